//! The link's framing and messages: one framed, versioned protocol for both links (agent →
//! cache service, cache service → processor). Change-log records travel inside `Records`
//! messages in the change log's own record format (`record.rs`), bound to [`WIRE_BINDING`]
//! instead of a segment id, so they are checked end to end and never recompressed.
//!
//! Byte map of a message (integers little-endian; see `docs/format.md`):
//!
//! ```text
//! off  size  field
//!   0     4  magic        "SBLK"
//!   4     1  version      1
//!   5     1  type         see `Msg`
//!   6     2  reserved     0
//!   8     4  payload_len  <= MAX_PAYLOAD_BYTES
//!  12     4  crc          crc32 seeded with FRAME_SEED over bytes 0..12 ‖ payload
//!  16     n  payload
//! ```
//!
//! A reader checks the magic, version and length before it allocates, and the crc before it
//! decodes; any failure is a [`Error::Link`] naming what was wrong, and the peer is dropped.

// A decoder of untrusted bytes: no unwrap, no panic, no unchecked index (see Cargo.toml's
// [lints] policy and CONVENTIONS).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::error::{Error, LinkError, Result};
use crate::util::codec::{DecodeError, Reader, Writer};
use std::io::{Read, Write};

pub const MAGIC: [u8; 4] = *b"SBLK";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 16;
/// Largest payload: a batch of records (a record body is at most 32 MiB).
pub const MAX_PAYLOAD_BYTES: usize = 40 << 20;
/// What record frames on the wire are bound to in place of a segment id ("STBYLINK").
pub const WIRE_BINDING: u64 = u64::from_le_bytes(*b"STBYLINK");
const FRAME_SEED: u32 = 0x5342_4c4b;
/// Longest VM or disk name, and most disks per VM, a message may carry.
const MAX_NAME: usize = 1024;
const MAX_DISKS: usize = 256;

/// Who opens a connection to the cache service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Agent = 1,
    Processor = 2,
    /// The target's group coordinator, asking one VM's agent (relayed by the service) to
    /// take part in a group point's barrier. Uses the processor's certificate.
    Coordinator = 3,
}

impl PeerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::Agent => "agent",
            PeerRole::Processor => "processor",
            PeerRole::Coordinator => "group coordinator",
        }
    }
}

/// One disk of a VM as the agent declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub name: String,
    pub size_bytes: u64,
}

/// Feature bits an agent declares in [`Msg::OpenAgentFeatures`]: what it answers beyond
/// the base protocol. A service sends an agent only what its bits say it speaks.
pub mod features {
    /// The agent answers [`super::Msg::GroupStep`] (consistency groups' barrier).
    pub const GROUP_BARRIER: u64 = 1;
    /// Every feature this build speaks.
    pub const ALL: u64 = GROUP_BARRIER;
}

/// A step of a group point's barrier (docs/groups.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierStep {
    /// Hold the client's acknowledgements for at most `hold_ms`.
    Hold = 1,
    /// Append the group point's marker durably (only while the hold is in force).
    Cut = 2,
    /// End the hold; the answer says whether it lasted until now.
    Release = 3,
}

/// One barrier step for one VM: coordinator → service → agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStep {
    /// Matches the answer to the request (the service relays many at once).
    pub tag: u64,
    pub step: BarrierStep,
    /// The group point's id, `GROUP/N`.
    pub group_point: String,
    pub hold_ms: u64,
    pub app: bool,
    /// The point's name (empty: none).
    pub name: String,
}

/// The answer to a [`GroupStep`]: agent → service → coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAnswer {
    pub tag: u64,
    /// Empty on success, else why the step failed (one line).
    pub error: String,
    /// Cut: the marker's sequence number; release: 1 if the hold lasted, 0 if it lapsed.
    pub value: u64,
}

