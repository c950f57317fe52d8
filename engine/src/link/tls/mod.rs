//! Link credentials and encrypted duplex streams: every connection of the site-to-site link
//! is mutual TLS under the vault's own CA, plus a proof of the vault's secret link key.
//!
//! # Credentials
//! `create` makes one directory of credentials per vault (the vault keeps it with its other
//! state; `export_source` copies what the source site needs):
//!
//! | file                            | what                                                   |
//! |---------------------------------|--------------------------------------------------------|
//! | `ca.pem`, `ca.key`              | the vault's self-signed CA (ECDSA P-256)               |
//! | `cache.pem`, `cache.key`        | the cache service (TLS server): DNS `standby-cache`, serverAuth |
//! | `agent.pem`, `agent.key`        | the agent (TLS client): CN `standby agent`, clientAuth |
//! | `processor.pem`, `processor.key`| the processor (TLS client): CN `standby processor`, clientAuth |
//! | `link.key`                      | 32 random bytes as 64 lowercase hex characters + `\n`  |
//!
//! Keys and `link.key` are mode 0600; every file is written as temp file, fsync, rename, fsync
//! of the directory, and `ca.pem` is written last, so its presence marks a complete set.
//! `ca.key` never leaves the vault's directory (`export_source` skips it): only the vault can
//! issue certificates (`issue`, for rotation).
//!
//! The CA's common name carries a digest of its public key, so two vaults' CAs never share a
//! name and a certificate from another vault fails as "unknown issuer". Trust is anchored in
//! that CA only (no system roots): clients verify the cache service's certificate against it
//! for the fixed name [`SERVER_NAME`], whatever address they dialled; the cache service
//! requires a client certificate signed by it. The link key is proved by `link::auth` (HMAC
//! bound to [`Stream::channel_binding`]), so a copied certificate alone does not open the link.
//!
//! # Streams
//! A [`Stream`] is an established connection, plain TCP or TLS. [`Stream::split`] gives a
//! [`ReadHalf`] and a [`WriteHalf`] that two threads use at once (one writes batches, the
//! other reads acknowledgements). Both halves share the socket (`Arc<TcpStream>`) and, for
//! TLS, one `rustls::Connection` behind a mutex (`Shared::conn`):
//! - the reader receives ciphertext with the lock released, then locks only to decrypt;
//! - the writer encrypts under the lock into its own buffer, releases it, then sends;
//! - ciphertext is drained from the connection only while holding `Shared::wlock`, the
//!   write-ordering lock, so records leave in the order rustls sealed them;
//! - records the reader makes rustls queue (the alert after a bad record) are sent by
//!   whoever next holds `wlock`: the reader only `try_lock`s it, so it never waits behind a
//!   writer that is blocked on a full socket (two peers doing that would deadlock each other).
//!   (rustls itself holds a TLS 1.3 key-update reply back until the next record we send.)
//!
//! Invariant: no thread blocks on the socket while holding the connection lock.
//!
//! `WriteHalf` buffers plaintext (up to `WRITE_BUF_BYTES`) and sends on `flush`; sockets get
//! `TCP_NODELAY`, so the flush is the message boundary.

use crate::error::{Error, LinkError, Result};
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

mod stream;
pub use stream::{peek_is_tls, ReadHalf, Stream, WriteHalf};

/// DNS name in the cache service's certificate. Clients always verify against this name,
/// whatever address they dial: trust is anchored in the vault's own CA.
pub const SERVER_NAME: &str = "standby-cache";

/// Length of the vault's secret link key.
pub const LINK_KEY_BYTES: usize = 32;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const LINK_KEY: &str = "link.key";

/// What the source site needs: the CA to verify peers with, the cache service's and the
/// agent's identities, and the link key. Never `ca.key` or the processor's identity.
const SOURCE_FILES: [&str; 6] = [
    CA_CERT,
    "cache.pem",
    "cache.key",
    "agent.pem",
    "agent.key",
    LINK_KEY,
];

/// Certificates made by `create` are valid from an hour ago (clock skew between sites) for
/// ten years.
const CERT_BACKDATE: time::Duration = time::Duration::hours(1);
const CERT_VALIDITY: time::Duration = time::Duration::days(3653);

