//! The NBD wire protocol (fixed newstyle handshake, transmission requests and replies), as
//! specified in `doc/proto.md` of the NetworkBlockDevice/nbd project. All integers are
//! big-endian (network order). This module only encodes and decodes; it owns no sockets.
//!
//! Handshake (server first):
//! ```text
//! S: "NBDMAGIC" (8)  "IHAVEOPT" (8)  handshake flags u16 (FIXED_NEWSTYLE | NO_ZEROES)
//! C: client flags u32
//! C: "IHAVEOPT" (8)  option u32  length u32  data[length]        (repeated)
//! S: 0x0003e889045565a9 (8)  option u32  reply type u32  length u32  data[length]
//! ```
//! Transmission:
//! ```text
//! C: 0x25609513 u32  flags u16  type u16  cookie u64  offset u64  length u32  [data]
//! S: 0x67446698 u32  error u32  cookie u64  [data]                          (simple)
//! S: 0x668e33ef u32  flags u16  type u16  cookie u64  length u32  payload   (structured)
//! ```
//! Untrusted bytes become a [`Request`] only through [`Request::parse`], which checks the
//! magic, the command and the flags; bounds against the export are checked by the server.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS). Reads go through the codec's bounds-checked cursor.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::util::codec::{DecodeError, Reader, Writer};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
const KNOWN_CMD_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The only metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Longest option payload accepted (a name is at most 4096 bytes; queries add a little).
pub const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Largest READ or WRITE payload served in one request.
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;
pub const REQUEST_BYTES: usize = 28;

/// A transmission-phase request header, validated for magic, command and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Bad magic: the stream is not NBD (or is out of sync); the connection must end.
    BadMagic(u32),
    /// A well-formed request the server will answer with this errno.
    Refuse {
        cookie: u64,
        errno: u32,
        why: String,
    },
}

impl Request {
    /// Parse the 28-byte header.
    pub fn parse(b: &[u8; REQUEST_BYTES]) -> Result<Request, RequestError> {
        let mut r = Reader::new(b);
        // 28 bytes hold every field: the reads cannot come up short.
        let mut read = || {
            Ok::<_, DecodeError>((
                r.u32_be("magic")?,
                Request {
                    flags: r.u16_be("flags")?,
                    command: r.u16_be("type")?,
                    cookie: r.u64_be("cookie")?,
                    offset: r.u64_be("offset")?,
                    length: r.u32_be("length")?,
                },
            ))
        };
        let Ok((magic, r)) = read() else {
            return Err(RequestError::BadMagic(0));
        };
        if magic != REQUEST_MAGIC {
            return Err(RequestError::BadMagic(magic));
        }
        if r.flags & !KNOWN_CMD_FLAGS != 0 {
            return Err(RequestError::Refuse {
                cookie: r.cookie,
                errno: EINVAL,
                why: format!("unknown command flags {:#x}", r.flags),
            });
        }
        Ok(r)
    }

    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// The spec's table of which command flag goes with which command: FUA with every
    /// command (`NBD_FLAG_SEND_FUA` is always advertised), DF with READ once structured
    /// replies (and so `NBD_FLAG_SEND_DF`) are negotiated, NO_HOLE with WRITE_ZEROES,
    /// REQ_ONE with BLOCK_STATUS. FAST_ZERO is never valid: `NBD_FLAG_SEND_FAST_ZERO` is
    /// not advertised. A request with any other flag is refused with `NBD_EINVAL`.
    pub fn flags_allowed(command: u16, structured: bool) -> u16 {
        CMD_FLAG_FUA
            | match command {
                CMD_READ if structured => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }

    /// Whether this request's flags all apply to its command (see [`Request::flags_allowed`]).
    pub fn flags_fit(&self, structured: bool) -> bool {
        self.flags & !Self::flags_allowed(self.command, structured) == 0
    }

    /// Whether a payload of `length` bytes follows this header on the wire.
    pub fn has_payload(&self) -> bool {
        self.command == CMD_WRITE
    }
}

pub fn simple_reply(cookie: u64, errno: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Header of one structured reply chunk carrying `len` payload bytes.
pub fn structured_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured error chunk (final): errno and a human message.
pub fn structured_error(cookie: u64, errno: u32, msg: &str) -> Vec<u8> {
    let msg = msg
        .as_bytes()
        .get(..msg.len().min(4096))
        .unwrap_or_default();
    let mut b = structured_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    )
    .to_vec();
    Writer::new(&mut b)
        .u32_be(errno)
        .u16_be(msg.len() as u16)
        .bytes(msg);
    b
}

/// An option reply.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    Writer::new(&mut b)
        .u64_be(REPLY_MAGIC_OPT)
        .u32_be(option)
        .u32_be(kind)
        .u32_be(data.len() as u32)
        .bytes(data);
    b
}

