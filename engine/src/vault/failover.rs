//! Failover and test failover: a recovery point (or any moment inside the window) of every
//! disk of a VM, materialized as sparse raw images with a `vm.json` manifest naming the
//! target resource group, network, subnet and availability set.
//!
//! Invariant: the images are written into a temporary directory beside the destination,
//! synced, and renamed into place before the catalog records the failover; a crash leaves
//! the previous failover (or none) intact.

use super::{
    now_us, resolve_existing, spec::rfc3339, spec::rfc3339_micros, FailoverRecord, PointSpec,
    Progress, Vault, VmState,
};
use crate::error::{Error, IoContext, Result};
use crate::process::Processor;
use crate::replica::{PointInfo, PointKind, View};
use crate::vfs::Vfs;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One materialized disk.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FailoverDisk {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub sha256: String,
}

/// What a failover produced.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FailoverReport {
    pub vm: String,
    pub test: bool,
    /// The point as it was asked for (`latest`, an id, `seq:N`, `time:…`).
    pub requested: PointSpec,
    /// The point the disks show: the one the spec named, or for a `seq:`/`time:` moment
    /// the point at exactly that seq if there is one.
    pub point: Option<PointInfo>,
    pub seq: u64,
    pub time_us: u64,
    pub dir: PathBuf,
    pub manifest: PathBuf,
    pub disks: Vec<FailoverDisk>,
    pub resource_group: String,
    pub network: String,
    pub subnet: String,
    pub availability_set: Option<String>,
    /// Source network to target network, as written into `vm.json`; for a test failover
    /// every target is the isolated network.
    pub network_mapping: std::collections::BTreeMap<String, String>,
}

impl Vault {
    /// Fail a VM over (or, with `test`, bring up a test failover in an isolated network
    /// while replication continues) to the point `spec` names.
    pub fn failover(
        &mut self,
        vm: &str,
        spec: PointSpec,
        out: Option<&Path>,
        test: bool,
        test_network: Option<&str>,
        progress: &mut dyn Progress,
    ) -> Result<FailoverReport> {
        let _lock = self.lock_vm(vm)?;
        let rec = self.live_vm(vm)?.clone();
        check_failover(vm, &rec, test)?;
        let (view, point) = self.resolve_point(vm, &rec, spec.clone())?;
        self.failover_from_view(vm, &view, point, spec, out, test, test_network, progress)
    }

