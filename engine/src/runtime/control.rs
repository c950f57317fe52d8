//! The control protocol of a process that owns a VM (the embedded agent, the source-site
//! agent, the target's follower): commands that need the VM while its owner runs — a
//! point, points, status, verify, a test failover, a mount — are requests on the owner's
//! Unix socket, answered from the owner's own published views, so they never wait for
//! (or stop) the VM's write path.
//!
//! Wire format: one request per connection, one JSON object on one line; one reply line,
//! `{"ok":true,"reply":{...}}` or `{"ok":false,"kind":"conflict","error":"..."}`. A
//! `mount` keeps the connection open: the owner serves the point until the client closes
//! its end. Requests carry a protocol version; an owner refuses a version it does not know.

use crate::error::{Error, Result};
use crate::replica::{PointInfo, VerifyReport};
use crate::vault::PointSpec;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Version of the control protocol.
pub const VERSION: u32 = 1;
/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 << 10;

/// What a client asks the owner of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Cut a point now (a marker through the write path where there is one).
    Point {
        app: bool,
        name: Option<String>,
    },
    /// Write a marker through the source-site agent; the target cuts the point.
    Marker {
        app: bool,
        name: Option<String>,
    },
    Status,
    Points,
    Verify {
        point: Option<PointSpec>,
    },
    /// Materialize a point beside replication (`point` as `standby failover` parses it).
    TestFailover {
        point: PointSpec,
        out: Option<PathBuf>,
        network: Option<String>,
    },
    /// Serve a point over NBD on `listen` until the client closes the connection.
    Mount {
        point: PointSpec,
        listen: String,
        writable: bool,
    },
    /// The changed ranges between two states (`standby diff`).
    Diff {
        a: PointSpec,
        b: PointSpec,
    },
    /// A group point's barrier, step 1: hold the client's acknowledgements (writes still
    /// go into the log) for at most `hold_ms` (docs/groups.md).
    GroupHold {
        group_point: String,
        hold_ms: u64,
    },
    /// Step 2, under the hold: write the marker carrying the group point's id (durable by
    /// the release). With `hold_ms`, steps 1 and 2 at once: take the hold, then write the
    /// marker (one round trip less while the VM's acknowledgements wait).
    GroupCut {
        group_point: String,
        app: bool,
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hold_ms: Option<u64>,
    },
    /// Step 3: end the hold; the reply says whether it lasted until now.
    GroupRelease {
        group_point: String,
    },
    /// After the barrier: process up to the marker at `seq` and return its point.
    GroupSettle {
        seq: u64,
    },
    /// Add a disk while the VM runs (`standby disk add`): its copy goes into the log
    /// beside the VM's writes; the agent serves it once restarted. Paths are absolute.
    DiskAdd {
        name: String,
        source: crate::vault::DiskSource,
    },
}