/// A string of option data: length u32, at most 4096 bytes of UTF-8.
fn get_string(r: &mut Reader<'_>, field: &'static str) -> Result<String, DecodeError> {
    let at = r.position();
    let n = r.u32_be(field)? as usize;
    if n > 4096 {
        return Err(DecodeError::invalid(
            field,
            at,
            format!("string of {n} bytes (at most 4096)"),
        ));
    }
    r.utf8(n, field)
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO: an export name and the info types requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(data: &[u8]) -> Result<InfoRequest, DecodeError> {
        let mut r = Reader::new(data);
        let name = get_string(&mut r, "export name")?;
        let n = r.u16_be("info count")? as usize;
        let mut infos = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            infos.push(r.u16_be("info type")?);
        }
        r.expect_end("the option data")?;
        Ok(InfoRequest { name, infos })
    }
}

/// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaRequest {
    pub fn parse(data: &[u8]) -> Result<MetaRequest, DecodeError> {
        let mut r = Reader::new(data);
        let export = get_string(&mut r, "export name")?;
        let at = r.position();
        let n = r.u32_be("query count")? as usize;
        if n > 1024 {
            return Err(DecodeError::invalid(
                "query count",
                at,
                format!("{n} queries (at most 1024)"),
            ));
        }
        let mut queries = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            queries.push(get_string(&mut r, "query")?);
        }
        r.expect_end("the option data")?;
        Ok(MetaRequest { export, queries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_input_is_refused() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] ^= 1;
        assert!(matches!(Request::parse(&b), Err(RequestError::BadMagic(_))));
        let mut b = r.encode();
        b[4] = 0x80;
        assert!(matches!(
            Request::parse(&b),
            Err(RequestError::Refuse { errno: EINVAL, .. })
        ));
    }

    #[test]
    fn each_flag_fits_only_the_commands_the_spec_gives_it() {
        let req = |command, flags| Request {
            flags,
            command,
            cookie: 1,
            offset: 0,
            length: 512,
        };
        for cmd in [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert!(req(cmd, CMD_FLAG_FUA).flags_fit(false), "FUA on {cmd}");
            assert!(
                !req(cmd, CMD_FLAG_FAST_ZERO).flags_fit(true),
                "FAST_ZERO on {cmd}"
            );
        }
        assert!(req(CMD_READ, CMD_FLAG_DF).flags_fit(true));
        assert!(
            !req(CMD_READ, CMD_FLAG_DF).flags_fit(false),
            "DF needs SEND_DF"
        );
        assert!(!req(CMD_WRITE, CMD_FLAG_DF).flags_fit(true));
        assert!(!req(CMD_BLOCK_STATUS, CMD_FLAG_DF).flags_fit(true));
        assert!(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA).flags_fit(true));
        assert!(!req(CMD_TRIM, CMD_FLAG_NO_HOLE).flags_fit(true));
        assert!(!req(CMD_READ, CMD_FLAG_NO_HOLE).flags_fit(true));
        assert!(req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE).flags_fit(true));
        assert!(!req(CMD_TRIM, CMD_FLAG_REQ_ONE).flags_fit(true));
        assert!(!req(CMD_READ, CMD_FLAG_REQ_ONE).flags_fit(true));
    }

    #[test]
    fn option_data_parsers_never_overrun() {
        let mut go = Vec::new();
        go.extend_from_slice(&2u32.to_be_bytes());
        go.extend_from_slice(b"os");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            InfoRequest::parse(&go),
            Ok(InfoRequest {
                name: "os".into(),
                infos: vec![INFO_BLOCK_SIZE]
            })
        );
        for cut in 0..go.len() {
            let e = InfoRequest::parse(&go[..cut]).unwrap_err();
            assert!(e.is_truncated(), "cut at {cut}: {e}");
        }
        let mut long = go.clone();
        long.push(0);
        let e = InfoRequest::parse(&long).unwrap_err();
        assert_eq!((e.field, e.offset), ("end", go.len()));
        let huge = [0xffu8; 16];
        let e = InfoRequest::parse(&huge).unwrap_err();
        assert_eq!((e.field, e.offset), ("export name", 0));
        assert!(MetaRequest::parse(&huge).is_err());
    }
}
