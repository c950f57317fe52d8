//! The owner of a VM answers control requests from its live processor: the embedded agent
//! and the target's follower each own a VM's log and replica for as long as they run, so a
//! point, points, status, verify, a test failover or a mount of that VM is served here,
//! from views published by the processor, while the VM's writes go on.
//!
//! Invariant: the processor's lock is held only to build a view (a view pins the layers it
//! reads, so pruning never frees them under it) or to cut a point; materializing, serving
//! and hashing run without it, so processing goes on meanwhile.

use super::control::{Handler, Reply, Request};
use super::{Event, Events};
use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::mount::MountDisk;
use crate::nbd::{BlockDevice, ExportList, Server, ServerConfig};
use crate::process::Processor;
use crate::record::{Consistency, Marker};
use crate::replica::{PointInfo, PointKind, View};
use crate::vault::{point_at, view_of, Health, LockWait, NoProgress, PointSpec, Vault, VmState};
use parking_lot::Mutex;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

/// A VM as its owning process holds it.
pub struct VmOwner {
    pub(crate) root: PathBuf,
    pub(crate) who: String,
    pub(crate) vm: String,
    /// The processor, which holds the VM's log (`Processor::cache`: the one in use, which
    /// the runtime may reopen after a failure) and its replica.
    pub(crate) processor: Arc<Mutex<Processor>>,
    /// The write tap, when the owner is the embedded agent (points go through it as
    /// markers, ordered with the VM's writes).
    pub(crate) agent: Option<Arc<Agent>>,
    pub(crate) events: Events,
    /// Why processing into the replica fails, while it does (an I/O error, a full disk):
    /// set and cleared by the runtime's processing loop; health names it.
    pub(crate) processing_failure: Mutex<Option<String>>,
}

impl VmOwner {
    fn vault(&self) -> Result<Vault> {
        Vault::open(&self.root, &self.who, LockWait::Block)
    }

    /// The view `spec` names and the point it shows. `latest` first makes every
    /// acknowledged write durable and processes it (lowest RPO), cutting a point if
    /// anything changed since the last.
    pub fn view(&self, spec: &PointSpec) -> Result<(View, Option<PointInfo>)> {
        let failed_over = self.vault()?.catalog().vm(&self.vm)?.state == VmState::FailedOver;
        if *spec == PointSpec::Latest && !failed_over {
            if let Some(a) = &self.agent {
                a.make_durable()?;
            }
        }
        let mut p = self.live_processor()?;
        if *spec == PointSpec::Latest && !failed_over {
            let r = p.run_pass()?;
            self.report_points(&r.points);
            if p.replica().changed_since_last_point() {
                let pt = p.cut_point(PointKind::CrashConsistent, None)?;
                self.report_points(std::slice::from_ref(&pt));
            }
        }
        let durable = p.cache().durable_seq();
        let view = view_of(p.replica(), &self.vm, spec, &|| Some(durable))?;
        let point = point_at(&view, p.replica().points());
        Ok((view, point))
    }

