//! The recovery rows of `users`: what a copy in flight lets DR commands do (RPO, a point,
//! a test failover, checked bit-exact), failover, and reads of a mounted point.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------
// during: RPO, a point and a test failover while a bulk copy runs.

/// `vm.json`'s point id and disks (path, sha256).
fn manifest(dir: &Path) -> Res<(u64, Vec<(PathBuf, String)>)> {
    let text = std::fs::read_to_string(dir.join("vm.json"))
        .map_err(|e| format!("{}: {e}", dir.join("vm.json").display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("vm.json: {e}"))?;
    let id = v["point"]["id"]
        .as_u64()
        .ok_or_else(|| "vm.json names no point id".to_string())?;
    let disks = v["disks"]
        .as_array()
        .ok_or_else(|| "vm.json lists no disks".to_string())?
        .iter()
        .map(|d| {
            (
                PathBuf::from(d["path"].as_str().unwrap_or_default()),
                d["sha256"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    Ok((id, disks))
}

/// Every disk's sha256 equals what `vm.json` says.
fn check_manifest(disks: &[(PathBuf, String)]) -> Res<()> {
    for (path, want) in disks {
        let got = deploy::sha256(path)?;
        if &got != want {
            return Err(format!(
                "{}: sha256 {got}, vm.json says {want}",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Serve `--point ID` with `standby mount` and compare it with `image`.
fn compare_with_mount(d: &Deployment, id: u64, image: &Path, timeout: Duration) -> Res<()> {
    let addr = deploy::free_addr([127, 0, 0, 1]);
    let (listen, point) = (addr.to_string(), id.to_string());
    let mut m = deploy::Proc::spawn(
        "standby mount",
        deploy::standby_bin(),
        &["mount", VM, "--point", &point, "--listen", &listen],
        Some(&d.vault),
        &d.dir.join("mount.log"),
    );
    m.wait_listening(addr, timeout)?;
    compare(image.to_str().unwrap(), &url(addr))?;
    m.stop(STOP)
}

pub fn during(kind: Kind, src: &Path, s: &Sizes) {
    let label = kind.label();
    let rpo_case = format!("RPO during the bulk copy ({label})");
    let tf_case = format!("test failover mid-copy, then bit-exact check ({label})");
    let point_case = format!("`standby point` mid-copy ({label})");
    let tf_target = "completes, bit-exact";
    guarded(&rpo_case.clone(), "< 5 s", || {
        let dir = common::scratch();
        let mut d = Deployment::start(kind, dir.path(), s.bulk)?;
        let target = url(d.addr);
        let src_owned = src.to_path_buf();
        // A VM in service has recovery points already (a fresh two-site VM has none until
        // its policy's first interval): the drill below fails over to the newest.
        // (Once the initial copy has reached the target: a point cut before the agent's
        // first resync ends would fall inside its window, and be dropped.)
        if kind == Kind::TwoSite {
            let until = Instant::now() + s.dr_timeout;
            loop {
                let st = d.status()?;
                let r = &st["remote"];
                if r["agent_connected"] == true
                    && r["resync_required"] == false
                    && r["behind_records"] == 0
                    && r["agent_journal_bytes"] == 0
                {
                    break;
                }
                if Instant::now() > until {
                    return Err(format!("the target never caught up: {st}"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        standby(&d.vault, &["point", VM], s.dr_timeout)?;
        // The RPO, every 200 ms, while the copy runs.
        let stop = Arc::new(AtomicBool::new(false));
        let copy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let r = convert(&src_owned, &target);
                stop.store(true, Ordering::SeqCst);
                r
            })
        };
        let sampler = {
            let (stop, vault) = (stop.clone(), d.vault.clone());
            std::thread::spawn(move || {
                let (mut rpo, mut errors) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    match standby(&vault, &["status", VM, "--json"], Duration::from_secs(10))
                        .and_then(|o| {
                            serde_json::from_str::<serde_json::Value>(&o).map_err(|e| e.to_string())
                        }) {
                        Ok(v) => match v["vms"][0]["rpo_seconds"].as_f64() {
                            Some(r) => rpo.push(r),
                            None => errors.push("no rpo_seconds".to_string()),
                        },
                        Err(e) => errors.push(e),
                    }
                    std::thread::sleep(Duration::from_millis(200).saturating_sub(t.elapsed()));
                }
                (rpo, errors)
            })
        };
        // The middle of the copy: half of what a copy of this size took in the bulk row,
        // else a second.
        let key = format!("bulk/{label}/random");
        let half = common::median_rate(&key)
            .map(|r| Duration::from_secs_f64(s.bulk as f64 / r / 2.0))
            .unwrap_or(Duration::from_secs(1));
        std::thread::sleep(half);
        // The test failover first (a drill in the middle of the copy), then a point: a
        // point applies the backlog before it answers, which takes longer than what is
        // left of a fast copy.
        let copy_running = !copy.is_finished();
        let t = Instant::now();
        let tf = standby(
            &d.vault,
            &["test-failover", VM, "--point", "latest-processed"],
            s.dr_timeout,
        );
        let tf_took = t.elapsed();
        let t = Instant::now();
        let point = standby(&d.vault, &["point", VM], s.dr_timeout);
        let point_took = t.elapsed();
        let copied = copy
            .join()
            .map_err(|_| "copy thread panicked".to_string())??;
        stop.store(true, Ordering::SeqCst);
        let (mut rpo, errors) = sampler.join().map_err(|_| "sampler panicked")?;
        compare(src.to_str().unwrap(), &url(d.addr))?;
        match point {
            Ok(_) => push(
                &point_case,
                ms(point_took),
                String::new(),
                String::new(),
                "—",
                None,
            ),
            Err(e) => failed(&point_case, "—", &e),
        }
        if rpo.is_empty() {
            failed(
                &rpo_case,
                "< 5 s",
                &format!(
                    "no RPO sample: {}",
                    errors.first().cloned().unwrap_or_default()
                ),
            );
        } else {
            rpo.sort_by(|a, b| a.total_cmp(b));
            let max = rpo[rpo.len() - 1];
            push(
                &rpo_case,
                format!(
                    "median {:.2} s, max {max:.2} s ({} samples over {:.1} s{})",
                    rpo[rpo.len() / 2],
                    rpo.len(),
                    copied.as_secs_f64(),
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(", {} status calls failed", errors.len())
                    }
                ),
                String::new(),
                String::new(),
                "< 5 s",
                Some(max < 5.0 && errors.is_empty()),
            );
        }
        let tf_result = (|| -> Res<String> {
            tf?;
            let st = d.status()?;
            let tdir = st["test_failover"]["dir"]
                .as_str()
                .ok_or("status shows no test failover")?
                .to_string();
            let (id, disks) = manifest(Path::new(&tdir))?;
            check_manifest(&disks)?;
            if kind == Kind::Embedded {
                d.stop_agent(STOP)?;
            }
            for (path, _) in &disks {
                compare_with_mount(&d, id, path, s.dr_timeout)?;
            }
            standby(&d.vault, &["test-failover-cleanup", VM], s.dr_timeout)?;
            Ok(format!(
                "{} ({}), point {id} bit-exact",
                ms(tf_took),
                if copy_running {
                    "started mid-copy"
                } else {
                    "started after the copy ended"
                }
            ))
        })();
        match tf_result {
            Ok(what) => push(
                &tf_case,
                what,
                String::new(),
                String::new(),
                tf_target,
                Some(true),
            ),
            Err(e) => failed(&tf_case, tf_target, &e),
        }
        d.stop(STOP)?;
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// failover and mount reads: a VM holding the system files with random writes over them.

pub fn failover_and_mount(
    system: &Path,
    s: &Sizes,
    pool: &[u8],
    scratch: &Path,
    do_failover: bool,
    do_mount: bool,
) {
    let case = "`standby failover --point latest`, page cache dropped (embedded)";
    let key = "failover";
    let mut mounted: Option<(Deployment, tempfile::TempDir, u64, PathBuf, PathBuf)> = None;
    guarded(case, "≥ 0.8", || {
        let dir = common::scratch();
        let mut d = Deployment::start(Kind::Embedded, dir.path(), s.bulk)?;
        // The system files, a point, then 4 KiB random writes over 1/64 of the disk.
        convert(system, &url(d.addr))?;
        let t = Instant::now();
        standby(&d.vault, &["point", VM], STOP)?;
        verbose(&format!("point after the copy: {:?}", t.elapsed()));
        let pattern = Pattern::RandomWrite {
            req: 4096,
            total: s.bulk / 64,
            disk: s.bulk,
            flush_every: FLUSH_EVERY,
        };
        client::drive(d.addr, s.bulk, pattern, pool, DEPTH, false);
        d.stop(STOP)?;
        let model = scratch.join("model-failover.raw");
        std::fs::copy(system, &model).map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&model)
                .map_err(|e| e.to_string())?;
            for op in client::ops(pattern, pool) {
                if let client::Op::Write(at, data) = op {
                    f.write_all_at(data, at).map_err(|e| e.to_string())?;
                }
            }
        }
        compare(model.to_str().unwrap(), d.disk.to_str().unwrap())?;
        let out = d.vault.join("failover");
        let failover = |check: bool| -> Res<Duration> {
            let _ = std::fs::remove_dir_all(&out);
            if !deploy::drop_caches() {
                return Err("cannot drop the page cache (needs root)".into());
            }
            let t = Instant::now();
            standby(&d.vault, &["failover", VM, "--point", "latest"], STOP)?;
            let took = t.elapsed();
            if check {
                let st = d.status()?;
                let fdir = st["failover"]["dir"]
                    .as_str()
                    .ok_or("status shows no failover")?
                    .to_string();
                let (_, disks) = manifest(Path::new(&fdir))?;
                check_manifest(&disks)?;
                compare(model.to_str().unwrap(), disks[0].0.to_str().unwrap())?;
            }
            Ok(took)
        };
        let floor_out = scratch.join("floor-failover.raw");
        let floor = |check: bool| -> Res<Duration> {
            let _ = std::fs::remove_file(&floor_out);
            if !deploy::drop_caches() {
                return Err("cannot drop the page cache (needs root)".into());
            }
            let t = Instant::now();
            deploy::run(
                "qemu-img",
                &[
                    "convert",
                    "-t",
                    "writeback",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    model.to_str().unwrap(),
                    floor_out.to_str().unwrap(),
                ],
                None,
                STOP,
            )?;
            let took = t.elapsed();
            if check {
                compare(model.to_str().unwrap(), floor_out.to_str().unwrap())?;
            }
            Ok(took)
        };
        failover(true)?;
        if do_failover {
            floor(true)?;
            common::paired(
                key,
                &format!("floor/{key}"),
                s.bulk,
                s.iters,
                || or_panic(failover(false)),
                || or_panic(floor(false)),
            );
            rate_row(case, key, 0.8);
        }
        let st = d.status()?;
        let fdir = st["failover"]["dir"]
            .as_str()
            .ok_or("status shows no failover")?
            .to_string();
        let (id, disks) = manifest(Path::new(&fdir))?;
        let _ = std::fs::remove_file(&floor_out);
        // Dropped in order: the deployment, then its directory.
        mounted = Some((d, dir, id, disks[0].0.clone(), model));
        Ok(())
    });
    if !do_mount {
        return;
    }
    let Some((d, _dir, id, image, model)) = mounted else {
        failed("mount reads", "≥ 0.8", "the failover setup failed");
        return;
    };
    let d = &d;
    for req in [64u32 << 10, 1 << 20] {
        let case = format!(
            "mount reads, {} KiB requests, 16 in flight (embedded)",
            req >> 10
        );
        let key = format!("mount/{}k", req >> 10);
        guarded(&case.clone(), "≥ 0.8", || {
            let addr = deploy::free_addr([127, 0, 0, 1]);
            let (listen, point) = (addr.to_string(), id.to_string());
            let mut m = deploy::Proc::spawn(
                "standby mount",
                deploy::standby_bin(),
                &["mount", VM, "--point", &point, "--listen", &listen],
                Some(&d.vault),
                &d.dir.join("mount.log"),
            );
            m.wait_listening(addr, s.dr_timeout)?;
            let q = QemuNbd::start(&image, true, &d.dir.join("qemu-nbd-r.log"))?;
            let pattern = Pattern::SeqRead { req, disk: s.bulk };
            compare(model.to_str().unwrap(), &url(addr))?;
            let (_, a) = client::drive(addr, s.bulk, pattern, &[], DEPTH, true);
            let (_, b) = client::drive(q.addr, s.bulk, pattern, &[], DEPTH, true);
            if a != b {
                return Err("the mount serves other bytes than qemu-nbd".into());
            }
            common::paired(
                &key,
                &format!("floor/{key}"),
                s.bulk,
                s.iters,
                || client::drive(addr, s.bulk, pattern, &[], DEPTH, false).0,
                || client::drive(q.addr, s.bulk, pattern, &[], DEPTH, false).0,
            );
            rate_row(&case, &key, 0.8);
            m.stop(STOP)
        });
    }
}