    /// The failover of `vm` to `view` (showing `point`, asked for as `spec`), which the
    /// caller took from the VM's replica: under the VM's lock, or from the live views of
    /// the process that owns the VM. Writes the images and `vm.json`, and records it.
    #[allow(clippy::too_many_arguments)]
    pub fn failover_from_view(
        &mut self,
        vm: &str,
        view: &View,
        point: Option<PointInfo>,
        spec: PointSpec,
        out: Option<&Path>,
        test: bool,
        test_network: Option<&str>,
        progress: &mut dyn Progress,
    ) -> Result<FailoverReport> {
        let rec = self.live_vm(vm)?.clone();
        check_failover(vm, &rec, test)?;
        let rg = rec.target.resource_group.clone();
        // A test failover never names a production network: the target network and every
        // mapping's target become their isolated twins (NET-test, or the --network given).
        let isolated = |n: &str| match test_network {
            Some(t) => t.to_string(),
            None => format!("{n}-test"),
        };
        let network = if test {
            isolated(&rec.target.network)
        } else {
            rec.target.network.clone()
        };
        let network_mapping = rec
            .network_mapping
            .iter()
            .map(|(s, d)| (s.clone(), if test { isolated(d) } else { d.clone() }))
            .collect();
        let dir = match out {
            Some(d) => d.to_path_buf(),
            None => self
                .root
                .join(if test { "test-failover" } else { "failover" })
                .join(&rg)
                .join(vm),
        };
        let dir = std::path::absolute(&dir).map_err(|e| Error::io(&dir, e))?;
        let parent = dir
            .parent()
            .ok_or_else(|| Error::Invalid(format!("{} has no parent directory", dir.display())))?;
        let vfs = self.vfs.clone();
        vfs.create_dir_all(parent).at(parent)?;
        if vfs.exists(&dir) && !self.owns_output(&rec, &dir) {
            return Err(Error::Conflict(format!(
                "{} already exists; choose another --out or remove it",
                dir.display()
            )));
        }
        let tmp = parent.join(format!(".{}.partial-{}", vm, std::process::id()));
        let disks = materialize_disks(&*vfs, view, &rec.disks, &tmp, &dir, progress)?;
        let report = FailoverReport {
            vm: vm.to_string(),
            test,
            requested: spec,
            point,
            seq: view.seq(),
            time_us: view.time_us(),
            manifest: dir.join("vm.json"),
            dir: dir.clone(),
            disks,
            resource_group: rg,
            network,
            subnet: rec.target.subnet.clone(),
            availability_set: rec.target.availability_set.clone(),
            network_mapping,
        };
        publish(&*vfs, &tmp, &dir, vm_json(&report).as_bytes())?;
        let frec = FailoverRecord {
            point_id: report.point.as_ref().map(|p| p.id),
            seq: report.seq,
            dir: dir.to_string_lossy().into_owned(),
            network: report.network.clone(),
            time_us: now_us(),
            disks: None,
            fenced_us: None,
        };
        self.update(|c| {
            let vmrec = c.vm_mut(vm)?;
            if test {
                if vmrec.test_failover.is_some() {
                    // Another test failover (through the VM's owner) got there first.
                    return Err(Error::Conflict(format!(
                        "a test failover of VM '{vm}' is already up; run `standby test-failover-cleanup {vm}` first"
                    )));
                }
                vmrec.test_failover = Some(frec);
                vmrec.state = VmState::TestFailover;
            } else {
                vmrec.failover = Some(frec);
                vmrec.state = VmState::FailedOver;
            }
            Ok(())
        })?;
        Ok(report)
    }

    /// The view `spec` names (the caller holds the VM's lock), and the point it shows: the
    /// point `spec` names, or for a `seq:`/`time:` moment the point cut at exactly that seq.
    pub(crate) fn resolve_point(
        &self,
        vm: &str,
        rec: &super::VmRecord,
        spec: PointSpec,
    ) -> Result<(View, Option<PointInfo>)> {
        let (view, points) = self.resolve_view_and_points(vm, rec, spec)?;
        let point = point_at(&view, points);
        Ok((view, point))
    }

    /// The view `spec` names (the caller holds the VM's lock). `latest` first processes
    /// everything pending and cuts a point, unless the VM is failed over.
    pub(crate) fn resolve_view(
        &self,
        vm: &str,
        rec: &super::VmRecord,
        spec: PointSpec,
    ) -> Result<View> {
        Ok(self.resolve_view_and_points(vm, rec, spec)?.0)
    }

    fn resolve_view_and_points(
        &self,
        vm: &str,
        rec: &super::VmRecord,
        spec: PointSpec,
    ) -> Result<(View, Vec<PointInfo>)> {
        let policy = self.vm_policy(vm)?;
        let mut replica = self.open_replica(vm)?;
        if spec == PointSpec::Latest
            && rec.state != VmState::FailedOver
            && rec.unprotected.is_none()
        {
            // Lowest RPO: process everything pending and cut a point at the end.
            let cache = self.open_cache(vm)?;
            let mut p = Processor::new(cache.clone(), replica, policy)?;
            p.run_pass()?;
            if p.replica().changed_since_last_point() {
                p.cut_point(PointKind::CrashConsistent, None)?;
            }
            replica = p.into_replica();
            cache.close()?;
        }
        let view = view_of(&replica, vm, &spec, &|| self.logged_seq(vm))?;
        Ok((view, replica.points()))
    }

