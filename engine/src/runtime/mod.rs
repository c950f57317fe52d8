//! The runtimes of the processes that stand in a VM's write path or own its replica: the
//! embedded agent (write tap, processing and control over one local vault), the source
//! site's agent (write tap, journal, shipper) and the control protocol both speak. The CLI
//! starts a runtime, prints the events it reports and stops it; everything that runs for
//! the life of the process lives here.
//!
//! Every runtime keeps the write path's budget (DESIGN.md): the client's write waits only
//! for the log; draining into the source images, processing, shipping and every control
//! request run on their own threads, so none of them stalls the VM.

pub mod control;
mod embedded;
pub mod flag;
mod follower;
pub mod group;
mod owner;
mod source;

pub use embedded::{EmbeddedAgent, EmbeddedOptions, SOURCE_AHEAD as EMBEDDED_SOURCE_AHEAD};
pub use follower::follow;
pub use owner::VmOwner;
pub use source::{marker, SourceAgent, SourceOptions, SourceProbe, SourceReport};

use crate::agent::{Agent, AgentDisk};
use crate::error::{Error, Result};
use crate::nbd::{BlockDevice, ExportList, Server, ServerConfig};
use crate::replica::PointInfo;
use std::sync::Arc;
use std::time::Duration;

/// How often durable writes are applied to the source images (page cache only).
pub const DRAIN_EVERY: Duration = Duration::from_millis(5);
/// Most bytes of dirty blocks shipped per background round.
pub const RESYNC_STEP_BYTES: u64 = 32 << 20;
/// How often the source images are synced and the log told how far they are, while the
/// client is idle...
pub const SOURCE_SYNC_EVERY: Duration = Duration::from_secs(1);
/// ...and at the latest while it writes: until then the source images' writes stay in the
/// page cache, so the disk's bandwidth goes to the log the client's FLUSH waits for (they
/// are in the log durably, and replayed from it after a crash; the source hold only keeps
/// the log from trimming them meanwhile).
pub const SOURCE_SYNC_MAX: Duration = Duration::from_secs(5);
/// The client counts as busy until it has asked for nothing for this long.
pub const CLIENT_IDLE: Duration = Duration::from_millis(50);

/// Tells, from the tap's count of client requests, whether the client is writing now.
pub(crate) struct ClientActivity {
    seen_ops: u64,
    last_op: std::time::Instant,
}

impl ClientActivity {
    pub(crate) fn new(agent: &Agent) -> ClientActivity {
        ClientActivity {
            seen_ops: agent.client_ops(),
            last_op: std::time::Instant::now(),
        }
    }

    /// Whether the client asked for a write within [`CLIENT_IDLE`].
    pub(crate) fn busy(&mut self, agent: &Agent) -> bool {
        let ops = agent.client_ops();
        if ops != self.seen_ops {
            self.seen_ops = ops;
            self.last_op = std::time::Instant::now();
        }
        self.last_op.elapsed() < CLIENT_IDLE
    }

    /// Whether a drain should sync the source images now, `since_sync` after the last
    /// time: every [`SOURCE_SYNC_EVERY`] while the client is idle, every
    /// [`SOURCE_SYNC_MAX`] while it writes, and at once past half a bounded log's
    /// capacity (the source hold keeps it from trimming).
    pub(crate) fn source_sync_due(&mut self, agent: &Agent, since_sync: Duration) -> bool {
        let busy = self.busy(agent);
        if since_sync < SOURCE_SYNC_EVERY {
            return false;
        }
        if since_sync >= SOURCE_SYNC_MAX || !busy {
            return true;
        }
        let st = agent.cache().stats();
        st.capacity_bytes
            .is_some_and(|cap| st.stored_bytes > cap / 2)
    }
}

/// Lower the calling thread's CPU priority (nice 10), for work behind the write path (the
/// embedded processor): on a busy machine it takes the cycles the client's I/O leaves,
/// on an idle one it runs at full speed. Best effort: a failure changes nothing else.
pub(crate) fn lower_thread_priority() {
    #[allow(unsafe_code)]
    // SAFETY: gettid and setpriority take no memory; on Linux a thread id names one thread.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

pub(crate) use crate::backoff::Backoff;
pub use crate::backoff::{BACKOFF_FIRST, BACKOFF_MAX};

/// Something worth telling the operator, reported by a runtime as it happens.
#[derive(Debug, Clone)]
pub enum Event {
    /// A recovery point was cut.
    Point { vm: String, point: PointInfo },
    /// A change of state (a resync began or ended, a link came up, …).
    Notice(String),
    /// Something failed; the runtime goes on (or stops, and says so in its result).
    Trouble(String),
}

/// Where a runtime reports its events.
pub type Events = Arc<dyn Fn(Event) + Send + Sync>;

/// Serve each disk of `agent` over NBD on `listen`, through the write tap.
pub fn serve_disks(agent: &Arc<Agent>, listen: &str) -> Result<Server> {
    let mut exports: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    for (i, d) in agent.disks().enumerate() {
        exports.push((
            d.name.clone(),
            Arc::new(AgentDisk::new(agent.clone(), i as u16)?),
        ));
    }
    Server::start(
        listen,
        Arc::new(ExportList(exports)),
        ServerConfig::default(),
    )
    .map_err(|e| Error::Invalid(format!("cannot listen on {listen}: {e}")))
}