/// What the agent reports of itself; the cache service passes it on to processors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    /// Bytes the dirty bitmap still has to resync (0: none).
    pub resync_bytes: u64,
    /// True while the agent tracks writes in its bitmap instead of shipping them.
    pub bitmap_mode: bool,
    /// Bytes in the agent's journal not yet durable in the cache.
    pub journal_bytes: u64,
    /// Newest sequence number the agent has journaled.
    pub journal_seq: u64,
}

/// What the cache service knows of a VM, sent to processors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceState {
    pub durable_seq: u64,
    pub first_seq: u64,
    pub used_bytes: u64,
    /// Bytes the cache holds beyond the target's checkpoint (not yet durable there).
    pub backlog_bytes: u64,
    /// 0: no limit.
    pub capacity_bytes: u64,
    /// When the newest durable record was accepted (µs since the epoch; 0 if none).
    pub last_time_us: u64,
    pub agent_connected: bool,
    /// When the agent last reported (µs since the epoch; 0 if never).
    pub agent_seen_us: u64,
    pub agent: AgentState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Client → server, first: who it is, for which VM, and a fresh nonce.
    Hello {
        role: PeerRole,
        vm: String,
        nonce: [u8; 32],
    },
    /// Server → client: its nonce and its proof of the link key.
    Challenge { nonce: [u8; 32], proof: [u8; 32] },
    /// Client → server: its proof of the link key.
    Auth { proof: [u8; 32] },
    /// Agent → server after auth: the VM's disks (checked against what the cache holds).
    OpenAgent { disks: Vec<DiskInfo> },
    /// Processor → server after auth: send records from this sequence number on.
    OpenProcessor { from_seq: u64 },
    /// Server → client: the link is open. `next_seq` is the next record the cache expects
    /// (agent) or holds (processor); `first_seq` the oldest it still holds.
    Ready {
        next_seq: u64,
        first_seq: u64,
        disks: Vec<DiskInfo>,
    },
    /// Record frames bound to [`WIRE_BINDING`], back to back, in sequence order.
    Records(Vec<u8>),
    /// Server → agent: every record up to here is durable in the cache.
    Ack { durable_seq: u64 },
    /// Processor → server: every record up to here is durable at the target site.
    Checkpoint { seq: u64 },
    /// Agent → server.
    AgentState(AgentState),
    /// Server → processor.
    SourceState(SourceState),
    /// Either way, last: why the sender is closing the link.
    Error { message: String },
    /// Processor → server after auth, instead of `OpenProcessor`: the VM failed over at
    /// the target site (`reason` says to what); the service refuses its agent from now on
    /// (the split-brain guard) and answers `Ready`.
    Fence { reason: String },
    /// Processor → server after auth, instead of `OpenProcessor` (a two-site reprotect):
    /// the VM's log at this service starts anew at `next_seq` (the vault's next record),
    /// its fence is lifted, and `hashes` (per disk, one per 64 KiB block: the vault's
    /// replica) are kept for the VM's agent, whose first run ships only the blocks that
    /// differ. Answered by `Ready`.
    Seed {
        next_seq: u64,
        disks: Vec<DiskInfo>,
        hashes: Vec<Vec<u128>>,
    },
    /// Agent → server after auth, instead of `OpenAgent`: send the seed the target left
    /// (answered by `Seed`, or `Error` when there is none).
    AskSeed { disks: Vec<DiskInfo> },
    /// Agent → server after auth, instead of `OpenAgent`: the same, plus the agent's
    /// [`features`] bits. An older service refuses it (unknown type): the agent then opens
    /// with `OpenAgent` on its next attempt and speaks no feature.
    OpenAgentFeatures { disks: Vec<DiskInfo>, features: u64 },
    /// Coordinator → server (relayed to the VM's agent), and on a coordinator link the
    /// first message after auth.
    GroupStep(GroupStep),
    /// Agent → server (relayed to the coordinator that asked).
    GroupAnswer(GroupAnswer),
}

