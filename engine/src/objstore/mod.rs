//! Object storage: a vault in an Azure Blob container (`az://CONTAINER/PREFIX`) or an S3
//! bucket (`s3://BUCKET/PREFIX`, S3 and compatible stores such as Ceph's radosgw).
//!
//! This module alone owns the `object_store` crate and the tokio runtime it needs (a small
//! multi-thread runtime, created once per process on first use); the rest of the engine
//! stays synchronous and sees objects through two doors:
//!
//! - [`Store`]: a small blocking client (get, ranged get, head, conditional put, delete,
//!   list) with bounded retries, whose errors are one line naming the URL and what to do;
//! - [`ObjFs`] (in `fs.rs`): the engine's [`crate::vfs::Vfs`] over a `Store`, so every
//!   command works against a URL vault unchanged. The object layout it keeps (chunked
//!   files, conditional replaces, directory markers) is described there and in
//!   docs/format.md.
//!
//! Plus [`lease`]: one lease object per VM, so two processors (on two machines) never
//! apply the same VM, and a dead holder's lease expires for another to take over.
//!
//! Credentials and endpoints come from the environment variables `object_store`'s
//! builders read (`from_env`): `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! `AZURE_STORAGE_USE_EMULATOR`, `AZURE_STORAGE_ENDPOINT`, …; `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT`, `AWS_REGION`, `AWS_ALLOW_HTTP`, ….

mod fs;
pub mod lease;
mod vault;

pub use fs::{ObjFs, CHUNK_BYTES};
pub(crate) use vault::registered;
pub use vault::{is_url, resolve, shadow_dir, STORE_URL_FILE};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, UpdateVersion,
};
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Which kind of store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `az://CONTAINER/PREFIX`: Azure Blob Storage (or Azurite).
    Azure,
    /// `s3://BUCKET/PREFIX`: S3 or a compatible store.
    S3,
}

/// A parsed store URL: scheme, container (or bucket) and a key prefix (no leading or
/// trailing `/`; may be empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreUrl {
    pub scheme: Scheme,
    pub container: String,
    pub prefix: String,
}

impl StoreUrl {
    /// Parse `az://CONTAINER[/PREFIX]` or `s3://BUCKET[/PREFIX]`; anything else is refused
    /// with a line that says which schemes exist.
    pub fn parse(s: &str) -> crate::Result<StoreUrl> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(crate::Error::Invalid(format!(
                "{s} is not a store URL (az://CONTAINER/PREFIX or s3://BUCKET/PREFIX)"
            )));
        };
        let scheme = match scheme {
            "az" | "azure" => Scheme::Azure,
            "s3" => Scheme::S3,
            other => {
                return Err(crate::Error::Invalid(format!(
                    "{s}: unknown store scheme '{other}://' (Standby stores vaults in az://CONTAINER/PREFIX (Azure Blob) or s3://BUCKET/PREFIX (S3), or in a local directory)"
                )))
            }
        };
        let rest = rest.trim_matches('/');
        let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if container.is_empty() {
            return Err(crate::Error::Invalid(format!(
                "{s}: no container or bucket named (az://CONTAINER/PREFIX or s3://BUCKET/PREFIX)"
            )));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix
            .split('/')
            .any(|p| p == "." || p == ".." || (p.is_empty() && !prefix.is_empty()))
        {
            return Err(crate::Error::Invalid(format!(
                "{s}: the prefix has an empty, '.' or '..' part"
            )));
        }
        Ok(StoreUrl {
            scheme,
            container: container.to_string(),
            prefix,
        })
    }

    pub fn kind(&self) -> Scheme {
        self.scheme
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.scheme {
            Scheme::Azure => "az",
            Scheme::S3 => "s3",
        };
        if self.prefix.is_empty() {
            write!(f, "{s}://{}", self.container)
        } else {
            write!(f, "{s}://{}/{}", self.container, self.prefix)
        }
    }
}

/// The runtime every object request runs on: created on first use, never dropped.
/// Two workers: requests are I/O-bound, and the machine's cores belong to the engine.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("standby-objstore")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the object store's runtime: {e}"))
    })
}

