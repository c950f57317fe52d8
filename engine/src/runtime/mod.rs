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
mod owner;
mod source;

pub use embedded::{EmbeddedAgent, EmbeddedOptions};
pub use follower::follow;
pub use owner::VmOwner;
pub use source::{marker, SourceAgent, SourceOptions};

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
/// How often the source images are synced and the log told how far they are.
pub const SOURCE_SYNC_EVERY: Duration = Duration::from_secs(1);

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