const T_HELLO: u8 = 1;
const T_CHALLENGE: u8 = 2;
const T_AUTH: u8 = 3;
const T_OPEN_AGENT: u8 = 4;
const T_OPEN_PROCESSOR: u8 = 5;
const T_READY: u8 = 6;
const T_RECORDS: u8 = 7;
const T_ACK: u8 = 8;
const T_CHECKPOINT: u8 = 9;
const T_AGENT_STATE: u8 = 10;
const T_SOURCE_STATE: u8 = 11;
const T_ERROR: u8 = 12;
const T_FENCE: u8 = 13;
const T_SEED: u8 = 40;
const T_ASK_SEED: u8 = 41;
const T_OPEN_AGENT_FEATURES: u8 = 14;
const T_GROUP_STEP: u8 = 15;
const T_GROUP_ANSWER: u8 = 16;

impl Msg {
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Challenge { .. } => "challenge",
            Msg::Auth { .. } => "auth",
            Msg::OpenAgent { .. } => "open-agent",
            Msg::OpenProcessor { .. } => "open-processor",
            Msg::Ready { .. } => "ready",
            Msg::Records(_) => "records",
            Msg::Ack { .. } => "ack",
            Msg::Checkpoint { .. } => "checkpoint",
            Msg::AgentState(_) => "agent-state",
            Msg::SourceState(_) => "source-state",
            Msg::Error { .. } => "error",
            Msg::Fence { .. } => "fence",
            Msg::Seed { .. } => "seed",
            Msg::AskSeed { .. } => "ask-seed",
            Msg::OpenAgentFeatures { .. } => "open-agent-features",
            Msg::GroupStep(_) => "group-step",
            Msg::GroupAnswer(_) => "group-answer",
        }
    }

    /// Encode the whole message (header and payload) onto `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let mut w = Writer::new(out);
        w.bytes(&[0u8; HEADER_BYTES]);
        let ty = match self {
            Msg::Hello { role, vm, nonce } => {
                w.u8(*role as u8);
                put_str(&mut w, vm);
                w.bytes(nonce);
                T_HELLO
            }
            Msg::Challenge { nonce, proof } => {
                w.bytes(nonce).bytes(proof);
                T_CHALLENGE
            }
            Msg::Auth { proof } => {
                w.bytes(proof);
                T_AUTH
            }
            Msg::OpenAgent { disks } => {
                put_disks(&mut w, disks);
                T_OPEN_AGENT
            }
            Msg::OpenProcessor { from_seq } => {
                w.u64(*from_seq);
                T_OPEN_PROCESSOR
            }
            Msg::Ready {
                next_seq,
                first_seq,
                disks,
            } => {
                w.u64(*next_seq).u64(*first_seq);
                put_disks(&mut w, disks);
                T_READY
            }
            Msg::Records(frames) => {
                w.bytes(frames);
                T_RECORDS
            }
            Msg::Ack { durable_seq } => {
                w.u64(*durable_seq);
                T_ACK
            }
            Msg::Checkpoint { seq } => {
                w.u64(*seq);
                T_CHECKPOINT
            }
            Msg::AgentState(a) => {
                put_agent(&mut w, a);
                T_AGENT_STATE
            }
            Msg::SourceState(s) => {
                w.u64(s.durable_seq)
                    .u64(s.first_seq)
                    .u64(s.used_bytes)
                    .u64(s.backlog_bytes)
                    .u64(s.capacity_bytes)
                    .u64(s.last_time_us)
                    .u64(s.agent_connected as u64)
                    .u64(s.agent_seen_us);
                put_agent(&mut w, &s.agent);
                T_SOURCE_STATE
            }
            Msg::Error { message } => {
                put_str(&mut w, message);
                T_ERROR
            }
            Msg::Fence { reason } => {
                put_str(&mut w, reason);
                T_FENCE
            }
            Msg::Seed {
                next_seq,
                disks,
                hashes,
            } => {
                w.u64(*next_seq);
                put_disks(&mut w, disks);
                for h in hashes {
                    w.u32(h.len() as u32);
                    for x in h {
                        w.bytes(&x.to_le_bytes());
                    }
                }
                T_SEED
            }
            Msg::AskSeed { disks } => {
                put_disks(&mut w, disks);
                T_ASK_SEED
            }
            Msg::OpenAgentFeatures { disks, features } => {
                put_disks(&mut w, disks);
                w.u64(*features);
                T_OPEN_AGENT_FEATURES
            }
            Msg::GroupStep(g) => {
                w.u64(g.tag).u8(g.step as u8);
                put_str(&mut w, &g.group_point);
                w.u64(g.hold_ms).u8(g.app as u8);
                put_str(&mut w, &g.name);
                T_GROUP_STEP
            }
            Msg::GroupAnswer(a) => {
                w.u64(a.tag);
                put_str(&mut w, &a.error);
                w.u64(a.value);
                T_GROUP_ANSWER
            }
        };
        if let Some(msg) = out.get_mut(start..) {
            seal(msg, ty);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// Encode a `Records` message straight from frames already sitting in `out` after a
/// reserved header: call with `out` holding `HEADER_BYTES` placeholder bytes followed by
/// the frames. Saves a copy of every batch.
pub fn seal_records(out: &mut [u8]) {
    seal(out, T_RECORDS);
}

/// A sealed message of type `ty` around an arbitrary payload (valid header and crc), for
/// fuzzing and tests: it lets them reach the payload decoders behind the checksum.
pub fn frame_raw(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_BYTES];
    out.extend_from_slice(payload);
    seal(&mut out, ty);
    out
}

