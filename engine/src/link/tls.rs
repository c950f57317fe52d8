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

use crate::error::{Error, Result};
use parking_lot::Mutex;
use rustls::client::{
    ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection, NamedGroup,
    ProtocolVersion, RootCertStore, ServerConfig, ServerConnection,
};
use rustls_pki_types::pem::PemObject;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

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
    let (cn, eku) = match role {
        Role::Cache => (SERVER_NAME, rcgen::ExtendedKeyUsagePurpose::ServerAuth),
        Role::Agent => ("standby agent", rcgen::ExtendedKeyUsagePurpose::ClientAuth),
        Role::Processor => (
            "standby processor",
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ),
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
        Error::Link(format!(
            "cannot use the {} credentials in {}: {e}",
            self.role,
            self.dir.display()
        ))
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

// ---------------------------------------------------------------------------------------
// Handshakes.

/// Which end of a TLS connection we are, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// An agent or processor; the peer is the cache service.
    Client,
    /// The cache service; the peer is an agent or processor.
    Server,
}

impl Side {
    fn peer(self) -> &'static str {
        match self {
            Side::Client => "the cache service",
            Side::Server => "the client",
        }
    }
}

/// A client "session store" that keeps nothing (clients never resume, so every connection
/// shows its certificate) but notes that a TLS 1.3 ticket arrived: the server sends one only
/// after it has accepted our certificate.
#[derive(Debug, Default)]
struct TicketSignal(AtomicBool);