/// The owner's answer to a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Point {
        point: Option<PointInfo>,
        seq: u64,
    },
    /// The VM's status ([`crate::vault::VmStatus`] as JSON) and who answered it.
    Status {
        status: serde_json::Value,
        owner_pid: u32,
        resync_bytes: Option<u64>,
    },
    /// Points with the bytes each one's layer holds, and damage that spoils some of them.
    Points {
        points: Vec<(PointInfo, u64)>,
        damage: Vec<crate::replica::Damage>,
    },
    Verify {
        report: VerifyReport,
        point: Option<PointInfo>,
    },
    TestFailover {
        report: crate::vault::FailoverReport,
    },
    Diff {
        report: crate::vault::DiffReport,
    },
    Mounted {
        addr: String,
        disks: Vec<String>,
        point: Option<PointInfo>,
        seq: u64,
        time_us: u64,
    },
    /// A group barrier's hold is in force.
    GroupHeld,
    /// A group point's marker is durable at `seq`.
    GroupMarker {
        seq: u64,
    },
    /// The hold ended; `intact` if it was in force until the release.
    GroupReleased {
        intact: bool,
    },
    DiskAdded {
        report: crate::vault::DiskAddReport,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    version: u32,
    vm: String,
    #[serde(flatten)]
    request: Request,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn error_kind(e: &Error) -> (&'static str, String) {
    match e {
        Error::Invalid(m) => ("invalid", m.clone()),
        Error::NotFound(m) => ("not-found", m.clone()),
        Error::Locked(m) => ("locked", m.clone()),
        Error::Conflict(m) => ("conflict", m.clone()),
        Error::Link(m) => ("link", m.to_string()),
        other => ("failed", other.to_string()),
    }
}

fn error_from(kind: &str, msg: String) -> Error {
    match kind {
        "invalid" => Error::Invalid(msg),
        "not-found" => Error::NotFound(msg),
        "locked" => Error::Locked(msg),
        "link" => Error::Link(crate::error::LinkError::Remote(msg)),
        _ => Error::Conflict(msg),
    }
}

/// A connection to an owner, for requests (like `mount`) that live as long as it does.
pub struct Session {
    conn: UnixStream,
}

impl Session {
    /// Wait until the owner ends the session (it stopped) or `stop` is set.
    pub fn wait(&self, stop: &AtomicBool) {
        let _ = self.conn.set_read_timeout(Some(Duration::from_millis(100)));
        let mut b = [0u8; 64];
        let mut r = &self.conn;
        while !stop.load(Ordering::SeqCst) {
            match std::io::Read::read(&mut r, &mut b) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    }
}

/// Send `req` to the owner of `vm` listening on `socket`. `None` if no owner is running
/// there (nothing listens); otherwise its reply, and the open session.
pub fn ask(socket: &Path, vm: &str, req: &Request) -> Option<Result<(Reply, Session)>> {
    ask_within(socket, vm, req, None)
}

/// [`ask`], giving up (an I/O error) when the owner has not answered within `timeout`.
pub fn ask_within(
    socket: &Path,
    vm: &str,
    req: &Request,
    timeout: Option<Duration>,
) -> Option<Result<(Reply, Session)>> {
    let conn = UnixStream::connect(socket).ok()?;
    if timeout.is_some() {
        let _ = conn.set_read_timeout(timeout);
        let _ = conn.set_write_timeout(timeout);
    }
    Some((|| {
        let env = Envelope {
            version: VERSION,
            vm: vm.to_string(),
            request: req.clone(),
        };
        let line = serde_json::to_string(&env)
            .map_err(|e| Error::Invalid(format!("cannot encode the request: {e}")))?;
        let mut w = &conn;
        writeln!(w, "{line}").map_err(|e| Error::io(socket, e))?;
        let mut reply = String::new();
        BufReader::new(&conn)
            .read_line(&mut reply)
            .map_err(|e| Error::io(socket, e))?;
        if reply.is_empty() {
            return Err(Error::io(
                socket,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the owner of VM '{vm}' closed the socket without answering (it may be stopping)"),
                ),
            ));
        }
        let a: Answer = serde_json::from_str(&reply).map_err(|e| {
            Error::Conflict(format!("malformed reply on {}: {e}", socket.display()))
        })?;
        match (a.ok, a.reply) {
            (true, Some(r)) => Ok((r, Session { conn })),
            _ => Err(error_from(
                a.kind.as_deref().unwrap_or("failed"),
                a.error.unwrap_or_else(|| "the owner refused".into()),
            )),
        }
    })())
}

/// Like [`ask`], for a request whose session ends with the reply.
pub fn ask_once(socket: &Path, vm: &str, req: &Request) -> Option<Result<Reply>> {
    ask(socket, vm, req).map(|r| r.map(|(reply, _)| reply))
}

/// What an owner does with a request. `conn` is the client's connection, for requests
/// that live as long as it does (a mount): such a handler answers through `answer` and
/// returns once the client has gone.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request, answer: &mut dyn FnMut(Result<Reply>), conn: &UnixStream);
}