/// Label of the TLS exporter value used for channel binding (RFC 5705 / RFC 8446 7.5).
const EXPORTER_LABEL: &[u8] = b"EXPORTER-standby-link";

/// Ciphertext read from the socket at a time by a `ReadHalf`.
const READ_BUF_BYTES: usize = 128 * 1024;
/// Plaintext a `WriteHalf` buffers before it encrypts and sends; also the most plaintext
/// encrypted under one hold of the connection lock.
const WRITE_BUF_BYTES: usize = 256 * 1024;
/// Read timeout applied during a handshake on a socket that has none, so a silent peer
/// cannot pin a thread forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed handshake, how long to wait for the peer to close before we do: our alert
/// must reach it before a TCP reset could discard it.
const ABORT_LINGER: Duration = Duration::from_secs(1);

/// Who holds a set of credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The cache service, at the source site (it owns the change log): the TLS server.
    Cache,
    /// The agent, at the source site: a TLS client.
    Agent,
    /// The processor, at the vault's site: a TLS client.
    Processor,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Cache, Role::Agent, Role::Processor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cache => "cache",
            Role::Agent => "agent",
            Role::Processor => "processor",
        }
    }

    fn cert_file(self) -> String {
        format!("{}.pem", self.as_str())
    }

    fn key_file(self) -> String {
        format!("{}.key", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                Error::Invalid(format!("unknown role {s:?} (cache, agent or processor)"))
            })
    }
}

// ---------------------------------------------------------------------------------------
// Creating, exporting and issuing credentials.

/// Create a vault's link credentials in `dir` (see the module doc). Refuses with
/// `Error::Conflict` if `dir` already holds a CA.
pub fn create(dir: &Path) -> Result<()> {
    make_private_dir(dir)?;
    let ca_path = dir.join(CA_CERT);
    if ca_path.symlink_metadata().is_ok() {
        return Err(Error::Conflict(format!(
            "{}: link credentials already exist (refusing to replace the vault's CA)",
            ca_path.display()
        )));
    }
    let now = OffsetDateTime::now_utc();
    let (not_before, not_after) = (now - CERT_BACKDATE, now + CERT_VALIDITY);
    let ca_key = rcgen::KeyPair::generate().map_err(cert_err)?;
    let ca = ca_params(&ca_key, not_before, not_after)
        .self_signed(&ca_key)
        .map_err(cert_err)?;

    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    for role in Role::ALL {
        let (cert_pem, key_pem) = sign_leaf(&ca, &ca_key, role, not_before, not_after)?;
        files.push((role.cert_file(), cert_pem.into_bytes(), 0o644));
        files.push((role.key_file(), key_pem.into_bytes(), 0o600));
    }
    let mut link_key = [0u8; LINK_KEY_BYTES];
    getrandom::getrandom(&mut link_key).map_err(|e| {
        Error::io(
            dir.join(LINK_KEY),
            io::Error::other(format!("no random bytes: {e}")),
        )
    })?;
    let mut hex = to_hex(&link_key);
    hex.push('\n');
    files.push((LINK_KEY.into(), hex.into_bytes(), 0o600));
    files.push((CA_KEY.into(), ca_key.serialize_pem().into_bytes(), 0o600));
    // Last: a crash part-way leaves no ca.pem, so `create` can simply run again.
    files.push((CA_CERT.into(), ca.pem().into_bytes(), 0o644));
    for (name, bytes, mode) in &files {
        write_durable(dir, name, bytes, *mode)?;
    }
    Ok(())
}

/// Copy what the source site needs (CA certificate, the cache service's and the agent's
/// certificates and keys, the link key) from the vault's credentials `dir` into `out`
/// (created if missing). Secrets stay 0600. Never copies `ca.key` or the processor's files.
pub fn export_source(dir: &Path, out: &Path) -> Result<()> {
    make_private_dir(out)?;
    for name in SOURCE_FILES {
        let src = dir.join(name);
        let bytes = fs::read(&src).map_err(|e| Error::io(&src, e))?;
        let mode = if is_secret(name) { 0o600 } else { 0o644 };
        write_durable(out, name, &bytes, mode)?;
    }
    Ok(())
}

