//! A fault-injecting HTTP/1.1 forwarding proxy, run inside the test's own process (threads,
//! std only), in front of a real server (Azurite, radosgw): the client under test (the
//! `standby` binary, or the `object_store` crate) is pointed at the proxy's address instead
//! of the server's.
//!
//! It parses just enough HTTP to know where each request and response ends (Content-Length,
//! chunked, HEAD/204/304 without a body), so faults hit whole requests: a fraction answered
//! 500 or 503 without reaching the server, responses delayed, connections dropped halfway
//! through a request body (the server sees a truncated upload) or a response body (the
//! client sees a truncated download), a pause (nothing accepted, nothing forwarded, until
//! resumed), and a kill (listener and every open connection closed at once, as a killed
//! process's sockets would be) followed by a restart on the same port. Choices among
//! requests come from a seeded generator, so a run's fault pattern is reproducible.
//!
//! Pass-through (no faults set) it counts requests by method and bytes each way: what a
//! cloud bill charges for.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy does to the requests it forwards. Rates are per mille of requests.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answer this many per mille of requests with `error_status` (the server never sees
    /// them).
    pub error_per_mille: u32,
    /// 500 or 503 (0 means 503).
    pub error_status: u16,
    /// Forward half of the request body, then close both connections.
    pub drop_request_per_mille: u32,
    /// Relay the response head and half of its body, then close both connections.
    pub drop_response_per_mille: u32,
    /// Hold every response this long before relaying it.
    pub delay: Duration,
}

/// What went through, counted since start (across restarts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests the client sent, by method (faulted ones included).
    pub by_method: HashMap<String, u64>,
    /// Requests answered with an injected error.
    pub errors_injected: u64,
    /// Connections dropped on purpose mid-body.
    pub drops_injected: u64,
    /// Body and head bytes client → server and server → client.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Counts {
    pub fn requests(&self) -> u64 {
        self.by_method.values().sum()
    }
    pub fn method(&self, m: &str) -> u64 {
        self.by_method.get(m).copied().unwrap_or(0)
    }
}

struct Shared {
    upstream: String,
    faults: Mutex<Faults>,
    rng: Mutex<u64>,
    paused: Mutex<bool>,
    unpaused: Condvar,
    counts: Mutex<Counts>,
    /// Every open socket (client side and server side), to close them all on kill.
    open: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

/// A running proxy. Dropping it kills it.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `upstream` (`host:port`), passing
    /// everything through until told otherwise.
    pub fn start(upstream: &str) -> FaultProxy {
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(0x9E37_79B9_7F4A_7C15),
            paused: Mutex::new(false),
            unpaused: Condvar::new(),
            counts: Mutex::new(Counts::default()),
            open: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut p = FaultProxy {
            addr,
            shared,
            stop: Arc::new(AtomicBool::new(false)),
            acceptor: None,
        };
        p.serve(listener);
        p
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap() = faults;
    }

    /// Back to pass-through.
    pub fn clear(&self) {
        self.set(Faults::default());
    }

    /// Reseed the generator that picks which requests are faulted.
    pub fn seed(&self, seed: u64) {
        *self.shared.rng.lock().unwrap() = seed | 1;
    }

    /// Accept nothing and forward nothing until [`FaultProxy::resume`]: new connections
    /// wait in the listen backlog, requests on open ones wait before they are forwarded.
    pub fn pause(&self) {
        *self.shared.paused.lock().unwrap() = true;
    }

    pub fn resume(&self) {
        *self.shared.paused.lock().unwrap() = false;
        self.shared.unpaused.notify_all();
    }

    pub fn counts(&self) -> Counts {
        self.shared.counts.lock().unwrap().clone()
    }

    pub fn reset_counts(&self) {
        *self.shared.counts.lock().unwrap() = Counts::default();
    }

    /// As a kill -9 of a proxy process looks from both sides: the port stops listening and
    /// every open connection is closed at once, whatever it was in the middle of.
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake a paused acceptor and a blocked accept().
        self.resume_for_stop();
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for (_, s) in self.shared.open.lock().unwrap().drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Listen again on the same port, with the same faults and counts.
    pub fn restart(&mut self) {
        assert!(
            self.acceptor.is_none(),
            "restart of a proxy that was not killed"
        );
        let listener = bind_retrying(self.addr);
        self.stop = Arc::new(AtomicBool::new(false));
        self.serve(listener);
    }

    fn resume_for_stop(&self) {
        self.shared.unpaused.notify_all();
    }

