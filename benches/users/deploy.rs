//! The processes the benchmark starts, exactly as README tells users to start them: the
//! `standby` binary (embedded and two-site deployments) and the floor's `qemu-nbd`. Every
//! process is owned by a [`Proc`], which stops it on drop (SIGINT, then SIGKILL), so a
//! panic leaves nothing running.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `standby` binary cargo built for this benchmark (target/release/standby).
pub fn standby_bin() -> &'static str {
    env!("CARGO_BIN_EXE_standby")
}

pub type Res<T> = Result<T, String>;

/// A port on `ip` that was free a moment ago.
pub fn free_addr(ip: [u8; 4]) -> SocketAddr {
    let l = TcpListener::bind(SocketAddr::from((ip, 0))).expect("a free port");
    l.local_addr().expect("local addr")
}

/// The last non-empty line of a log file (for a failure's reason).
pub fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// A running child; SIGINT then SIGKILL on drop.
pub struct Proc {
    pub what: String,
    child: Option<Child>,
    pub log: PathBuf,
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

impl Proc {
    /// Start `program args`, stdout and stderr to `log`, with STANDBY_VAULT=`vault`.
    pub fn spawn(
        what: &str,
        program: &str,
        args: &[&str],
        vault: Option<&Path>,
        log: &Path,
    ) -> Proc {
        let out = File::create(log).expect("log file");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out);
        if let Some(v) = vault {
            cmd.env("STANDBY_VAULT", v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc {
            what: what.into(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// Wait until `addr` accepts connections (the process serves).
    pub fn wait_listening(&mut self, addr: SocketAddr, timeout: Duration) -> Res<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "{} exited ({st}): {}",
                        self.what,
                        last_line(&self.log)
                    ));
                }
            }
            if TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not listen on {addr}", self.what));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGINT (a clean stop) and wait up to `timeout`; then SIGKILL. Err if it had to be
    /// killed or did not exit 0.
    pub fn stop(&mut self, timeout: Duration) -> Res<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal(child.id(), "-INT");
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => {
                    return Err(format!(
                        "{} exited with {st}: {}",
                        self.what,
                        last_line(&self.log)
                    ))
                }
                _ => {}
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not stop within {timeout:?} of SIGINT (killed)",
                    self.what
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(10));
    }
}

/// Commands slower than this are logged with `STANDBY_USERS_VERBOSE`.
const SLOW: Duration = Duration::from_millis(500);

/// Run a command to completion within `timeout`; Ok(stdout) if it exits 0, else the
/// reason (its last stderr line, or the timeout).
pub fn run(program: &str, args: &[&str], vault: Option<&Path>, timeout: Duration) -> Res<String> {
    let dir = tempfile::tempdir().expect("tmp");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("out"))
        .stderr(File::create(&err).expect("err"));
    if let Some(v) = vault {
        cmd.env("STANDBY_VAULT", v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let started = Instant::now();
    let deadline = started + timeout;
    let name = format!("{} {}", short(program), args.first().copied().unwrap_or(""));
    loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            if std::env::var_os("STANDBY_USERS_VERBOSE").is_some() && started.elapsed() > SLOW {
                eprintln!("users:   `{}` took {:?}", args.join(" "), started.elapsed());
            }
            let stdout = std::fs::read_to_string(&out).unwrap_or_default();
            if st.success() {
                return Ok(stdout);
            }
            return Err(format!("`{name}` exited {st}: {}", last_line(&err)));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let why = last_line(&err);
            return Err(format!(
                "`{name}` did not finish within {} s{}",
                timeout.as_secs(),
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn short(program: &str) -> &str {
    Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program)
}

/// `standby ARGS` with STANDBY_VAULT=`vault`.
pub fn standby(vault: &Path, args: &[&str], timeout: Duration) -> Res<String> {
    run(standby_bin(), args, Some(vault), timeout)
}

/// A fresh sparse raw file of `size` bytes.
pub fn sparse(path: &Path, size: u64) {
    let f = File::create(path).expect("raw file");
    f.set_len(size).expect("raw size");
    f.sync_all().expect("raw sync");
}

pub const VM: &str = "web01";
const SHORT: Duration = Duration::from_secs(60);

/// Which deployment serves the VM's disk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// `standby init`, `standby protect web01 --disk os=PATH`, `standby agent web01`.
    Embedded,
    /// README's "To try both sites on one machine": cache service and agent on 127.0.0.2,
    /// `protect --cache` and `process --cache --follow` on the vault.
    TwoSite,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Embedded => "embedded",
            Kind::TwoSite => "two-site",
        }
    }
}