/// Issue a certificate for `role`, signed by the CA in `dir` and valid from `not_before` to
/// `not_after`, with a new key: written as `out_dir/<role>.pem` and `out_dir/<role>.key`
/// (replacing them: `out_dir == dir` rotates the role's certificate in place).
pub fn issue(
    dir: &Path,
    role: Role,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    out_dir: &Path,
) -> Result<()> {
    if not_after <= not_before {
        return Err(Error::Invalid(format!(
            "certificate validity ends ({not_after}) before it starts ({not_before})"
        )));
    }
    let (ca, ca_key) = load_issuer(dir)?;
    let (cert_pem, key_pem) = sign_leaf(&ca, &ca_key, role, not_before, not_after)?;
    make_private_dir(out_dir)?;
    // Key first: a crash between the two leaves the old certificate with a new key, which
    // `Credentials::load` reports as a mismatch rather than silently using a stale pair.
    write_durable(out_dir, &role.key_file(), key_pem.as_bytes(), 0o600)?;
    write_durable(out_dir, &role.cert_file(), cert_pem.as_bytes(), 0o644)
}

/// The CA's parameters, a function of its key alone, so `issue` can rebuild the issuer from
/// `ca.key` (rcgen cannot parse `ca.pem` without x509-parser): same name, same key id.
fn ca_params(
    ca_key: &rcgen::KeyPair,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> rcgen::CertificateParams {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(ca_key.public_key_der());
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "Standby");
    p.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("standby vault CA {}", to_hex(&digest[..8])),
    );
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    p
}