    /// The newest durable seq in a VM's change log, if it can be read.
    fn logged_seq(&self, vm: &str) -> Option<u64> {
        let cache = self.open_cache(vm).ok()?;
        let seq = cache.durable_seq();
        let _ = cache.close();
        Some(seq)
    }

    /// A point of a VM for mounting: its view, held with the VM's lock until dropped.
    pub fn mount(&self, vm: &str, spec: PointSpec) -> Result<MountHandle> {
        let lock = self.lock_vm(vm)?;
        let rec = self.live_vm(vm)?.clone();
        let view = Arc::new(self.resolve_view(vm, &rec, spec)?);
        Ok(MountHandle {
            // The disks of that state (a disk added later is not in an older point).
            disks: view.disks().iter().map(|d| d.name.clone()).collect(),
            view,
            scratch: self.vm_dir(vm),
            _lock: lock,
        })
    }

    /// Whether `dir` is this VM's own earlier failover output (so it may be replaced).
    fn owns_output(&self, rec: &super::VmRecord, dir: &Path) -> bool {
        rec.failover
            .as_ref()
            .is_some_and(|f| Path::new(&f.dir) == dir)
    }

    /// End a failover: it becomes final, and the VM's recovery points are deleted.
    pub fn failover_commit(&mut self, vm: &str) -> Result<()> {
        let rec = self.live_vm(vm)?;
        if rec.state != VmState::FailedOver {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is not failed over; run `standby failover {vm} --point …` first"
            )));
        }
        let vm_dir = self.vm_dir(vm);
        let lock = self.lock_vm(vm)?;
        self.update(|c| {
            c.vm_mut(vm)?.committed = true;
            Ok(())
        })?;
        drop(lock);
        if vm_dir.exists() {
            std::fs::remove_dir_all(&vm_dir).at(&vm_dir)?;
        }
        Ok(())
    }

    /// Remove a test failover's disks and return the VM to plain protection.
    pub fn test_failover_cleanup(&mut self, vm: &str) -> Result<PathBuf> {
        let rec = self.catalog.vm(vm)?;
        let Some(t) = rec.test_failover.clone() else {
            return Err(Error::Conflict(format!(
                "VM '{vm}' has no test failover to clean up"
            )));
        };
        let dir = PathBuf::from(&t.dir);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).at(&dir)?;
        }
        self.update(|c| {
            let rec = c.vm_mut(vm)?;
            rec.test_failover = None;
            if rec.state == VmState::TestFailover {
                rec.state = VmState::Protected;
            }
            Ok(())
        })?;
        Ok(dir)
    }
}

/// Materialize every disk of `view` as `NAME.raw` into a fresh `tmp` (removed first if a
/// crashed run left it), each hashed as it is written; the disks' paths in the result are
/// where [`publish`] puts them, under `dir`. On error `tmp` is removed again.
pub fn materialize_disks(
    vfs: &dyn Vfs,
    view: &View,
    disks: &[super::DiskRecord],
    tmp: &Path,
    dir: &Path,
    progress: &mut dyn Progress,
) -> Result<Vec<FailoverDisk>> {
    if vfs.exists(tmp) {
        vfs.remove_dir_all(tmp).at(tmp)?;
    }
    vfs.create_dir_all(tmp).at(tmp)?;
    // The disks of the view's state, at their size then: a disk added later is not in an
    // older point, and a grown one has its size at that point.
    let disks = &disks[..disks.len().min(view.disks().len())];
    let total: u64 = (0..disks.len())
        .map(|i| view.allocated_bytes(i as u16).unwrap_or(0))
        .sum();
    progress.begin("materializing", total);
    let mut out = Vec::new();
    let result = disks.iter().enumerate().try_for_each(|(i, d)| {
        let size_bytes = view.disks().get(i).map_or(d.size_bytes, |v| v.size_bytes);
        let name = format!("{}.raw", d.name);
        let path = tmp.join(&name);
        let stats =
            view.materialize_at_with(vfs, i as u16, &path, true, &mut |n| progress.advance(n))?;
        let sha = stats
            .sha256
            .ok_or_else(|| Error::Invalid("materialize returned no sha256".into()))?;
        out.push(FailoverDisk {
            name: d.name.clone(),
            path: dir.join(&name),
            size_bytes,
            allocated_bytes: stats.written_bytes,
            sha256: hex(&sha),
        });
        Ok(())
    });
    progress.end();
    if let Err(e) = result {
        let _ = vfs.remove_dir_all(tmp);
        return Err(e);
    }
    Ok(out)
}