/// A running control socket; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Listen on `path` (a stale socket there is replaced: the caller owns the VM) and
    /// answer each connection on its own thread.
    pub fn start(path: &Path, vm: &str, handler: Arc<dyn Handler>) -> Result<ControlServer> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(path, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, vm) = (stop.clone(), vm.to_string());
            std::thread::Builder::new()
                .name("standby-control".into())
                .spawn(move || accept_loop(listener, &vm, handler, &stop))
                .map_err(|e| Error::io("control thread", e))?
        };
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: UnixListener, vm: &str, handler: Arc<dyn Handler>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => {
                let (handler, vm) = (handler.clone(), vm.to_string());
                let _ = std::thread::Builder::new()
                    .name("standby-control-conn".into())
                    .spawn(move || serve_one(conn, &vm, &*handler));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve_one(conn: UnixStream, vm: &str, handler: &dyn Handler) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let read = BufReader::new(std::io::Read::take(&conn, MAX_REQUEST_BYTES)).read_line(&mut line);
    let _ = conn.set_read_timeout(None);
    let mut send = |r: Result<Reply>| {
        let a = match r {
            Ok(reply) => Answer {
                ok: true,
                reply: Some(reply),
                kind: None,
                error: None,
            },
            Err(e) => {
                let (kind, msg) = error_kind(&e);
                Answer {
                    ok: false,
                    reply: None,
                    kind: Some(kind.into()),
                    error: Some(msg),
                }
            }
        };
        let mut w = &conn;
        if let Ok(s) = serde_json::to_string(&a) {
            let _ = writeln!(w, "{s}");
        }
    };
    let env = match read {
        Err(e) => return send(Err(Error::Invalid(format!("cannot read the request: {e}")))),
        Ok(_) => match serde_json::from_str::<Envelope>(&line) {
            Ok(env) => env,
            Err(e) => return send(Err(Error::Invalid(format!("malformed request: {e}")))),
        },
    };
    if env.version != VERSION {
        return send(Err(Error::Invalid(format!(
            "control protocol version {} is not supported (this owner speaks {VERSION})",
            env.version
        ))));
    }
    if env.vm != vm {
        return send(Err(Error::NotFound(format!(
            "this process owns VM '{vm}', not '{}'",
            env.vm
        ))));
    }
    handler.handle(env.request, &mut send, &conn);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, req: Request, answer: &mut dyn FnMut(Result<Reply>), _: &UnixStream) {
            match req {
                Request::Point { name, .. } => answer(Ok(Reply::Point {
                    point: None,
                    seq: name.map_or(0, |n| n.len() as u64),
                })),
                _ => answer(Err(Error::Conflict("no".into()))),
            }
        }
    }

    #[test]
    fn requests_round_trip_and_errors_keep_their_kind() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let _srv = ControlServer::start(&sock, "vm1", Arc::new(Echo)).unwrap();
        let req = Request::Point {
            app: true,
            name: Some("abc".into()),
        };
        match ask_once(&sock, "vm1", &req).unwrap().unwrap() {
            Reply::Point { seq, .. } => assert_eq!(seq, 3),
            other => panic!("{other:?}"),
        }
        match ask_once(&sock, "vm1", &Request::Status) {
            Some(Err(Error::Conflict(m))) => assert_eq!(m, "no"),
            other => panic!("{other:?}"),
        }
        match ask_once(&sock, "other", &Request::Status) {
            Some(Err(Error::NotFound(m))) => assert!(m.contains("vm1"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(ask_once(&dir.path().join("none.sock"), "vm1", &Request::Status).is_none());
    }

    #[test]
    fn a_malformed_request_gets_a_one_line_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let _srv = ControlServer::start(&sock, "vm1", Arc::new(Echo)).unwrap();
        for bad in [
            "garbage\n",
            "{\"version\":1,\"vm\":\"vm1\",\"op\":\"nope\"}\n",
            "{\"version\":9,\"vm\":\"vm1\",\"op\":\"status\"}\n",
        ] {
            let c = UnixStream::connect(&sock).unwrap();
            (&c).write_all(bad.as_bytes()).unwrap();
            let mut line = String::new();
            BufReader::new(&c).read_line(&mut line).unwrap();
            let a: Answer = serde_json::from_str(&line).unwrap();
            assert!(!a.ok, "{line}");
            assert_eq!(a.kind.as_deref(), Some("invalid"), "{line}");
        }
    }
}