fn seal(msg: &mut [u8], ty: u8) {
    // Callers reserve the header first; a shorter buffer has no room for one (and a peer
    // refuses it as shorter than its header).
    let Some((h, payload)) = msg.split_first_chunk_mut::<HEADER_BYTES>() else {
        debug_assert!(false, "a message buffer shorter than its header");
        return;
    };
    let len = payload.len() as u32;
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = ty;
    h[6..8].copy_from_slice(&[0, 0]);
    h[8..12].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new_with_initial(FRAME_SEED);
    crc.update(&h[0..12]);
    crc.update(payload);
    let c = crc.finalize();
    h[12..16].copy_from_slice(&c.to_le_bytes());
}

fn put_str(w: &mut Writer<'_>, s: &str) {
    let b = s
        .as_bytes()
        .get(..s.len().min(u16::MAX as usize))
        .unwrap_or_default();
    w.u16(b.len() as u16).bytes(b);
}

fn put_disks(w: &mut Writer<'_>, disks: &[DiskInfo]) {
    w.u16(disks.len() as u16);
    for d in disks {
        put_str(w, &d.name);
        w.u64(d.size_bytes);
    }
}

fn put_agent(w: &mut Writer<'_>, a: &AgentState) {
    w.u64(a.resync_bytes)
        .u64(a.bitmap_mode as u64)
        .u64(a.journal_bytes)
        .u64(a.journal_seq);
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Link(LinkError::Protocol {
        what: what.to_string(),
    })
}

/// Checks a message header; returns (type, payload length).
pub fn parse_header(h: &[u8; HEADER_BYTES]) -> Result<(u8, usize)> {
    let mut r = Reader::new(h);
    let fields = (|| {
        Ok::<_, DecodeError>((
            r.array::<4>("magic")?,
            r.u8("version")?,
            r.u8("type")?,
            r.u16("reserved")?,
            r.u32("payload_len")?,
        ))
    })();
    let (magic, version, ty, reserved, len) = fields.map_err(bad)?;
    if magic != MAGIC {
        if magic[0] == 0x16 {
            return Err(Error::Link(LinkError::TlsOnPlaintext));
        }
        return Err(Error::Link(LinkError::NotStandby));
    }
    if version != VERSION {
        return Err(Error::Link(LinkError::Version {
            peer: version,
            ours: VERSION,
        }));
    }
    if reserved != 0 {
        return Err(bad("reserved header bytes are not zero"));
    }
    let len = len as usize;
    if len > MAX_PAYLOAD_BYTES {
        return Err(bad(format!("payload of {len} bytes exceeds the limit")));
    }
    Ok((ty, len))
}

