//! Drives whole NBD server sessions (greeting, option haggling, requests in any order)
//! over memory against RAM disks: the client's bytes are either the input itself, or
//! built from it message by message (well-framed options and requests with arbitrary
//! fields, so the fuzzer gets past the handshake at once). The server must never panic or
//! hang, and with structured replies every chunk it sends must be one the spec allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby_engine::nbd::proto::*;
use standby_engine::nbd::{serve_session, BlockDevice, ExportList, MemDisk};
use std::collections::HashMap;
use std::sync::Arc;

const OS_BYTES: u64 = 1 << 20;
const RO_BYTES: u64 = 64 << 10;

/// Bytes taken from the input, zeros once it runs out.
struct Src<'a>(&'a [u8]);

impl Src<'_> {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n2 = n.min(self.0.len());
        let mut v = self.0[..n2].to_vec();
        self.0 = &self.0[n2..];
        v.resize(n, 0);
        v
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn name(src: &mut Src) -> Vec<u8> {
    match src.u8() % 4 {
        0 => b"os".to_vec(),
        1 => b"ro".to_vec(),
        2 => Vec::new(),
        _ => {
            let n = src.u8() as usize % 8;
            src.bytes(n)
        }
    }
}

/// The requests a built stream sends, by cookie (each cookie is used once).
type Sent = HashMap<u64, Request>;

/// A client stream built from the input: a few options, then requests.
fn build(mut src: Src, sent: &mut Sent) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(src.u8() as u32 & 3).to_be_bytes());
    for _ in 0..8 {
        if src.0.is_empty() {
            return out;
        }
        let kind = src.u8();
        match kind % 10 {
            0 => option(&mut out, OPT_STRUCTURED_REPLY, &[]),
            1 | 2 => {
                let mut d = Vec::new();
                string(&mut d, &name(&mut src));
                let n = src.u8() % 3;
                d.extend_from_slice(&(n as u32).to_be_bytes());
                for _ in 0..n {
                    let q: &[u8] = match src.u8() % 3 {
                        0 => BASE_ALLOCATION.as_bytes(),
                        1 => b"base:",
                        _ => b"qemu:dirty-bitmap:x",
                    };
                    string(&mut d, q);
                }
                let opt = if kind % 10 == 1 {
                    OPT_SET_META_CONTEXT
                } else {
                    OPT_LIST_META_CONTEXT
                };
                option(&mut out, opt, &d);
            }
            3 => option(&mut out, OPT_LIST, &[]),
            4 | 5 | 6 => {
                let mut d = Vec::new();
                string(&mut d, &name(&mut src));
                let n = src.u8() % 4;
                d.extend_from_slice(&(n as u16).to_be_bytes());
                for _ in 0..n {
                    d.extend_from_slice(&(src.u8() as u16 % 5).to_be_bytes());
                }
                let opt = if kind % 10 == 4 { OPT_INFO } else { OPT_GO };
                option(&mut out, opt, &d);
                if opt == OPT_GO {
                    break;
                }
            }
            7 => {
                let n = name(&mut src);
                option(&mut out, OPT_EXPORT_NAME, &n);
                break;
            }
            8 => {
                let opt = src.u32();
                let n = src.u8() as usize % 16;
                let d = src.bytes(n);
                option(&mut out, opt, &d);
            }
            _ => option(&mut out, OPT_ABORT, &[]),
        }
    }
    let mut cookie = 0u64;
    while !src.0.is_empty() {
        cookie += 1;
        let flags = src.u8() as u16 & 0x3f;
        let command = src.u8() as u16 % 9;
        // Offsets and lengths near the interesting edges: 0, the ends, 512 multiples.
        let offset = match src.u8() % 4 {
            0 => 0,
            1 => src.u16() as u64 * 512,
            2 => OS_BYTES - src.u16() as u64 % 4096,
            _ => src.u32() as u64,
        };
        let length = match src.u8() % 4 {
            0 => 0,
            1 => src.u8() as u32 * 512,
            2 => src.u16() as u32,
            _ => src.u32(),
        };
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        out.extend_from_slice(&r.encode());
        sent.insert(cookie, r);
        if command == CMD_WRITE {
            // At most what is left: a short payload is the end of the stream.
            let n = (length as usize).min(src.0.len());
            out.extend_from_slice(&src.bytes(n));
        }
    }
    out
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Some(h)
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0, |a, &x| (a << 8) | x as u64)
}