/// Put a materialized failover in place: write `manifest` as `tmp/vm.json`, sync it and
/// `tmp`, then replace `dir` (an earlier failover of the same VM, if any) with `tmp` and
/// sync their parent. A crash leaves the earlier failover, or none, or the new one whole,
/// and at worst a `tmp` beside them that the next run removes.
pub fn publish(vfs: &dyn Vfs, tmp: &Path, dir: &Path, manifest: &[u8]) -> Result<()> {
    let parent = dir
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no parent directory", dir.display())))?;
    let mpath = tmp.join("vm.json");
    let f = vfs.create_new(&mpath).at(&mpath)?;
    f.write_all_at(manifest, 0).at(&mpath)?;
    f.sync_data().at(&mpath)?;
    vfs.sync_dir(tmp).at(tmp)?;
    if vfs.exists(dir) {
        vfs.remove_dir_all(dir).at(dir)?;
    }
    vfs.rename_dir(tmp, dir).at(dir)?;
    vfs.sync_dir(parent).at(parent)?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The view `spec` names in `replica` (`latest`: its newest point; the caller processes
/// first to make that the lowest-RPO one). `logged` tells the newest seq the VM's log
/// holds, for saying what is wrong with a moment past what was processed.
pub fn view_of(
    replica: &crate::replica::Replica,
    vm: &str,
    spec: &PointSpec,
    logged: &dyn Fn() -> Option<u64>,
) -> Result<View> {
    let spec = spec.clone();
    Ok(match spec {
        PointSpec::Latest => {
            let p = replica
                .latest_point()
                .ok_or_else(|| super::unknown_point(vm, "yet"))?;
            replica.view_point(p.id)?
        }
        PointSpec::Seq(seq) => {
            if seq > replica.applied_seq() {
                return Err(past_newest(vm, replica, seq, logged));
            }
            replica
                .view_seq(seq)
                .map_err(|e| outside_window(replica, vm, &spec, e))?
        }
        PointSpec::Time(t) => {
            let now = now_us();
            if t > now {
                return Err(Error::Invalid(format!(
                    "time {} is in the future (it is now {}); the newest write of VM '{vm}' is {}",
                    rfc3339_micros(t),
                    rfc3339_micros(now),
                    newest_write(vm, replica, logged)
                )));
            }
            replica
                .view_time(t)
                .map_err(|e| outside_window(replica, vm, &spec, e))?
        }
        other => replica.view_point(resolve_existing(replica, vm, other)?.id)?,
    })
}

/// The point a view shows: the one it was opened by, or the point cut at exactly its seq.
pub fn point_at(view: &View, points: Vec<PointInfo>) -> Option<PointInfo> {
    match view.point() {
        Some(p) => Some(p.clone()),
        None => points.into_iter().find(|p| p.seq == view.seq()),
    }
}

/// The newest record of a VM's replica, in words, and any the log holds beyond it.
fn newest_write(
    vm: &str,
    replica: &crate::replica::Replica,
    logged: &dyn Fn() -> Option<u64>,
) -> String {
    let applied = replica.applied_seq();
    let mut s = format!(
        "seq {applied} at {}",
        rfc3339_micros(replica.applied_time_us())
    );
    if let Some(logged) = logged().filter(|&l| l > applied) {
        s.push_str(&format!(
            " (seq {logged} is logged but not processed yet: `standby process {vm}`)"
        ));
    }
    s
}

/// `seq:N` past what the replica holds: past the newest write, or not processed yet.
fn past_newest(
    vm: &str,
    replica: &crate::replica::Replica,
    seq: u64,
    logged: &dyn Fn() -> Option<u64>,
) -> Error {
    let applied = replica.applied_seq();
    match logged() {
        Some(logged) if logged >= seq => Error::NotFound(format!(
            "seq {seq} of VM '{vm}' is logged but not processed yet (processed up to seq {applied}): run `standby process {vm}` first"
        )),
        logged => Error::NotFound(format!(
            "seq {seq} is past the newest write of VM '{vm}' (seq {})",
            logged.unwrap_or(applied).max(applied)
        )),
    }
}

/// Whether `rec` can take a (test) failover now.
fn check_failover(vm: &str, rec: &super::VmRecord, test: bool) -> Result<()> {
    if test {
        if rec.test_failover.is_some() {
            return Err(Error::Conflict(format!(
                    "a test failover of VM '{vm}' is already up; run `standby test-failover-cleanup {vm}` first"
                )));
        }
        if rec.state == VmState::FailedOver {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is failed over; a test failover needs a protected VM"
            )));
        }
    } else if rec.test_failover.is_some() {
        return Err(Error::Conflict(format!(
                "a test failover of VM '{vm}' is up; run `standby test-failover-cleanup {vm}` before a failover"
            )));
    }
    Ok(())
}

