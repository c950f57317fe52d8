//! The NBD server: an accept loop, one thread per connection, the fixed newstyle option
//! haggling, then requests served in order. Invariant: a malformed message ends the
//! connection or gets the protocol's error reply; it never panics, never hangs the server,
//! and never applies a partial write (a write's payload is read whole before it is applied).

use super::proto::*;
use super::{BlockDevice, DevError, Exports, Extent};
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
                                    let _ = Connection::new(stream, ex, cfg).and_then(|c| c.run());
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

struct Connection {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    stream: TcpStream,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    structured: bool,
    meta: bool,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

enum Next {
    Option,
    Transmit(Arc<dyn BlockDevice>),
    Close,
}

impl Connection {
    fn new(
        stream: TcpStream,
        exports: Arc<dyn Exports>,
        config: ServerConfig,
    ) -> io::Result<Connection> {
        Ok(Connection {
            r: BufReader::with_capacity(256 << 10, stream.try_clone()?),
            w: BufWriter::with_capacity(256 << 10, stream.try_clone()?),
            stream,
            exports,
            config,
            structured: false,
            meta: false,
        })
    }

    fn run(mut self) -> io::Result<()> {
        self.stream
            .set_read_timeout(Some(self.config.handshake_timeout))?;
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
        let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        loop {
            match self.option(no_zeroes)? {
                Next::Option => continue,
                Next::Close => return Ok(()),
                Next::Transmit(dev) => {
                    self.stream.set_read_timeout(None)?;
                    return self.transmit(dev);
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

    fn option(&mut self, no_zeroes: bool) -> io::Result<Next> {
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
                let dev = self
                    .exports
                    .get(&name)
                    .ok_or_else(|| bad("unknown export"))?;
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&dev.size().to_be_bytes());
                b.extend_from_slice(&self.tflags(&*dev).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                self.w.write_all(&b)?;
                self.w.flush()?;
                Ok(Next::Transmit(dev))
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
                let Some(req) = InfoRequest::parse(&data) else {
                    return self.error(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
                };
                let Some(dev) = self.exports.get(&req.name) else {
                    let msg = format!("no export named '{}'", req.name);
                    return self.error(opt, REP_ERR_UNKNOWN, &msg);
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&dev.size().to_be_bytes());
                info.extend_from_slice(&self.tflags(&*dev).to_be_bytes());
                self.reply(opt, REP_INFO, &info)?;
                if req.infos.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(req.name.as_bytes());
                    self.reply(opt, REP_INFO, &d)?;
                }
                if req.infos.contains(&INFO_BLOCK_SIZE) {
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    d.extend_from_slice(&dev.min_block_bytes().to_be_bytes());
                    d.extend_from_slice(&4096u32.max(dev.min_block_bytes()).to_be_bytes());
                    d.extend_from_slice(&MAX_PAYLOAD_BYTES.to_be_bytes());
                    self.reply(opt, REP_INFO, &d)?;
                }
                self.reply(opt, REP_ACK, &[])?;
                self.w.flush()?;
                if opt == OPT_GO {
                    Ok(Next::Transmit(dev))
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
                let Some(req) = MetaRequest::parse(&data) else {
                    return self.error(opt, REP_ERR_INVALID, "malformed meta context request");
                };
                if self.exports.get(&req.export).is_none() {
                    let msg = format!("no export named '{}'", req.export);
                    return self.error(opt, REP_ERR_UNKNOWN, &msg);
                }
                let matches = |q: &str| q == BASE_ALLOCATION || (!set && q == "base:");
                let any =
                    (!set && req.queries.is_empty()) || req.queries.iter().any(|q| matches(q));
                if any {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    self.reply(opt, REP_META_CONTEXT, &d)?;
                }
                if set {
                    self.meta = any;
                }
                self.reply(opt, REP_ACK, &[])?;
                self.w.flush()?;
                Ok(Next::Option)
            }
            _ => self.error(opt, REP_ERR_UNSUP, "option not supported"),
        }
    }

    fn send_error(&mut self, cookie: u64, e: &DevError) -> io::Result<()> {
        if self.structured {
            self.w
                .write_all(&structured_error(cookie, e.errno, &e.message))
        } else {
            self.w.write_all(&simple_reply(cookie, e.errno))
        }
    }

    fn send_ok(&mut self, cookie: u64) -> io::Result<()> {
        if self.structured {
            self.w.write_all(&structured_header(
                cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                0,
            ))
        } else {
            self.w.write_all(&simple_reply(cookie, 0))
        }
    }

    fn transmit(mut self, dev: Arc<dyn BlockDevice>) -> io::Result<()> {
        let size = dev.size();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let mut h = [0u8; REQUEST_BYTES];
            match self.r.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let req = match Request::parse(&h) {
                Ok(r) => r,
                Err(RequestError::BadMagic(_)) => return Err(bad("bad request magic")),
                Err(RequestError::Refuse { cookie, errno, why }) => {
                    // The header is sound enough to know whether a payload follows.
                    let cmd = u16::from_be_bytes([h[6], h[7]]);
                    let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
                    if cmd == CMD_WRITE {
                        if len > MAX_PAYLOAD_BYTES {
                            return Err(bad("oversized write"));
                        }
                        io::copy(&mut (&mut self.r).take(len as u64), &mut io::sink())?;
                    }
                    self.send_error(
                        cookie,
                        &DevError {
                            errno,
                            message: why,
                        },
                    )?;
                    self.w.flush()?;
                    continue;
                }
            };
            let end = req.offset.checked_add(req.length as u64);
            let in_bounds = end.is_some_and(|e| e <= size);
            let result: Result<(), DevError> = match req.command {
                CMD_READ => {
                    if req.length > MAX_PAYLOAD_BYTES {
                        Err(DevError {
                            errno: EOVERFLOW,
                            message: "read too large".into(),
                        })
                    } else if !in_bounds {
                        Err(DevError::invalid("read past the end of the export"))
                    } else {
                        buf.resize(req.length as usize, 0);
                        match dev.read(req.offset, &mut buf) {
                            Ok(()) => {
                                if self.structured {
                                    self.w.write_all(&structured_header(
                                        req.cookie,
                                        REPLY_FLAG_DONE,
                                        REPLY_TYPE_OFFSET_DATA,
                                        8 + req.length,
                                    ))?;
                                    self.w.write_all(&req.offset.to_be_bytes())?;
                                } else {
                                    self.w.write_all(&simple_reply(req.cookie, 0))?;
                                }
                                self.w.write_all(&buf)?;
                                self.w.flush()?;
                                continue;
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
                CMD_WRITE => {
                    if req.length > MAX_PAYLOAD_BYTES {
                        // Cannot stay in sync without buffering it: hang up.
                        return Err(bad("oversized write"));
                    }
                    buf.resize(req.length as usize, 0);
                    self.r.read_exact(&mut buf)?;
                    let fua = req.flags & CMD_FLAG_FUA != 0;
                    self.check_write(&*dev, in_bounds, req.offset, req.length as u64)
                        .and_then(|_| dev.write(req.offset, &buf, fua))
                }
                CMD_DISC => {
                    self.w.flush()?;
                    return Ok(());
                }
                CMD_FLUSH => dev.flush(),
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    let fua = req.flags & CMD_FLAG_FUA != 0;
                    self.check_write(&*dev, in_bounds, req.offset, req.length as u64)
                        .and_then(|_| {
                            if req.command == CMD_TRIM {
                                dev.trim(req.offset, req.length as u64, fua)
                            } else {
                                dev.write_zeroes(req.offset, req.length as u64, fua)
                            }
                        })
                }
                CMD_BLOCK_STATUS => {
                    if !self.structured || !self.meta {
                        Err(DevError::invalid(
                            "block status needs structured replies and base:allocation",
                        ))
                    } else if !in_bounds || req.length == 0 {
                        Err(DevError::invalid("block status past the end of the export"))
                    } else {
                        match dev.block_status(req.offset, req.length as u64) {
                            Ok(extents) => {
                                self.block_status(
                                    req.cookie,
                                    req.length,
                                    req.flags & CMD_FLAG_REQ_ONE != 0,
                                    &extents,
                                )?;
                                continue;
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
                _ => Err(DevError::invalid(format!(
                    "unknown command {}",
                    req.command
                ))),
            };
            match result {
                Ok(()) => self.send_ok(req.cookie)?,
                Err(e) => self.send_error(req.cookie, &e)?,
            }
            self.w.flush()?;
        }
    }

    fn check_write(
        &self,
        dev: &dyn BlockDevice,
        in_bounds: bool,
        offset: u64,
        len: u64,
    ) -> Result<(), DevError> {
        if dev.read_only() {
            return Err(DevError {
                errno: EPERM,
                message: "the export is read-only".into(),
            });
        }
        if !in_bounds {
            return Err(DevError::no_space("write past the end of the export"));
        }
        let min = dev.min_block_bytes() as u64;
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            return Err(DevError::invalid(format!(
                "writes must be aligned to {min} bytes"
            )));
        }
        Ok(())
    }

    fn block_status(
        &mut self,
        cookie: u64,
        length: u32,
        one: bool,
        extents: &[Extent],
    ) -> io::Result<()> {
        let mut descs: Vec<(u32, u32)> = Vec::new();
        let mut covered = 0u64;
        for e in extents {
            if covered >= length as u64 || e.len == 0 {
                break;
            }
            let len = e.len.min(length as u64 - covered).min(u32::MAX as u64) as u32;
            let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
            match descs.last_mut() {
                Some(last) if last.1 == flags && !one => last.0 = last.0.saturating_add(len),
                _ => descs.push((len, flags)),
            }
            covered += len as u64;
            if one {
                break;
            }
        }
        if descs.is_empty() {
            descs.push((length, 0));
        }
        let mut payload = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        for (l, f) in descs {
            payload.extend_from_slice(&l.to_be_bytes());
            payload.extend_from_slice(&f.to_be_bytes());
        }
        self.w.write_all(&structured_header(
            cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            payload.len() as u32,
        ))?;
        self.w.write_all(&payload)?;
        self.w.flush()
    }
}