/// Run a future to completion on the store's runtime, from a synchronous caller.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// The version of an object a conditional write is made against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// What a conditional put may replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// Anything (a blind overwrite).
    Any,
    /// Only if no object exists (If-None-Match: *).
    Absent,
    /// Only this version of the object (If-Match).
    Is(Version),
}

/// An object's size and version.
#[derive(Debug, Clone)]
pub struct Meta {
    pub size: u64,
    pub version: Version,
}

/// A listing of one level: object names and sub-prefixes, both relative to the listed one.
#[derive(Debug, Default)]
pub struct Listing {
    pub objects: Vec<(String, u64)>,
    pub prefixes: Vec<String>,
}

/// How an object request failed, as a type (the message is one line for an operator).
#[derive(Debug)]
pub enum StoreError {
    NotFound,
    /// A conditional put found another version (or an object where none was expected).
    Conflict,
    Other(io::Error),
}

impl StoreError {
    pub fn into_io(self, what: &str) -> io::Error {
        match self {
            StoreError::NotFound => {
                io::Error::new(io::ErrorKind::NotFound, format!("{what}: no such object"))
            }
            StoreError::Conflict => conflict_error(what),
            StoreError::Other(e) => e,
        }
    }
}

/// The error of a conditional write that lost: another writer changed the object first.
pub fn conflict_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{what} was changed by another writer since it was read (nothing was overwritten); run the command again"),
    )
}

/// A blocking client of one container (or bucket) under one prefix.
pub struct Store {
    url: StoreUrl,
    inner: Arc<dyn ObjectStore>,
    /// Whether the store honours `If-Match` on PUT (probed once, on first need). Where it
    /// does not (radosgw before Squid answers 412 to every If-Match PUT), replaced objects
    /// are kept as generations, see [`Store::put_versioned`].
    if_match: OnceLock<bool>,
}

/// Suffix of the pseudo-directory of an object's generations (stores without If-Match).
pub const GENERATIONS_SUFFIX: &str = "@g";

fn gen_key(key: &str, g: u64) -> String {
    format!("{key}{GENERATIONS_SUFFIX}/{g:020}")
}

fn gen_version(g: u64) -> Version {
    Version {
        e_tag: None,
        version: Some(format!("gen:{g}")),
    }
}

fn gen_of(v: &Version) -> Option<u64> {
    v.version.as_deref()?.strip_prefix("gen:")?.parse().ok()
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

/// Retries of transient failures (5xx, timeouts, dropped connections): few and short, so
/// an unreachable store is reported within seconds, not minutes.
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(20),
    }
}

/// Whether a GET failed while its body streamed (the connection dropped after the head):
/// object_store retries requests, not a body cut off halfway, so we do.
fn body_error(e: &object_store::Error) -> bool {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(&s.to_string());
        src = s.source();
    }
    let lower = text.to_lowercase();
    lower.contains("body") || lower.contains("connection closed") || lower.contains("eof")
}

/// Run a request again (a few times, backing off) when its body was cut off (a GET's
/// download, a PUT's upload: whole-object PUTs are idempotent, and a conditional one that
/// landed before its connection dropped is recognised by [`Store::put`]).
async fn body_retried<T, F, Fut>(mut f: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    const TRIES: u32 = 5;
    let mut wait = Duration::from_millis(50);
    for _ in 1..TRIES {
        match f().await {
            Err(e) if body_error(&e) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            r => return r,
        }
    }
    f().await
}

/// Timeouts of one request (set as config keys: replacing the builder's client options
/// would drop what `from_env` read into them, such as `AWS_ALLOW_HTTP`).
const CLIENT_TIMEOUTS: [(ClientConfigKey, &str); 2] = [
    (ClientConfigKey::ConnectTimeout, "3s"),
    (ClientConfigKey::Timeout, "30s"),
];

