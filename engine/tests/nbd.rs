//! The NBD server against real clients (qemu-io, qemu-img) over an in-memory device, and
//! against malformed input written by hand.

use parking_lot::Mutex;
use standby_engine::nbd::proto::*;
use standby_engine::nbd::{BlockDevice, DevResult, ExportList, Extent, Server, ServerConfig};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// A RAM disk whose block status reports never-written 64 KiB blocks as holes.
struct Ram {
    data: Mutex<Vec<u8>>,
    written: Mutex<Vec<bool>>,
    read_only: bool,
    flushes: Mutex<u64>,
}

const BLOCK: u64 = 64 << 10;

impl Ram {
    fn new(size: usize, read_only: bool) -> Arc<Ram> {
        Arc::new(Ram {
            data: Mutex::new(vec![0; size]),
            written: Mutex::new(vec![false; size.div_ceil(BLOCK as usize)]),
            read_only,
            flushes: Mutex::new(0),
        })
    }
    fn mark(&self, offset: u64, len: u64, on: bool) {
        let mut w = self.written.lock();
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            w[b as usize] = on;
        }
    }
}

impl BlockDevice for Ram {
    fn size(&self) -> u64 {
        self.data.lock().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn min_block_bytes(&self) -> u32 {
        512
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        buf.copy_from_slice(&self.data.lock()[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> DevResult<()> {
        self.data.lock()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        self.mark(offset, data.len() as u64, true);
        Ok(())
    }
    fn flush(&self) -> DevResult<()> {
        *self.flushes.lock() += 1;
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> DevResult<()> {
        self.write_zeroes(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> DevResult<()> {
        self.data.lock()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        let w = self.written.lock();
        let mut out = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let b = at / BLOCK;
            let end = ((b + 1) * BLOCK).min(offset + len);
            let hole = !w[b as usize];
            out.push(Extent {
                len: end - at,
                hole,
                zero: hole,
            });
            at = end;
        }
        Ok(out)
    }
}

fn start(devs: Vec<(&str, Arc<Ram>)>) -> Server {
    let list = devs
        .into_iter()
        .map(|(n, d)| (n.to_string(), d as Arc<dyn BlockDevice>))
        .collect();
    Server::start(
        "127.0.0.1:0",
        Arc::new(ExportList(list)),
        ServerConfig::default(),
    )
    .unwrap()
}

fn qemu_io(url: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(url);
    let out = c.output().expect("qemu-io is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("failed"),
        text,
    )
}

#[test]
fn qemu_io_writes_reads_zeroes_discards_and_flushes() {
    let ram = Ram::new(16 << 20, false);
    let server = start(vec![("disk", ram.clone())]);
    let url = format!("nbd://{}/disk", server.local_addr());
    let (ok, out) = qemu_io(
        &url,
        &[
            "write -P 0xab 0 1M",
            "aio_write -P 0xcd 4M 64k",
            "aio_write -P 0xce 5M 64k",
            "aio_flush",
            "write -z 512k 128k",
            "discard 768k 64k",
            "flush",
            "write -P 0x11 3001000 100",
            "read -P 0xab 0 512k",
            "read -P 0 512k 128k",
            "read -P 0 768k 64k",
            "read -P 0xcd 4M 64k",
            "read -P 0xce 5M 64k",
            "read -P 0x11 3001000 100",
            "read -P 0xab 1000 100",
        ],
    );
    assert!(ok, "{out}");
    let data = ram.data.lock();
    assert!(data[..512 << 10].iter().all(|&b| b == 0xab));
    assert!(data[3001000..3001100].iter().all(|&b| b == 0x11));
    assert!(data[3000900..3001000].iter().all(|&b| b == 0));
    assert!(data[4 << 20..(4 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(*ram.flushes.lock() >= 1);
}

#[test]
fn qemu_img_sees_size_exports_and_holes() {
    let a = Ram::new(8 << 20, false);
    let b = Ram::new(4 << 20, true);
    a.write(2 << 20, &vec![7u8; 128 << 10], false).unwrap();
    let server = start(vec![("a", a), ("b", b)]);
    let addr = server.local_addr();
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", &format!("nbd://{addr}/b")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains(&format!("\"virtual-size\": {}", 4 << 20)),
        "{text}"
    );
    let map = Command::new("qemu-img")
        .args([
            "map",
            "--output=json",
            "-f",
            "raw",
            &format!("nbd://{addr}/a"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&map.stdout);
    assert!(
        map.status.success(),
        "{}",
        String::from_utf8_lossy(&map.stderr)
    );
    // The written 128 KiB are data; the rest are holes.
    assert!(text.contains(&format!("\"start\": {}, \"length\": {}, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true", 2 << 20, 128 << 10)), "{text}");
    assert!(text.contains("\"zero\": true, \"data\": false"), "{text}");
    // A read-only export refuses writes.
    let (ok, out) = qemu_io(&format!("nbd://{addr}/b"), &["write -P 1 0 4k"]);
    assert!(!ok, "{out}");
    // An unknown export is refused with a clear message.
    let bad = Command::new("qemu-img")
        .args(["info", &format!("nbd://{addr}/nope")])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nope"));
}

fn handshake(addr: &str, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    s
}

fn simple(s: &mut TcpStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        u32::from_be_bytes([r[0], r[1], r[2], r[3]]),
        SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes([r[4], r[5], r[6], r[7]]),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

#[test]
fn malformed_requests_get_errors_or_a_clean_disconnect_never_a_partial_write() {
    let ram = Ram::new(1 << 20, false);
    let server = start(vec![("d", ram.clone())]);
    let addr = server.local_addr().to_string();
    let mut s = handshake(&addr, "d");
    let req = |cmd: u16, flags: u16, cookie: u64, offset: u64, length: u32| {
        Request {
            flags,
            command: cmd,
            cookie,
            offset,
            length,
        }
        .encode()
    };
    // Offset beyond the export.
    s.write_all(&req(CMD_READ, 0, 1, 1 << 20, 512)).unwrap();
    assert_eq!(simple(&mut s), (EINVAL, 1));
    // A write past the end: its payload is consumed, nothing is written.
    s.write_all(&req(CMD_WRITE, 0, 2, (1 << 20) - 512, 1024))
        .unwrap();
    s.write_all(&[9u8; 1024]).unwrap();
    assert_eq!(simple(&mut s), (ENOSPC, 2));
    assert!(ram.data.lock()[(1 << 20) - 512..].iter().all(|&b| b == 0));
    // Unaligned write.
    s.write_all(&req(CMD_WRITE, 0, 3, 100, 10)).unwrap();
    s.write_all(&[9u8; 10]).unwrap();
    assert_eq!(simple(&mut s), (EINVAL, 3));
    // Unknown command and unknown flags.
    s.write_all(&req(99, 0, 4, 0, 0)).unwrap();
    assert_eq!(simple(&mut s), (EINVAL, 4));
    s.write_all(&req(CMD_FLUSH, 0x4000, 5, 0, 0)).unwrap();
    assert_eq!(simple(&mut s), (EINVAL, 5));
    // Block status without negotiation.
    s.write_all(&req(CMD_BLOCK_STATUS, 0, 6, 0, 4096)).unwrap();
    assert_eq!(simple(&mut s), (EINVAL, 6));
    // Still in sync: a good write and read.
    s.write_all(&req(CMD_WRITE, 0, 7, 0, 512)).unwrap();
    s.write_all(&[5u8; 512]).unwrap();
    assert_eq!(simple(&mut s), (0, 7));
    // A truncated write (payload cut short by a disconnect) is never applied.
    s.write_all(&req(CMD_WRITE, 0, 8, 4096, 4096)).unwrap();
    s.write_all(&[6u8; 1000]).unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    assert!(ram.data.lock()[4096..8192].iter().all(|&b| b == 0));
    assert!(ram.data.lock()[..512].iter().all(|&b| b == 5));
    // Bad magic: the server hangs up.
    let mut s = handshake(&addr, "d");
    s.write_all(&[0xffu8; 28]).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    // Garbage instead of a handshake: the server hangs up, and keeps serving others.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&[0xffu8; 64]).unwrap();
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    let (ok, out) = qemu_io(&format!("nbd://{addr}/d"), &["read -P 5 0 512"]);
    assert!(ok, "{out}");
}

#[test]
fn option_haggling_lists_exports_and_refuses_the_unknown() {
    let server = start(vec![
        ("one", Ram::new(1 << 20, false)),
        ("two", Ram::new(1 << 20, false)),
    ]);
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    let send = |s: &mut TcpStream, opt: u32, data: &[u8]| {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        s.write_all(&b).unwrap();
    };
    let recv = |s: &mut TcpStream| -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            REPLY_MAGIC_OPT
        );
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        (kind, d)
    };
    send(&mut s, OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (k, d) = recv(&mut s);
        if k == REP_ACK {
            break;
        }
        assert_eq!(k, REP_SERVER);
        names.push(String::from_utf8(d[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["one", "two"]);
    send(&mut s, 42, &[1, 2, 3]);
    assert_eq!(recv(&mut s).0, REP_ERR_UNSUP);
    send(&mut s, OPT_INFO, &[0, 0, 0, 9, b'x']);
    assert_eq!(recv(&mut s).0, REP_ERR_INVALID);
    let mut info = 4u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"nope");
    info.extend_from_slice(&0u16.to_be_bytes());
    send(&mut s, OPT_INFO, &info);
    assert_eq!(recv(&mut s).0, REP_ERR_UNKNOWN);
    send(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(recv(&mut s).0, REP_ERR_POLICY);
    send(&mut s, OPT_ABORT, &[]);
    assert_eq!(recv(&mut s).0, REP_ACK);
}
