//! The NBD server's protocol conformance, end to end through `standby agent` and
//! `standby mount`, with libnbd (python3-libnbd, the strictest common client) as the
//! client and the spec (NetworkBlockDevice/nbd `doc/proto.md`) as the reference: replies
//! libnbd would drop the connection over, the errno the spec gives each refusal, flags
//! that do not apply to a command, block sizes sent unasked, the default export's name.

mod common;

use common::{free_port, Env};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const OS: u64 = 16 << 20;

impl Env {
    /// A vault protecting `vm`, whose disk `os` is a sparse source image.
    fn new() -> Env {
        let env = Env::empty();
        env.ok(&["init", env.vault.to_str().unwrap()]);
        let os = format!("os=new:{}MiB", OS >> 20);
        env.ok(&["protect", "vm", "--disk", &os]);
        env
    }

    /// Start a long-running server and wait for its first line (it is serving); stopped
    /// with SIGINT when the guard drops.
    fn serve(&self, args: &[&str]) -> Serving {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(
            first.contains("nbd") || first.contains("on 127.0.0.1"),
            "{first}"
        );
        Serving(child)
    }

    fn agent(&self) -> (Serving, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let s = self.serve(&["agent", "vm", "--listen", &addr]);
        (s, format!("nbd://{addr}/os"))
    }

    fn mount(&self, writable: bool) -> (Serving, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["mount", "vm", "--point", "1", "--listen", &addr];
        if writable {
            args.push("--writable");
        }
        let s = self.serve(&args);
        (s, format!("nbd://{addr}/os"))
    }
}

/// A running `standby` server: SIGINT on drop, and it must stop cleanly.
struct Serving(Child);