/// Decode one whole message (header and payload).
pub fn decode(b: &[u8]) -> Result<Msg> {
    let Some((h, payload)) = b.split_first_chunk::<HEADER_BYTES>() else {
        return Err(bad("message shorter than its header"));
    };
    let (ty, len) = parse_header(h)?;
    if b.len() != HEADER_BYTES + len {
        return Err(bad(format!(
            "message of {} bytes, its header says {}",
            b.len(),
            HEADER_BYTES + len
        )));
    }
    let mut crc = crc32fast::Hasher::new_with_initial(FRAME_SEED);
    crc.update(&h[0..12]);
    crc.update(payload);
    if crc.finalize() != u32::from_le_bytes([h[12], h[13], h[14], h[15]]) {
        return Err(bad("checksum mismatch"));
    }
    decode_payload(ty, payload).map_err(bad)
}

/// Decode a payload; offsets in errors are from the start of the payload.
fn decode_payload(ty: u8, p: &[u8]) -> std::result::Result<Msg, DecodeError> {
    let mut r = Reader::new(p);
    let msg = match ty {
        T_HELLO => {
            let role = match r.u8("role")? {
                1 => PeerRole::Agent,
                2 => PeerRole::Processor,
                3 => PeerRole::Coordinator,
                n => return Err(DecodeError::invalid("role", 0, format!("unknown role {n}"))),
            };
            Msg::Hello {
                role,
                vm: get_str(&mut r, "vm")?,
                nonce: r.array("nonce")?,
            }
        }
        T_CHALLENGE => Msg::Challenge {
            nonce: r.array("nonce")?,
            proof: r.array("proof")?,
        },
        T_AUTH => Msg::Auth {
            proof: r.array("proof")?,
        },
        T_OPEN_AGENT => Msg::OpenAgent {
            disks: get_disks(&mut r)?,
        },
        T_OPEN_PROCESSOR => Msg::OpenProcessor {
            from_seq: r.u64("from_seq")?,
        },
        T_READY => Msg::Ready {
            next_seq: r.u64("next_seq")?,
            first_seq: r.u64("first_seq")?,
            disks: get_disks(&mut r)?,
        },
        T_RECORDS => Msg::Records(r.rest().to_vec()),
        T_ACK => Msg::Ack {
            durable_seq: r.u64("durable_seq")?,
        },
        T_CHECKPOINT => Msg::Checkpoint { seq: r.u64("seq")? },
        T_AGENT_STATE => Msg::AgentState(get_agent(&mut r)?),
        T_SOURCE_STATE => Msg::SourceState(SourceState {
            durable_seq: r.u64("durable_seq")?,
            first_seq: r.u64("first_seq")?,
            used_bytes: r.u64("used_bytes")?,
            backlog_bytes: r.u64("backlog_bytes")?,
            capacity_bytes: r.u64("capacity_bytes")?,
            last_time_us: r.u64("last_time_us")?,
            agent_connected: get_flag(&mut r, "agent_connected")?,
            agent_seen_us: r.u64("agent_seen_us")?,
            agent: get_agent(&mut r)?,
        }),
        T_FENCE => Msg::Fence {
            reason: get_str(&mut r, "reason")?,
        },
        T_SEED => {
            let next_seq = r.u64("next_seq")?;
            let disks = get_disks(&mut r)?;
            let mut hashes = Vec::with_capacity(disks.len());
            for d in &disks {
                let at = r.position();
                let n = r.u32("block_count")? as u64;
                if n != d.size_bytes.div_ceil(crate::delta::BLOCK_BYTES) {
                    return Err(DecodeError::invalid(
                        "block_count",
                        at,
                        format!("{n} block hashes for a disk of {} bytes", d.size_bytes),
                    ));
                }
                let mut h = Vec::with_capacity(n.min(r.remaining() as u64 / 16) as usize);
                for _ in 0..n {
                    h.push(u128::from_le_bytes(r.array("block_hash")?));
                }
                hashes.push(h);
            }
            Msg::Seed {
                next_seq,
                disks,
                hashes,
            }
        }
        T_ASK_SEED => Msg::AskSeed {
            disks: get_disks(&mut r)?,
        },
        T_ERROR => Msg::Error {
            message: get_str(&mut r, "message")?,
        },
        T_OPEN_AGENT_FEATURES => Msg::OpenAgentFeatures {
            disks: get_disks(&mut r)?,
            features: r.u64("features")?,
        },
        T_GROUP_STEP => {
            let tag = r.u64("tag")?;
            let at = r.position();
            let step = match r.u8("step")? {
                1 => BarrierStep::Hold,
                2 => BarrierStep::Cut,
                3 => BarrierStep::Release,
                n => {
                    return Err(DecodeError::invalid(
                        "step",
                        at,
                        format!("unknown step {n}"),
                    ))
                }
            };
            let group_point = get_str(&mut r, "group_point")?;
            let hold_ms = r.u64("hold_ms")?;
            let at = r.position();
            let app = match r.u8("app")? {
                0 => false,
                1 => true,
                v => {
                    return Err(DecodeError::invalid(
                        "app",
                        at,
                        format!("flag with value {v}"),
                    ))
                }
            };
            Msg::GroupStep(GroupStep {
                tag,
                step,
                group_point,
                hold_ms,
                app,
                name: get_str(&mut r, "name")?,
            })
        }
        T_GROUP_ANSWER => Msg::GroupAnswer(GroupAnswer {
            tag: r.u64("tag")?,
            error: get_str(&mut r, "error")?,
            value: r.u64("value")?,
        }),
        t => {
            return Err(DecodeError::invalid(
                "type",
                0,
                format!("unknown message type {t}"),
            ))
        }
    };
    r.expect_end(&format!("a {} message", msg.name()))?;
    Ok(msg)
}