    /// The processor, its replica reopened first if a failure latched it (the store
    /// unreachable for a while, say): what the processing loop does before its next pass,
    /// done here too so a command through the owner does not wait for that loop's backoff.
    fn live_processor(&self) -> Result<parking_lot::MutexGuard<'_, Processor>> {
        let mut p = self.processor.lock();
        if p.replica().failure().is_some() {
            let replica = self.vault()?.open_replica(&self.vm)?;
            p.reopen(replica)?;
        }
        Ok(p)
    }

    fn report_points(&self, points: &[PointInfo]) {
        for pt in points {
            (self.events)(Event::Point {
                vm: self.vm.clone(),
                point: pt.clone(),
            });
        }
    }

    fn point(&self, app: bool, name: Option<String>) -> Result<Reply> {
        if let Some(n) = &name {
            if n.len() > crate::record::MAX_NAME_BYTES {
                return Err(Error::Invalid("point name is too long".into()));
            }
            crate::record::check_point_name(n).map_err(Error::Invalid)?;
        }
        let Some(agent) = &self.agent else {
            // A remote VM: its staging log mirrors the source's, so nothing is appended
            // here; a crash-consistent point is cut where processing stands.
            if app {
                return Err(Error::Conflict(format!(
                    "VM '{}' is replicated from a remote site: app-consistent points are cut by its agent there",
                    self.vm
                )));
            }
            let mut p = self.processor.lock();
            let r = p.run_pass()?;
            self.report_points(&r.points);
            if p.in_resync() {
                return Err(Error::Conflict(format!(
                    "VM '{}' is in the middle of a resync: no consistent point can be cut until it ends",
                    self.vm
                )));
            }
            let pt = p
                .replica_mut()
                .cut_point(PointKind::CrashConsistent, name.as_deref())?;
            p.replica_mut().flush()?;
            self.report_points(std::slice::from_ref(&pt));
            return Ok(Reply::Point {
                seq: pt.seq,
                point: Some(pt),
            });
        };
        let marker = Marker {
            consistency: if app {
                Consistency::App
            } else {
                Consistency::Crash
            },
            name,
            group: None,
            kind: crate::record::MarkerKind::Point,
        };
        let seq = agent.marker(&marker)?;
        let mut p = self.live_processor()?;
        let report = p.run_pass()?;
        self.report_points(&report.points);
        let pt = report
            .points
            .into_iter()
            .find(|pt| pt.seq == seq)
            .or_else(|| p.replica().points().into_iter().find(|pt| pt.seq == seq))
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "the marker at seq {seq} cut no point (the VM is in a resync window)"
                ))
            })?;
        Ok(Reply::Point {
            seq,
            point: Some(pt),
        })
    }

    fn status(&self) -> Result<Reply> {
        let vault = self.vault()?;
        let p = self.processor.lock();
        let cache = p.cache().clone();
        let mut st = vault.status_of(&self.vm, &cache, p.replica())?;
        drop(p);
        if let Some(f) = self.processing_failure.lock().clone() {
            st.health = Health::Critical;
            st.reasons.insert(
                0,
                format!("processing into the replica failed: {f}; retrying with backoff"),
            );
        }
        if let Some(cause) = self.agent.as_ref().and_then(|a| a.log_failure()) {
            st.health = Health::Critical;
            st.reasons.insert(
                0,
                format!("the change log failed: {cause}; writes are tracked in the dirty bitmap"),
            );
        }
        if let Some(a) = &self.agent {
            if let Some(bytes) = a.resync_pending() {
                st.reasons.push(format!(
                    "the change log could not take writes: {bytes} bytes of blocks to resync"
                ));
            }
        }
        Ok(Reply::Status {
            status: serde_json::to_value(&st)
                .map_err(|e| Error::Invalid(format!("cannot encode the status: {e}")))?,
            owner_pid: std::process::id(),
            resync_bytes: self.agent.as_ref().and_then(|a| a.resync_pending()),
        })
    }

    fn test_failover(
        &self,
        spec: PointSpec,
        out: Option<PathBuf>,
        network: Option<String>,
    ) -> Result<Reply> {
        let mut vault = self.vault()?;
        let rec = vault.catalog().vm(&self.vm)?.clone();
        if rec.test_failover.is_some() {
            return Err(Error::Conflict(format!(
                "a test failover of VM '{}' is already up; run `standby test-failover-cleanup {}` first",
                self.vm, self.vm
            )));
        }
        let (view, point) = self.view(&spec)?;
        let report = vault.failover_from_view(
            &self.vm,
            &view,
            point,
            spec,
            out.as_deref(),
            true,
            network.as_deref(),
            &mut NoProgress,
        )?;
        Ok(Reply::TestFailover { report })
    }

    fn mount(
        &self,
        spec: PointSpec,
        listen: &str,
        writable: bool,
        answer: &mut dyn FnMut(Result<Reply>),
        conn: &UnixStream,
    ) {
        let started = (|| -> Result<(Server, Reply)> {
            let vault = self.vault()?;
            let rec = vault.catalog().vm(&self.vm)?.clone();
            let view = Arc::new(self.view(&spec)?.0);
            let mut exports: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
            // The disks of that state (a disk added later is not in an older point).
            let disks = &rec.disks[..rec.disks.len().min(view.disks().len())];
            for (i, d) in disks.iter().enumerate() {
                let dev = if writable {
                    let scratch = vault.vm_scratch(&self.vm).join(format!(
                        "mount-{}-{}-{}.overlay",
                        std::process::id(),
                        crate::now_us(),
                        d.name
                    ));
                    MountDisk::writable(view.clone(), i as u16, &scratch)?
                } else {
                    MountDisk::read_only(view.clone(), i as u16)?
                };
                exports.push((d.name.clone(), Arc::new(dev)));
            }
            let server = Server::start(
                listen,
                Arc::new(ExportList(exports)),
                ServerConfig::default(),
            )
            .map_err(|e| Error::Invalid(format!("cannot listen on {listen}: {e}")))?;
            let reply = Reply::Mounted {
                addr: server.local_addr().to_string(),
                disks: disks.iter().map(|d| d.name.clone()).collect(),
                point: view.point().cloned(),
                seq: view.seq(),
                time_us: view.time_us(),
            };
            Ok((server, reply))
        })();
        match started {
            Err(e) => answer(Err(e)),
            Ok((mut server, reply)) => {
                answer(Ok(reply));
                // Serve until the client goes (its command stopped or was killed).
                let mut b = [0u8; 64];
                let mut r = conn;
                while let Ok(n) = std::io::Read::read(&mut r, &mut b) {
                    if n == 0 {
                        break;
                    }
                }
                server.stop();
            }
        }
    }
}

