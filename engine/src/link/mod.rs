//! The site-to-site link: agent → cache service → processor over TCP.
//!
//! - `wire`: the framed, versioned messages of both links (records travel in the change
//!   log's own record format).
//! - `tls`: the vault's credentials (its own CA, certificates, link key) and encrypted
//!   duplex streams.
//! - `auth`: the link-key proof both sides give after the TLS handshake, bound to the TLS
//!   channel.
//! - `service`: the cache service at the source site, which owns the change log.
//! - `ship`: the agent's shipper, from its local journal to the cache service.
//! - `pull`: the target site's puller, from the cache service into the vault.
//! - `relay`: the cache service's relay of group point barriers to the agents.
//!
//! Every connection is opened by the agent or the processor (nothing connects into the
//! agent). Each is TLS with a client certificate, unless both sides run with
//! `--insecure-loopback` (refused anywhere but 127.0.0.0/8); the link key is proven either way.

pub mod auth;
pub mod fence;
pub mod objlog;
pub mod pull;
mod relay;
pub mod seed;
pub mod service;
pub mod ship;
pub mod tls;
pub mod wire;

use crate::error::{Error, Result};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use tls::{Credentials, Stream};

/// The agent's and processor's credentials role names, re-exported for callers.
pub use crate::error::LinkError;
pub use tls::Role;

/// How a link is protected.
#[derive(Clone)]
pub struct Security {
    pub creds: Arc<Credentials>,
    /// Plain TCP (loopback only): the key is still proven, but nothing is encrypted.
    pub insecure_loopback: bool,
}

impl Security {
    pub fn key(&self) -> &[u8; 32] {
        self.creds.link_key()
    }
}

/// How long a connect or handshake may take before the peer counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer silent for this long is dropped (both sides send something at least every second).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Resolve `addr` and refuse plain TCP anywhere but loopback.
pub fn resolve(addr: &str, security: &Security) -> Result<SocketAddr> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| Error::Invalid(format!("cannot resolve '{addr}': {e}")))?
        .next()
        .ok_or_else(|| Error::Invalid(format!("'{addr}' resolves to no address")))?;
    check_plain_allowed(&sa, security)?;
    Ok(sa)
}

/// `--insecure-loopback` is refused for any address outside 127.0.0.0/8.
pub fn check_plain_allowed(sa: &SocketAddr, security: &Security) -> Result<()> {
    if security.insecure_loopback {
        let ok = match sa.ip() {
            std::net::IpAddr::V4(ip) => ip.octets()[0] == 127,
            std::net::IpAddr::V6(_) => false,
        };
        if !ok {
            return Err(Error::Invalid(format!(
                "--insecure-loopback works only on 127.0.0.0/8, not {sa}: plain TCP would cross a network"
            )));
        }
    }
    Ok(())
}

/// An open, authenticated link, as two halves usable from two threads.
pub struct Link {
    pub reader: tls::ReadHalf,
    pub writer: tls::WriteHalf,
    pub peer: Option<SocketAddr>,
}

/// Connect to the cache service and prove who we are: TCP, TLS (unless insecure), the
/// link-key handshake. Returns the link, ready for the role's open message.
pub fn connect(addr: &str, security: &Security, role: wire::PeerRole, vm: &str) -> Result<Link> {
    connect_timed(addr, security, role, vm, IDLE_TIMEOUT)
}

/// [`connect`], with reads on the open link timing out after `read_timeout` (a group
/// coordinator bounds each barrier step so).
pub fn connect_timed(
    addr: &str,
    security: &Security,
    role: wire::PeerRole,
    vm: &str,
    read_timeout: Duration,
) -> Result<Link> {
    let sa = resolve(addr, security)?;
    let sock = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT).map_err(|e| {
        Error::Link(LinkError::Unreachable {
            addr: addr.to_string(),
            why: e.to_string(),
        })
    })?;
    let _ = sock.set_nodelay(true);
    sock.set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(wire::io_err)?;
    sock.set_write_timeout(Some(IDLE_TIMEOUT))
        .map_err(wire::io_err)?;
    // Socket options are shared by every handle of the socket: this one sets the idle
    // timeout once the handshake is done.
    let opts = sock.try_clone().map_err(wire::io_err)?;
    let stream = if security.insecure_loopback {
        Stream::plain(sock)
    } else {
        Stream::connect_tls(sock, &security.creds)?
    };
    let binding = stream.channel_binding();
    let peer = stream.peer_addr();
    let (mut reader, mut writer) = stream.split();
    auth::client(&mut reader, &mut writer, security.key(), role, vm, binding)?;
    opts.set_read_timeout(Some(read_timeout))
        .map_err(wire::io_err)?;
    Ok(Link {
        reader,
        writer,
        peer,
    })
}