fn get_flag(r: &mut Reader<'_>, field: &'static str) -> std::result::Result<bool, DecodeError> {
    let at = r.position();
    match r.u64(field)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(DecodeError::invalid(
            field,
            at,
            format!("flag with value {v}"),
        )),
    }
}

/// A string: length u16, UTF-8 bytes.
fn get_str(r: &mut Reader<'_>, field: &'static str) -> std::result::Result<String, DecodeError> {
    let at = r.position();
    let n = r.u16(field)? as usize;
    if n > MAX_NAME.max(4096) {
        return Err(DecodeError::invalid(field, at, "string too long"));
    }
    r.utf8(n, field)
}

fn get_disks(r: &mut Reader<'_>) -> std::result::Result<Vec<DiskInfo>, DecodeError> {
    let at = r.position();
    let n = r.u16("disk_count")? as usize;
    if n > MAX_DISKS {
        return Err(DecodeError::invalid("disk_count", at, format!("{n} disks")));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let at = r.position();
        let name = get_str(r, "disk_name")?;
        if name.len() > MAX_NAME {
            return Err(DecodeError::invalid("disk_name", at, "disk name too long"));
        }
        v.push(DiskInfo {
            name,
            size_bytes: r.u64("disk_size")?,
        });
    }
    Ok(v)
}

fn get_agent(r: &mut Reader<'_>) -> std::result::Result<AgentState, DecodeError> {
    Ok(AgentState {
        resync_bytes: r.u64("resync_bytes")?,
        bitmap_mode: get_flag(r, "bitmap_mode")?,
        journal_bytes: r.u64("journal_bytes")?,
        journal_seq: r.u64("journal_seq")?,
    })
}

/// Read one message from a stream. `Ok(None)` on a clean end of stream before a header.
pub fn read_msg(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<Msg>> {
    let mut h = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        match r.read(h.get_mut(got..).unwrap_or_default()) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::Link(LinkError::ClosedMidMessage)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    let (_, len) = parse_header(&h)?;
    buf.clear();
    buf.extend_from_slice(&h);
    buf.resize(HEADER_BYTES + len, 0);
    r.read_exact(buf.get_mut(HEADER_BYTES..).unwrap_or_default())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Link(LinkError::ClosedMidMessage)
            } else {
                io_err(e)
            }
        })?;
    decode(buf).map(Some)
}