impl Serving {
    fn stop(mut self) {
        let st = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let status = self.0.wait().unwrap();
        assert!(status.success(), "clean stop on SIGINT, got {status}");
        std::mem::forget(self);
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Helpers every script starts with: `connect(url, ...)` and `errno(f)` (the error's
/// symbolic errno, or "ok").
const PRELUDE: &str = r#"
import nbd, sys
def connect(url, structured=True, block_size=True, strict=True):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    h.set_request_block_size(block_size)
    h.set_full_info(True)
    if structured:
        h.add_meta_context("base:allocation")
    h.connect_uri(url)
    return h
def errno(f):
    try:
        f()
        return "ok"
    except nbd.Error as e:
        return e.errno
"#;

/// Run a libnbd script with `URL` set; it fails the test with its traceback if it raises.
fn libnbd(url: &str, script: &str) -> String {
    let code = format!("{PRELUDE}\nURL = {url:?}\n{script}");
    // The system interpreter: python3-libnbd installs its module there.
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &code])
        .output()
        .expect("python3-libnbd is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "libnbd script on {url} failed:\n{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A zero-length read with structured replies used to get an 8-byte OFFSET_DATA chunk
/// (the spec wants at least 9: a chunk describes at least one byte), so libnbd dropped
/// the connection. Now it is a lone NONE chunk, and the connection goes on.
const ZERO_LENGTH_READ: &str = r#"
for structured in (True, False):
    h = connect(URL, structured=structured, strict=False)
    assert h.pread(0, 0) == b"", "empty read"
    assert h.pread(0, 4096) == b"", "empty read at an offset"
    assert len(h.pread(512, 0)) == 512, "still connected"
    h.shutdown()
print("ok")
"#;

#[test]
fn a_zero_length_read_keeps_a_strict_client_connected_on_the_agent_and_the_mount() {
    let env = Env::new();
    let (agent, url) = env.agent();
    libnbd(&url, ZERO_LENGTH_READ);
    // nbdsh, as a user would type it.
    let out = Command::new("nbdsh")
        // nbdsh runs `python3` from PATH: the system one, which has the module.
        .env("PATH", "/usr/bin:/bin")
        .args([
            "-u",
            &url,
            "-c",
            "h.set_strict_mode(0)",
            "-c",
            "h.pread(0,0)",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.stop();
    let (mount, url) = env.mount(false);
    libnbd(&url, ZERO_LENGTH_READ);
    mount.stop();
}

/// The errno the spec gives each refusal, and flags that do not apply to a command
/// refused with EINVAL (nothing changes): what `standby agent` and a writable `standby
/// mount` answer alike.
const REFUSALS: &str = r#"
size = 16 << 20
for structured in (True, False):
    h = connect(URL, structured=structured, strict=False)
    big = (32 << 20) + 512
    # EOVERFLOW only where DF is supported (structured replies), EINVAL otherwise.
    want = "EOVERFLOW" if structured else "EINVAL"
    assert errno(lambda: h.pread(big, 0)) == want, (structured, errno(lambda: h.pread(big, 0)))
    assert errno(lambda: h.pread(512, size)) == "EINVAL"
    assert errno(lambda: h.trim(4096, size - 512)) == "EINVAL", errno(lambda: h.trim(4096, size - 512))
    assert errno(lambda: h.pwrite(b"x" * 512, size)) == "ENOSPC"
    assert errno(lambda: h.zero(4096, size - 512)) == "ENOSPC"
    # Flags outside the spec's table.
    h.pwrite(b"\x11" * 512, 0)
    assert errno(lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_DF)) == "EINVAL"
    assert errno(lambda: h.trim(512, 0, nbd.CMD_FLAG_NO_HOLE)) == "EINVAL"
    assert errno(lambda: h.trim(512, 0, nbd.CMD_FLAG_REQ_ONE)) == "EINVAL"
    assert errno(lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE)) == "EINVAL"
    assert errno(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)) == "EINVAL"
    assert errno(lambda: h.flush(nbd.CMD_FLAG_DF)) == "EINVAL"
    assert errno(lambda: h.zero(512, 0, nbd.CMD_FLAG_DF)) == "EINVAL"
    assert errno(lambda: h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)) == "EINVAL"
    if structured:
        assert errno(lambda: h.block_status(512, 0, lambda *a: 0, nbd.CMD_FLAG_DF)) == "EINVAL"
        assert errno(lambda: h.block_status(512, 0, lambda *a: 0, nbd.CMD_FLAG_NO_HOLE)) == "EINVAL"
        assert errno(lambda: h.block_status(512, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)) == "ok"
        assert len(h.pread(512, 0, nbd.CMD_FLAG_DF)) == 512
    else:
        assert errno(lambda: h.pread(512, 0, nbd.CMD_FLAG_DF)) == "EINVAL", "DF needs SEND_DF"
    assert h.pread(512, 0) == b"\x11" * 512, "a refused request changed the disk"
    # Zero lengths are no-ops, as qemu-nbd treats them.
    assert errno(lambda: h.pwrite(b"", 0)) == "ok"
    assert errno(lambda: h.trim(0, 0)) == "ok"
    assert errno(lambda: h.zero(0, 0)) == "ok"
    assert h.pread(512, 0) == b"\x11" * 512
    h.shutdown()
print("ok")
"#;

#[test]
fn refusals_get_the_errno_the_spec_gives_them_on_the_agent_and_the_mount() {
    let env = Env::new();
    let (agent, url) = env.agent();
    libnbd(&url, REFUSALS);
    agent.stop();
    let (mount, url) = env.mount(true);
    libnbd(&url, REFUSALS);
    mount.stop();
}

/// The agent takes writes in 512-byte sectors: it says so whether or not the client asks
/// (the spec's SHOULD), and still serves a client that did not ask, refusing what it
/// cannot take. The empty export name is answered with the name of the export it selects.
#[test]
fn block_sizes_go_unasked_and_the_default_export_is_named() {
    let env = Env::new();
    let (agent, url) = env.agent();
    libnbd(
        &url,
        r#"
for ask in (True, False):
    h = connect(URL, block_size=ask)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 512, (ask, h.get_block_size(nbd.SIZE_MINIMUM))
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
    h.shutdown()
h = connect(URL, block_size=False, strict=False)
assert errno(lambda: h.pwrite(b"x" * 100, 0)) == "EINVAL"
assert errno(lambda: h.pwrite(b"x" * 512, 100)) == "EINVAL"
assert h.pread(512, 0) == bytes(512), "an unaligned write changed the disk"
h.shutdown()
h = nbd.NBD()
h.set_full_info(True)
h.set_export_name("")
h.connect_tcp(URL.split("/")[2].split(":")[0], URL.split("/")[2].split(":")[1])
assert h.get_canonical_export_name() == "os", h.get_canonical_export_name()
h.shutdown()
print("ok")
"#,
    );
    agent.stop();
    let (mount, url) = env.mount(false);
    libnbd(
        &url,
        r#"
h = connect(URL, block_size=False)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
h.shutdown()
"#,
    );
    mount.stop();
}

/// The agent's block status reports the source image's holes and the writes not yet
/// applied to it, so copies from the agent stay sparse: `qemu-img map` shows the holes,
/// `nbdcopy` writes a sparse file, both with the written bytes where they were written.
#[test]
fn copies_from_the_agent_keep_its_holes() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let (agent, url) = env.agent();
    libnbd(
        &url,
        r#"
h = connect(URL)
h.pwrite(b"\xaa" * 65536, 1 << 20)
h.pwrite(b"\xbb" * 65536, 8 << 20)
h.pwrite(b"\xcc" * 131072, 12 << 20)
h.zero(65536, 12 << 20)
seen = []
h.block_status(16 << 20, 0, lambda ctx, off, ents, err: seen.extend(ents) or 0)
assert any(flags & nbd.STATE_HOLE for flags in seen[1::2]), seen
h.shutdown()
"#,
    );
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        data,
        vec![
            (1 << 20, 64 << 10),
            (8 << 20, 64 << 10),
            ((12 << 20) + (64 << 10), 64 << 10)
        ],
        "qemu-img map: {map}"
    );
    let copy = env.root.join("copy.raw");
    let st = Command::new("nbdcopy")
        .args([&url, copy.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&copy).unwrap();
    let mut want = vec![0u8; OS as usize];
    want[1 << 20..(1 << 20) + (64 << 10)].fill(0xaa);
    want[8 << 20..(8 << 20) + (64 << 10)].fill(0xbb);
    want[(12 << 20) + (64 << 10)..(12 << 20) + (128 << 10)].fill(0xcc);
    assert!(
        bytes == want,
        "nbdcopy's copy differs from what was written"
    );
    let allocated = std::fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        allocated <= 1 << 20,
        "nbdcopy's copy of 192 KiB of data in 16 MiB is not sparse: {allocated} bytes allocated"
    );
    agent.stop();
}
