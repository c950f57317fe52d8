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
use crate::vfs::Vfs;
use std::sync::Arc;

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
}

/// Where the resync window is kept, in the replica's directory: `begin end` as decimal.
const RESYNC_FILE: &str = "resync.window";

impl Processor {
    pub fn new(cache: Arc<Cache>, replica: Replica, policy: Policy) -> Result<Processor> {
        policy.validate()?;
        let resync = read_window(&**replica.vfs(), &replica.dir().join(RESYNC_FILE))?;
        Ok(Processor {
            cache,
            replica,
            policy,
            clock: Box::new(crate::now_us),
            resync,
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
        self.resync = read_window(&**replica.vfs(), &replica.dir().join(RESYNC_FILE))?;
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

    fn set_window(&mut self, window: (u64, u64)) -> Result<()> {
        self.resync = window;
        let text = format!("{} {}\n", window.0, window.1);
        crate::fsutil::replace_atomic(
            &**self.replica.vfs(),
            self.replica.dir(),
            RESYNC_FILE,
            text.as_bytes(),
        )
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
        Ok(report)
    }
}

fn read_window(vfs: &dyn Vfs, path: &std::path::Path) -> Result<(u64, u64)> {
    if !vfs.exists(path) {
        return Ok((0, 0));
    }
    let f = vfs.open(path).map_err(|e| crate::Error::io(path, e))?;
    // Two decimal u64s, a space and a newline fit in 48 bytes; more is not a window.
    let mut b = [0u8; 64];
    let n = f
        .read_full_at(&mut b, 0)
        .map_err(|e| crate::Error::io(path, e))?;
    let text = match n < b.len() {
        true => std::str::from_utf8(&b[..n]).unwrap_or(""),
        false => "",
    };
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(b)), Some(Ok(e)), None) => Ok((b, e)),
        _ => Err(crate::Error::corrupt(
            path,
            0,
            "expected two sequence numbers (the resync window)",
        )),
    }
}
