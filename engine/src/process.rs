//! The processor: reads the change log in order from the replica's applied sequence
//! number, applies it to the replica, cuts recovery points, advances the log's checkpoint
//! once what it applied is durable, and prunes by policy.
//!
//! Points are cut at every marker (app- or crash-consistent as the marker says), and a
//! crash-consistent point whenever the policy's interval has elapsed *in record time*:
//! before applying record r, if `r.time_us - open_since >= crash_interval`, where
//! `open_since` is the time of the oldest change no point covers yet, a point is cut at
//! `r.seq - 1`. So no change stays outside a point for longer than the interval. That rule depends only on
//! the log and the replica's durable state, so redoing a range after a crash cuts the same
//! points. At the end of a pass a point is also cut if the interval elapsed by the wall
//! clock (an idle VM still gets a fresh point); that one depends on when the pass ran.
//!
//! Invariant: the log's checkpoint never passes the replica's durable sequence number.

use crate::agent::{RESYNC_BEGIN, RESYNC_END};
use crate::cache::Cache;
use crate::error::Result;
use crate::policy::{us, Policy};
use crate::record::MarkerKind;
use crate::replica::{Applied, PointInfo, PointKind, PruneReport, Replica};
use std::sync::Arc;

mod window;

/// Flush and advance the checkpoint after this many bytes applied within one pass, so a
/// long catch-up lets the log trim as it goes.
const CHECKPOINT_EVERY_BYTES: u64 = 256 << 20;

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Records applied (not counting those skipped as already applied).
    pub applied: u64,
    pub applied_bytes: u64,
    pub points: Vec<PointInfo>,
    /// The replica's durable sequence number, now the log's checkpoint.
    pub durable_seq: u64,
    pub prune: PruneReport,
}

type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

/// Drives one VM's change log into its replica.
pub struct Processor {
    cache: Arc<Cache>,
    replica: Replica,
    policy: Policy,
    clock: Clock,
    /// The agent's last resync window `(begin, end)` by sequence number (`end` 0 while
    /// open): inside it the log is not crash-consistent and no point is cut.
    resync: (u64, u64),
    /// Where applied bytes are counted for monitoring, if anywhere
    /// ([`crate::util::latency::replicated_bytes`]).
    applied_total: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Processor {
    /// Count the bytes every pass applies into `total` (a monitoring counter).
    pub fn counting_into(mut self, total: Arc<std::sync::atomic::AtomicU64>) -> Processor {
        self.applied_total = Some(total);
        self
    }

    pub fn new(cache: Arc<Cache>, replica: Replica, policy: Policy) -> Result<Processor> {
        policy.validate()?;
        let resync = window::read(&**replica.vfs(), replica.dir())?;
        Ok(Processor {
            cache,
            replica,
            policy,
            clock: Box::new(crate::now_us),
            resync,
            applied_total: None,
        })
    }

    /// Use another clock (microseconds since the Unix epoch) for the end-of-pass cut and
    /// for pruning; tests use it to make time pass.
    pub fn with_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// The log this processor reads.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Read `cache` from now on: the same log, reopened by its owner after a failure.
    pub fn set_cache(&mut self, cache: Arc<Cache>) {
        self.cache = cache;
    }

    /// Work on `replica` from now on: the same replica reopened (recovery ran) by the
    /// runtime after a failure latched the old one.
    pub fn reopen(&mut self, replica: Replica) -> Result<()> {
        self.resync = window::read(&**replica.vfs(), replica.dir())?;
        self.replica = replica;
        Ok(())
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn replica_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }

    pub fn into_replica(self) -> Replica {
        self.replica
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn set_policy(&mut self, policy: Policy) -> Result<()> {
        policy.validate()?;
        self.policy = policy;
        Ok(())
    }

    /// Cut a point now (for example the initial point once initial replication is
    /// applied), after applying everything durable in the log.
    pub fn cut_point(&mut self, kind: PointKind, name: Option<&str>) -> Result<PointInfo> {
        self.run_pass()?;
        let p = self.replica.cut_point(kind, name)?;
        self.checkpoint()?;
        Ok(p)
    }

    /// True while the replica sits inside the agent's resync window.
    pub fn in_resync(&self) -> bool {
        let (begin, end) = self.resync;
        let at = self.replica.applied_seq();
        begin != 0 && begin <= at && (end == 0 || at < end)
    }

    fn set_window(&mut self, w: window::Window) -> Result<()> {
        self.resync = w;
        window::write(&**self.replica.vfs(), self.replica.dir(), w)
    }

    fn due(&self, time_us: u64) -> bool {
        !self.in_resync()
            && self.replica.changed_since_last_point()
            && self.replica.open_since_us().is_some_and(|since| {
                time_us.saturating_sub(since) >= us(self.policy.crash_interval)
            })
    }

    fn checkpoint(&mut self) -> Result<u64> {
        let durable = self.replica.flush()?;
        let upto = durable.min(self.cache.durable_seq());
        if upto > 0 {
            self.cache.set_checkpoint(upto)?;
        }
        Ok(durable)
    }

    /// Apply everything durable in the log, cutting points as the policy says, then make
    /// it durable, advance the log's checkpoint and prune.
    pub fn run_pass(&mut self) -> Result<PassReport> {
        let mut report = PassReport::default();
        let mut reader = self.cache.reader(self.replica.applied_seq() + 1)?;
        let mut since_checkpoint = 0u64;
        while let Some(rec) = reader.next_record()? {
            if rec.seq <= self.replica.applied_seq() {
                continue;
            }
            if self.due(rec.time_us) {
                report
                    .points
                    .push(self.replica.cut_point(PointKind::CrashConsistent, None)?);
            }
            let bytes = rec.op.logical_bytes();
            match self.replica.apply(&rec)? {
                Applied::Marker(m) if m.kind == RESYNC_BEGIN => {
                    self.set_window((rec.seq, 0))?;
                }
                Applied::Marker(m) if m.kind == RESYNC_END => {
                    self.set_window((self.resync.0, rec.seq))?;
                    report.points.push(
                        self.replica
                            .cut_point(PointKind::CrashConsistent, Some("resync"))?,
                    );
                }
                Applied::Marker(m) if m.kind == MarkerKind::Point => {
                    report.points.push(self.replica.cut_marker_point(&m)?)
                }
                // A kind this build writes no handling for cuts no point.
                Applied::Marker(_) => {}
                Applied::Stored => {
                    report.applied_bytes += bytes;
                    since_checkpoint += bytes;
                }
                Applied::Skipped => continue,
            }
            report.applied += 1;
            if since_checkpoint >= CHECKPOINT_EVERY_BYTES {
                self.checkpoint()?;
                since_checkpoint = 0;
            }
        }
        let now = (self.clock)();
        if self.due(now) {
            report
                .points
                .push(self.replica.cut_point(PointKind::CrashConsistent, None)?);
        }
        report.durable_seq = self.checkpoint()?;
        report.prune = self.replica.prune(&self.policy, now)?;
        if let Some(t) = &self.applied_total {
            t.fetch_add(report.applied_bytes, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(report)
    }
}
