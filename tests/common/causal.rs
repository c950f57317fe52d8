//! The causal workload of the consistency-group tests: one chain of writes across the
//! members' disks (through libnbd, from Python), each write submitted only once the one
//! before it (on another member) was acknowledged, as a transfer between two databases
//! would be; the model of what each member holds after a prefix of the chain; and the check
//! that a failed-over group point is one prefix of the chain, bit-exact per member.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The causal writer's block.
pub const BLOCK: usize = 4096;

/// The causal chain: write k goes to VM k % n, block k / n, and is submitted only once
/// write k-1 (on another VM) was acknowledged. Block content: k as 8 bytes LE, then
/// (k % 251) + 1 repeated. Stops when `stop` exists (or a disk is full); prints the number
/// of acknowledged writes (to `progress`, rewritten as it goes, and at the end to stdout).
const CAUSAL: &str = r#"
import nbd, os, sys, struct
stop, progress, block, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hs = []
for uri in sys.argv[5:]:
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
n = len(hs)
k = 0
while not os.path.exists(stop):
    b = k // n
    if (b + 1) * block > size:
        break
    data = struct.pack("<Q", k) + bytes([k % 251 + 1]) * (block - 8)
    hs[k % n].pwrite(data, b * block)
    k += 1
    if k % 64 == 0:
        with open(progress + ".tmp", "w") as f:
            f.write(str(k))
        os.replace(progress + ".tmp", progress)
with open(progress + ".tmp", "w") as f:
    f.write(str(k))
os.replace(progress + ".tmp", progress)
while not os.path.exists(stop):
    import time
    time.sleep(0.01)
for h in hs:
    h.shutdown()
print(k)
"#;

/// The bytes block `b` of member `v` (of `n`) holds once the chain wrote it.
pub fn block_of(n: usize, v: usize, b: usize) -> Vec<u8> {
    let k = b * n + v;
    let mut d = vec![(k % 251 + 1) as u8; BLOCK];
    d[..8].copy_from_slice(&(k as u64).to_le_bytes());
    d
}

/// How many chain writes went to member `v` of `n` among the first `total`.
pub fn share(total: usize, n: usize, v: usize) -> usize {
    (total + n - 1 - v) / n
}

/// The model: member `v`'s disk of `disk` bytes after the first `total` writes.
pub fn model(total: usize, n: usize, v: usize, disk: usize) -> Vec<u8> {
    let mut d = vec![0u8; disk];
    for b in 0..share(total, n, v) {
        d[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&block_of(n, v, b));
    }
    d
}

/// Blocks of the chain image `img` holds as member `v` of `n` (a prefix, checked).
pub fn written(img: &[u8], n: usize, v: usize) -> usize {
    let mut c = 0;
    while (c + 1) * BLOCK <= img.len() && img[c * BLOCK..(c + 1) * BLOCK] == block_of(n, v, c)[..] {
        c += 1;
    }
    c
}

/// Check one failed-over group point of the chain's members (`vms`, chain order, each
/// failed over to `out/VM/os.raw`): every member's image is a prefix of its writes, the
/// prefixes together are one prefix of the chain (causal consistency), and each image is
/// bit-exact to the model of that prefix. Returns the prefix's length.
pub fn check_causal(out: &Path, vms: &[&str], disk: usize) -> usize {
    let n = vms.len();
    let imgs: Vec<Vec<u8>> = vms
        .iter()
        .map(|vm| std::fs::read(out.join(vm).join("os.raw")).unwrap())
        .collect();
    let counts: Vec<usize> = imgs
        .iter()
        .enumerate()
        .map(|(v, img)| written(img, n, v))
        .collect();
    let total: usize = counts.iter().sum();
    for (v, c) in counts.iter().enumerate() {
        assert_eq!(
            *c,
            share(total, n, v),
            "not causally consistent: members hold {counts:?} blocks, not one prefix of the chain"
        );
        assert!(
            imgs[v] == model(total, n, v, disk),
            "member {} is not bit-exact to the model of the first {total} writes",
            vms[v]
        );
    }
    total
}

/// A causal writer across NBD exports.
pub struct Causal {
    child: Child,
    stop: PathBuf,
    progress: PathBuf,
    /// Writes of the whole chain: every block of every member once (then it stops writing).
    cap: usize,
}

impl Causal {
    /// Start the chain over `uris` (`nbd://HOST:PORT/os`, chain order) on disks of
    /// `disk` bytes; its files go in `root`, named by `tag`.
    pub fn start(root: &Path, uris: &[String], disk: usize, tag: &str) -> Causal {
        let script = root.join("causal.py");
        std::fs::write(&script, CAUSAL).unwrap();
        let stop = root.join(format!("{tag}.stop"));
        let progress = root.join(format!("{tag}.progress"));
        let mut c = Command::new("/usr/bin/python3");
        c.arg(&script)
            .arg(&stop)
            .arg(&progress)
            .arg(BLOCK.to_string())
            .arg(disk.to_string())
            .args(uris);
        let child = c.stdout(Stdio::piped()).spawn().unwrap();
        Causal {
            child,
            stop,
            progress,
            cap: disk / BLOCK * uris.len(),
        }
    }

    pub fn acked(&self) -> usize {
        std::fs::read_to_string(&self.progress)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Wait until at least `n` more writes than now were acknowledged (60 s at most), or
    /// the chain is complete (it wrote every block once; a loaded machine cuts points more
    /// slowly than the writer fills the disks).
    pub fn advance(&self, n: usize) {
        let want = (self.acked() + n).min(self.cap);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.acked() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer stalled at {} acknowledged writes",
                self.acked()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Stop the chain; the number of acknowledged writes.
    pub fn finish(mut self) -> usize {
        std::fs::write(&self.stop, b"").unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut s).unwrap();
        assert!(
            self.child.wait().unwrap().success(),
            "the NBD client failed"
        );
        s.trim().parse().unwrap()
    }
}

impl Drop for Causal {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`check_causal`] for a group point of only some of the chain's VMs (`members`, a subset
/// of `chain`, failed over to `out/VM/os.raw`): some prefix of the chain explains what
/// every member holds, and each member is bit-exact to it.
pub fn check_causal_subset(out: &Path, chain: &[&str], members: &[&str], disk: usize) {
    let n = chain.len();
    // Member v holds c blocks iff the prefix T has (c-1)·n + v < T <= c·n + v.
    let (mut lo, mut hi) = (0usize, usize::MAX);
    let mut counts = Vec::new();
    for m in members {
        let v = chain.iter().position(|c| c == m).unwrap();
        let img = std::fs::read(out.join(m).join("os.raw")).unwrap();
        let c = written(&img, n, v);
        // The first c·n + v writes of the chain hold exactly c of member v's.
        assert!(
            img == model(c * n + v, n, v, disk),
            "member {m} is not bit-exact to a prefix of its writes"
        );
        if c > 0 {
            lo = lo.max((c - 1) * n + v + 1);
        }
        hi = hi.min(c * n + v);
        counts.push((m.to_string(), c));
    }
    assert!(
        lo <= hi,
        "not causally consistent: members hold {counts:?} blocks, no prefix of the chain explains them"
    );
}