/// A new key and a certificate for `role` signed by the CA: (certificate PEM, key PEM).
fn sign_leaf(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    role: Role,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate().map_err(cert_err)?;
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "Standby");
    let cn = role_cn(role);
    let eku = match role {
        Role::Cache => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        Role::Agent | Role::Processor => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    };
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    if role == Role::Cache {
        let name = rcgen::Ia5String::try_from(SERVER_NAME).map_err(cert_err)?;
        p.subject_alt_names = vec![rcgen::SanType::DnsName(name)];
    }
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    p.use_authority_key_identifier_extension = true;
    p.not_before = not_before;
    p.not_after = not_after;
    let cert = p.signed_by(&key, ca, ca_key).map_err(cert_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Rebuild the CA of `dir` as an issuer: its key from `ca.key`, its name from the key, and a
/// check that `ca.pem` is the certificate of that key and name.
fn load_issuer(dir: &Path) -> Result<(rcgen::Certificate, rcgen::KeyPair)> {
    let key_path = dir.join(CA_KEY);
    let key_pem = fs::read_to_string(&key_path).map_err(|e| Error::io(&key_path, e))?;
    let ca_key = rcgen::KeyPair::from_pem(&key_pem)
        .map_err(|e| Error::Invalid(format!("{}: not a private key ({e})", key_path.display())))?;
    let now = OffsetDateTime::now_utc();
    let params = ca_params(&ca_key, now - CERT_BACKDATE, now + CERT_VALIDITY);
    let cn = match params.distinguished_name.get(&rcgen::DnType::CommonName) {
        Some(rcgen::DnValue::Utf8String(s)) => s.clone(),
        _ => String::new(),
    };
    let cert_path = dir.join(CA_CERT);
    let on_disk = read_certs(&cert_path)?;
    let spki = ca_key.public_key_der();
    let matches = on_disk
        .iter()
        .any(|c| contains(c, &spki) && contains(c, cn.as_bytes()));
    if !matches {
        return Err(Error::Invalid(format!(
            "{} does not belong to {} (mixed-up credential files?)",
            key_path.display(),
            cert_path.display()
        )));
    }
    let ca = params.self_signed(&ca_key).map_err(cert_err)?;
    Ok((ca, ca_key))
}

fn cert_err(e: rcgen::Error) -> Error {
    Error::Invalid(format!("cannot make a certificate: {e}"))
}

fn is_secret(name: &str) -> bool {
    name.ends_with(".key")
}

/// The common name of a role's certificate.
fn role_cn(role: Role) -> &'static str {
    match role {
        Role::Cache => SERVER_NAME,
        Role::Agent => "standby agent",
        Role::Processor => "standby processor",
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Create `dir` (and missing parents) readable by the owner only.
fn make_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

/// Replace `dir/name` with `bytes` (mode `mode`) durably: temp file, fsync, rename, fsync dir.
fn write_durable(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    // A leftover temp file may carry a wider mode; never reuse it.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&tmp, e)),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

// ---------------------------------------------------------------------------------------
// Loaded credentials and TLS configurations.

/// One role's credentials, loaded: the CA to trust, its own certificate and key, the link key.
pub struct Credentials {
    role: Role,
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    link_key: [u8; LINK_KEY_BYTES],
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("Credentials")
            .field("role", &self.role)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Load `ca.pem`, `<role>.pem`, `<role>.key` and `link.key` from `dir`.
    pub fn load(dir: &Path, role: Role) -> Result<Credentials> {
        let ca_path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&ca_path)? {
            roots.add(ca).map_err(|e| {
                Error::Invalid(format!(
                    "{}: not a usable CA certificate ({e})",
                    ca_path.display()
                ))
            })?;
        }
        let cert_path = dir.join(role.cert_file());
        let chain = read_certs(&cert_path)?;
        let key_path = dir.join(role.key_file());
        let key = read_key(&key_path)?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
            Error::Invalid(format!(
                "{}: unsupported private key ({e})",
                key_path.display()
            ))
        })?;
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            rustls::sign::CertifiedKey::new(chain.clone(), signer).keys_match()
        {
            return Err(Error::Invalid(format!(
                "{} is not the key of {} (mixed-up credential files?)",
                key_path.display(),
                cert_path.display()
            )));
        }
        let link_key = read_link_key(&dir.join(LINK_KEY))?;
        Ok(Credentials {
            role,
            dir: dir.to_path_buf(),
            roots: Arc::new(roots),
            chain,
            key,
            link_key,
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The vault's secret link key.
    pub fn link_key(&self) -> &[u8; LINK_KEY_BYTES] {
        &self.link_key
    }

    /// The cache service's TLS configuration: requires a client certificate signed by the
    /// vault's CA; TLS 1.3 (1.2 allowed); ring.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        if self.role != Role::Cache {
            return Err(Error::Invalid(format!(
                "a TLS server needs the cache service's credentials, not the {}'s",
                self.role
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| self.config_err(e))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| self.config_err(e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.config_err(e))?;
        // One session ticket follows every accepted TLS 1.3 handshake: it tells the client
        // its certificate was accepted (see `await_acceptance`). Clients never resume.
        config.send_tls13_tickets = 1;
        Ok(Arc::new(config))
    }

    /// An agent's or processor's TLS configuration: trusts only the vault's CA and presents
    /// the role's client certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        self.client_config_with(Resumption::disabled())
            .map(Arc::new)
    }

    fn client_config_with(&self, resumption: Resumption) -> Result<ClientConfig> {
        if self.role == Role::Cache {
            return Err(Error::Invalid(
                "a TLS client needs the agent's or the processor's credentials, not the cache service's"
                    .into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| self.config_err(e))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.config_err(e))?;
        config.resumption = resumption;
        Ok(config)
    }

    fn config_err(&self, e: impl fmt::Display) -> Error {
        Error::Link(LinkError::Tls(format!(
            "cannot use the {} credentials in {}: {e}",
            self.role,
            self.dir.display()
        )))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::Invalid(format!(
                "{}: not a PEM certificate file ({e})",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: not a PEM private key ({e})", path.display())))
}

fn read_link_key(path: &Path) -> Result<[u8; LINK_KEY_BYTES]> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let bad = || {
        Error::Invalid(format!(
            "{}: expected {} hex characters",
            path.display(),
            LINK_KEY_BYTES * 2
        ))
    };
    if text.len() != LINK_KEY_BYTES * 2 {
        return Err(bad());
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut key = [0u8; LINK_KEY_BYTES];
    for (k, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
        *k = (nibble(pair[0]).ok_or_else(bad)? << 4) | nibble(pair[1]).ok_or_else(bad)?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests;
