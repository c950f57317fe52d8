//! A pipelined NBD client (fixed newstyle, NBD_OPT_GO, simple replies), shared by the
//! `users` and the `nbd` bench: `depth` requests in flight, a reply-reader thread, FLUSH
//! barriers; plus a one-at-a-time FUA writer that records each write's latency.

use standby_engine::nbd::proto::*;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const EXPORT: &str = "os";

/// What the client sends.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    /// `total` bytes written in order from offset 0, `req` bytes a request, FLUSH every
    /// `flush_every` bytes and at the end.
    SeqWrite {
        req: u32,
        total: u64,
        flush_every: u64,
    },
    /// `total` bytes written `req` bytes at a time at random `req`-aligned offsets of a
    /// `disk`-byte export, FLUSH every `flush_every` bytes and at the end.
    RandomWrite {
        req: u32,
        total: u64,
        disk: u64,
        flush_every: u64,
    },
    /// The whole `disk`-byte export read in order, `req` bytes a request.
    SeqRead { req: u32, disk: u64 },
}

/// A small deterministic generator (xorshift64) for offsets.
pub struct Xorshift(pub u64);

impl Xorshift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A read's cookie carries its offset and length (in sectors), so replies can be checked
/// in whatever order they come.
fn cookie(offset: u64, read_len: u32) -> u64 {
    ((offset >> 9) << 24) | (read_len as u64 >> 9)
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Fixed newstyle handshake with NBD_OPT_GO: the export's size and transmission flags.
pub fn handshake(s: &mut TcpStream, name: &str) -> io::Result<(u64, u16)> {
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet)?;
    let magic = u64::from_be_bytes(greet[0..8].try_into().unwrap());
    let opt = u64::from_be_bytes(greet[8..16].try_into().unwrap());
    let hflags = u16::from_be_bytes([greet[16], greet[17]]);
    if magic != NBDMAGIC || opt != IHAVEOPT || hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("not a fixed newstyle NBD server".into()));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    let mut msg = cflags.to_be_bytes().to_vec();
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(&data);
    s.write_all(&msg)?;
    let mut info = None;
    loop {
        let mut h = [0u8; 8];
        s.read_exact(&mut h)?;
        if u64::from_be_bytes(h) != REPLY_MAGIC_OPT {
            return Err(bad("bad option reply magic".into()));
        }
        let _opt = read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)?;
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d)?;
        match kind {
            REP_ACK => break,
            REP_INFO if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                info = Some((size, u16::from_be_bytes([d[10], d[11]])));
            }
            REP_INFO => {}
            k => {
                return Err(bad(format!(
                    "NBD_OPT_GO refused ({k:#x}): {}",
                    String::from_utf8_lossy(&d)
                )))
            }
        }
    }
    info.ok_or_else(|| bad("no export info".into()))
}

/// Reads simple replies until the server hangs up; tells the sender of each completion.
/// With `check`, returns an order-independent digest of what the reads returned.
fn reply_reader(
    mut s: TcpStream,
    done: mpsc::Sender<Result<(), String>>,
    check: bool,
) -> io::Result<u64> {
    let mut r = io::BufReader::with_capacity(1 << 20, &mut s);
    let mut buf = vec![0u8; 1 << 20];
    let mut digest = 0u64;
    loop {
        let mut h = [0u8; 16];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(digest),
            Err(e) => return Err(e),
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(bad(format!("bad reply magic {magic:#x}")));
        }
        let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let c = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = ((c & 0xff_ffff) << 9) as usize;
        if errno != 0 {
            let _ = done.send(Err(format!("request {c:#x} failed with errno {errno}")));
            continue;
        }
        if len > 0 {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            r.read_exact(&mut buf[..len])?;
            if check {
                let mut hs = crc32fast::Hasher::new();
                hs.update(&(c >> 24).to_le_bytes());
                hs.update(&buf[..len]);
                digest = digest.wrapping_add(hs.finalize() as u64);
            }
        }
        if done.send(Ok(())).is_err() {
            return Ok(digest);
        }
    }
}

struct Sender {
    w: BufWriter<TcpStream>,
    done: mpsc::Receiver<Result<(), String>>,
    inflight: usize,
    depth: usize,
    next: u64,
}

impl Sender {
    fn complete_one(&mut self) {
        self.w.flush().expect("send");
        match self.done.recv() {
            Ok(Ok(())) => self.inflight -= 1,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("the server hung up"),
        }
    }

    fn send(&mut self, command: u16, offset: u64, length: u32, payload: &[u8]) {
        while self.inflight >= self.depth {
            self.complete_one();
        }
        self.next += 1;
        let cookie = if command == CMD_READ {
            cookie(offset, length)
        } else {
            cookie(self.next << 9, 0)
        };
        let req = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        self.w.write_all(&req.encode()).expect("send");
        self.w.write_all(payload).expect("send");
        self.w.flush().expect("send");
        self.inflight += 1;
    }

    fn barrier(&mut self) {
        while self.inflight > 0 {
            self.complete_one();
        }
    }

    fn flush_barrier(&mut self) {
        self.barrier();
        self.send(CMD_FLUSH, 0, 0, &[]);
        self.barrier();
    }
}

/// One step of a pattern. `Flush`: wait for the writes sent, FLUSH, wait for it.
pub enum Op<'a> {
    Write(u64, &'a [u8]),
    Read(u64, u32),
    Flush,
}