/// A deployment serving a VM with one fresh sparse disk `os` of `size` bytes; its agent
/// serves it at `addr`. Every process stops on drop.
pub struct Deployment {
    pub dir: PathBuf,
    pub vault: PathBuf,
    pub disk: PathBuf,
    pub addr: SocketAddr,
    pub cache_addr: Option<SocketAddr>,
    // Dropped in this order: the processor, the agent, the cache service (README's order).
    pub process: Option<Proc>,
    pub agent: Option<Proc>,
    pub cache: Option<Proc>,
}

impl Deployment {
    pub fn start(kind: Kind, dir: &Path, size: u64) -> Res<Deployment> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let vault = dir.join("vault");
        let disk = dir.join("web01-os.raw");
        let v = vault.to_str().unwrap();
        standby(&vault, &["init", v], SHORT)?;
        sparse(&disk, size);
        let mut d = Deployment {
            dir: dir.to_path_buf(),
            vault: vault.clone(),
            disk: disk.clone(),
            addr: free_addr([127, 0, 0, 1]),
            cache_addr: None,
            process: None,
            agent: None,
            cache: None,
        };
        match kind {
            Kind::Embedded => {
                let spec = format!("os={}", disk.display());
                standby(&vault, &["protect", VM, "--disk", &spec], SHORT)?;
                d.start_embedded_agent()?;
            }
            Kind::TwoSite => {
                let creds = dir.join("creds");
                let cache_dir = dir.join("cache");
                let journal = dir.join("journal");
                standby(
                    &vault,
                    &["link", "export", "--out", creds.to_str().unwrap()],
                    SHORT,
                )?;
                let cache_addr = free_addr([127, 0, 0, 2]);
                let ca = cache_addr.to_string();
                let mut cache = Proc::spawn(
                    "standby cache serve",
                    standby_bin(),
                    &[
                        "cache",
                        "serve",
                        "--dir",
                        cache_dir.to_str().unwrap(),
                        "--listen",
                        &ca,
                        "--creds",
                        creds.to_str().unwrap(),
                        "--insecure-loopback",
                    ],
                    Some(&vault),
                    &dir.join("cache.log"),
                );
                cache.wait_listening(cache_addr, SHORT)?;
                d.cache = Some(cache);
                d.cache_addr = Some(cache_addr);
                d.addr = free_addr([127, 0, 0, 2]);
                let listen = d.addr.to_string();
                let spec = format!("os={}", disk.display());
                let mut agent = Proc::spawn(
                    "standby agent",
                    standby_bin(),
                    &[
                        "agent",
                        VM,
                        "--cache",
                        &ca,
                        "--creds",
                        creds.to_str().unwrap(),
                        "--insecure-loopback",
                        "--journal",
                        journal.to_str().unwrap(),
                        "--disk",
                        &spec,
                        "--listen",
                        &listen,
                    ],
                    Some(&vault),
                    &dir.join("agent.log"),
                );
                agent.wait_listening(d.addr, SHORT)?;
                d.agent = Some(agent);
                // The agent declares its disks to the cache service once connected.
                let deadline = Instant::now() + SHORT;
                loop {
                    match standby(
                        &vault,
                        &["protect", VM, "--cache", &ca, "--insecure-loopback"],
                        SHORT,
                    ) {
                        Ok(_) => break,
                        Err(e) if Instant::now() > deadline => return Err(e),
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
                let process = Proc::spawn(
                    "standby process --follow",
                    standby_bin(),
                    &["process", "--cache", &ca, "--follow"],
                    Some(&vault),
                    &dir.join("process.log"),
                );
                d.process = Some(process);
                d.wait_connected()?;
            }
        }
        Ok(d)
    }

    /// `standby agent web01 --listen ADDR` (embedded), waited for until it serves.
    pub fn start_embedded_agent(&mut self) -> Res<()> {
        let listen = self.addr.to_string();
        let mut agent = Proc::spawn(
            "standby agent",
            standby_bin(),
            &["agent", VM, "--listen", &listen],
            Some(&self.vault),
            &self.dir.join("agent.log"),
        );
        agent.wait_listening(self.addr, SHORT)?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Two-site: wait until the follower and the agent are connected and the initial
    /// replication (of an empty disk) is done.
    fn wait_connected(&self) -> Res<()> {
        let deadline = Instant::now() + SHORT;
        loop {
            let st = self.status()?;
            let m = &st["remote"];
            if m["link"] == "connected"
                && m["agent_connected"] == true
                && m["resync_required"] != true
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the two sites did not connect: {m}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `standby status web01 --json`, the VM's object.
    pub fn status(&self) -> Res<serde_json::Value> {
        let out = standby(&self.vault, &["status", VM, "--json"], SHORT)?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("status --json: {e}"))?;
        Ok(v["vms"][0].clone())
    }

    /// Stop every process cleanly (README's order), within `timeout` each.
    pub fn stop(&mut self, timeout: Duration) -> Res<()> {
        let mut first_err = Ok(());
        for p in [&mut self.process, &mut self.agent, &mut self.cache] {
            if let Some(mut p) = p.take() {
                let r = p.stop(timeout);
                if first_err.is_ok() {
                    first_err = r;
                }
            }
        }
        first_err
    }

    /// Only the agent (embedded: so that commands needing the VM's lock can run).
    pub fn stop_agent(&mut self, timeout: Duration) -> Res<()> {
        match self.agent.take() {
            Some(mut a) => a.stop(timeout),
            None => Ok(()),
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(20));
    }
}

/// `qemu-nbd -f raw -t --cache=writeback` (or `-r`) serving `file` as `os`; killed on drop.
pub struct QemuNbd {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl QemuNbd {
    pub fn start(file: &Path, read_only: bool, log: &Path) -> Res<QemuNbd> {
        let addr = free_addr([127, 0, 0, 1]);
        let port = addr.port().to_string();
        let mut args = vec![
            "--cache=writeback",
            "-f",
            "raw",
            "-t",
            "-b",
            "127.0.0.1",
            "-x",
            crate::client::EXPORT,
            "-p",
            &port,
        ];
        if read_only {
            args.push("-r");
        }
        let f = file.to_str().unwrap();
        args.push(f);
        let mut p = Proc::spawn("qemu-nbd", "qemu-nbd", &args, None, log);
        p.wait_listening(addr, SHORT)?;
        Ok(QemuNbd { addr, _proc: p })
    }
}

/// `nbd://ADDR/os`.
pub fn url(addr: SocketAddr) -> String {
    format!("nbd://{addr}/{}", crate::client::EXPORT)
}

/// `qemu-img compare -f raw A -F raw B`: Ok if identical.
pub fn compare(a: &str, b: &str) -> Res<()> {
    run(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "raw", a, b],
        None,
        Duration::from_secs(600),
    )
    .map(|_| ())
    .map_err(|e| format!("{a} and {b} differ: {e}"))
}

/// Drop the page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`); false if not allowed.
pub fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

/// sha256 of a file, by `sha256sum`.
pub fn sha256(path: &Path) -> Res<String> {
    let out = run(
        "sha256sum",
        &[path.to_str().unwrap()],
        None,
        Duration::from_secs(600),
    )?;
    Ok(out.split_whitespace().next().unwrap_or("").to_string())
}
