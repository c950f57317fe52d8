//! The NBD agent and mount end to end, with qemu-io and qemu-img as the clients: patterned
//! writes, aio bursts, flush, discard and write-zeroes through `standby agent`, points cut
//! through the running agent, every point failed over and compared with a model of what
//! qemu-io wrote, the same points read through `standby mount`, a writable mount that leaves
//! its point unchanged, and kill -9 of the agent in the middle of a burst.

mod common;

use common::{free_port, interrupt, qemu_io, sha, Env};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const OS: usize = 16 << 20;
const DATA: usize = 8 << 20;

impl Env {
    fn new() -> Env {
        Env::with(&[])
    }

    fn with(extra: &[&str]) -> Env {
        let env = Env::empty();
        env.ok(&["init", env.vault.to_str().unwrap()]);
        let os = format!("os=new:{}MiB", OS >> 20);
        let data = format!("data=new:{}MiB", DATA >> 20);
        let mut args = vec!["protect", "vm", "--disk", &os, "--disk", &data];
        args.extend_from_slice(extra);
        env.ok(&args);
        env
    }

    /// Poll `status` until the VM reaches `want` (60 s at most).
    fn wait_state(&self, want: &str, failure: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.state() != want {
            assert!(std::time::Instant::now() < deadline, "{failure}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    fn state(&self) -> String {
        let st: Value = serde_json::from_str(&self.ok(&["status", "--json"])).unwrap();
        st["vms"][0]["state"].as_str().unwrap().to_string()
    }

    /// Start a long-running command and wait for its first line of output (it is serving).
    fn serve(&self, args: &[&str]) -> Child {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(
            first.contains("nbd") || first.contains("on 127.0.0.1"),
            "{first}"
        );
        child
    }
}

/// What qemu-io wrote, applied to a byte model of each disk.
struct Model {
    disks: Vec<Vec<u8>>,
}

impl Model {
    /// Run qemu-io commands against `disk` through the agent and apply them to the model.
    /// Supported: `write -P p off len`, `aio_write -P p off len`, `write -z off len`,
    /// `discard off len`, `flush`, `aio_flush`.
    fn run(&mut self, addr: &str, disk: usize, cmds: &[&str]) {
        let name = ["os", "data"][disk];
        for c in cmds {
            let w: Vec<&str> = c.split_whitespace().collect();
            match w.as_slice() {
                ["write" | "aio_write", "-P", p, off, len] => {
                    let (off, len, p) = (num(off), num(len), num(p) as u8);
                    self.disks[disk][off..off + len].fill(p);
                }
                ["write", "-z", off, len] | ["discard", off, len] => {
                    let (off, len) = (num(off), num(len));
                    self.disks[disk][off..off + len].fill(0);
                }
                ["flush"] | ["aio_flush"] => {}
                other => panic!("model does not know {other:?}"),
            }
        }
        let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
        qemu_io(&format!("nbd://{addr}/{name}"), &cmds);
    }

    fn sums(&self) -> Vec<String> {
        self.disks.iter().map(|d| sha(d)).collect()
    }
}

fn num(s: &str) -> usize {
    let (n, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    if let Some(hex) = n.strip_prefix("0x") {
        usize::from_str_radix(hex, 16).unwrap() * mult
    } else {
        n.parse::<usize>().unwrap() * mult
    }
}

fn image_sums(dir: &Path) -> Vec<String> {
    ["os", "data"]
        .iter()
        .map(|n| sha(&std::fs::read(dir.join(format!("{n}.raw"))).unwrap()))
        .collect()
}

#[test]
fn qemu_io_through_the_agent_then_every_point_by_failover_and_by_mount() {
    let env = Env::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = env.serve(&["agent", "vm", "--listen", &addr]);
    let mut m = Model {
        disks: vec![vec![0; OS], vec![0; DATA]],
    };
    let mut expected = Vec::new();

    m.run(
        &addr,
        0,
        &[
            "write -P 0x11 0 1M",
            "aio_write -P 0x12 2M 64k",
            "aio_write -P 0x13 3M 128k",
            "aio_flush",
            "write -P 0x14 5M 4k",
        ],
    );
    m.run(&addr, 1, &["write -P 0x15 0 256k", "flush"]);
    let out = env.ok(&["point", "vm", "--app-consistent", "--name", "r1"]);
    assert!(out.contains("app-consistent"), "{out}");
    expected.push(("r1", m.sums()));

    m.run(
        &addr,
        0,
        &[
            "write -P 0x21 512k 1M",
            "discard 2M 64k",
            "write -z 3M 64k",
            "aio_write -P 0x22 6M 32k",
            "aio_write -P 0x23 7M 16k",
            "aio_flush",
        ],
    );
    m.run(&addr, 1, &["write -P 0x24 128k 512k"]);
    env.ok(&["point", "vm", "--name", "r2"]);
    expected.push(("r2", m.sums()));

    m.run(
        &addr,
        0,
        &["write -P 0x31 0 64k", "write -P 0x32 15M 1M", "flush"],
    );
    m.run(&addr, 1, &["discard 0 64k"]);
    // Status and points go through the running agent.
    let st: Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(st["vms"][0]["state"], "protected");
    assert!(st["vms"][0]["agent_pid"].as_u64().is_some());
    interrupt(&mut agent);
    // The clean stop processed everything: the latest state is the model's.
    let latest = m.sums();

    let pts: Value = serde_json::from_str(&env.ok(&["points", "vm", "--json"])).unwrap();
    let id_of = |name: &str| {
        pts["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["id"]
            .as_u64()
            .unwrap()
            .to_string()
    };
    let out = env.root.join("tf");
    for (name, sums) in &expected {
        let id = id_of(name);
        env.ok(&[
            "test-failover",
            "vm",
            "--point",
            &id,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(&image_sums(&out), sums, "failover of point {name}");
        env.ok(&["test-failover-cleanup", "vm"]);
        // The same point through `standby mount`, copied by qemu-img (sparse).
        let port = free_port();
        let maddr = format!("127.0.0.1:{port}");
        let mut mount = env.serve(&["mount", "vm", "--point", &id, "--listen", &maddr]);
        for (i, disk) in ["os", "data"].iter().enumerate() {
            let copy = env.root.join(format!("copy-{disk}.raw"));
            let st = Command::new("qemu-img")
                .args([
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &format!("nbd://{maddr}/{disk}"),
                    copy.to_str().unwrap(),
                ])
                .status()
                .unwrap();
            assert!(st.success());
            assert_eq!(
                sha(&std::fs::read(&copy).unwrap()),
                sums[i],
                "mount of point {name}, disk {disk}"
            );
            std::fs::remove_file(&copy).unwrap();
        }
        interrupt(&mut mount);
    }
    env.ok(&[
        "test-failover",
        "vm",
        "--point",
        "latest",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(image_sums(&out), latest);
    env.ok(&["test-failover-cleanup", "vm"]);

    // A writable mount: the client reads its own writes; the point never changes.
    let id = id_of("r1");
    let port = free_port();
    let maddr = format!("127.0.0.1:{port}");
    let mut mount = env.serve(&[
        "mount",
        "vm",
        "--point",
        &id,
        "--listen",
        &maddr,
        "--writable",
    ]);
    qemu_io(
        &format!("nbd://{maddr}/os"),
        &[
            "write -P 0x77 0 2M",
            "write -z 3M 64k",
            "read -P 0x77 0 2M",
            "read -P 0 3M 64k",
            "read -P 0x14 5M 4k",
        ],
    );
    interrupt(&mut mount);
    env.ok(&[
        "test-failover",
        "vm",
        "--point",
        &id,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        image_sums(&out),
        expected[0].1,
        "the writable mount changed its point"
    );
    env.ok(&["test-failover-cleanup", "vm"]);
    let leftovers: Vec<_> = std::fs::read_dir(env.vault.join("vms/vm"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".overlay"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the overlay is discarded when the mount ends"
    );
}

#[test]
fn kill_9_of_the_agent_mid_burst_loses_no_acknowledged_write() {
    let env = Env::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = env.serve(&["agent", "vm", "--listen", &addr]);
    // A long burst of distinct 64 KiB writes; qemu-io prints each one it saw acknowledged.
    let n = 200;
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for i in 0..n {
        c.args(["-c", &format!("write -P {} {} 64k", 1 + i % 250, i * 65536)]);
    }
    let mut io = c
        .arg(format!("nbd://{addr}/os"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = Vec::new();
    let mut lines = BufReader::new(io.stdout.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        if let Some(rest) = line.strip_prefix("wrote 65536/65536 bytes at offset ") {
            acked.push(rest.trim().parse::<usize>().unwrap() / 65536);
            if acked.len() == 60 {
                agent.kill().unwrap(); // SIGKILL, mid-burst
            }
        }
    }
    let _ = agent.kill(); // in case the burst ended before the kill
    agent.wait().unwrap();
    let _ = io.wait();
    assert!(
        acked.len() >= 60 && acked.len() < n,
        "the kill landed mid-burst ({} acknowledged)",
        acked.len()
    );
    // Restart: every acknowledged write is there, read through the agent.
    let mut agent = env.serve(&["agent", "vm", "--listen", &addr]);
    let cmds: Vec<String> = acked
        .iter()
        .map(|i| format!("read -P {} {} 64k", 1 + i % 250, i * 65536))
        .collect();
    qemu_io(&format!("nbd://{addr}/os"), &cmds);
    interrupt(&mut agent);
    // And in the replica: the latest failover holds them too.
    let out = env.root.join("tf");
    env.ok(&[
        "test-failover",
        "vm",
        "--point",
        "latest",
        "--out",
        out.to_str().unwrap(),
    ]);
    let img = std::fs::read(out.join("os.raw")).unwrap();
    for i in &acked {
        let want = (1 + i % 250) as u8;
        assert!(
            img[i * 65536..(i + 1) * 65536].iter().all(|&b| b == want),
            "acknowledged write {i} missing from the replica"
        );
    }
}

#[test]
fn a_full_cache_falls_back_to_the_dirty_bitmap_and_resyncs_without_losing_a_write() {
    let env = Env::with(&["--cache-capacity", "8KiB"]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Processing (which frees the log) starts 5 s after the agent does.
    let mut agent = env.serve(&["agent", "vm", "--listen", &addr, "--process-every", "5s"]);
    let mut m = Model {
        disks: vec![vec![0; OS], vec![0; DATA]],
    };
    let cmds: Vec<String> = (0..64)
        .map(|i| format!("write -P {} {} 64k", 1 + i % 200, (i * 3 % 64) * 65536 * 3))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    m.run(&addr, 0, &cmds);
    m.run(
        &addr,
        1,
        &["write -P 0x42 0 2M", "discard 512k 64k", "flush"],
    );
    // The VM kept running; its writes were tracked, not replicated.
    assert_eq!(env.state(), "resync-required");
    // Once processing frees the log, the dirty blocks are shipped and protection resumes.
    env.wait_state("protected", "the resync never finished");
    // Reads through the agent and the replica agree with what the VM wrote.
    let latest = m.sums();
    interrupt(&mut agent);
    let out = env.root.join("tf");
    env.ok(&[
        "test-failover",
        "vm",
        "--point",
        "latest",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        image_sums(&out),
        latest,
        "a write is missing from the replica after the resync"
    );
}

#[test]
fn an_agent_killed_while_the_cache_was_full_resyncs_everything_on_restart() {
    let env = Env::with(&["--cache-capacity", "8KiB"]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = env.serve(&["agent", "vm", "--listen", &addr, "--process-every", "1h"]);
    let mut m = Model {
        disks: vec![vec![0; OS], vec![0; DATA]],
    };
    // qemu-io writes constant patterns, which compress ~200:1: many writes fill 8 KiB.
    let cmds: Vec<String> = (0..48)
        .map(|i| format!("write -P {} {} 64k", 0x51 + i % 7, i * 65536 * 2))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    m.run(&addr, 0, &cmds);
    m.run(&addr, 0, &["write -P 0x52 8M 1M", "flush"]);
    assert_eq!(env.state(), "resync-required");
    agent.kill().unwrap(); // the dirty bitmap dies with it
    agent.wait().unwrap();
    let mut agent = env.serve(&["agent", "vm", "--listen", &addr, "--process-every", "1s"]);
    env.wait_state("protected", "the full resync never finished");
    interrupt(&mut agent);
    let out = env.root.join("tf");
    env.ok(&[
        "test-failover",
        "vm",
        "--point",
        "latest",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(image_sums(&out), m.sums());
}

/// Wait (10 s at most) for nbdfuse to show its export as a file.
fn wait_for_file(dev: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !dev.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Unmounts (and ends FUSE mounts) on drop, so a failing test leaves no mount behind.
struct Unmount(Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = Command::new("umount").arg(p).status();
            let _ = Command::new("fusermount3")
                .args(["-u", p.to_str().unwrap()])
                .status();
        }
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// nbdfuse exposes an export as a file (the kernel's nbd driver is not needed): a
/// filesystem made through the agent, mounted back from a recovery point, read-only.
#[test]
fn a_filesystem_written_through_the_agent_mounts_from_a_recovery_point() {
    let env = Env::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = env.serve(&["agent", "vm", "--listen", &addr]);
    let (fuse, fs) = (env.root.join("fuse"), env.root.join("fs"));
    std::fs::create_dir_all(&fuse).unwrap();
    std::fs::create_dir_all(&fs).unwrap();
    let dev = fuse.join("nbd");
    {
        let mut nbdfuse = Command::new("nbdfuse")
            .args([fuse.to_str().unwrap(), &format!("nbd://{addr}/os")])
            .spawn()
            .unwrap();
        let _guard = Unmount(vec![fuse.clone(), fs.clone()]);
        wait_for_file(&dev);
        run("mkfs.ext4", &["-q", "-F", dev.to_str().unwrap()]);
        run(
            "mount",
            &["-o", "loop", dev.to_str().unwrap(), fs.to_str().unwrap()],
        );
        std::fs::write(fs.join("hello.txt"), b"kept by standby\n").unwrap();
        std::fs::write(fs.join("big.bin"), vec![0x5au8; 3 << 20]).unwrap();
        run("umount", &[fs.to_str().unwrap()]);
        run("fusermount3", &["-u", fuse.to_str().unwrap()]);
        let _ = nbdfuse.wait();
    }
    env.ok(&["point", "vm", "--app-consistent", "--name", "fs"]);
    // Later writes must not show up in the point.
    qemu_io(&format!("nbd://{addr}/os"), &["write -P 0xee 0 1M"]);
    interrupt(&mut agent);

    let port = free_port();
    let maddr = format!("127.0.0.1:{port}");
    let mut mount = env.serve(&[
        "mount",
        "vm",
        "--point",
        "latest-app-consistent",
        "--listen",
        &maddr,
    ]);
    {
        let mut nbdfuse = Command::new("nbdfuse")
            .args(["-r", fuse.to_str().unwrap(), &format!("nbd://{maddr}/os")])
            .spawn()
            .unwrap();
        let _guard = Unmount(vec![fuse.clone(), fs.clone()]);
        wait_for_file(&dev);
        run(
            "mount",
            &["-o", "ro,loop", dev.to_str().unwrap(), fs.to_str().unwrap()],
        );
        assert_eq!(
            std::fs::read(fs.join("hello.txt")).unwrap(),
            b"kept by standby\n"
        );
        assert_eq!(
            std::fs::read(fs.join("big.bin")).unwrap(),
            vec![0x5au8; 3 << 20]
        );
        run("umount", &[fs.to_str().unwrap()]);
        run("fusermount3", &["-u", fuse.to_str().unwrap()]);
        let _ = nbdfuse.wait();
    }
    // nbdcopy keeps the copy sparse: block status reports the holes.
    let copy = env.root.join("copy.raw");
    run(
        "nbdcopy",
        &[&format!("nbd://{maddr}/os"), copy.to_str().unwrap()],
    );
    interrupt(&mut mount);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&copy).unwrap();
    assert_eq!(meta.len(), OS as u64);
    assert!(
        meta.blocks() * 512 < OS as u64 / 2,
        "nbdcopy wrote {} bytes of a {} byte disk",
        meta.blocks() * 512,
        OS
    );
}
