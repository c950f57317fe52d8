//! The object-store servers a test runs against: Azurite (Azure Blob) and radosgw on a
//! one-node Ceph cluster, both on loopback, brought up by `tests/fixtures/objstores.sh`.
//!
//! One pair of servers is shared by every test of a test binary and by every test binary
//! running at the same time: the first caller in a process runs `objstores.sh ensure`, which
//! takes a lock on the shared directory, reuses the servers there if both answer or starts
//! them, and registers this process; a watcher the script leaves behind stops them once the
//! last registered process has exited (however it exited). Each test then takes a fresh
//! container and bucket of the same name ([`ObjStores::fresh_bucket`]), so tests never see
//! each other's objects.
//!
//! The shared directory is `$STANDBY_OBJSTORES_DIR`, else `standby-objstores` in the
//! system's temporary directory.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/objstores.sh");

/// The running servers and the environment that reaches them.
pub struct ObjStores {
    pub dir: PathBuf,
    /// Every `export K=V` the script printed: credentials and endpoints, as the
    /// `object_store` crate's builders read them from the environment.
    pub vars: Vec<(String, String)>,
}

static SERVERS: OnceLock<Result<ObjStores, String>> = OnceLock::new();
static BUCKETS: AtomicU32 = AtomicU32::new(0);

/// The shared servers, started on first use in this process. Panics (failing the test)
/// with the script's own message when they cannot be brought up.
pub fn servers() -> &'static ObjStores {
    match SERVERS.get_or_init(ensure) {
        Ok(s) => s,
        Err(e) => panic!("object-store servers: {e}"),
    }
}

fn ensure() -> Result<ObjStores, String> {
    let dir = std::env::var_os("STANDBY_OBJSTORES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("standby-objstores"));
    let out = Command::new("bash")
        .arg(SCRIPT)
        .arg("ensure")
        .arg(&dir)
        .arg(std::process::id().to_string())
        .output()
        .map_err(|e| format!("running {SCRIPT}: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let vars = parse_exports(&String::from_utf8_lossy(&out.stdout));
    if vars.is_empty() {
        return Err(format!("{SCRIPT} ensure printed no exports"));
    }
    Ok(ObjStores { dir, vars })
}

/// `export K=V` and `export K='V'` lines into pairs; anything else is skipped.
pub fn parse_exports(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

impl ObjStores {
    /// The value of one exported variable. Panics if the script did not export it.
    pub fn var(&self, key: &str) -> &str {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("objstores.sh exported no {key}"))
    }

    /// `127.0.0.1:PORT` of Azurite's blob service.
    pub fn azure_addr(&self) -> String {
        host_port(self.var("AZURITE_BLOB_STORAGE_URL"))
    }

    /// `127.0.0.1:PORT` of radosgw.
    pub fn s3_addr(&self) -> String {
        host_port(self.var("AWS_ENDPOINT"))
    }

    /// Sets every exported variable on `cmd` (for `standby` run against these servers).
    pub fn apply(&self, cmd: &mut Command) {
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
    }

    /// The variables with both endpoints pointed at other addresses (`host:port`), such as
    /// a fault proxy in front of each server.
    pub fn vars_via(&self, azure: &str, s3: &str) -> Vec<(String, String)> {
        self.vars
            .iter()
            .map(|(k, v)| {
                let v = match k.as_str() {
                    "AZURITE_BLOB_STORAGE_URL" => format!("http://{azure}"),
                    "AZURE_STORAGE_ENDPOINT" => {
                        format!("http://{azure}/{}", self.var("AZURE_STORAGE_ACCOUNT_NAME"))
                    }
                    "AWS_ENDPOINT" => format!("http://{s3}"),
                    _ => v.clone(),
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// A new, empty container in Azurite and bucket in radosgw, both named
    /// [`Bucket::name`] (unique to this process and call).
    pub fn fresh_bucket(&self) -> Bucket {
        let n = BUCKETS.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("t{}-{n}-{nanos:x}", std::process::id());
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("bucket")
            .arg(&self.dir)
            .arg(&name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "creating bucket {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Bucket { name }
    }
}

fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// A container (Azurite) and a bucket (radosgw) of one name.
pub struct Bucket {
    pub name: String,
}

impl Bucket {
    /// `az://NAME/PREFIX` (or `az://NAME` for an empty prefix).
    pub fn az_url(&self, prefix: &str) -> String {
        url("az", &self.name, prefix)
    }

    /// `s3://NAME/PREFIX` (or `s3://NAME` for an empty prefix).
    pub fn s3_url(&self, prefix: &str) -> String {
        url("s3", &self.name, prefix)
    }
}

fn url(scheme: &str, name: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        format!("{scheme}://{name}")
    } else {
        format!("{scheme}://{name}/{prefix}")
    }
}
