//! The transmission phase of one NBD connection, pipelined: this thread reads requests
//! (a write's payload whole, before anything is applied) and hands them to a few workers,
//! which call the device and send each reply as soon as it is ready (the protocol lets
//! replies come in any order). So a client with many requests in flight keeps the device
//! and the socket busy at once.
//!
//! Invariants: a malformed request gets the protocol's error reply, or ends the connection
//! when the stream cannot be trusted any more (bad magic, an oversized payload); DISC and
//! end of stream wait for every request in flight to be answered; replies never interleave.

use super::proto::*;
use super::{BlockDevice, DevError, Extent};
use parking_lot::Mutex;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Requests executed at once per connection: as many as are read ahead, so every write a
/// client pipelines (16 in flight for qemu) waits for the same log write, instead of four
/// at a time (a log write and a wake-up per four requests).
const WORKERS: usize = QUEUE_DEPTH;
/// Most descriptors sent in one block status chunk (the spec's SHOULD NOT exceed).
const MAX_DESCRIPTORS: usize = 1 << 20;
/// Requests read ahead of the workers (bounds memory: at most this many payloads).
const QUEUE_DEPTH: usize = 16;
/// Most bytes of a write's payload reserved before they arrive.
const PAYLOAD_RESERVE_BYTES: usize = 4 << 20;

struct Job {
    req: Request,
    payload: Vec<u8>,
}

struct Replies<W> {
    w: Mutex<W>,
    structured: bool,
    failed: AtomicBool,
}

impl<W: Write> Replies<W> {
    fn send(&self, parts: &[&[u8]]) {
        let mut w = self.w.lock();
        let r = write_all_vectored(&mut *w, parts).and_then(|_| w.flush());
        if r.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
    }

    fn ok(&self, cookie: u64) {
        if self.structured {
            self.send(&[&structured_header(
                cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                0,
            )]);
        } else {
            self.send(&[&simple_reply(cookie, 0)]);
        }
    }

    fn error(&self, cookie: u64, e: &DevError) {
        if self.structured {
            self.send(&[&structured_error(cookie, e.errno, &e.message)]);
        } else {
            self.send(&[&simple_reply(cookie, e.errno)]);
        }
    }
}

/// Write every part, gathered: a reply's header and its data go out in one `writev` when
/// `w` passes them through (a `BufWriter` does for parts larger than its buffer), and are
/// never copied into a buffer first.
fn write_all_vectored<W: Write>(w: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    io::IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Serve requests until the client disconnects (DISC or end of stream).
pub fn serve<R: Read, W: Write + Send>(
    mut r: R,
    w: W,
    structured: bool,
    meta: bool,
    dev: Arc<dyn BlockDevice>,
) -> io::Result<()> {
    let replies = Replies {
        w: Mutex::new(w),
        structured,
        failed: AtomicBool::new(false),
    };
    let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUE_DEPTH);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            let (rx, replies, dev) = (rx.clone(), &replies, &dev);
            scope.spawn(move || {
                let mut buf = Vec::new();
                for job in rx {
                    execute(&**dev, job, &mut buf, replies, meta);
                }
            });
        }
        drop(rx);
        // Reading ends the connection on error; dropping `tx` then lets the workers answer
        // what is in flight and stop.
        let result = read_requests(&mut r, &tx, &replies, &*dev);
        drop(tx);
        result
    })
}