    fn serve(&mut self, listener: TcpListener) {
        let shared = self.shared.clone();
        let stop = self.stop.clone();
        self.acceptor = Some(std::thread::spawn(move || loop {
            {
                let mut paused = shared.paused.lock().unwrap();
                while *paused && !stop.load(Ordering::SeqCst) {
                    paused = shared.unpaused.wait(paused).unwrap();
                }
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok((client, _)) = listener.accept() else {
                continue;
            };
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let _ = Conn::run(&shared, &stop, client);
            });
        }));
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.kill();
        }
    }
}

fn bind_retrying(addr: SocketAddr) -> TcpListener {
    // The old listener is closed; std sets SO_REUSEADDR, so only a racing bind by someone
    // else can hold the port, and then the test cannot go on anyway.
    for _ in 0..200 {
        if let Ok(l) = TcpListener::bind(addr) {
            return l;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("fault proxy: cannot listen on {addr} again");
}

/// One client connection and its own connection to the server.
struct Conn<'a> {
    shared: &'a Shared,
    ids: Vec<u64>,
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().unwrap();
        for id in &self.ids {
            if let Some(s) = open.remove(id) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl<'a> Conn<'a> {
    fn register(&mut self, s: &TcpStream) -> io::Result<()> {
        let id = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
        self.shared.open.lock().unwrap().insert(id, s.try_clone()?);
        self.ids.push(id);
        Ok(())
    }

    fn run(shared: &'a Shared, stop: &AtomicBool, client: TcpStream) -> io::Result<()> {
        let mut conn = Conn {
            shared,
            ids: Vec::new(),
        };
        conn.register(&client)?;
        let mut from_client = BufReader::new(client.try_clone()?);
        let mut to_client = client;
        let mut server: Option<(BufReader<TcpStream>, TcpStream)> = None;
        loop {
            let Some(head) = read_head(&mut from_client)? else {
                return Ok(());
            };
            {
                let mut paused = shared.paused.lock().unwrap();
                while *paused && !stop.load(Ordering::SeqCst) {
                    paused = shared.unpaused.wait(paused).unwrap();
                }
            }
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let req = Head::parse(&head)?;
            let method = req.start.split(' ').next().unwrap_or("").to_string();
            let (faults, pick) = {
                let f = shared.faults.lock().unwrap().clone();
                let mut rng = shared.rng.lock().unwrap();
                (f, next_per_mille(&mut rng))
            };
            {
                let mut c = shared.counts.lock().unwrap();
                *c.by_method.entry(method.clone()).or_default() += 1;
                c.bytes_up += head.len() as u64;
            }
            let req_len = req.body_len(true, &method, 0)?;
            let error_until = faults.error_per_mille;
            let drop_req_until = error_until + faults.drop_request_per_mille;
            let drop_resp_until = drop_req_until + faults.drop_response_per_mille;

            if pick < error_until {
                // Read (and discard) the whole request, then answer the error.
                copy_body(&mut from_client, &mut io::sink(), req_len, None)?;
                let status = match faults.error_status {
                    0 => 503,
                    s => s,
                };
                let reason = if status == 500 {
                    "Internal Server Error"
                } else {
                    "Service Unavailable"
                };
                shared.counts.lock().unwrap().errors_injected += 1;
                let close = if req.close {
                    "Connection: close\r\n"
                } else {
                    ""
                };
                write!(
                    to_client,
                    "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n{close}\r\n"
                )?;
                to_client.flush()?;
                if req.close {
                    return Ok(());
                }
                continue;
            }

            if server.is_none() {
                let s = TcpStream::connect(&shared.upstream)?;
                s.set_nodelay(true)?;
                conn.register(&s)?;
                server = Some((BufReader::new(s.try_clone()?), s));
            }
            let Some((from_server, to_server)) = server.as_mut() else {
                return Ok(());
            };
            to_server.write_all(&head)?;
            if pick < drop_req_until {
                let half = match req_len {
                    BodyLen::Fixed(n) => Some(n / 2),
                    _ => Some(0),
                };
                let sent = copy_body(&mut from_client, to_server, req_len, half)?;
                shared.counts.lock().unwrap().bytes_up += sent;
                shared.counts.lock().unwrap().drops_injected += 1;
                return Ok(()); // Conn's drop closes both sides
            }
            let sent = copy_body(&mut from_client, to_server, req_len, None)?;
            to_server.flush()?;
            shared.counts.lock().unwrap().bytes_up += sent;

            // The response (skipping any 1xx interim ones, relayed as they come).
            loop {
                let Some(rhead) = read_head(from_server)? else {
                    return Ok(());
                };
                let resp = Head::parse(&rhead)?;
                let status: u16 = resp
                    .start
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let resp_len = resp.body_len(false, &method, status)?;
                if !faults.delay.is_zero() {
                    std::thread::sleep(faults.delay);
                }
                if (drop_req_until..drop_resp_until).contains(&pick) && status >= 200 {
                    shared.counts.lock().unwrap().drops_injected += 1;
                    if let BodyLen::Fixed(n) = resp_len {
                        if n > 0 {
                            to_client.write_all(&rhead)?;
                            copy_body(from_server, &mut to_client, resp_len, Some(n / 2))?;
                            to_client.flush()?;
                        }
                    }
                    return Ok(());
                }
                to_client.write_all(&rhead)?;
                let got = copy_body(from_server, &mut to_client, resp_len, None)?;
                to_client.flush()?;
                shared.counts.lock().unwrap().bytes_down += rhead.len() as u64 + got;
                if status >= 200 {
                    if matches!(resp_len, BodyLen::UntilClose) || resp.close {
                        return Ok(());
                    }
                    break;
                }
            }
            if req.close {
                return Ok(());
            }
        }
    }
}

fn next_per_mille(state: &mut u64) -> u32 {
    // xorshift64*
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % 1000) as u32
}

/// The bytes of one message head, through the blank line; `None` on a clean end of stream
/// before its first byte.
fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
            if head == b"\r\n" {
                head.clear(); // a stray CRLF between messages
                continue;
            }
            return Ok(Some(head));
        }
        if head.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
    }
}