/// Check what the server sent. Every message is whole; once structured replies were
/// acknowledged, every transmission reply is a chunk of a type the spec allows, shaped
/// as the spec says. With the requests known (`sent`, for a built stream): simple replies
/// are parsed too, each request is answered at most once, a read's data lies inside it,
/// and a successful read's data covers it exactly.
fn check(out: &[u8], no_zeroes: bool, sent: Option<&Sent>) {
    let mut b = out;
    if b.is_empty() {
        return;
    }
    assert_eq!(be(take(&mut b, 8).unwrap()), NBDMAGIC);
    assert_eq!(be(take(&mut b, 8).unwrap()), IHAVEOPT);
    take(&mut b, 2).unwrap();
    let mut structured = false;
    while b.len() >= 8 && be(&b[..8]) == REPLY_MAGIC_OPT {
        take(&mut b, 8);
        let opt = be(take(&mut b, 4).unwrap()) as u32;
        let kind = be(take(&mut b, 4).unwrap()) as u32;
        let len = be(take(&mut b, 4).unwrap()) as usize;
        let data = take(&mut b, len).expect("a whole option reply");
        if opt == OPT_STRUCTURED_REPLY && kind == REP_ACK {
            structured = true;
        }
        if kind == REP_INFO && data.len() >= 2 && be(&data[..2]) == INFO_BLOCK_SIZE as u64 {
            assert_eq!(data.len(), 14);
            let (min, pref, max) = (be(&data[2..6]), be(&data[6..10]), be(&data[10..14]));
            assert!(min.is_power_of_two() && min <= 1 << 16);
            assert!(pref.is_power_of_two() && pref >= min.max(512));
            assert!(max >= pref);
        }
    }
    if b.len() >= 8 && [OS_BYTES, RO_BYTES].contains(&be(&b[..8])) {
        // The reply to NBD_OPT_EXPORT_NAME.
        take(&mut b, 10).unwrap();
        if !no_zeroes {
            take(&mut b, 124).expect("the export name reply's padding");
        }
    }
    let defined = [
        EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN,
    ];
    if !structured {
        // Simple read replies cannot be split without the requests.
        let Some(sent) = sent else { return };
        let mut answered = std::collections::HashSet::new();
        while !b.is_empty() {
            assert_eq!(
                be(take(&mut b, 4).expect("a whole magic")) as u32,
                SIMPLE_REPLY_MAGIC
            );
            let errno = be(take(&mut b, 4).unwrap()) as u32;
            let cookie = be(take(&mut b, 8).unwrap());
            assert!(errno == 0 || defined.contains(&errno), "errno {errno}");
            let req = sent.get(&cookie).expect("a reply to a request sent");
            assert!(answered.insert(cookie), "cookie {cookie} answered twice");
            if errno == 0 && req.command == CMD_READ {
                take(&mut b, req.length as usize).expect("a whole read reply");
            }
        }
        return;
    }
    // Per cookie: bytes of data chunks, whether an error chunk came, whether DONE came.
    let mut state: HashMap<u64, (u64, bool, bool)> = HashMap::new();
    while !b.is_empty() {
        assert_eq!(
            be(take(&mut b, 4).expect("a whole magic")) as u32,
            STRUCTURED_REPLY_MAGIC
        );
        let flags = be(take(&mut b, 2).unwrap()) as u16;
        let kind = be(take(&mut b, 2).unwrap()) as u16;
        let cookie = be(take(&mut b, 8).unwrap());
        let len = be(take(&mut b, 4).unwrap()) as usize;
        let p = take(&mut b, len).expect("a whole chunk");
        let req = sent.map(|s| *s.get(&cookie).expect("a reply to a request sent"));
        let st = state.entry(cookie).or_default();
        if sent.is_some() {
            assert!(!st.2, "a chunk after DONE for cookie {cookie}");
        }
        st.2 = flags & REPLY_FLAG_DONE != 0;
        match kind {
            REPLY_TYPE_NONE => {
                assert!(
                    p.is_empty() && flags & REPLY_FLAG_DONE != 0,
                    "NONE: empty, DONE"
                )
            }
            REPLY_TYPE_OFFSET_DATA => {
                assert!(p.len() >= 9, "OFFSET_DATA describes at least one byte");
                let off = be(&p[..8]);
                let n = p.len() as u64 - 8;
                assert!(off + n <= OS_BYTES, "data past the export");
                if let Some(r) = req {
                    assert_eq!(r.command, CMD_READ, "data for a {}", r.command);
                    assert!(
                        off >= r.offset && off + n <= r.offset + r.length as u64,
                        "data outside the read"
                    );
                }
                st.0 += n;
            }
            REPLY_TYPE_BLOCK_STATUS => {
                assert!(p.len() >= 12 && (p.len() - 4) % 8 == 0, "descriptors");
                if let Some(r) = req {
                    assert_eq!(r.command, CMD_BLOCK_STATUS);
                    if r.flags & CMD_FLAG_REQ_ONE != 0 {
                        assert_eq!(p.len(), 12, "REQ_ONE: one descriptor");
                        assert!(
                            be(&p[4..8]) <= r.length as u64,
                            "REQ_ONE: within the request"
                        );
                    }
                }
                for d in p[4..].chunks(8) {
                    assert_ne!(be(&d[..4]), 0, "a zero-length descriptor");
                }
            }
            REPLY_TYPE_ERROR => {
                assert!(p.len() >= 6);
                let errno = be(&p[..4]) as u32;
                assert!(
                    defined.contains(&errno),
                    "errno {errno} is not one the spec defines"
                );
                assert_eq!(be(&p[4..6]) as usize, p.len() - 6, "message length");
                st.1 = true;
            }
            k => panic!("chunk type {k} is not one this server may send"),
        }
        if let Some(r) = req {
            if st.2 && !st.1 && r.command == CMD_READ {
                assert_eq!(
                    st.0, r.length as u64,
                    "a successful read not covered exactly"
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut sent = Sent::new();
    let built = mode & 1 != 0;
    let client = if built {
        build(Src(rest), &mut sent)
    } else {
        rest.to_vec()
    };
    let no_zeroes = client.len() >= 4 && client[3] & FLAG_C_NO_ZEROES as u8 != 0;
    let min = if mode & 2 == 0 { 1 } else { 512 };
    let exports = Arc::new(ExportList(vec![
        (
            "os".to_string(),
            Arc::new(MemDisk::new(OS_BYTES as usize, min, false)) as Arc<dyn BlockDevice>,
        ),
        (
            "ro".to_string(),
            Arc::new(MemDisk::new(RO_BYTES as usize, 1, true)) as Arc<dyn BlockDevice>,
        ),
    ]));
    let mut out = Vec::new();
    let _ = serve_session(&client[..], &mut out, exports);
    check(&out, no_zeroes, built.then_some(&sent));
});