impl Store {
    /// A client for `url`, configured from the environment. Makes no request.
    pub fn connect(url: &StoreUrl) -> crate::Result<Store> {
        let built: object_store::Result<Arc<dyn ObjectStore>> = match url.kind() {
            Scheme::Azure => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(&url.container)
                    .with_retry(retry());
                for (k, v) in CLIENT_TIMEOUTS {
                    b = b.with_config(object_store::azure::AzureConfigKey::Client(k), v);
                }
                b.build().map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
            }
            Scheme::S3 => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&url.container)
                    .with_retry(retry());
                for (k, v) in CLIENT_TIMEOUTS {
                    b = b.with_config(object_store::aws::AmazonS3ConfigKey::Client(k), v);
                }
                if std::env::var_os("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_none() {
                    // Path-style requests: what S3-compatible stores on an endpoint of
                    // their own (radosgw, …) expect; AWS itself serves both.
                    b = b.with_virtual_hosted_style_request(false);
                }
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                b.build().map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
            }
        };
        let inner = built.map_err(|e| {
            crate::Error::Invalid(format!(
                "{url}: cannot configure the store ({}); {}",
                one_line(&e.to_string()),
                env_hint(url.kind())
            ))
        })?;
        let if_match = OnceLock::new();
        if url.kind() == Scheme::Azure {
            let _ = if_match.set(true);
        }
        Ok(Store {
            url: url.clone(),
            inner,
            if_match,
        })
    }

    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.url.prefix.is_empty() {
            ObjPath::from(key)
        } else if key.is_empty() {
            ObjPath::from(self.url.prefix.as_str())
        } else {
            ObjPath::from(format!("{}/{key}", self.url.prefix))
        }
    }

    /// `URL/KEY`, as messages name an object.
    pub fn name(&self, key: &str) -> String {
        format!("{}/{key}", self.url)
    }

    fn map(&self, key: &str, e: object_store::Error) -> StoreError {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } => StoreError::NotFound,
            E::AlreadyExists { .. } | E::Precondition { .. } => StoreError::Conflict,
            other => StoreError::Other(self.explain(key, &other)),
        }
    }

    /// One line naming the URL, what failed and what to do.
    fn explain(&self, key: &str, e: &object_store::Error) -> io::Error {
        use object_store::Error as E;
        let url = &self.url;
        let text = one_line(&e.to_string());
        let lower = text.to_ascii_lowercase();
        let (kind, msg) = match e {
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
                io::ErrorKind::PermissionDenied,
                format!(
                    "{url}: the store refused our credentials ({}); {}",
                    short(&text),
                    env_hint(url.kind())
                ),
            ),
            _ if lower.contains("containernotfound")
                || lower.contains("nosuchbucket")
                || lower.contains("container not found")
                || lower.contains("bucket does not exist") =>
            {
                (
                    io::ErrorKind::NotFound,
                    format!(
                        "{url}: the {} '{}' does not exist; create it first ({})",
                        container_word(url.kind()),
                        url.container,
                        create_hint(url.kind(), &url.container)
                    ),
                )
            }
            _ if lower.contains("403 forbidden")
                || lower.contains("authenticationfailed")
                || lower.contains("signaturedoesnotmatch")
                || lower.contains("invalidaccesskeyid")
                || lower.contains("accessdenied") =>
            {
                (
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{url}: the store refused our credentials ({}); {}",
                        short(&text),
                        env_hint(url.kind())
                    ),
                )
            }
            _ if lower.contains("error sending request")
                || lower.contains("connect")
                || lower.contains("timed out")
                || lower.contains("dns")
                || lower.contains("retry") =>
            {
                (
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "{url}: the store is unreachable ({}); check that it runs and the endpoint ({}) is right",
                        short(&text),
                        endpoint_var(url.kind())
                    ),
                )
            }
            _ => (
                io::ErrorKind::Other,
                format!("{url}: request for '{key}' failed: {}", short(&text)),
            ),
        };
        io::Error::new(kind, msg)
    }

    /// Check the container is there and answers (one listing request).
    pub fn probe(&self) -> io::Result<()> {
        self.list("")
            .map(|_| ())
            .map_err(|e| e.into_io(&self.name("")))
    }

    /// The whole object, with its version.
    pub fn get(&self, key: &str) -> Result<(Vec<u8>, Meta), StoreError> {
        match self.get_opts(key, None) {
            Err(StoreError::NotFound) => match self.newest_generation(key)? {
                Some(g) => {
                    let (b, m) = self.get_opts(&gen_key(key, g), None)?;
                    Ok((
                        b,
                        Meta {
                            size: m.size,
                            version: gen_version(g),
                        },
                    ))
                }
                None => Err(StoreError::NotFound),
            },
            other => other,
        }
    }

    /// The newest generation of `key` (None: it has none). Only S3 stores keep them.
    fn newest_generation(&self, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.generations(key)?.last().copied())
    }

    fn generations(&self, key: &str) -> Result<Vec<u64>, StoreError> {
        if self.url.kind() != Scheme::S3 {
            return Ok(Vec::new());
        }
        let dir = format!("{key}{GENERATIONS_SUFFIX}");
        let l = match self.list(&dir) {
            Ok(l) => l,
            Err(StoreError::NotFound) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut g: Vec<u64> = l
            .objects
            .iter()
            .filter_map(|(n, _)| n.parse().ok())
            .collect();
        g.sort_unstable();
        Ok(g)
    }

    /// Whether conditional updates (If-Match) work here; probed once with a scratch object.
    fn if_match_works(&self) -> Result<bool, StoreError> {
        if let Some(&b) = self.if_match.get() {
            return Ok(b);
        }
        let probe = format!(".standby-probe-{}-{}", std::process::id(), crate::now_us());
        let v = self.put(&probe, b"1".to_vec(), &Cond::Any)?;
        let ok = match self.put(&probe, b"2".to_vec(), &Cond::Is(v)) {
            Ok(_) => true,
            Err(StoreError::Conflict) => false,
            Err(e) => return Err(e),
        };
        let _ = self.delete_plain(&probe);
        let _ = self.if_match.set(ok);
        Ok(ok)
    }

    /// Replace a small object whole if `cond` holds: the object every writer of a
    /// manifest, the catalog or a lease goes through. Where the store honours If-Match this
    /// is [`Store::put`]. Where it does not, the object is kept as generations
    /// `KEY@g/NNNN…` (20 digits), each created with If-None-Match, which every S3 store
    /// honours: replacing generation N means creating N+1, so of two writers that read N
    /// exactly one wins and the other gets [`StoreError::Conflict`]; a reader takes the
    /// newest (one listing). Generations older than N-1 are deleted by the writer of N+1.
    pub fn put_versioned(
        &self,
        key: &str,
        bytes: Vec<u8>,
        cond: &Cond,
    ) -> Result<Version, StoreError> {
        if self.if_match_works()? {
            return self.put(key, bytes, cond);
        }
        let next = match cond {
            Cond::Absent => {
                if self.head_plain(key).is_ok() || self.newest_generation(key)?.is_some() {
                    return Err(StoreError::Conflict);
                }
                1
            }
            Cond::Is(v) => match gen_of(v) {
                Some(g) => g + 1,
                // A version of a plain object: it was written where If-Match worked.
                None => return Err(StoreError::Conflict),
            },
            Cond::Any => self.newest_generation(key)?.unwrap_or(0) + 1,
        };
        self.put(&gen_key(key, next), bytes, &Cond::Absent)?;
        if next >= 3 {
            let _ = self.delete_plain(&gen_key(key, next - 2));
        }
        Ok(gen_version(next))
    }

    /// Bytes `[range)` of an object, with the object's size and version.
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<(Vec<u8>, Meta), StoreError> {
        if range.is_empty() {
            let m = self.head(key)?;
            return Ok((Vec::new(), m));
        }
        self.get_opts(key, Some(range))
    }

    fn get_opts(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<(Vec<u8>, Meta), StoreError> {
        let path = self.path(key);
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        block_on(body_retried(|| {
            let opts = opts.clone();
            let path = path.clone();
            async move {
                let r = self.inner.get_opts(&path, opts).await?;
                let meta = Meta {
                    size: r.meta.size,
                    version: Version {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    },
                };
                let bytes = r.bytes().await?;
                Ok::<_, object_store::Error>((bytes.to_vec(), meta))
            }
        }))
        .map_err(|e| self.map(key, e))
    }

    /// Several ranges of objects at once (several requests in flight).
    pub fn get_ranges(&self, parts: &[(String, Range<u64>)]) -> Result<Vec<Vec<u8>>, StoreError> {
        const IN_FLIGHT: usize = 8;
        let futs = parts.iter().map(|(key, r)| {
            let path = self.path(key);
            let store = self.inner.clone();
            let r = r.clone();
            let key = key.clone();
            async move {
                body_retried(|| store.get_range(&path, r.clone()))
                    .await
                    .map(|b| b.to_vec())
                    .map_err(|e| (key, e))
            }
        });
        block_on(async {
            futures::stream::iter(futs)
                .buffered(IN_FLIGHT)
                .try_collect::<Vec<_>>()
                .await
        })
        .map_err(|(key, e)| self.map(&key, e))
    }

    pub fn head(&self, key: &str) -> Result<Meta, StoreError> {
        match self.head_plain(key) {
            Err(StoreError::NotFound) => match self.newest_generation(key)? {
                Some(g) => self.head_plain(&gen_key(key, g)).map(|m| Meta {
                    size: m.size,
                    version: gen_version(g),
                }),
                None => Err(StoreError::NotFound),
            },
            other => other,
        }
    }

    fn head_plain(&self, key: &str) -> Result<Meta, StoreError> {
        let path = self.path(key);
        block_on(self.inner.head(&path))
            .map(|m| Meta {
                size: m.size,
                version: Version {
                    e_tag: m.e_tag,
                    version: m.version,
                },
            })
            .map_err(|e| self.map(key, e))
    }

    /// Put an object whole (one request), if `cond` holds; returns the new version.
    pub fn put(&self, key: &str, bytes: Vec<u8>, cond: &Cond) -> Result<Version, StoreError> {
        let path = self.path(key);
        let mode = match cond {
            Cond::Any => PutMode::Overwrite,
            Cond::Absent => PutMode::Create,
            Cond::Is(v) => PutMode::Update(UpdateVersion {
                e_tag: v.e_tag.clone(),
                version: v.version.clone(),
            }),
        };
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        let conditional = !matches!(cond, Cond::Any);
        let sent = if conditional {
            Some(bytes.clone())
        } else {
            None
        };
        let payload = PutPayload::from(bytes);
        let r = block_on(body_retried(|| {
            self.inner.put_opts(&path, payload.clone(), opts.clone())
        }))
        .map(|r| Version {
            e_tag: r.e_tag,
            version: r.version,
        })
        .map_err(|e| self.map(key, e));
        match (r, sent) {
            // A conditional PUT whose response was lost is retried by the client, and the
            // retry then finds the object our first attempt wrote: 412 (or 409) for a write
            // that in fact went through. Where the object now holds exactly our bytes, the
            // write is ours (had another writer put identical bytes, telling us we succeeded
            // is still true of what the object holds).
            (Err(StoreError::Conflict), Some(sent)) => match self.get_opts(key, None) {
                Ok((now, meta)) if now == sent => Ok(meta.version),
                _ => Err(StoreError::Conflict),
            },
            (r, _) => r,
        }
    }

    /// Several unconditional puts at once (several requests in flight).
    pub fn put_many(&self, objects: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        const IN_FLIGHT: usize = 4;
        let futs = objects.into_iter().map(|(key, bytes)| {
            let path = self.path(&key);
            let store = self.inner.clone();
            async move {
                let payload = PutPayload::from(bytes);
                body_retried(|| store.put_opts(&path, payload.clone(), PutOptions::default()))
                    .await
                    .map(|_| ())
                    .map_err(|e| (key, e))
            }
        });
        block_on(async {
            futures::stream::iter(futs)
                .buffered(IN_FLIGHT)
                .try_collect::<Vec<_>>()
                .await
        })
        .map(|_| ())
        .map_err(|(key, e)| self.map(&key, e))
    }

    /// Delete an object; a missing one is not an error.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.delete_plain(key)?;
        for g in self.generations(key)? {
            self.delete_plain(&gen_key(key, g))?;
        }
        Ok(())
    }

    fn delete_plain(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        match block_on(self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map(key, e)),
        }
    }

    /// Server-side copy (overwrites the destination).
    pub fn copy(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let (f, t) = (self.path(from), self.path(to));
        block_on(self.inner.copy(&f, &t)).map_err(|e| self.map(from, e))
    }

    /// One level under `dir` (a key prefix without trailing `/`; "" is the vault's top).
    pub fn list(&self, dir: &str) -> Result<Listing, StoreError> {
        let base = self.path(dir);
        let prefix = if base.as_ref().is_empty() {
            None
        } else {
            Some(&base)
        };
        let r = block_on(self.inner.list_with_delimiter(prefix)).map_err(|e| self.map(dir, e))?;
        let strip = |p: &ObjPath| -> Option<String> {
            let s = p.as_ref();
            let b = base.as_ref();
            let rest = if b.is_empty() {
                s
            } else {
                s.strip_prefix(b)?.strip_prefix('/')?
            };
            (!rest.is_empty()).then(|| rest.to_string())
        };
        Ok(Listing {
            objects: r
                .objects
                .iter()
                .filter_map(|m| strip(&m.location).map(|n| (n, m.size)))
                .collect(),
            prefixes: r.common_prefixes.iter().filter_map(strip).collect(),
        })
    }

    /// Every object under `dir/` (all levels), as keys relative to the store's prefix.
    pub fn list_all(&self, dir: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let base = self.path(dir);
        let top = self.path("");
        let out = block_on(async {
            self.inner
                .list(Some(&base))
                .map_ok(|m| (m.location.to_string(), m.size))
                .try_collect::<Vec<_>>()
                .await
        })
        .map_err(|e| self.map(dir, e))?;
        let top = top.as_ref().to_string();
        Ok(out
            .into_iter()
            .filter_map(|(k, n)| {
                let rest = if top.is_empty() {
                    Some(k.as_str())
                } else {
                    k.strip_prefix(&top).and_then(|r| r.strip_prefix('/'))
                };
                rest.map(|r| (r.to_string(), n))
            })
            .collect())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn short(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn container_word(k: Scheme) -> &'static str {
    match k {
        Scheme::Azure => "container",
        Scheme::S3 => "bucket",
    }
}

fn create_hint(k: Scheme, name: &str) -> String {
    match k {
        Scheme::Azure => format!("az storage container create --name {name}"),
        Scheme::S3 => format!("aws s3 mb s3://{name}"),
    }
}

fn endpoint_var(k: Scheme) -> &'static str {
    match k {
        Scheme::Azure => "AZURE_STORAGE_ENDPOINT, or AZURE_STORAGE_USE_EMULATOR=true for Azurite",
        Scheme::S3 => "AWS_ENDPOINT",
    }
}

fn env_hint(k: Scheme) -> &'static str {
    match k {
        Scheme::Azure => "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_USE_EMULATOR=true for Azurite)",
        Scheme::S3 => "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT, AWS_ALLOW_HTTP=true for a plain-HTTP endpoint)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_unknown_schemes_are_refused() {
        let u = StoreUrl::parse("az://vaults/site-a/v1/").unwrap();
        assert_eq!(u.container, "vaults");
        assert_eq!(u.prefix, "site-a/v1");
        assert_eq!(u.to_string(), "az://vaults/site-a/v1");
        let u = StoreUrl::parse("s3://bucket").unwrap();
        assert_eq!((u.kind(), u.prefix.as_str()), (Scheme::S3, ""));
        let e = StoreUrl::parse("gs://b/p").unwrap_err().to_string();
        assert!(e.contains("gs://") && e.contains("az://"), "{e}");
        assert!(StoreUrl::parse("az://").is_err());
        assert!(StoreUrl::parse("az://c/a//b").is_err());
        assert!(StoreUrl::parse("az://c/../b").is_err());
    }
}
