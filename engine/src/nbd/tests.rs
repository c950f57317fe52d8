//! Whole sessions over memory: a scripted client's bytes in, the server's bytes parsed
//! back, checked against the spec's rules for each reply.

use super::proto::*;
use super::{serve_session, BlockDevice, ExportList, MemDisk};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a client sends, built up message by message.
struct Client(Vec<u8>);

impl Client {
    fn new() -> Client {
        Client(
            (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
                .to_be_bytes()
                .to_vec(),
        )
    }
    fn opt(mut self, opt: u32, data: &[u8]) -> Client {
        self.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.0.extend_from_slice(&opt.to_be_bytes());
        self.0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.0.extend_from_slice(data);
        self
    }
    fn structured(self) -> Client {
        self.opt(OPT_STRUCTURED_REPLY, &[])
    }
    fn meta(self, export: &str) -> Client {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        self.opt(OPT_SET_META_CONTEXT, &d)
    }
    fn go(self, name: &str, infos: &[u16]) -> Client {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.opt(OPT_GO, &d)
    }
    fn req(mut self, flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Client {
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.0.extend_from_slice(&r.encode());
        if command == CMD_WRITE {
            self.0.extend(std::iter::repeat_n(0xa5, length as usize));
        }
        self
    }
}

/// One structured chunk, or a simple reply (kind `u16::MAX`, `errno` set, data after it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    flags: u16,
    kind: u16,
    payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct Parsed {
    /// Option replies: (option, reply type, data).
    options: Vec<(u32, u32, Vec<u8>)>,
    /// Transmission replies by cookie: structured chunks, or simple (errno, data).
    chunks: BTreeMap<u64, Vec<Chunk>>,
    simple: BTreeMap<u64, (u32, Vec<u8>)>,
}

impl Parsed {
    fn errno(&self, cookie: u64) -> u32 {
        if let Some((e, _)) = self.simple.get(&cookie) {
            return *e;
        }
        let c = &self.chunks[&cookie];
        c.iter()
            .find(|c| c.kind == REPLY_TYPE_ERROR)
            .map(|c| u32::from_be_bytes(c.payload[0..4].try_into().unwrap()))
            .unwrap_or(0)
    }
    fn infos(&self, info: u16) -> Vec<Vec<u8>> {
        self.options
            .iter()
            .filter(|(o, t, d)| *o == OPT_GO && *t == REP_INFO && d[0..2] == info.to_be_bytes())
            .map(|(_, _, d)| d[2..].to_vec())
            .collect()
    }
}

/// Run one session and parse what the server sent. `read_lens` gives the length of each
/// read by cookie, which a simple reply does not say.
fn run(dev: Arc<dyn BlockDevice>, client: Client, read_lens: &[(u64, u32)]) -> Parsed {
    let exports = Arc::new(ExportList(vec![
        ("first".to_string(), dev),
        (
            "other".to_string(),
            Arc::new(MemDisk::new(1 << 20, 1, false)) as Arc<dyn BlockDevice>,
        ),
    ]));
    let mut out = Vec::new();
    let _ = serve_session(&client.0[..], &mut out, exports);
    parse(&out, &read_lens.iter().copied().collect())
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (h, t) = b.split_at(n);
    *b = t;
    h
}

fn parse(out: &[u8], read_lens: &BTreeMap<u64, u32>) -> Parsed {
    let mut p = Parsed::default();
    let mut b = out;
    assert_eq!(take(&mut b, 8), NBDMAGIC.to_be_bytes());
    assert_eq!(take(&mut b, 8), IHAVEOPT.to_be_bytes());
    take(&mut b, 2);
    while b.len() >= 8 && b[0..8] == REPLY_MAGIC_OPT.to_be_bytes() {
        take(&mut b, 8);
        let opt = u32::from_be_bytes(take(&mut b, 4).try_into().unwrap());
        let kind = u32::from_be_bytes(take(&mut b, 4).try_into().unwrap());
        let len = u32::from_be_bytes(take(&mut b, 4).try_into().unwrap());
        p.options
            .push((opt, kind, take(&mut b, len as usize).to_vec()));
    }
    while !b.is_empty() {
        let magic = u32::from_be_bytes(take(&mut b, 4).try_into().unwrap());
        if magic == SIMPLE_REPLY_MAGIC {
            let errno = u32::from_be_bytes(take(&mut b, 4).try_into().unwrap());
            let cookie = u64::from_be_bytes(take(&mut b, 8).try_into().unwrap());
            let n = match read_lens.get(&cookie) {
                Some(&n) if errno == 0 => n as usize,
                _ => 0,
            };
            let data = take(&mut b, n).to_vec();
            assert!(p.simple.insert(cookie, (errno, data)).is_none());
            continue;
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
        let flags = u16::from_be_bytes(take(&mut b, 2).try_into().unwrap());
        let kind = u16::from_be_bytes(take(&mut b, 2).try_into().unwrap());
        let cookie = u64::from_be_bytes(take(&mut b, 8).try_into().unwrap());
        let len = u32::from_be_bytes(take(&mut b, 4).try_into().unwrap());
        let payload = take(&mut b, len as usize).to_vec();
        check_chunk(kind, &payload);
        let list = p.chunks.entry(cookie).or_default();
        assert!(
            list.last().is_none_or(|c| c.flags & REPLY_FLAG_DONE == 0),
            "a chunk after DONE for cookie {cookie}"
        );
        list.push(Chunk {
            flags,
            kind,
            payload,
        });
    }
    for (cookie, list) in &p.chunks {
        assert!(
            list.last().unwrap().flags & REPLY_FLAG_DONE != 0,
            "cookie {cookie} never DONE"
        );
    }
    p
}

/// The spec's rules for each chunk type this server sends.
fn check_chunk(kind: u16, payload: &[u8]) {
    match kind {
        REPLY_TYPE_NONE => assert!(payload.is_empty(), "NONE carries nothing"),
        REPLY_TYPE_OFFSET_DATA => assert!(
            payload.len() >= 9,
            "an OFFSET_DATA chunk must describe at least one byte: {} bytes",
            payload.len()
        ),
        REPLY_TYPE_BLOCK_STATUS => {
            assert!(payload.len() >= 12 && (payload.len() - 4).is_multiple_of(8));
            for d in payload[4..].chunks(8) {
                assert_ne!(d[0..4], [0; 4], "a zero-length descriptor");
            }
        }
        REPLY_TYPE_ERROR => assert!(payload.len() >= 6),
        k => panic!("unexpected chunk type {k}"),
    }
}

fn disk(min: u32) -> Arc<dyn BlockDevice> {
    Arc::new(MemDisk::new(1 << 20, min, false))
}

#[test]
fn a_zero_length_structured_read_is_answered_by_a_lone_none_chunk() {
    let c = Client::new()
        .structured()
        .go("first", &[])
        .req(0, CMD_READ, 1, 0, 0)
        .req(0, CMD_READ, 2, 4096, 0)
        .req(0, CMD_READ, 3, 0, 512);
    let p = run(disk(1), c, &[]);
    for cookie in [1, 2] {
        assert_eq!(
            p.chunks[&cookie],
            vec![Chunk {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_NONE,
                payload: vec![]
            }]
        );
    }
    assert_eq!(p.chunks[&3][0].kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(p.chunks[&3][0].payload.len(), 8 + 512);
    // Simple replies: a success with no data.
    let c = Client::new()
        .go("first", &[])
        .req(0, CMD_READ, 1, 0, 0)
        .req(0, CMD_READ, 2, 0, 16);
    let p = run(disk(1), c, &[(1, 0), (2, 16)]);
    assert_eq!(p.simple[&1], (0, vec![]));
    assert_eq!(p.simple[&2], (0, vec![0; 16]));
}

#[test]
fn oversized_reads_get_eoverflow_only_where_df_is_supported() {
    let big = MAX_PAYLOAD_BYTES + 1;
    let p = run(
        disk(1),
        Client::new().go("first", &[]).req(0, CMD_READ, 1, 0, big),
        &[],
    );
    assert_eq!(p.errno(1), EINVAL, "simple replies: EINVAL");
    let c = Client::new()
        .structured()
        .go("first", &[])
        .req(0, CMD_READ, 1, 0, big)
        .req(CMD_FLAG_DF, CMD_READ, 2, 0, big);
    let p = run(disk(1), c, &[]);
    assert_eq!(p.errno(1), EOVERFLOW);
    assert_eq!(p.errno(2), EOVERFLOW);
}

#[test]
fn past_the_end_trim_is_einval_write_and_write_zeroes_enospc() {
    let size = 1u64 << 20;
    for structured in [false, true] {
        let mut c = Client::new();
        if structured {
            c = c.structured();
        }
        let c = c
            .go("first", &[])
            .req(0, CMD_TRIM, 1, size - 512, 1024)
            .req(0, CMD_WRITE, 2, size, 512)
            .req(0, CMD_WRITE_ZEROES, 3, size - 512, 1024)
            .req(0, CMD_READ, 4, size, 512)
            .req(0, CMD_TRIM, 5, size - 512, 512);
        let p = run(disk(512), c, &[]);
        assert_eq!(p.errno(1), EINVAL);
        assert_eq!(p.errno(2), ENOSPC);
        assert_eq!(p.errno(3), ENOSPC);
        assert_eq!(p.errno(4), EINVAL);
        assert_eq!(p.errno(5), 0);
    }
}

#[test]
fn flags_that_do_not_apply_to_a_command_are_refused_and_change_nothing() {
    let mem = Arc::new(MemDisk::new(1 << 20, 512, false));
    let c = Client::new()
        .structured()
        .meta("first")
        .go("first", &[INFO_BLOCK_SIZE])
        .req(CMD_FLAG_DF, CMD_WRITE, 1, 0, 512)
        .req(CMD_FLAG_NO_HOLE, CMD_TRIM, 2, 0, 512)
        .req(CMD_FLAG_DF, CMD_BLOCK_STATUS, 3, 0, 512)
        .req(CMD_FLAG_REQ_ONE, CMD_READ, 4, 0, 512)
        .req(CMD_FLAG_NO_HOLE, CMD_READ, 5, 0, 512)
        .req(CMD_FLAG_DF, CMD_FLUSH, 6, 0, 0)
        .req(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 7, 0, 512)
        .req(CMD_FLAG_REQ_ONE, CMD_WRITE, 8, 512, 512)
        // The flags that do apply.
        .req(CMD_FLAG_DF | CMD_FLAG_FUA, CMD_READ, 10, 0, 512)
        .req(
            CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
            CMD_WRITE_ZEROES,
            11,
            0,
            512,
        )
        .req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 12, 0, 512)
        .req(CMD_FLAG_FUA, CMD_FLUSH, 13, 0, 0);
    let p = run(mem.clone(), c, &[]);
    for cookie in 1..=8 {
        assert_eq!(p.errno(cookie), EINVAL, "cookie {cookie}");
    }
    for cookie in 10..=13 {
        assert_eq!(p.errno(cookie), 0, "cookie {cookie}");
    }
    assert!(
        mem.contents().iter().all(|&b| b == 0),
        "a refused write wrote"
    );
    // DF is only valid once SEND_DF is advertised, i.e. with structured replies.
    let p = run(
        disk(1),
        Client::new()
            .go("first", &[])
            .req(CMD_FLAG_DF, CMD_READ, 1, 0, 512),
        &[(1, 512)],
    );
    assert_eq!(p.errno(1), EINVAL);
}

#[test]
fn zero_length_changes_are_accepted_as_no_ops() {
    let mem = Arc::new(MemDisk::new(1 << 20, 512, false));
    let c = Client::new()
        .go("first", &[])
        .req(0, CMD_WRITE, 1, 0, 0)
        .req(CMD_FLAG_FUA, CMD_TRIM, 2, 4096, 0)
        .req(0, CMD_WRITE_ZEROES, 3, 0, 0);
    let p = run(mem, c, &[]);
    for cookie in 1..=3 {
        assert_eq!(p.errno(cookie), 0, "cookie {cookie}");
    }
}

#[test]
fn block_sizes_are_sent_unasked_and_the_default_export_says_its_name() {
    let p = run(disk(512), Client::new().go("", &[]), &[]);
    let sizes = p.infos(INFO_BLOCK_SIZE);
    assert_eq!(
        sizes.len(),
        1,
        "NBD_INFO_BLOCK_SIZE unasked: {:?}",
        p.options
    );
    let s = &sizes[0];
    assert_eq!(s[0..4], 512u32.to_be_bytes());
    assert_eq!(s[4..8], 4096u32.to_be_bytes());
    assert_eq!(s[8..12], MAX_PAYLOAD_BYTES.to_be_bytes());
    assert_eq!(p.infos(INFO_NAME), vec![b"first".to_vec()]);
    assert_eq!(p.options.last().unwrap().1, REP_ACK);
    // Asked by name: the name once.
    let p = run(disk(1), Client::new().go("other", &[INFO_NAME]), &[]);
    assert_eq!(p.infos(INFO_NAME), vec![b"other".to_vec()]);
}

#[test]
fn block_status_needs_the_meta_context_of_the_export_entered() {
    let c = Client::new()
        .structured()
        .meta("other")
        .go("first", &[])
        .req(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    assert_eq!(run(disk(1), c, &[]).errno(1), EINVAL);
    // The default export by its empty name is the same export as by its name.
    let c =
        Client::new()
            .structured()
            .meta("")
            .go("first", &[])
            .req(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    let p = run(disk(1), c, &[]);
    assert_eq!(p.errno(1), 0);
    assert_eq!(p.chunks[&1][0].kind, REPLY_TYPE_BLOCK_STATUS);
}