impl TicketSignal {
    fn seen(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl ClientSessionStore for TicketSignal {
    fn set_kx_hint(&self, _: ServerName<'static>, _: NamedGroup) {}
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        None
    }
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {}
    fn insert_tls13_ticket(&self, _: ServerName<'static>, _: Tls13ClientSessionValue) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        None
    }
}

/// Run `f` with a read timeout on `sock` if it has none, restoring it afterwards.
fn with_handshake_timeout<T>(sock: &TcpStream, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let had_none = matches!(sock.read_timeout(), Ok(None));
    if had_none {
        let _ = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    }
    let r = f();
    if had_none {
        let _ = sock.set_read_timeout(None);
    }
    r
}

/// Drive the handshake to completion on the blocking socket.
fn handshake(conn: &mut Connection, sock: &TcpStream, side: Side) -> Result<()> {
    let mut io = sock;
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut io)
                .map_err(|e| handshake_io_err(side, e))?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        match conn.read_tls(&mut io) {
            Ok(0) => return Err(closed_in_handshake(side)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(handshake_io_err(side, e)),
        }
        if let Err(e) = conn.process_new_packets() {
            abort(conn, sock);
            return Err(Error::Link(describe(side, &e)));
        }
    }
}

/// In TLS 1.3 the client finishes its handshake before the server has checked the client's
/// certificate. Wait for the server's verdict (its session ticket, or an alert) so that a
/// refused certificate fails the connect, not some later read.
fn await_acceptance(conn: &mut Connection, sock: &TcpStream, signal: &TicketSignal) -> Result<()> {
    let mut io = sock;
    let closed = || {
        Error::Link(
            "the cache service closed the connection right after the TLS handshake (did it refuse our certificate?)"
                .into(),
        )
    };
    while !signal.seen() {
        match conn.read_tls(&mut io) {
            Ok(0) => return Err(closed()),
            Ok(_) => {
                if let Err(e) = conn.process_new_packets() {
                    abort(conn, sock);
                    return Err(Error::Link(describe(Side::Client, &e)));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Not our cache service (ours always sends a ticket) or a very slow one: go on;
            // a refusal would then surface on the first read.
            Err(e) if is_timeout(&e) => return Ok(()),
            Err(e) if is_reset(&e) => return Err(closed()),
            Err(e) => return Err(handshake_io_err(Side::Client, e)),
        }
    }
    Ok(())
}

/// After a failed handshake: send the alert rustls queued, close our direction, and give the
/// peer a moment to read it and close too (closing with unread input would reset the
/// connection, and a reset can discard the alert before the peer reads it).
fn abort(conn: &mut Connection, sock: &TcpStream) {
    let mut io = sock;
    while conn.wants_write() {
        if conn.write_tls(&mut io).is_err() {
            break;
        }
    }
    let _ = sock.shutdown(Shutdown::Write);
    let deadline = std::time::Instant::now() + ABORT_LINGER;
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match io.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

fn closed_in_handshake(side: Side) -> Error {
    Error::Link(match side {
        Side::Client => {
            "the peer did not answer with TLS (is it running with --insecure-loopback?)".into()
        }
        Side::Server => {
            "the client closed the connection during the TLS handshake (is it running with --insecure-loopback?)"
                .into()
        }
    })
}

fn handshake_io_err(side: Side, e: io::Error) -> Error {
    if is_timeout(&e) {
        Error::Link(format!(
            "TLS handshake timed out: {} did not answer",
            side.peer()
        ))
    } else if is_reset(&e) {
        closed_in_handshake(side)
    } else {
        Error::Link(format!("TLS handshake with {}: {e}", side.peer()))
    }
}

/// One line an operator can act on, for a TLS failure seen from `side`.
fn describe(side: Side, e: &rustls::Error) -> String {
    use rustls::Error as E;
    use CertificateError as C;
    let theirs = match side {
        Side::Client => "the cache service's certificate",
        Side::Server => "client certificate",
    };
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => match side {
                Side::Client => "the cache service's certificate is not signed by this vault's CA (a foreign certificate? both sites need credentials from the same vault)".into(),
                Side::Server => "client certificate not signed by this vault's CA (a certificate from another vault?)".into(),
            },
            C::Expired | C::ExpiredContext { .. } => {
                format!("{theirs} has expired (issue a new one)")
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("{theirs} is not valid yet (are both sites' clocks right?)")
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "{theirs} is not issued for {SERVER_NAME:?} (not a cache service certificate?)"
            ),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => match side {
                Side::Client => "the cache service's certificate is not a server certificate (another role's certificate?)".into(),
                Side::Server => "client certificate is not a client certificate (the cache service's certificate used by a client?)".into(),
            },
            _ => format!("{theirs} was rejected: {e}"),
        },
        E::NoCertificatesPresented => match side {
            Side::Client => "the cache service sent no certificate".into(),
            Side::Server => "the client sent no certificate".into(),
        },
        E::AlertReceived(alert) => refused(side, *alert),
        E::InvalidMessage(_) => match side {
            Side::Client => {
                "the peer did not answer with TLS (is it running with --insecure-loopback?)".into()
            }
            Side::Server => {
                "the client did not speak TLS (is it running with --insecure-loopback?)".into()
            }
        },
        E::PeerIncompatible(_) => format!("{}'s TLS is incompatible with ours: {e}", side.peer()),
        _ => format!("TLS with {} failed: {e}", side.peer()),
    }
}

/// The peer sent `alert`: say why it most likely refused us.
fn refused(side: Side, alert: AlertDescription) -> String {
    let who = side.peer();
    let why = match alert {
        AlertDescription::UnknownCA => {
            "it trusts another CA: are the credentials from another vault?"
        }
        AlertDescription::CertificateExpired => "our certificate has expired or is not valid yet",
        AlertDescription::BadCertificate => "bad certificate",
        AlertDescription::UnsupportedCertificate => "our certificate is for another role",
        AlertDescription::CertificateRevoked => "our certificate is revoked",
        AlertDescription::CertificateRequired | AlertDescription::NoCertificate => {
            "it requires a certificate"
        }
        AlertDescription::CertificateUnknown
        | AlertDescription::AccessDenied
        | AlertDescription::DecryptError => "certificate not accepted",
        AlertDescription::CloseNotify => return format!("{who} closed the TLS session"),
        other => return format!("{who} aborted TLS ({other:?})"),
    };
    format!("{who} refused our certificate ({why})")
}

// ---------------------------------------------------------------------------------------
// Streams.

/// The TLS state both halves of a stream share.
struct Shared {
    conn: Mutex<Connection>,
    /// Write-ordering lock: ciphertext is taken out of `conn` and sent only while holding it.
    wlock: Mutex<()>,
    /// `conn` may hold records queued by the reader that nobody has sent yet.
    queued: AtomicBool,
    side: Side,
}

impl Shared {
    fn new(mut conn: Connection, side: Side) -> Arc<Shared> {
        // Our own chunking bounds the buffers; rustls's limit would make writes partial.
        conn.set_buffer_limit(None);
        Arc::new(Shared {
            conn: Mutex::new(conn),
            wlock: Mutex::new(()),
            queued: AtomicBool::new(false),
            side,
        })
    }

    /// Encrypt `plain` (may be empty: then only queued records go out) and send it, in order.
    fn send(&self, sock: &TcpStream, cipher: &mut Vec<u8>, plain: &[u8]) -> io::Result<()> {
        {
            let _order = self.wlock.lock();
            // Whatever is queued now is drained below.
            self.queued.store(false, Ordering::SeqCst);
            let mut rest = plain;
            loop {
                let (chunk, tail) = rest.split_at(rest.len().min(WRITE_BUF_BYTES));
                rest = tail;
                cipher.clear();
                {
                    let mut conn = self.conn.lock();
                    if !chunk.is_empty() {
                        conn.writer().write_all(chunk)?;
                    }
                    drain(&mut conn, cipher)?;
                }
                let mut io = sock;
                io.write_all(cipher)?;
                if rest.is_empty() {
                    break;
                }
            }
        }
        if self.queued.load(Ordering::SeqCst) {
            self.send_queued(sock)?;
        }
        Ok(())
    }

    /// Send records queued in `conn`, unless someone holds `wlock`: then that holder sends
    /// them (it checks `queued` after releasing the lock), and we do not wait.
    fn send_queued(&self, sock: &TcpStream) -> io::Result<()> {
        self.queued.store(true, Ordering::SeqCst);
        loop {
            let Some(order) = self.wlock.try_lock() else {
                return Ok(());
            };
            self.queued.store(false, Ordering::SeqCst);
            let mut cipher = Vec::new();
            drain(&mut self.conn.lock(), &mut cipher)?;
            let mut io = sock;
            io.write_all(&cipher)?;
            drop(order);
            if !self.queued.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }
}

/// Move every record rustls has sealed into `out`.
fn drain(conn: &mut Connection, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

/// An established link stream (handshake done), plain TCP or TLS. Reads and writes like a
/// socket; `split` it to read and write from two threads.
pub struct Stream {
    r: ReadHalf,
    w: WriteHalf,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("peer", &self.peer_addr())
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl Stream {
    /// A plaintext stream (the `--insecure-loopback` mode).
    pub fn plain(sock: TcpStream) -> Stream {
        Stream::new(sock, None)
    }

    fn new(sock: TcpStream, tls: Option<Arc<Shared>>) -> Stream {
        // `WriteHalf` buffers; its flushes are the message boundaries.
        let _ = sock.set_nodelay(true);
        let sock = Arc::new(sock);
        Stream {
            r: ReadHalf {
                sock: sock.clone(),
                tls: tls.clone().map(|shared| TlsReader {
                    shared,
                    buf: vec![0u8; READ_BUF_BYTES].into_boxed_slice(),
                    start: 0,
                    end: 0,
                    eof: false,
                }),
            },
            w: WriteHalf {
                sock,
                tls,
                buf: Vec::with_capacity(WRITE_BUF_BYTES),
                cipher: Vec::new(),
                failed: false,
            },
        }
    }

    /// Client side: TLS handshake with the cache service over `sock` (blocking), verifying
    /// its certificate against the vault's CA for [`SERVER_NAME`] and presenting ours.
    pub fn connect_tls(sock: TcpStream, creds: &Credentials) -> Result<Stream> {
        let signal = Arc::new(TicketSignal::default());
        let config = creds.client_config_with(Resumption::store(signal.clone()))?;
        let name = ServerName::try_from(SERVER_NAME)
            .map_err(|e| Error::Invalid(format!("{SERVER_NAME}: {e}")))?;
        let conn = ClientConnection::new(Arc::new(config), name)
            .map_err(|e| Error::Link(format!("cannot start TLS: {e}")))?;
        let mut conn = Connection::Client(conn);
        with_handshake_timeout(&sock, || {
            handshake(&mut conn, &sock, Side::Client)?;
            if conn.protocol_version() == Some(ProtocolVersion::TLSv1_3) {
                await_acceptance(&mut conn, &sock, &signal)?;
            }
            Ok(())
        })?;
        Ok(Stream::new(sock, Some(Shared::new(conn, Side::Client))))
    }

    /// Server side: TLS handshake (blocking) requiring a client certificate signed by the
    /// vault's CA (`config` from [`Credentials::server_config`]).
    pub fn accept_tls(sock: TcpStream, config: Arc<ServerConfig>) -> Result<Stream> {
        let conn = ServerConnection::new(config)
            .map_err(|e| Error::Link(format!("cannot start TLS: {e}")))?;
        let mut conn = Connection::Server(conn);
        with_handshake_timeout(&sock, || handshake(&mut conn, &sock, Side::Server))?;
        Ok(Stream::new(sock, Some(Shared::new(conn, Side::Server))))
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.r.sock.peer_addr().ok()
    }

    pub fn is_tls(&self) -> bool {
        self.r.tls.is_some()
    }

    /// The TLS exporter value for this session (32 bytes, label `EXPORTER-standby-link`, no
    /// context), identical at both ends and unique to the session: binds the link-key proof
    /// to this connection. `None` for plain streams.
    pub fn channel_binding(&self) -> Option<[u8; 32]> {
        let tls = self.r.tls.as_ref()?;
        let conn = tls.shared.conn.lock();
        conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
            .ok()
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.r.sock.set_read_timeout(d)
    }

    /// Split into halves usable from two threads; reading and writing proceed concurrently.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        (self.r, self.w)
    }
}

impl Read for Stream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.r.read(out)
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.w.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// The receiving half of a [`Stream`]. `read` returns `Ok(0)` at the end of the stream: the
/// peer's close_notify, or the TCP connection's end.
pub struct ReadHalf {
    sock: Arc<TcpStream>,
    tls: Option<TlsReader>,
}

struct TlsReader {
    shared: Arc<Shared>,
    /// Ciphertext received but not yet given to rustls: `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

/// What one pass under the connection lock produced.
struct Pass {
    /// `Some(n)`: return `n` bytes (0: end of stream); `None`: need more ciphertext.
    result: io::Result<Option<usize>>,
    /// rustls queued records to send (the alert after a bad record).
    queued: bool,
}

impl ReadHalf {
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(d)
    }
}

impl TlsReader {
    fn read(&mut self, sock: &TcpStream, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let pass = self.decrypt_into(out);
            if pass.queued {
                // A failure here breaks the connection; the writer will see it.
                let _ = self.shared.send_queued(sock);
            }
            if let Some(n) = pass.result? {
                return Ok(n);
            }
            // Wait for ciphertext with the connection unlocked: the writer keeps going.
            let mut io = sock;
            let n = loop {
                match io.read(&mut self.buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            };
            self.start = 0;
            self.end = n;
            self.eof = n == 0;
        }
    }

    /// Under the connection lock: hand out decrypted bytes, decrypting buffered ciphertext
    /// as needed, until `out` is full or the buffered ciphertext runs out.
    fn decrypt_into(&mut self, out: &mut [u8]) -> Pass {
        let mut conn = self.shared.conn.lock();
        let mut total = 0;
        let result = loop {
            match conn.reader().read(&mut out[total..]) {
                // close_notify: the end, after whatever came before it.
                Ok(0) => break Ok(Some(total)),
                Ok(n) => {
                    total += n;
                    if total == out.len() {
                        break Ok(Some(total));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(Some(total)),
                Err(e) => break Err(e),
            }
            if self.start == self.end {
                break Ok((total > 0 || self.eof).then_some(total));
            }
            match conn.read_tls(&mut &self.buf[self.start..self.end]) {
                // rustls takes nothing after close_notify.
                Ok(0) => self.start = self.end,
                Ok(n) => self.start += n,
                Err(e) => break Err(e),
            }
            if let Err(e) = conn.process_new_packets() {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    describe(self.shared.side, &e),
                ));
            }
        };
        Pass {
            result,
            queued: conn.wants_write(),
        }
    }
}

impl Read for ReadHalf {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => (&*self.sock).read(out),
            Some(tls) => tls.read(&self.sock, out),
        }
    }
}

/// The sending half of a [`Stream`]. Buffers up to `WRITE_BUF_BYTES` of plaintext: call
/// `flush` to send (bytes still buffered when it is dropped are discarded, so that dropping
/// a stuck connection never blocks). After a failed send it refuses further writes.
pub struct WriteHalf {
    sock: Arc<TcpStream>,
    tls: Option<Arc<Shared>>,
    buf: Vec<u8>,
    /// Reused ciphertext buffer.
    cipher: Vec<u8>,
    failed: bool,
}

impl WriteHalf {
    /// Shut the TCP socket both ways, so a reader blocked on it wakes (with end of stream).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    /// Close cleanly: flush, send TLS close_notify, and shut our direction of the socket.
    /// The peer's reader sees the end of the stream after all our data.
    pub fn finish(&mut self) -> io::Result<()> {
        self.flush()?;
        if let Some(shared) = &self.tls {
            shared.conn.lock().send_close_notify();
            let r = shared.send(&self.sock, &mut self.cipher, &[]);
            self.note(r)?;
        }
        self.sock.shutdown(Shutdown::Write)
    }

    /// Update our traffic keys and ask the peer to update its own (TLS 1.3 KeyUpdate): its
    /// reader sees the request, and its writer's next record must carry the answer first.
    #[cfg(test)]
    fn request_key_update(&mut self) -> io::Result<()> {
        self.flush()?;
        let Some(shared) = &self.tls else {
            return Ok(());
        };
        shared
            .conn
            .lock()
            .refresh_traffic_keys()
            .map_err(io::Error::other)?;
        let r = shared.send(&self.sock, &mut self.cipher, &[]);
        self.note(r)
    }

    fn check(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the link stream failed earlier",
            ));
        }
        Ok(())
    }

    fn note(&mut self, r: io::Result<()>) -> io::Result<()> {
        if r.is_err() {
            // Part of a record may have gone out: nothing sent after it could be read.
            self.failed = true;
        }
        r
    }

    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let r = match &self.tls {
            None => (&*self.sock).write_all(data),
            Some(shared) => shared.send(&self.sock, &mut self.cipher, data),
        };
        self.note(r)
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let r = self.send(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }
}