/// A mounted point: its view and disk names; the VM stays locked while this lives.
pub struct MountHandle {
    pub view: Arc<View>,
    pub disks: Vec<String>,
    /// Where writable mounts keep their throw-away overlays.
    pub scratch: PathBuf,
    _lock: crate::util::lock::VaultLock,
}

/// Say plainly that a `seq:`/`time:` moment cannot be recovered, and what can.
fn outside_window(
    replica: &crate::replica::Replica,
    vm: &str,
    spec: &PointSpec,
    e: Error,
) -> Error {
    if !matches!(e, Error::NotFound(_) | Error::Invalid(_)) {
        return e;
    }
    let oldest = replica
        .points()
        .first()
        .map(|p| format!("; the oldest point is {} at {}", p.id, rfc3339(p.time_us)))
        .unwrap_or_default();
    let ranges: Vec<String> = replica
        .viewable_ranges()
        .iter()
        .map(|(a, b)| format!("seq:{a}..seq:{b}"))
        .collect();
    Error::NotFound(format!(
        "VM '{vm}' cannot be recovered to {spec}: it is outside the any-moment window (recoverable: {}{oldest}); pick a point from `standby points {vm}`",
        if ranges.is_empty() { "the points only".to_string() } else { ranges.join(", ") }
    ))
}

/// sha256 of a (sparse) image over its full virtual size; holes hash as zeros without
/// being read.
pub fn sha256_sparse(path: &Path, size: u64) -> Result<String> {
    const BUF: usize = 1 << 20;
    let f = std::fs::File::open(path).at(path)?;
    let ranges = crate::fsutil::data_ranges(&f, size).at(path)?;
    let zeros = vec![0u8; BUF];
    let mut buf = vec![0u8; BUF];
    let mut h = Sha256::new();
    let mut at = 0u64;
    let zero_run = |h: &mut Sha256, mut n: u64| {
        while n > 0 {
            let k = n.min(BUF as u64) as usize;
            h.update(&zeros[..k]);
            n -= k as u64;
        }
    };
    for (s, e) in ranges {
        zero_run(&mut h, s - at);
        let mut p = s;
        while p < e {
            let k = ((e - p) as usize).min(BUF);
            f.read_exact_at(&mut buf[..k], p).at(path)?;
            h.update(&buf[..k]);
            p += k as u64;
        }
        at = e;
    }
    zero_run(&mut h, size - at);
    Ok(hex(&h.finalize()))
}

