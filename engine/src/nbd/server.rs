//! The NBD server: an accept loop, one thread per connection, the fixed newstyle option
//! haggling, then requests served in order. Invariant: a malformed message ends the
//! connection or gets the protocol's error reply; it never panics, never hangs the server,
//! and never applies a partial write (a write's payload is read whole before it is applied).

use super::proto::*;
use super::{BlockDevice, Exports};
use parking_lot::Mutex;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long a client may take over the handshake.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Open connections: a handle to shut each socket down, and its thread.
type Conns = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// A running NBD server. Dropping it (or [`Server::stop`]) closes every connection.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Conns,
}

impl Server {
    /// Bind `addr` and start serving `exports`.
    pub fn start(
        addr: &str,
        exports: Arc<dyn Exports>,
        config: ServerConfig,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::new(Mutex::new(Vec::new()));
        let (s2, c2) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                while !s2.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_nodelay(true);
                            let Ok(mine) = stream.try_clone() else {
                                continue;
                            };
                            let (ex, cfg) = (exports.clone(), config.clone());
                            let h = std::thread::Builder::new().name("nbd-conn".into()).spawn(
                                move || {
                                    let closer = stream.try_clone();
                                    let _ = serve_tcp(stream, ex, cfg);
                                    // The server keeps a handle to every socket (to shut it down
                                    // on stop), so close it explicitly: clients wait for EOF.
                                    if let Ok(c) = closer {
                                        let _ = c.shutdown(Shutdown::Both);
                                    }
                                },
                            );
                            if let Ok(h) = h {
                                let mut all = c2.lock();
                                all.retain(|(_, h)| !h.is_finished());
                                all.push((mine, h));
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(Server {
            addr,
            stop,
            accept: Some(accept),
            conns,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, close every connection and wait for their threads.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns: Vec<_> = self.conns.lock().drain(..).collect();
        for (s, h) in conns {
            let _ = s.shutdown(Shutdown::Both);
            let _ = h.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One TCP client: the handshake under the configured timeout, then transmission without.
fn serve_tcp(stream: TcpStream, exports: Arc<dyn Exports>, config: ServerConfig) -> io::Result<()> {
    let r = BufReader::with_capacity(256 << 10, stream.try_clone()?);
    let w = BufWriter::with_capacity(256 << 10, stream.try_clone()?);
    stream.set_read_timeout(Some(config.handshake_timeout))?;
    let mut session = Session::new(r, w, exports);
    match session.handshake()? {
        Some(dev) => {
            stream.set_read_timeout(None)?;
            session.w.flush()?;
            // Replies go out whole as they are ready: a small buffer gathers a header-only
            // reply, while a read's header and data pass straight to one writev.
            let w = BufWriter::with_capacity(REPLY_BUFFER_BYTES, stream.try_clone()?);
            let meta = session.meta.is_some();
            super::transmit::serve(session.r, w, session.structured, meta, dev)
        }
        None => Ok(()),
    }
}

/// The transmission phase's reply buffer: big enough for any reply without data.
const REPLY_BUFFER_BYTES: usize = 4096;

/// Serve one client over any byte stream — the greeting, the option haggling, then
/// requests — until it disconnects. `r` should be buffered; `w` is flushed after each
/// message. The TCP server runs every connection through this; tests and the fuzzer run
/// it over memory.
pub fn serve_session<R: Read, W: Write + Send>(
    r: R,
    w: W,
    exports: Arc<dyn Exports>,
) -> io::Result<()> {
    let mut session = Session::new(r, w, exports);
    match session.handshake()? {
        Some(dev) => session.transmit(dev),
        None => Ok(()),
    }
}

struct Session<R, W> {
    r: R,
    w: W,
    exports: Arc<dyn Exports>,
    no_zeroes: bool,
    structured: bool,
    /// The export that the last NBD_OPT_SET_META_CONTEXT selected `base:allocation` for
    /// (canonical name): block status is served only if the client goes on to that export.
    meta: Option<String>,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

enum Next {
    Option,
    Transmit(String, Arc<dyn BlockDevice>),
    Close,
}

impl<R: Read, W: Write + Send> Session<R, W> {
    fn new(r: R, w: W, exports: Arc<dyn Exports>) -> Self {
        Session {
            r,
            w,
            exports,
            no_zeroes: false,
            structured: false,
            meta: None,
        }
    }

    /// The greeting and the options; `Some(device)` once the client entered transmission.
    fn handshake(&mut self) -> io::Result<Option<Arc<dyn BlockDevice>>> {
        self.w.write_all(&NBDMAGIC.to_be_bytes())?;
        self.w.write_all(&IHAVEOPT.to_be_bytes())?;
        self.w
            .write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        self.w.flush()?;
        let mut b4 = [0u8; 4];
        self.r.read_exact(&mut b4)?;
        let cflags = u32::from_be_bytes(b4);
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(bad("unknown client flags"));
        }
        self.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        loop {
            match self.option()? {
                Next::Option => continue,
                Next::Close => return Ok(None),
                Next::Transmit(name, dev) => {
                    if self.meta.as_deref() != Some(name.as_str()) {
                        self.meta = None;
                    }
                    return Ok(Some(dev));
                }
            }
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        self.w.write_all(&option_reply(option, kind, data))
    }

    fn error(&mut self, option: u32, kind: u32, msg: &str) -> io::Result<Next> {
        self.reply(option, kind, msg.as_bytes())?;
        self.w.flush()?;
        Ok(Next::Option)
    }

    fn tflags(&self, dev: &dyn BlockDevice) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
        if dev.read_only() {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        if self.structured {
            f |= TFLAG_SEND_DF;
        }
        f
    }

    fn option(&mut self) -> io::Result<Next> {
        let mut h = [0u8; 16];
        self.r.read_exact(&mut h)?;
        let mut m = [0u8; 8];
        m.copy_from_slice(&h[0..8]);
        if u64::from_be_bytes(m) != IHAVEOPT {
            return Err(bad("option without IHAVEOPT"));
        }
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if len > MAX_OPTION_BYTES {
            // Too big to buffer: drain it (bounded) and refuse, or hang up if absurd.
            if len > 16 << 20 {
                return Err(bad("option too large"));
            }
            io::copy(&mut (&mut self.r).take(len as u64), &mut io::sink())?;
            return self.error(opt, REP_ERR_TOO_BIG, "option data too large");
        }
        let mut data = vec![0u8; len as usize];
        self.r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data).map_err(|_| bad("export name is not UTF-8"))?;
                // This option cannot fail politely: an unknown export ends the connection.
                let (name, dev) = self
                    .exports
                    .resolve(&name)
                    .ok_or_else(|| bad("unknown export"))?;
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&dev.size().to_be_bytes());
                b.extend_from_slice(&self.tflags(&*dev).to_be_bytes());
                if !self.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                self.w.write_all(&b)?;
                self.w.flush()?;
                Ok(Next::Transmit(name, dev))
            }
            OPT_ABORT => {
                let _ = self.reply(opt, REP_ACK, &[]);
                let _ = self.w.flush();
                Ok(Next::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return self.error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                for name in self.exports.names() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    self.reply(opt, REP_SERVER, &d)?;
                }
                self.reply(opt, REP_ACK, &[])?;
                self.w.flush()?;
                Ok(Next::Option)
            }
            OPT_STARTTLS => self.error(opt, REP_ERR_POLICY, "TLS is not offered on this port"),
            OPT_INFO | OPT_GO => {
                let req = match InfoRequest::parse(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        let msg = format!("malformed NBD_OPT_INFO/GO data: {e}");
                        return self.error(opt, REP_ERR_INVALID, &msg);
                    }
                };
                let Some((name, dev)) = self.exports.resolve(&req.name) else {
                    let msg = format!("no export named '{}'", req.name);
                    return self.error(opt, REP_ERR_UNKNOWN, &msg);
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&dev.size().to_be_bytes());
                info.extend_from_slice(&self.tflags(&*dev).to_be_bytes());
                self.reply(opt, REP_INFO, &info)?;
                // The canonical name: asked for, or unasked when the client named the
                // default export ("") and so cannot know which one it gets.
                if req.infos.contains(&INFO_NAME) || req.name != name {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    self.reply(opt, REP_INFO, &d)?;
                }
                // Always: the spec asks a server with constraints other than the defaults
                // to advertise them whether or not the client asked. A client that did not
                // ask is still served (the Linux nbd-client never asks); a request outside
                // the constraints then gets NBD_EINVAL and changes nothing.
                let min = dev.min_block_bytes();
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&min.to_be_bytes());
                d.extend_from_slice(&4096u32.max(min).to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD_BYTES.to_be_bytes());
                self.reply(opt, REP_INFO, &d)?;
                self.reply(opt, REP_ACK, &[])?;
                self.w.flush()?;
                if opt == OPT_GO {
                    Ok(Next::Transmit(name, dev))
                } else {
                    Ok(Next::Option)
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return self.error(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                self.structured = true;
                self.reply(opt, REP_ACK, &[])?;
                self.w.flush()?;
                Ok(Next::Option)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !self.structured {
                    return self.error(
                        opt,
                        REP_ERR_INVALID,
                        "structured replies must be negotiated first",
                    );
                }
                let req = match MetaRequest::parse(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        let msg = format!("malformed meta context request: {e}");
                        return self.error(opt, REP_ERR_INVALID, &msg);
                    }
                };
                let Some((export, _)) = self.exports.resolve(&req.export) else {
                    let msg = format!("no export named '{}'", req.export);
                    return self.error(opt, REP_ERR_UNKNOWN, &msg);
                };
                let matches = |q: &str| q == BASE_ALLOCATION || (!set && q == "base:");
                let any =
                    (!set && req.queries.is_empty()) || req.queries.iter().any(|q| matches(q));
                if any {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    self.reply(opt, REP_META_CONTEXT, &d)?;
                }
                if set {
                    self.meta = any.then_some(export);
                }
                self.reply(opt, REP_ACK, &[])?;
                self.w.flush()?;
                Ok(Next::Option)
            }
            _ => self.error(opt, REP_ERR_UNSUP, "option not supported"),
        }
    }

    fn transmit(self, dev: Arc<dyn BlockDevice>) -> io::Result<()> {
        let meta = self.meta.is_some();
        super::transmit::serve(self.r, self.w, self.structured, meta, dev)
    }
}