/// The requests of `pattern`, in order (write data sliced from `pool`).
pub fn ops(pattern: Pattern, pool: &[u8]) -> impl Iterator<Item = Op<'_>> {
    let slice = move |i: u64, len: usize| {
        let steps = ((pool.len() - len) / 4096) as u64;
        let at = ((i * 7919) % steps) as usize * 4096;
        &pool[at..at + len]
    };
    let (req, count, write, slots, flush_every) = match pattern {
        Pattern::SeqWrite {
            req,
            total,
            flush_every,
        } => (req, total / req as u64, true, 0, flush_every),
        Pattern::RandomWrite {
            req,
            total,
            disk,
            flush_every,
        } => (
            req,
            total / req as u64,
            true,
            disk / req as u64,
            flush_every,
        ),
        Pattern::SeqRead { req, disk } => (req, disk / req as u64, false, 0, u64::MAX),
    };
    let per_flush = (flush_every / req as u64).max(1);
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    // Two writes of one block in flight at once may land in either order (NBD promises no
    // order between requests in flight; block layers never send such a pair), so a model
    // in submission order could not tell the right result: a random slot is never one of
    // the last RECENT (more than any depth used here).
    const RECENT: usize = 64;
    let mut recent = std::collections::VecDeque::with_capacity(RECENT);
    (0..count).flat_map(move |i| {
        let slot = if slots > RECENT as u64 {
            let mut s = rng.next() % slots;
            while recent.contains(&s) {
                s = rng.next() % slots;
            }
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(s);
            s
        } else if slots > 0 {
            rng.next() % slots
        } else {
            i
        };
        let offset = slot * req as u64;
        let op = if write {
            Op::Write(offset, slice(i, req as usize))
        } else {
            Op::Read(offset, req)
        };
        let flush = write && ((i + 1) % per_flush == 0 || i + 1 == count);
        std::iter::once(op).chain(flush.then_some(Op::Flush))
    })
}

/// Write what `pattern` writes into `path` (a fresh sparse file of `size` bytes): the
/// bytes a server must end with.
pub fn model_image(path: &Path, size: u64, pattern: Pattern, pool: &[u8]) {
    let f = std::fs::File::create(path).expect("model image");
    f.set_len(size).expect("model size");
    for op in ops(pattern, pool) {
        if let Op::Write(offset, data) = op {
            f.write_all_at(data, offset).expect("model write");
        }
    }
}

fn connect(addr: SocketAddr, size: u64) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let (got, flags) = handshake(&mut s, EXPORT).expect("handshake");
    assert_eq!(got, size, "export size");
    (s, flags)
}

/// Connect, run `pattern` with `depth` requests in flight, disconnect. Returns the time
/// from the first request to the last reply, and (with `check`) the digest of the reads.
pub fn drive(
    addr: SocketAddr,
    size: u64,
    pattern: Pattern,
    pool: &[u8],
    depth: usize,
    check: bool,
) -> (Duration, u64) {
    let (s, _) = connect(addr, size);
    let (tx, rx) = mpsc::channel();
    let rs = s.try_clone().expect("clone");
    let reader = std::thread::Builder::new()
        .name("client-replies".into())
        .spawn(move || reply_reader(rs, tx, check))
        .expect("reader thread");
    let mut c = Sender {
        w: BufWriter::with_capacity(256 << 10, s.try_clone().expect("clone")),
        done: rx,
        inflight: 0,
        depth,
        next: 0,
    };
    let start = Instant::now();
    for op in ops(pattern, pool) {
        match op {
            Op::Write(offset, data) => c.send(CMD_WRITE, offset, data.len() as u32, data),
            Op::Read(offset, len) => c.send(CMD_READ, offset, len, &[]),
            Op::Flush => c.flush_barrier(),
        }
    }
    c.barrier();
    let took = start.elapsed();
    c.send(CMD_DISC, 0, 0, &[]);
    let _ = s.shutdown(Shutdown::Both);
    drop(c);
    let digest = reader.join().expect("reader").expect("replies");
    (took, digest)
}

/// A database's commits: `count` 4 KiB writes with FUA, one at a time, at consecutive
/// offsets (a log), each waited for before the next is sent. Returns each write's
/// latency; panics if the server does not offer FUA.
pub fn commits(addr: SocketAddr, size: u64, count: u64, pool: &[u8]) -> Vec<Duration> {
    let (mut s, flags) = connect(addr, size);
    assert!(
        flags & TFLAG_SEND_FUA != 0,
        "the server does not offer FUA (transmission flags {flags:#x})"
    );
    let mut lat = Vec::with_capacity(count as usize);
    let mut msg = Vec::with_capacity(28 + 4096);
    let mut reply = [0u8; 16];
    for i in 0..count {
        let offset = (i * 4096) % size;
        let at = ((i * 7919) % ((pool.len() as u64 - 4096) / 4096)) as usize * 4096;
        msg.clear();
        msg.extend_from_slice(
            &Request {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: i,
                offset,
                length: 4096,
            }
            .encode(),
        );
        msg.extend_from_slice(&pool[at..at + 4096]);
        let t = Instant::now();
        s.write_all(&msg).expect("send");
        s.read_exact(&mut reply).expect("reply");
        lat.push(t.elapsed());
        let errno = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        assert_eq!(errno, 0, "commit {i} failed with errno {errno}");
        assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), i);
    }
    let req = Request {
        flags: 0,
        command: CMD_DISC,
        cookie: u64::MAX,
        offset: 0,
        length: 0,
    };
    let _ = s.write_all(&req.encode());
    let _ = s.shutdown(Shutdown::Both);
    lat
}

/// What [`commits`] leaves on a fresh disk of `size` bytes, written to `path`.
pub fn commits_model(path: &Path, size: u64, count: u64, pool: &[u8]) {
    let f = std::fs::File::create(path).expect("model image");
    f.set_len(size).expect("model size");
    for i in 0..count {
        let at = ((i * 7919) % ((pool.len() as u64 - 4096) / 4096)) as usize * 4096;
        f.write_all_at(&pool[at..at + 4096], (i * 4096) % size)
            .expect("model write");
    }
}