fn vm_json(r: &FailoverReport) -> String {
    let point = r.point.as_ref().map(|p| {
        serde_json::json!({
            "id": p.id,
            "seq": p.seq,
            "time": rfc3339_micros(p.time_us),
            "kind": super::status::kind_str(p.kind),
            "name": p.name,
        })
    });
    let doc = serde_json::json!({
        "vm": r.vm,
        "test_failover": r.test,
        "requested": r.requested.to_string(),
        "point": point,
        "seq": r.seq,
        "time": rfc3339_micros(r.time_us),
        "target": {
            "resource_group": r.resource_group,
            "network": r.network,
            "subnet": r.subnet,
            "availability_set": r.availability_set,
        },
        "network_mapping": r.network_mapping,
        "disks": r.disks,
    });
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}

/// A streaming sha256 printed as lowercase hex, the form vm.json uses.
#[derive(Default)]
pub struct Sha256Hex(Sha256);

impl Sha256Hex {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn hex(self) -> String {
        hex(&self.0.finalize())
    }
}

#[cfg(test)]
mod tests {
    //! Failover's files go through the Vfs: cut the power at every sync of a failover that
    //! replaces an earlier one, and check what a restart finds.
    use super::*;
    use crate::record::{Op, Record};
    use crate::replica::{DiskSpec, Replica, ReplicaConfig};
    use crate::vfs::SimFs;
    use std::sync::Arc;

    const DISK: u64 = 1 << 20;

    fn disks() -> Vec<super::super::DiskRecord> {
        ["os", "data"]
            .iter()
            .map(|n| super::super::DiskRecord {
                name: n.to_string(),
                source: format!("/src/{n}.raw"),
                size_bytes: DISK,
            })
            .collect()
    }

    fn read_all(fs: &SimFs, path: &Path) -> Option<Vec<u8>> {
        let f = fs.open(path).ok()?;
        let mut b = vec![0u8; f.len().ok()? as usize];
        f.read_full_at(&mut b, 0).ok()?;
        Some(b)
    }

    fn sha_hex(bytes: &[u8]) -> String {
        let mut h = Sha256Hex::new();
        h.update(bytes);
        h.hex()
    }

    /// Each disk's bytes at each point: the model the images are checked against.
    type Model = Vec<Vec<u8>>;

