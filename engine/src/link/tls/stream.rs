//! TLS handshakes and the duplex streams (see the parent module's doc).

use super::*;
use crate::error::{Error, LinkError, Result};
use parking_lot::Mutex;
use rustls::client::{
    ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;
use rustls::{
    AlertDescription, CertificateError, ClientConnection, Connection, NamedGroup, ProtocolVersion,
    ServerConfig, ServerConnection,
};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Handshakes.

/// Which end of a TLS connection we are, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// An agent or processor; the peer is the cache service.
    Client,
    /// The cache service; the peer is an agent or processor.
    Server,
}

impl Side {
    fn peer(self) -> &'static str {
        match self {
            Side::Client => "the cache service",
            Side::Server => "the client",
        }
    }
}

/// A client "session store" that keeps nothing (clients never resume, so every connection
/// shows its certificate) but notes that a TLS 1.3 ticket arrived: the server sends one only
/// after it has accepted our certificate.
#[derive(Debug, Default)]
struct TicketSignal(AtomicBool);

impl TicketSignal {
    fn seen(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl ClientSessionStore for TicketSignal {
    fn set_kx_hint(&self, _: ServerName<'static>, _: NamedGroup) {}
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        None
    }
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {}
    fn insert_tls13_ticket(&self, _: ServerName<'static>, _: Tls13ClientSessionValue) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        None
    }
}

/// Run `f` with a read timeout on `sock` if it has none, restoring it afterwards.
fn with_handshake_timeout<T>(sock: &TcpStream, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let had_none = matches!(sock.read_timeout(), Ok(None));
    if had_none {
        let _ = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    }
    let r = f();
    if had_none {
        let _ = sock.set_read_timeout(None);
    }
    r
}

/// Drive the handshake to completion on the blocking socket.
fn handshake(conn: &mut Connection, sock: &TcpStream, side: Side) -> Result<()> {
    let mut io = sock;
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut io)
                .map_err(|e| handshake_io_err(side, e))?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        match conn.read_tls(&mut io) {
            Ok(0) => return Err(closed_in_handshake(side)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(handshake_io_err(side, e)),
        }
        if let Err(e) = conn.process_new_packets() {
            abort(conn, sock);
            return Err(Error::Link(LinkError::Tls(describe(side, &e))));
        }
    }
}

/// In TLS 1.3 the client finishes its handshake before the server has checked the client's
/// certificate. Wait for the server's verdict (its session ticket, or an alert) so that a
/// refused certificate fails the connect, not some later read.
fn await_acceptance(conn: &mut Connection, sock: &TcpStream, signal: &TicketSignal) -> Result<()> {
    let mut io = sock;
    let closed = || {
        Error::Link(LinkError::Tls(
            "the cache service closed the connection right after the TLS handshake (did it refuse our certificate?)"
                .into(),
        ))
    };
    while !signal.seen() {
        match conn.read_tls(&mut io) {
            Ok(0) => return Err(closed()),
            Ok(_) => {
                if let Err(e) = conn.process_new_packets() {
                    abort(conn, sock);
                    return Err(Error::Link(LinkError::Tls(describe(Side::Client, &e))));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Not our cache service (ours always sends a ticket) or a very slow one: go on;
            // a refusal would then surface on the first read.
            Err(e) if is_timeout(&e) => return Ok(()),
            Err(e) if is_reset(&e) => return Err(closed()),
            Err(e) => return Err(handshake_io_err(Side::Client, e)),
        }
    }
    Ok(())
}

/// After a failed handshake: send the alert rustls queued, close our direction, and give the
/// peer a moment to read it and close too (closing with unread input would reset the
/// connection, and a reset can discard the alert before the peer reads it).
fn abort(conn: &mut Connection, sock: &TcpStream) {
    let mut io = sock;
    while conn.wants_write() {
        if conn.write_tls(&mut io).is_err() {
            break;
        }
    }
    let _ = sock.shutdown(Shutdown::Write);
    let deadline = std::time::Instant::now() + ABORT_LINGER;
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match io.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

fn closed_in_handshake(side: Side) -> Error {
    Error::Link(LinkError::Tls(match side {
        Side::Client => {
            "the peer did not answer with TLS (is it running with --insecure-loopback?)".into()
        }
        Side::Server => {
            "the client closed the connection during the TLS handshake (is it running with --insecure-loopback?)"
                .into()
        }
    }))
}

fn handshake_io_err(side: Side, e: io::Error) -> Error {
    if is_timeout(&e) {
        Error::Link(LinkError::Tls(format!(
            "TLS handshake timed out: {} did not answer",
            side.peer()
        )))
    } else if is_reset(&e) {
        closed_in_handshake(side)
    } else {
        Error::Link(LinkError::Tls(format!(
            "TLS handshake with {}: {e}",
            side.peer()
        )))
    }
}

/// One line an operator can act on, for a TLS failure seen from `side`.
fn describe(side: Side, e: &rustls::Error) -> String {
    use rustls::Error as E;
    use CertificateError as C;
    let theirs = match side {
        Side::Client => "the cache service's certificate",
        Side::Server => "client certificate",
    };
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => match side {
                Side::Client => "the cache service's certificate is not signed by this vault's CA (a foreign certificate? both sites need credentials from the same vault)".into(),
                Side::Server => "client certificate not signed by this vault's CA (a certificate from another vault?)".into(),
            },
            C::Expired | C::ExpiredContext { .. } => {
                format!("{theirs} has expired (issue a new one)")
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("{theirs} is not valid yet (are both sites' clocks right?)")
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "{theirs} is not issued for {SERVER_NAME:?} (not a cache service certificate?)"
            ),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => match side {
                Side::Client => "the cache service's certificate is not a server certificate (another role's certificate?)".into(),
                Side::Server => "client certificate is not a client certificate (the cache service's certificate used by a client?)".into(),
            },
            _ => format!("{theirs} was rejected: {e}"),
        },
        E::NoCertificatesPresented => match side {
            Side::Client => "the cache service sent no certificate".into(),
            Side::Server => "the client sent no certificate".into(),
        },
        E::AlertReceived(alert) => refused(side, *alert),
        E::InvalidMessage(_) => match side {
            Side::Client => {
                "the peer did not answer with TLS (is it running with --insecure-loopback?)".into()
            }
            Side::Server => {
                "the client did not speak TLS (is it running with --insecure-loopback?)".into()
            }
        },
        E::PeerIncompatible(_) => format!("{}'s TLS is incompatible with ours: {e}", side.peer()),
        _ => format!("TLS with {} failed: {e}", side.peer()),
    }
}

/// The peer sent `alert`: say why it most likely refused us.
fn refused(side: Side, alert: AlertDescription) -> String {
    let who = side.peer();
    let why = match alert {
        AlertDescription::UnknownCA => {
            "it trusts another CA: are the credentials from another vault?"
        }
        AlertDescription::CertificateExpired => "our certificate has expired or is not valid yet",
        AlertDescription::BadCertificate => "bad certificate",
        AlertDescription::UnsupportedCertificate => "our certificate is for another role",
        AlertDescription::CertificateRevoked => "our certificate is revoked",
        AlertDescription::CertificateRequired | AlertDescription::NoCertificate => {
            "it requires a certificate"
        }
        AlertDescription::CertificateUnknown
        | AlertDescription::AccessDenied
        | AlertDescription::DecryptError => "certificate not accepted",
        AlertDescription::CloseNotify => return format!("{who} closed the TLS session"),
        other => return format!("{who} aborted TLS ({other:?})"),
    };
    format!("{who} refused our certificate ({why})")
}

// ---------------------------------------------------------------------------------------
// Streams.

/// The TLS state both halves of a stream share.
struct Shared {
    conn: Mutex<Connection>,
    /// Write-ordering lock: ciphertext is taken out of `conn` and sent only while holding it.
    wlock: Mutex<()>,
    /// `conn` may hold records queued by the reader that nobody has sent yet.
    queued: AtomicBool,
    side: Side,
}

impl Shared {
    fn new(mut conn: Connection, side: Side) -> Arc<Shared> {
        // Our own chunking bounds the buffers; rustls's limit would make writes partial.
        conn.set_buffer_limit(None);
        Arc::new(Shared {
            conn: Mutex::new(conn),
            wlock: Mutex::new(()),
            queued: AtomicBool::new(false),
            side,
        })
    }

    /// Encrypt `plain` (may be empty: then only queued records go out) and send it, in order.
    fn send(&self, sock: &TcpStream, cipher: &mut Vec<u8>, plain: &[u8]) -> io::Result<()> {
        {
            let _order = self.wlock.lock();
            // Whatever is queued now is drained below.
            self.queued.store(false, Ordering::SeqCst);
            let mut rest = plain;
            loop {
                let (chunk, tail) = rest.split_at(rest.len().min(WRITE_BUF_BYTES));
                rest = tail;
                cipher.clear();
                {
                    let mut conn = self.conn.lock();
                    if !chunk.is_empty() {
                        conn.writer().write_all(chunk)?;
                    }
                    drain(&mut conn, cipher)?;
                }
                let mut io = sock;
                io.write_all(cipher)?;
                if rest.is_empty() {
                    break;
                }
            }
        }
        if self.queued.load(Ordering::SeqCst) {
            self.send_queued(sock)?;
        }
        Ok(())
    }

    /// Send records queued in `conn`, unless someone holds `wlock`: then that holder sends
    /// them (it checks `queued` after releasing the lock), and we do not wait.
    fn send_queued(&self, sock: &TcpStream) -> io::Result<()> {
        self.queued.store(true, Ordering::SeqCst);
        loop {
            let Some(order) = self.wlock.try_lock() else {
                return Ok(());
            };
            self.queued.store(false, Ordering::SeqCst);
            let mut cipher = Vec::new();
            drain(&mut self.conn.lock(), &mut cipher)?;
            let mut io = sock;
            io.write_all(&cipher)?;
            drop(order);
            if !self.queued.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }
}

/// Move every record rustls has sealed into `out`.
fn drain(conn: &mut Connection, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

/// An established link stream (handshake done), plain TCP or TLS. Reads and writes like a
/// socket; `split` it to read and write from two threads.
pub struct Stream {
    r: ReadHalf,
    w: WriteHalf,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("peer", &self.peer_addr())
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl Stream {
    /// A plaintext stream (the `--insecure-loopback` mode).
    pub fn plain(sock: TcpStream) -> Stream {
        Stream::new(sock, None)
    }

    fn new(sock: TcpStream, tls: Option<Arc<Shared>>) -> Stream {
        // `WriteHalf` buffers; its flushes are the message boundaries.
        let _ = sock.set_nodelay(true);
        let sock = Arc::new(sock);
        Stream {
            r: ReadHalf {
                sock: sock.clone(),
                tls: tls.clone().map(|shared| TlsReader {
                    shared,
                    buf: vec![0u8; READ_BUF_BYTES].into_boxed_slice(),
                    start: 0,
                    end: 0,
                    eof: false,
                }),
            },
            w: WriteHalf {
                sock,
                tls,
                buf: Vec::with_capacity(WRITE_BUF_BYTES),
                cipher: Vec::new(),
                failed: false,
            },
        }
    }

    /// Client side: TLS handshake with the cache service over `sock` (blocking), verifying
    /// its certificate against the vault's CA for [`SERVER_NAME`] and presenting ours.
    pub fn connect_tls(sock: TcpStream, creds: &Credentials) -> Result<Stream> {
        let signal = Arc::new(TicketSignal::default());
        let config = creds.client_config_with(Resumption::store(signal.clone()))?;
        let name = ServerName::try_from(SERVER_NAME)
            .map_err(|e| Error::Invalid(format!("{SERVER_NAME}: {e}")))?;
        let conn = ClientConnection::new(Arc::new(config), name)
            .map_err(|e| Error::Link(LinkError::Tls(format!("cannot start TLS: {e}"))))?;
        let mut conn = Connection::Client(conn);
        with_handshake_timeout(&sock, || {
            handshake(&mut conn, &sock, Side::Client)?;
            if conn.protocol_version() == Some(ProtocolVersion::TLSv1_3) {
                await_acceptance(&mut conn, &sock, &signal)?;
            }
            Ok(())
        })?;
        Ok(Stream::new(sock, Some(Shared::new(conn, Side::Client))))
    }

    /// Server side: TLS handshake (blocking) requiring a client certificate signed by the
    /// vault's CA (`config` from [`Credentials::server_config`]).
    pub fn accept_tls(sock: TcpStream, config: Arc<ServerConfig>) -> Result<Stream> {
        let conn = ServerConnection::new(config)
            .map_err(|e| Error::Link(LinkError::Tls(format!("cannot start TLS: {e}"))))?;
        let mut conn = Connection::Server(conn);
        with_handshake_timeout(&sock, || handshake(&mut conn, &sock, Side::Server))?;
        Ok(Stream::new(sock, Some(Shared::new(conn, Side::Server))))
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.r.sock.peer_addr().ok()
    }

    pub fn is_tls(&self) -> bool {
        self.r.tls.is_some()
    }

    /// The TLS exporter value for this session (32 bytes, label `EXPORTER-standby-link`, no
    /// context), identical at both ends and unique to the session: binds the link-key proof
    /// to this connection. `None` for plain streams.
    pub fn channel_binding(&self) -> Option<[u8; 32]> {
        let tls = self.r.tls.as_ref()?;
        let conn = tls.shared.conn.lock();
        conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
            .ok()
    }

    /// The role named by the peer's certificate (its CN: `standby agent`, `standby
    /// processor`, the cache service's name), for a verified TLS peer; `None` on plain TCP.
    /// The certificate was signed by the vault's CA, so its contents can be trusted.
    pub fn peer_role(&self) -> Option<Role> {
        let tls = self.r.tls.as_ref()?;
        let conn = tls.shared.conn.lock();
        let cert = conn.peer_certificates()?.first()?;
        let der = cert.as_ref();
        [Role::Agent, Role::Processor, Role::Cache]
            .into_iter()
            .find(|r| contains(der, role_cn(*r).as_bytes()))
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.r.sock.set_read_timeout(d)
    }

    /// Split into halves usable from two threads; reading and writing proceed concurrently.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        (self.r, self.w)
    }
}

impl Read for Stream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.r.read(out)
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.w.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// The receiving half of a [`Stream`]. `read` returns `Ok(0)` at the end of the stream: the
/// peer's close_notify, or the TCP connection's end.
pub struct ReadHalf {
    sock: Arc<TcpStream>,
    tls: Option<TlsReader>,
}

struct TlsReader {
    shared: Arc<Shared>,
    /// Ciphertext received but not yet given to rustls: `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

/// What one pass under the connection lock produced.
struct Pass {
    /// `Some(n)`: return `n` bytes (0: end of stream); `None`: need more ciphertext.
    result: io::Result<Option<usize>>,
    /// rustls queued records to send (the alert after a bad record).
    queued: bool,
}

impl ReadHalf {
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(d)
    }
}

impl TlsReader {
    fn read(&mut self, sock: &TcpStream, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let pass = self.decrypt_into(out);
            if pass.queued {
                // A failure here breaks the connection; the writer will see it.
                let _ = self.shared.send_queued(sock);
            }
            if let Some(n) = pass.result? {
                return Ok(n);
            }
            // Wait for ciphertext with the connection unlocked: the writer keeps going.
            let mut io = sock;
            let n = loop {
                match io.read(&mut self.buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            };
            self.start = 0;
            self.end = n;
            self.eof = n == 0;
        }
    }

    /// Under the connection lock: hand out decrypted bytes, decrypting buffered ciphertext
    /// as needed, until `out` is full or the buffered ciphertext runs out.
    fn decrypt_into(&mut self, out: &mut [u8]) -> Pass {
        let mut conn = self.shared.conn.lock();
        let mut total = 0;
        let result = loop {
            match conn.reader().read(&mut out[total..]) {
                // close_notify: the end, after whatever came before it.
                Ok(0) => break Ok(Some(total)),
                Ok(n) => {
                    total += n;
                    if total == out.len() {
                        break Ok(Some(total));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(Some(total)),
                Err(e) => break Err(e),
            }
            if self.start == self.end {
                break Ok((total > 0 || self.eof).then_some(total));
            }
            match conn.read_tls(&mut &self.buf[self.start..self.end]) {
                // rustls takes nothing after close_notify.
                Ok(0) => self.start = self.end,
                Ok(n) => self.start += n,
                Err(e) => break Err(e),
            }
            if let Err(e) = conn.process_new_packets() {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    describe(self.shared.side, &e),
                ));
            }
        };
        Pass {
            result,
            queued: conn.wants_write(),
        }
    }
}

impl Read for ReadHalf {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => (&*self.sock).read(out),
            Some(tls) => tls.read(&self.sock, out),
        }
    }
}

/// The sending half of a [`Stream`]. Buffers up to `WRITE_BUF_BYTES` of plaintext: call
/// `flush` to send (bytes still buffered when it is dropped are discarded, so that dropping
/// a stuck connection never blocks). After a failed send it refuses further writes.
pub struct WriteHalf {
    sock: Arc<TcpStream>,
    tls: Option<Arc<Shared>>,
    buf: Vec<u8>,
    /// Reused ciphertext buffer.
    cipher: Vec<u8>,
    failed: bool,
}

impl WriteHalf {
    /// Shut the TCP socket both ways, so a reader blocked on it wakes (with end of stream).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    /// Close cleanly: flush, send TLS close_notify, and shut our direction of the socket.
    /// The peer's reader sees the end of the stream after all our data.
    pub fn finish(&mut self) -> io::Result<()> {
        self.flush()?;
        if let Some(shared) = &self.tls {
            shared.conn.lock().send_close_notify();
            let r = shared.send(&self.sock, &mut self.cipher, &[]);
            self.note(r)?;
        }
        self.sock.shutdown(Shutdown::Write)
    }

    /// Update our traffic keys and ask the peer to update its own (TLS 1.3 KeyUpdate): its
    /// reader sees the request, and its writer's next record must carry the answer first.
    #[cfg(test)]
    pub(super) fn request_key_update(&mut self) -> io::Result<()> {
        self.flush()?;
        let Some(shared) = &self.tls else {
            return Ok(());
        };
        shared
            .conn
            .lock()
            .refresh_traffic_keys()
            .map_err(io::Error::other)?;
        let r = shared.send(&self.sock, &mut self.cipher, &[]);
        self.note(r)
    }

    fn check(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the link stream failed earlier",
            ));
        }
        Ok(())
    }

    fn note(&mut self, r: io::Result<()>) -> io::Result<()> {
        if r.is_err() {
            // Part of a record may have gone out: nothing sent after it could be read.
            self.failed = true;
        }
        r
    }

    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let r = match &self.tls {
            None => (&*self.sock).write_all(data),
            Some(shared) => shared.send(&self.sock, &mut self.cipher, data),
        };
        self.note(r)
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let r = self.send(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }
}

impl Write for WriteHalf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check()?;
        if self.buf.len() + data.len() > WRITE_BUF_BYTES {
            if !self.buf.is_empty() {
                self.send_buffered()?;
            }
            if data.len() >= WRITE_BUF_BYTES {
                // Large writes skip the buffer (and its copy).
                self.send(data)?;
                return Ok(data.len());
            }
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        self.send_buffered()
    }
}

/// True if the first byte waiting on `sock` starts a TLS handshake record (0x16), without
/// consuming it; waits up to `timeout` for data (then `TimedOut`/`WouldBlock`), `Ok(false)` at
/// end of stream. Lets the cache service answer a plaintext peer on its TLS port in plaintext.
pub fn peek_is_tls(sock: &TcpStream, timeout: Duration) -> io::Result<bool> {
    let old = sock.read_timeout()?;
    sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let mut first = [0u8; 1];
    let r = loop {
        match sock.peek(&mut first) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => break r,
        }
    };
    sock.set_read_timeout(old)?;
    Ok(r? == 1 && first[0] == 0x16)
}