impl Handler for VmOwner {
    fn handle(&self, req: Request, answer: &mut dyn FnMut(Result<Reply>), conn: &UnixStream) {
        let r = match req {
            Request::Point { app, name } => self.point(app, name),
            Request::Marker { .. } => Err(Error::Invalid(
                "markers are written through a source-site agent (`standby point --journal`)"
                    .into(),
            )),
            Request::Status => self.status(),
            Request::Points => {
                let p = self.processor.lock();
                Ok(Reply::Points {
                    points: p.replica().points_with_bytes(),
                    damage: p.replica().damage(),
                })
            }
            Request::Verify { point: spec } => (|| {
                let vault = self.vault()?;
                let p = self.processor.lock();
                let cache = p.cache().clone();
                let (report, point) = vault.verify_open(&self.vm, spec, p.replica(), &cache)?;
                Ok(Reply::Verify { report, point })
            })(),
            Request::TestFailover {
                point,
                out,
                network,
            } => self.test_failover(point, out, network),
            Request::Diff { a, b } => (|| {
                let rec = self.vault()?.catalog().vm(&self.vm)?.clone();
                // `latest` first: a point it cuts is then seen by the other side.
                let (va, vb) = if b == PointSpec::Latest {
                    let vb = self.view(&b)?.0;
                    (self.view(&a)?.0, vb)
                } else {
                    let va = self.view(&a)?.0;
                    (va, self.view(&b)?.0)
                };
                let names: Vec<String> = rec.disks.iter().map(|d| d.name.clone()).collect();
                let report = crate::vault::diff_views(&self.vm, &names, (&va, a), (&vb, b))?;
                Ok(Reply::Diff { report })
            })(),
            Request::Mount {
                point,
                listen,
                writable,
            } => return self.mount(point, &listen, writable, answer, conn),
            Request::DiskAdd { name, source } => (|| {
                let Some(agent) = &self.agent else {
                    return Err(Error::Conflict(format!(
                        "VM '{}' is replicated from a remote site: its disks are the ones its agent declares there; disk add is not supported for it yet",
                        self.vm
                    )));
                };
                let mut vault = self.vault()?;
                let report = vault.disk_add_live(
                    &self.vm,
                    &name,
                    &source,
                    agent,
                    &self.processor,
                    &mut crate::vault::NoProgress,
                )?;
                self.report_points(std::slice::from_ref(&report.point));
                Ok(Reply::DiskAdded { report })
            })(),
            Request::GroupHold { .. }
            | Request::GroupCut { .. }
            | Request::GroupRelease { .. }
            | Request::GroupSettle { .. } => super::group::handle(self, req),
        };
        answer(r)
    }
}