struct Head {
    start: String,
    content_length: Option<u64>,
    chunked: bool,
    close: bool,
}

#[derive(Clone, Copy, Debug)]
enum BodyLen {
    Fixed(u64),
    Chunked,
    UntilClose,
}

impl Head {
    fn parse(bytes: &[u8]) -> io::Result<Head> {
        let text = String::from_utf8_lossy(bytes);
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or("").to_string();
        let mut h = Head {
            start,
            content_length: None,
            chunked: false,
            close: false,
        };
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => {
                    h.content_length = Some(v.parse().map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "bad content-length")
                    })?)
                }
                "transfer-encoding" => h.chunked = v.contains("chunked"),
                "connection" => h.close = v.contains("close"),
                _ => {}
            }
        }
        Ok(h)
    }

    fn body_len(&self, request: bool, method: &str, status: u16) -> io::Result<BodyLen> {
        if !request && (method == "HEAD" || status < 200 || status == 204 || status == 304) {
            return Ok(BodyLen::Fixed(0));
        }
        Ok(match (self.chunked, self.content_length) {
            (true, _) => BodyLen::Chunked,
            (false, Some(n)) => BodyLen::Fixed(n),
            (false, None) if request => BodyLen::Fixed(0),
            (false, None) => BodyLen::UntilClose,
        })
    }
}

/// Copy one body from `r` to `w`, at most `limit` bytes of it (then stop early). Returns
/// the bytes copied.
fn copy_body(
    r: &mut BufReader<TcpStream>,
    w: &mut dyn Write,
    len: BodyLen,
    limit: Option<u64>,
) -> io::Result<u64> {
    let limit = limit.unwrap_or(u64::MAX);
    match len {
        BodyLen::Fixed(n) => copy_n(r, w, n.min(limit)),
        BodyLen::UntilClose => copy_n(r, w, limit),
        BodyLen::Chunked => {
            let mut total = 0u64;
            loop {
                let mut line = Vec::new();
                r.read_until(b'\n', &mut line)?;
                let size_text = String::from_utf8_lossy(&line);
                let size = u64::from_str_radix(
                    size_text.trim().split(';').next().unwrap_or("").trim(),
                    16,
                )
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                if total + line.len() as u64 > limit {
                    return Ok(total);
                }
                w.write_all(&line)?;
                total += line.len() as u64;
                if size == 0 {
                    // Trailers, through the blank line.
                    loop {
                        let mut t = Vec::new();
                        r.read_until(b'\n', &mut t)?;
                        w.write_all(&t)?;
                        total += t.len() as u64;
                        if t == b"\r\n" || t.is_empty() {
                            return Ok(total);
                        }
                    }
                }
                let want = (size + 2).min(limit - total);
                let got = copy_n(r, w, want)?;
                total += got;
                if got < size + 2 {
                    return Ok(total);
                }
            }
        }
    }
}

fn copy_n(r: &mut BufReader<TcpStream>, w: &mut dyn Write, n: u64) -> io::Result<u64> {
    let copied = io::copy(&mut r.by_ref().take(n), w)?;
    Ok(copied)
}