/// Write one message and flush it.
pub fn write_msg(w: &mut impl Write, msg: &Msg) -> Result<()> {
    w.write_all(&msg.encode()).map_err(io_err)?;
    w.flush().map_err(io_err)
}

/// An I/O error on the link, in words.
pub fn io_err(e: std::io::Error) -> Error {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof => {
            Error::Link(LinkError::Broken { why: e.to_string() })
        }
        WouldBlock | TimedOut => Error::Link(LinkError::TimedOut),
        _ => Error::Link(LinkError::Io { why: e.to_string() }),
    }
}

/// Walk the record frames of a `Records` payload, checking each completely (length, crc
/// against [`WIRE_BINDING`], every field, the body decompresses) and that it stays within
/// the VM's `disks`, then hand it to `f` with its header. A payload that fails anywhere is
/// refused whole before `f` sees any of it, so a malformed batch changes nothing.
pub fn check_records(
    payload: &[u8],
    disks: &[DiskInfo],
) -> Result<Vec<(usize, crate::record::FrameHeader)>> {
    use crate::record::{self, Op};
    let mut frames = Vec::new();
    let mut at = 0usize;
    let mut prev: Option<u64> = None;
    while at < payload.len() {
        let h = record::FrameHeader::parse(payload.get(at..).unwrap_or_default(), WIRE_BINDING)
            .map_err(|e| bad(format!("record at byte {at}: {e}")))?;
        let total = h.frame_bytes();
        let frame = payload
            .get(at..at + total)
            .ok_or_else(|| bad(format!("record at byte {at} runs past the message")))?;
        let rec = record::verify_and_decode(frame, &h, WIRE_BINDING)
            .map_err(|e| bad(format!("record {} : {e}", h.seq)))?;
        if let Some(p) = prev {
            if h.seq != p + 1 {
                return Err(bad(format!("record {} follows record {p}", h.seq)));
            }
        }
        prev = Some(h.seq);
        let span = match &rec.op {
            Op::Write { disk, offset, data } => Some((*disk, *offset, data.len() as u64)),
            Op::Zero {
                disk, offset, len, ..
            } => Some((*disk, *offset, *len)),
            Op::Marker(_) => None,
        };
        if let Some((disk, offset, len)) = span {
            let d = disks.get(disk as usize).ok_or_else(|| {
                bad(format!(
                    "record {} names disk {disk}, the VM has {}",
                    h.seq,
                    disks.len()
                ))
            })?;
            if offset.checked_add(len).is_none_or(|e| e > d.size_bytes) {
                return Err(bad(format!(
                    "record {} runs past the end of disk '{}'",
                    h.seq, d.name
                )));
            }
        }
        frames.push((at, h));
        at += total;
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        let disks = vec![
            DiskInfo {
                name: "os".into(),
                size_bytes: 1 << 30,
            },
            DiskInfo {
                name: "data".into(),
                size_bytes: 1 << 40,
            },
        ];
        let agent = AgentState {
            resync_bytes: 1,
            bitmap_mode: true,
            journal_bytes: 3,
            journal_seq: 4,
        };
        vec![
            Msg::Hello {
                role: PeerRole::Agent,
                vm: "web01".into(),
                nonce: [7; 32],
            },
            Msg::Challenge {
                nonce: [1; 32],
                proof: [2; 32],
            },
            Msg::Auth { proof: [3; 32] },
            Msg::OpenAgent {
                disks: disks.clone(),
            },
            Msg::OpenProcessor { from_seq: 99 },
            Msg::Ready {
                next_seq: 5,
                first_seq: 2,
                disks,
            },
            Msg::Records(vec![9; 100]),
            Msg::Ack { durable_seq: 77 },
            Msg::Checkpoint { seq: 66 },
            Msg::AgentState(agent.clone()),
            Msg::SourceState(SourceState {
                durable_seq: 1,
                first_seq: 2,
                used_bytes: 3,
                backlog_bytes: 9,
                capacity_bytes: 4,
                last_time_us: 5,
                agent_connected: true,
                agent_seen_us: 6,
                agent,
            }),
            Msg::Error {
                message: "wrong link key".into(),
            },
            Msg::Fence {
                reason: "VM 'vm' was failed over to point 3".into(),
            },
            Msg::Seed {
                next_seq: 12,
                disks: vec![DiskInfo {
                    name: "os".into(),
                    size_bytes: 3 * crate::delta::BLOCK_BYTES - 512,
                }],
                hashes: vec![vec![1, u128::MAX, 3]],
            },
            Msg::AskSeed {
                disks: vec![DiskInfo {
                    name: "os".into(),
                    size_bytes: 4096,
                }],
            },
            Msg::OpenAgentFeatures {
                disks: vec![DiskInfo {
                    name: "os".into(),
                    size_bytes: 512,
                }],
                features: features::ALL,
            },
            Msg::GroupStep(GroupStep {
                tag: 3,
                step: BarrierStep::Cut,
                group_point: "erp/7".into(),
                hold_ms: 5000,
                app: true,
                name: "nightly".into(),
            }),
            Msg::GroupStep(GroupStep {
                tag: 4,
                step: BarrierStep::Release,
                group_point: "erp/7".into(),
                hold_ms: 0,
                app: false,
                name: String::new(),
            }),
            Msg::GroupAnswer(GroupAnswer {
                tag: 3,
                error: String::new(),
                value: 42,
            }),
            Msg::GroupAnswer(GroupAnswer {
                tag: 4,
                error: "its hold lapsed".into(),
                value: 0,
            }),
        ]
    }

    #[test]
    fn every_message_round_trips_and_any_flip_is_refused() {
        for m in samples() {
            let b = m.encode();
            assert_eq!(decode(&b).unwrap(), m);
            let mut r = &b[..];
            let mut buf = Vec::new();
            assert_eq!(read_msg(&mut r, &mut buf).unwrap(), Some(m.clone()));
            for i in 0..b.len() {
                let mut d = b.clone();
                d[i] ^= 0x20;
                assert!(decode(&d).is_err(), "{}: flip at {i} passed", m.name());
            }
            assert!(decode(&b[..b.len() - 1]).is_err());
        }
    }

    #[test]
    fn tls_and_foreign_bytes_are_named() {
        let mut h = [0u8; HEADER_BYTES];
        h[0] = 0x16;
        let e = parse_header(&h).unwrap_err().to_string();
        assert!(e.contains("TLS"), "{e}");
        let e = parse_header(b"GET / HTTP/1.1\r\n").unwrap_err().to_string();
        assert!(e.contains("does not speak"), "{e}");
    }

    #[test]
    fn header_refusals_are_typed_and_keep_their_words() {
        let mut h = [0u8; HEADER_BYTES];
        h[0] = 0x16;
        assert!(matches!(
            parse_header(&h),
            Err(Error::Link(LinkError::TlsOnPlaintext))
        ));
        assert!(matches!(
            parse_header(b"GET / HTTP/1.1\r\n"),
            Err(Error::Link(LinkError::NotStandby))
        ));
        let mut b = Msg::Ack { durable_seq: 1 }.encode();
        b[4] = VERSION + 1;
        let e = decode(&b).unwrap_err();
        assert!(
            matches!(e, Error::Link(LinkError::Version { peer, ours }) if peer == VERSION + 1 && ours == VERSION),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "link: the peer speaks link protocol version {}, this build speaks {VERSION}",
                VERSION + 1
            )
        );
        let mut r: &[u8] = &b[..5];
        assert!(matches!(
            read_msg(&mut r, &mut Vec::new()),
            Err(Error::Link(LinkError::ClosedMidMessage))
        ));
    }

    #[test]
    fn oversized_payload_is_refused_before_allocation() {
        let mut b = Msg::Ack { durable_seq: 1 }.encode();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = &b[..];
        let e = read_msg(&mut r, &mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
    }
}