fn read_requests<R: Read, W: Write>(
    r: &mut R,
    tx: &crossbeam_channel::Sender<Job>,
    replies: &Replies<W>,
    dev: &dyn BlockDevice,
) -> io::Result<()> {
    // The reader's own buffer for reads it answers itself.
    let mut buf = Vec::new();
    loop {
        if replies.failed.load(Ordering::SeqCst) {
            return Err(bad("cannot send replies"));
        }
        let mut h = [0u8; REQUEST_BYTES];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = match Request::parse(&h) {
            Ok(req) => req,
            Err(RequestError::BadMagic(_)) => return Err(bad("bad request magic")),
            Err(RequestError::Refuse { cookie, errno, why }) => {
                // Sound enough to know whether a payload follows: skip it, refuse.
                let cmd = u16::from_be_bytes([h[6], h[7]]);
                let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
                if cmd == CMD_WRITE {
                    if len > MAX_PAYLOAD_BYTES {
                        return Err(bad("oversized write"));
                    }
                    io::copy(&mut r.by_ref().take(len as u64), &mut io::sink())?;
                }
                replies.error(
                    cookie,
                    &DevError {
                        errno,
                        message: why,
                    },
                );
                continue;
            }
        };
        let mut payload = Vec::new();
        match req.command {
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD_BYTES {
                    // Cannot stay in sync without buffering it: hang up.
                    return Err(bad("oversized write"));
                }
                // Grown as the bytes arrive, not allocated up front on the client's word
                // past a bound (a client's usual request fits it: no regrowth and copy).
                payload.reserve_exact((req.length as usize).min(PAYLOAD_RESERVE_BYTES));
                r.by_ref()
                    .take(req.length as u64)
                    .read_to_end(&mut payload)?;
                if payload.len() != req.length as usize {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            CMD_DISC => return Ok(()),
            CMD_READ if read_inline(dev, &req, &mut buf, replies) => continue,
            _ => {}
        }
        if tx.send(Job { req, payload }).is_err() {
            return Err(bad("workers stopped"));
        }
    }
}

/// Answer `req` (a READ) on the reader's thread if it is valid and the device has its
/// bytes in memory ([`BlockDevice::read_cached`]); whether it was answered. Anything else
/// (an invalid read, one needing I/O) is left to the workers, which check and answer it.
fn read_inline<W: Write>(
    dev: &dyn BlockDevice,
    req: &Request,
    buf: &mut Vec<u8>,
    replies: &Replies<W>,
) -> bool {
    let in_bounds = req
        .offset
        .checked_add(req.length as u64)
        .is_some_and(|e| e <= dev.size());
    if !req.flags_fit(replies.structured)
        || !in_bounds
        || req.length == 0
        || req.length > MAX_PAYLOAD_BYTES
    {
        return false;
    }
    if buf.len() < req.length as usize {
        buf.resize(req.length as usize, 0);
    }
    let data = &mut buf[..req.length as usize];
    match dev.read_cached(req.offset, data) {
        None => false,
        Some(Ok(())) => {
            send_read(replies, req, data);
            true
        }
        Some(Err(e)) => {
            replies.error(req.cookie, &e);
            true
        }
    }
}

fn execute<W: Write>(
    dev: &dyn BlockDevice,
    job: Job,
    buf: &mut Vec<u8>,
    replies: &Replies<W>,
    meta: bool,
) {
    let req = job.req;
    let size = dev.size();
    let in_bounds = req
        .offset
        .checked_add(req.length as u64)
        .is_some_and(|e| e <= size);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = req.length as u64;
    let result: Result<(), DevError> = if !req.flags_fit(replies.structured) {
        Err(DevError::invalid(format!(
            "command flags {:#x} do not apply to command {}",
            req.flags, req.command
        )))
    } else {
        match req.command {
            CMD_READ => {
                if req.length > MAX_PAYLOAD_BYTES {
                    // EOVERFLOW is the spec's answer only where DF is supported (structured
                    // replies); with simple replies such a read is a plain invalid request.
                    let errno = if replies.structured {
                        EOVERFLOW
                    } else {
                        EINVAL
                    };
                    Err(DevError {
                        errno,
                        message: "read too large".into(),
                    })
                } else if !in_bounds {
                    Err(DevError::invalid("read past the end of the export"))
                } else if req.length == 0 {
                    // Nothing to describe: a structured reply is NONE alone (a content
                    // chunk must cover at least one byte); a simple reply carries no data.
                    Ok(())
                } else {
                    buf.resize(req.length as usize, 0);
                    match dev.read(req.offset, buf) {
                        Ok(()) => {
                            send_read(replies, &req, buf);
                            return;
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            CMD_WRITE => check_write(dev, in_bounds, req.offset, len, ENOSPC)
                .and_then(|_| noop_if_empty(len, || dev.write_owned(req.offset, job.payload, fua))),
            CMD_FLUSH => dev.flush(),
            // Past the end, the spec asks ENOSPC of WRITE_ZEROES (as of WRITE) but EINVAL of
            // TRIM. Zero lengths are no-ops, as qemu-nbd treats them.
            CMD_TRIM => check_write(dev, in_bounds, req.offset, len, EINVAL)
                .and_then(|_| noop_if_empty(len, || dev.trim(req.offset, len, fua))),
            CMD_WRITE_ZEROES => check_write(dev, in_bounds, req.offset, len, ENOSPC)
                .and_then(|_| noop_if_empty(len, || dev.write_zeroes(req.offset, len, fua))),
            CMD_BLOCK_STATUS => {
                if !replies.structured || !meta {
                    Err(DevError::invalid(
                        "block status needs structured replies and base:allocation",
                    ))
                } else if !in_bounds || req.length == 0 {
                    Err(DevError::invalid("block status past the end of the export"))
                } else {
                    match dev.block_status(req.offset, req.length as u64) {
                        Ok(extents) => {
                            block_status(
                                replies,
                                req.cookie,
                                req.length,
                                req.flags & CMD_FLAG_REQ_ONE != 0,
                                &extents,
                            );
                            return;
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            _ => Err(DevError::invalid(format!(
                "unknown command {}",
                req.command
            ))),
        }
    };
    match result {
        Ok(()) => replies.ok(req.cookie),
        Err(e) => replies.error(req.cookie, &e),
    }
}

/// Send the reply to a successful read of `data` (non-empty): one data chunk, or a simple
/// reply followed by the data.
fn send_read<W: Write>(replies: &Replies<W>, req: &Request, data: &[u8]) {
    if replies.structured {
        let h = structured_header(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            8 + req.length,
        );
        replies.send(&[&h, &req.offset.to_be_bytes(), data]);
    } else {
        replies.send(&[&simple_reply(req.cookie, 0), data]);
    }
}

fn noop_if_empty(len: u64, op: impl FnOnce() -> Result<(), DevError>) -> Result<(), DevError> {
    if len == 0 {
        Ok(())
    } else {
        op()
    }
}

/// Whether a change of `len` bytes at `offset` may go ahead: a writable export, inside it
/// (else `past_end`, the errno the spec gives that command), aligned to its block size.
fn check_write(
    dev: &dyn BlockDevice,
    in_bounds: bool,
    offset: u64,
    len: u64,
    past_end: u32,
) -> Result<(), DevError> {
    if dev.read_only() {
        return Err(DevError {
            errno: EPERM,
            message: "the export is read-only".into(),
        });
    }
    if !in_bounds {
        return Err(DevError {
            errno: past_end,
            message: "past the end of the export".into(),
        });
    }
    let min = dev.min_block_bytes() as u64;
    if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
        return Err(DevError::invalid(format!(
            "writes must be aligned to {min} bytes"
        )));
    }
    Ok(())
}

fn block_status<W: Write>(
    replies: &Replies<W>,
    cookie: u64,
    length: u32,
    one: bool,
    extents: &[Extent],
) {
    let mut descs: Vec<(u32, u32)> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        // The spec: at most 2^20 descriptors in one chunk (the client asks for the rest).
        if covered >= length as u64 || e.len == 0 || descs.len() >= MAX_DESCRIPTORS {
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
    let h = structured_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        payload.len() as u32,
    );
    replies.send(&[&h, &payload]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_status_sends_at_most_the_specs_descriptor_count() {
        let replies = Replies {
            w: Mutex::new(Vec::new()),
            structured: true,
            failed: AtomicBool::new(false),
        };
        let n = MAX_DESCRIPTORS + 5;
        let extents: Vec<Extent> = (0..n)
            .map(|i| Extent {
                len: 1,
                hole: i % 2 == 0,
                zero: i % 2 == 0,
            })
            .collect();
        block_status(&replies, 9, n as u32, false, &extents);
        let out = replies.w.into_inner();
        let payload = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert_eq!(out.len(), 20 + payload);
        assert_eq!((payload - 4) / 8, MAX_DESCRIPTORS);
    }
}