    /// A replica with two points over two disks (the second overwrites and adds data).
    fn replica(fs: &SimFs) -> (Replica, [u64; 2], [Model; 2]) {
        let specs: Vec<DiskSpec> = disks()
            .iter()
            .map(|d| DiskSpec {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
            })
            .collect();
        let mut r =
            Replica::create(Arc::new(fs.clone()), "/r", &specs, ReplicaConfig::default()).unwrap();
        let mut model: Model = vec![vec![0u8; DISK as usize]; 2];
        let mut seq = 0;
        let mut ids = [0; 2];
        let mut models: [Model; 2] = Default::default();
        for (round, writes) in [
            [(0u16, 0u64, 9000usize), (1, 65536, 4096)],
            [(0, 4096, 200_000), (1, 900_000, 70_000)],
        ]
        .iter()
        .enumerate()
        {
            for &(disk, offset, len) in writes {
                seq += 1;
                let data: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + seq) as u8).collect();
                model[disk as usize][offset as usize..offset as usize + len].copy_from_slice(&data);
                r.apply(&Record {
                    seq,
                    time_us: seq,
                    op: Op::Write { disk, offset, data },
                })
                .unwrap();
            }
            ids[round] = r.cut_point(PointKind::CrashConsistent, None).unwrap().id;
            models[round] = model.clone();
        }
        (r, ids, models)
    }

    fn failover(fs: &SimFs, r: &Replica, id: u64) -> Result<()> {
        let view = r.view_point(id)?;
        let (tmp, dir) = (Path::new("/out/.web01.partial"), Path::new("/out/web01"));
        let disks =
            materialize_disks(fs, &view, &disks(), tmp, dir, &mut super::super::NoProgress)?;
        let manifest = serde_json::to_vec(&disks).unwrap();
        publish(fs, tmp, dir, &manifest)
    }

    /// Which point `/out/web01` holds whole (`None`: no failover there); panics on anything
    /// else (a directory without its manifest, an image that is not its manifest's).
    fn found(fs: &SimFs, models: &[Model; 2]) -> Option<usize> {
        let dir = Path::new("/out/web01");
        if !fs.exists(dir) {
            return None;
        }
        let manifest =
            read_all(fs, &dir.join("vm.json")).expect("a failover directory without vm.json");
        let listed: Vec<FailoverDisk> = serde_json::from_slice(&manifest).unwrap();
        let images: Vec<Vec<u8>> = listed
            .iter()
            .map(|d| {
                let bytes = read_all(fs, &dir.join(format!("{}.raw", d.name)))
                    .expect("an image vm.json lists is missing");
                assert_eq!(
                    sha_hex(&bytes),
                    d.sha256,
                    "{} does not match vm.json",
                    d.name
                );
                bytes
            })
            .collect();
        let which = models.iter().position(|m| *m == images);
        assert!(which.is_some(), "the images are neither point's");
        which
    }

    #[test]
    fn the_sha256_in_the_manifest_is_the_images_hash_holes_included() {
        let fs = SimFs::new();
        let (r, ids, models) = replica(&fs);
        fs.create_dir_all(Path::new("/out")).unwrap();
        failover(&fs, &r, ids[1]).unwrap();
        assert_eq!(found(&fs, &models), Some(1));
        let listed: Vec<FailoverDisk> =
            serde_json::from_slice(&read_all(&fs, Path::new("/out/web01/vm.json")).unwrap())
                .unwrap();
        for (d, m) in listed.iter().zip(&models[1]) {
            assert_eq!(d.sha256, sha_hex(m));
        }
    }

    #[test]
    fn a_power_cut_at_any_sync_of_a_failover_leaves_the_old_one_or_the_new_one_whole() {
        let fs = SimFs::new();
        let (r, ids, models) = replica(&fs);
        fs.create_dir_all(Path::new("/out")).unwrap();
        failover(&fs, &r, ids[0]).unwrap();
        drop(r);
        // Everything so far made durable: the starting state of every cut.
        let base = fs.process_crash();
        let open = |fs: &SimFs| {
            Replica::open(Arc::new(fs.clone()), "/r", ReplicaConfig::default())
                .unwrap()
                .0
        };
        let whole = base.process_crash();
        let r = open(&whole);
        let before = whole.sync_count();
        failover(&whole, &r, ids[1]).unwrap();
        let syncs = whole.sync_count() - before;
        // Once it returned, a power loss keeps the new failover whole.
        assert_eq!(found(&whole.crash(0), &models), Some(1));
        assert!(
            syncs >= 5,
            "a failover of two disks syncs each image, vm.json and directories"
        );
        let mut seen = [false; 3];
        for cut in 1..=syncs {
            let fs = base.process_crash();
            let r = open(&fs);
            fs.fail_at_sync(cut);
            assert!(
                failover(&fs, &r, ids[1]).is_err(),
                "cut {cut} of {syncs} did not fail"
            );
            drop(r);
            let after = fs.crash(0);
            let got = found(&after, &models);
            seen[got.map_or(2, |g| g)] = true;
            // Until the parent's last sync the earlier failover is still there, whole. A
            // restart runs the failover again and gets the new point whole.
            let r = open(&after);
            failover(&after, &r, ids[1]).unwrap_or_else(|e| panic!("cut {cut}: rerun: {e}"));
            assert_eq!(found(&after, &models), Some(1), "cut {cut}");
            assert!(
                !after.exists(Path::new("/out/.web01.partial")),
                "cut {cut}: the partial directory was left beside the failover"
            );
        }
        assert!(seen[0], "no cut left the earlier failover in place");
    }
}