impl Write for WriteHalf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check()?;
        if self.buf.len() + data.len() > WRITE_BUF_BYTES {
            if !self.buf.is_empty() {
                self.send_buffered()?;
            }
            if data.len() >= WRITE_BUF_BYTES {
                // Large writes skip the buffer (and its copy).
                self.send(data)?;
                return Ok(data.len());
            }
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        self.send_buffered()
    }
}

/// True if the first byte waiting on `sock` starts a TLS handshake record (0x16), without
/// consuming it; waits up to `timeout` for data (then `TimedOut`/`WouldBlock`), `Ok(false)` at
/// end of stream. Lets the cache service answer a plaintext peer on its TLS port in plaintext.
pub fn peek_is_tls(sock: &TcpStream, timeout: Duration) -> io::Result<bool> {
    let old = sock.read_timeout()?;
    sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let mut first = [0u8; 1];
    let r = loop {
        match sock.peek(&mut first) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => break r,
        }
    };
    sock.set_read_timeout(old)?;
    Ok(r? == 1 && first[0] == 0x16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::fs::PermissionsExt;
    use std::thread;

    fn vault(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        create(&dir).unwrap();
        dir
    }

    /// Connect a client with `client` credentials to a server with `server` credentials;
    /// both results.
    fn connect(server: &Credentials, client: &Credentials) -> (Result<Stream>, Result<Stream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server.server_config().unwrap();
        let srv = thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            Stream::accept_tls(sock, config)
        });
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let c = Stream::connect_tls(sock, client);
        (srv.join().unwrap(), c)
    }

    fn link_err(r: Result<Stream>) -> String {
        match r {
            Err(Error::Link(m)) => m,
            other => panic!("expected a link error, got {other:?}"),
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn create_then_load_every_role() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        let mut keys = Vec::new();
        for role in Role::ALL {
            let c = Credentials::load(&dir, role).unwrap();
            assert_eq!(c.role(), role);
            keys.push(*c.link_key());
            assert_eq!(mode(&dir.join(role.key_file())), 0o600);
        }
        assert!(keys.iter().all(|k| k == &keys[0]));
        assert_ne!(keys[0], [0u8; 32]);
        for secret in [CA_KEY, LINK_KEY] {
            assert_eq!(mode(&dir.join(secret)), 0o600);
        }
        let text = fs::read_to_string(dir.join(LINK_KEY)).unwrap();
        assert_eq!(text.len(), 65);
        assert_eq!(text, format!("{}\n", to_hex(&keys[0])));
        assert!(matches!(create(&dir), Err(Error::Conflict(_))));
        // Configs match roles.
        let cache = Credentials::load(&dir, Role::Cache).unwrap();
        cache.server_config().unwrap();
        assert!(cache.client_config().is_err());
        let agent = Credentials::load(&dir, Role::Agent).unwrap();
        agent.client_config().unwrap();
        assert!(agent.server_config().is_err());
    }

    #[test]
    fn load_names_the_bad_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        fs::write(dir.join(LINK_KEY), "abcd\n").unwrap();
        match Credentials::load(&dir, Role::Agent) {
            Err(Error::Invalid(m)) => {
                assert!(m.contains("link.key: expected 64 hex characters"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        fs::write(dir.join(LINK_KEY), format!("{}\n", "g".repeat(64))).unwrap();
        assert!(matches!(
            Credentials::load(&dir, Role::Agent),
            Err(Error::Invalid(_))
        ));
        fs::write(dir.join(LINK_KEY), "AB".repeat(32)).unwrap();
        assert_eq!(
            Credentials::load(&dir, Role::Agent).unwrap().link_key(),
            &[0xab; 32]
        );

        fs::remove_file(dir.join("agent.pem")).unwrap();
        match Credentials::load(&dir, Role::Agent) {
            Err(Error::Io { path, .. }) => assert!(path.ends_with("agent.pem")),
            other => panic!("{other:?}"),
        }
        fs::write(dir.join("agent.pem"), "not a certificate\n").unwrap();
        match Credentials::load(&dir, Role::Agent) {
            Err(Error::Invalid(m)) => assert!(m.contains("agent.pem"), "{m}"),
            other => panic!("{other:?}"),
        }
        // The processor's certificate with the agent's key.
        fs::copy(dir.join("processor.pem"), dir.join("agent.pem")).unwrap();
        match Credentials::load(&dir, Role::Agent) {
            Err(Error::Invalid(m)) => assert!(m.contains("is not the key of"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn export_source_copies_exactly_what_the_source_needs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        let out = tmp.path().join("export/source");
        export_source(&dir, &out).unwrap();
        let mut names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<String> = SOURCE_FILES.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(names, want);
        assert!(!out.join(CA_KEY).exists());
        for name in SOURCE_FILES {
            assert_eq!(
                fs::read(out.join(name)).unwrap(),
                fs::read(dir.join(name)).unwrap()
            );
            let want_mode = if is_secret(name) { 0o600 } else { 0o644 };
            assert_eq!(mode(&out.join(name)), want_mode, "{name}");
        }
        Credentials::load(&out, Role::Cache).unwrap();
        Credentials::load(&out, Role::Agent).unwrap();
        assert!(Credentials::load(&out, Role::Processor).is_err());
        // Without the CA key, the source site cannot issue certificates.
        assert!(issue(
            &out,
            Role::Agent,
            OffsetDateTime::now_utc(),
            OffsetDateTime::now_utc() + time::Duration::days(1),
            &out
        )
        .is_err());
    }

    /// Pseudo-random bytes, so a reordered or repeated chunk would be noticed.
    fn pattern(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Echo 8 MiB through a TLS link, with both ends' halves on separate threads; with
    /// `key_updates`, the client updates keys every MiB or so while the server is echoing
    /// (its reader sees the request, its writer sends the answer).
    fn duplex_round_trip(key_updates: bool) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        let cache = Credentials::load(&dir, Role::Cache).unwrap();
        let agent = Credentials::load(&dir, Role::Agent).unwrap();
        let (srv, cli) = connect(&cache, &agent);
        let (srv, cli) = (srv.unwrap(), cli.unwrap());
        assert!(srv.is_tls() && cli.is_tls());
        let binding = cli.channel_binding().unwrap();
        assert_eq!(srv.channel_binding(), Some(binding));

        // Server: echo, with its reader and writer on two threads.
        let (mut sr, mut sw) = srv.split();
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let echo_reader = thread::spawn(move || {
            let mut buf = vec![0u8; 100_000];
            loop {
                let n = sr.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                tx.send(buf[..n].to_vec()).unwrap();
            }
        });
        let echo_writer = thread::spawn(move || {
            for chunk in rx {
                sw.write_all(&chunk).unwrap();
                sw.flush().unwrap();
            }
            sw.finish().unwrap();
        });

        // Client: one thread writes 8 MiB in uneven pieces while this one reads it back.
        let data = Arc::new(pattern(8 << 20));
        let (mut cr, mut cw) = cli.split();
        let sent = data.clone();
        let writer = thread::spawn(move || {
            let mut at = 0;
            let mut step = 1;
            let mut next_update = 1 << 20;
            while at < sent.len() {
                let n = step.min(sent.len() - at);
                cw.write_all(&sent[at..at + n]).unwrap();
                if step % 3 == 0 {
                    cw.flush().unwrap();
                }
                at += n;
                step = (step * 7 + 13) % 700_000 + 1;
                if key_updates && at >= next_update {
                    cw.request_key_update().unwrap();
                    next_update += 1 << 20;
                }
            }
            cw.finish().unwrap();
        });
        let mut got = Vec::with_capacity(data.len());
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = cr.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        writer.join().unwrap();
        echo_reader.join().unwrap();
        echo_writer.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == *data, "echoed bytes differ");
    }

    #[test]
    fn tls_duplex_round_trip() {
        duplex_round_trip(false);
    }

    #[test]
    fn tls_duplex_round_trip_with_key_updates() {
        duplex_round_trip(true);
    }

    #[test]
    fn corrupt_record_fails_both_readers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        let cache = Credentials::load(&dir, Role::Cache).unwrap();
        let agent = Credentials::load(&dir, Role::Agent).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = cache.server_config().unwrap();
        let srv = thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let (mut r, _w) = Stream::accept_tls(sock, config).unwrap().split();
            // The bad record fails this read, and its alert goes out through the reader.
            let e = r.read(&mut [0u8; 16]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        });
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut raw = sock.try_clone().unwrap();
        let (mut r, _w) = Stream::connect_tls(sock, &agent).unwrap().split();
        // An application-data record whose tag cannot verify.
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        record.extend_from_slice(&[0x5a; 0x40]);
        raw.write_all(&record).unwrap();
        let e = r.read(&mut [0u8; 16]).unwrap_err();
        assert!(
            e.to_string().contains("the cache service aborted TLS"),
            "{e}"
        );
        srv.join().unwrap();
    }

    #[test]
    fn plain_stream_round_trip_and_shutdown_wakes_reader() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut s = Stream::plain(sock);
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
            s.flush().unwrap();
            // Wait until the client shuts down.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
        });
        let s = Stream::plain(TcpStream::connect(addr).unwrap());
        assert!(!s.is_tls());
        assert_eq!(s.channel_binding(), None);
        assert_eq!(s.peer_addr(), Some(addr));
        let (mut r, mut w) = s.split();
        w.write_all(b"hello").unwrap();
        w.flush().unwrap();
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let blocked = thread::spawn(move || r.read(&mut [0u8; 8]).map_err(|e| e.kind()));
        thread::sleep(Duration::from_millis(50));
        w.shutdown();
        assert_eq!(blocked.join().unwrap(), Ok(0));
        srv.join().unwrap();
    }

    #[test]
    fn foreign_client_certificate_is_refused_on_both_sides() {
        let tmp = tempfile::tempdir().unwrap();
        let ours = vault(tmp.path(), "ours");
        let theirs = vault(tmp.path(), "theirs");
        let cache = Credentials::load(&ours, Role::Cache).unwrap();

        // Another vault's agent: it trusts another CA, so it refuses our server first.
        let foreign = Credentials::load(&theirs, Role::Agent).unwrap();
        let (srv, cli) = connect(&cache, &foreign);
        let c = link_err(cli);
        assert!(c.contains("not signed by this vault's CA"), "{c}");
        let s = link_err(srv);
        assert!(s.contains("refused our certificate"), "{s}");

        // Our CA, but another vault's agent certificate: our server refuses it.
        let mixed = tmp.path().join("mixed");
        fs::create_dir(&mixed).unwrap();
        for (from, name) in [
            (&ours, CA_CERT),
            (&ours, LINK_KEY),
            (&theirs, "agent.pem"),
            (&theirs, "agent.key"),
        ] {
            fs::copy(from.join(name), mixed.join(name)).unwrap();
        }
        let mixed = Credentials::load(&mixed, Role::Agent).unwrap();
        let (srv, cli) = connect(&cache, &mixed);
        let s = link_err(srv);
        assert!(
            s.contains("client certificate not signed by this vault's CA"),
            "{s}"
        );
        let c = link_err(cli);
        assert!(c.contains("refused our certificate"), "{c}");
    }

    #[test]
    fn foreign_server_certificate_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ours = vault(tmp.path(), "ours");
        let theirs = vault(tmp.path(), "theirs");
        let foreign = Credentials::load(&theirs, Role::Cache).unwrap();
        let agent = Credentials::load(&ours, Role::Agent).unwrap();
        let (srv, cli) = connect(&foreign, &agent);
        let c = link_err(cli);
        assert!(c.contains("not signed by this vault's CA"), "{c}");
        let s = link_err(srv);
        assert!(s.contains("refused our certificate"), "{s}");
    }

    #[test]
    fn expired_client_certificate_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        let old = tmp.path().join("old");
        let now = OffsetDateTime::now_utc();
        issue(
            &dir,
            Role::Agent,
            now - time::Duration::days(10),
            now - time::Duration::days(1),
            &old,
        )
        .unwrap();
        fs::copy(dir.join(CA_CERT), old.join(CA_CERT)).unwrap();
        fs::copy(dir.join(LINK_KEY), old.join(LINK_KEY)).unwrap();
        let cache = Credentials::load(&dir, Role::Cache).unwrap();
        let expired = Credentials::load(&old, Role::Agent).unwrap();
        let (srv, cli) = connect(&cache, &expired);
        let s = link_err(srv);
        assert!(s.contains("client certificate has expired"), "{s}");
        let c = link_err(cli);
        assert!(c.contains("expired"), "{c}");
    }

    #[test]
    fn issued_certificate_rotates_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        let before = fs::read(dir.join("processor.pem")).unwrap();
        let now = OffsetDateTime::now_utc();
        issue(
            &dir,
            Role::Processor,
            now - time::Duration::hours(1),
            now + time::Duration::days(30),
            &dir,
        )
        .unwrap();
        assert_ne!(fs::read(dir.join("processor.pem")).unwrap(), before);
        assert_eq!(mode(&dir.join("processor.key")), 0o600);
        let cache = Credentials::load(&dir, Role::Cache).unwrap();
        let processor = Credentials::load(&dir, Role::Processor).unwrap();
        let (srv, cli) = connect(&cache, &processor);
        let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
        cli.write_all(b"ping").unwrap();
        cli.flush().unwrap();
        let mut buf = [0u8; 4];
        srv.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(issue(&dir, Role::Agent, now, now, &dir).is_err());
    }

    #[test]
    fn cache_certificate_cannot_act_as_client() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        // Dress the cache service's certificate up as the agent's.
        let fake = tmp.path().join("fake");
        fs::create_dir(&fake).unwrap();
        for (from, to) in [
            (CA_CERT, CA_CERT),
            (LINK_KEY, LINK_KEY),
            ("cache.pem", "agent.pem"),
            ("cache.key", "agent.key"),
        ] {
            fs::copy(dir.join(from), fake.join(to)).unwrap();
        }
        let cache = Credentials::load(&dir, Role::Cache).unwrap();
        let fake = Credentials::load(&fake, Role::Agent).unwrap();
        let (srv, cli) = connect(&cache, &fake);
        let s = link_err(srv);
        assert!(s.contains("not a client certificate"), "{s}");
        link_err(cli);
    }

    #[test]
    fn plaintext_peer_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        let agent = Credentials::load(&dir, Role::Agent).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A plaintext server answers in plaintext and hangs up.
        let srv = thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            assert!(peek_is_tls(&sock, Duration::from_secs(10)).unwrap());
            sock.write_all(b"STBYLINK plaintext only\n").unwrap();
            let _ = sock.shutdown(Shutdown::Write);
            let _ = sock.read_to_end(&mut Vec::new());
        });
        let sock = TcpStream::connect(addr).unwrap();
        let c = link_err(Stream::connect_tls(sock, &agent));
        assert!(c.contains("did not answer with TLS"), "{c}");
        srv.join().unwrap();
    }

    #[test]
    fn peek_tells_tls_from_plaintext() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut plain = TcpStream::connect(addr).unwrap();
        let (plain_srv, _) = listener.accept().unwrap();
        plain.write_all(b"STBYLINK").unwrap();
        assert!(!peek_is_tls(&plain_srv, Duration::from_secs(10)).unwrap());
        // Peeking does not consume.
        let mut buf = [0u8; 8];
        (&plain_srv).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"STBYLINK");
        drop(plain);
        assert!(!peek_is_tls(&plain_srv, Duration::from_secs(10)).unwrap());

        let tmp = tempfile::tempdir().unwrap();
        let dir = vault(tmp.path(), "creds");
        let agent = Credentials::load(&dir, Role::Agent).unwrap();
        let client = thread::spawn(move || {
            let sock = TcpStream::connect(addr).unwrap();
            let _ = Stream::connect_tls(sock, &agent);
        });
        let (tls_srv, _) = listener.accept().unwrap();
        assert!(peek_is_tls(&tls_srv, Duration::from_secs(10)).unwrap());
        drop(tls_srv);
        client.join().unwrap();

        // Nothing sent: times out.
        let _idle = TcpStream::connect(addr).unwrap();
        let (idle_srv, _) = listener.accept().unwrap();
        assert!(peek_is_tls(&idle_srv, Duration::from_millis(20)).is_err());
    }
}
