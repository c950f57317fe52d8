//! The link-key proof. After TLS (or on a plain loopback link), both sides prove they hold
//! the vault's link key without sending it: each sends a fresh 32-byte nonce and an
//! HMAC-SHA256 under the key over both nonces, the client's role and VM, and the TLS
//! channel binding (so a proof cannot be relayed onto another connection). The server
//! proves first; whichever side finds the other's proof wrong tells it why and closes,
//! before anything is written.
//!
//! ```text
//! client → server  Hello { role, vm, client_nonce }
//! server → client  Challenge { server_nonce, proof = HMAC(key, "standby-link/1 server" ‖ T) }
//! client → server  Auth { proof = HMAC(key, "standby-link/1 client" ‖ T) }
//! T = role(1) ‖ vm_len(2) ‖ vm ‖ client_nonce(32) ‖ server_nonce(32) ‖ binding(32, zeros on plain TCP)
//! ```

use super::wire::{self, Msg, PeerRole};
use crate::error::{Error, LinkError, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};

type HmacSha256 = Hmac<Sha256>;

fn transcript(
    role: PeerRole,
    vm: &str,
    cn: &[u8; 32],
    sn: &[u8; 32],
    binding: Option<[u8; 32]>,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(100 + vm.len());
    t.push(role as u8);
    t.extend_from_slice(&(vm.len() as u16).to_le_bytes());
    t.extend_from_slice(vm.as_bytes());
    t.extend_from_slice(cn);
    t.extend_from_slice(sn);
    t.extend_from_slice(&binding.unwrap_or([0; 32]));
    t
}

fn mac(key: &[u8; 32], label: &[u8], t: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(label);
    m.update(t);
    m
}

fn prove(key: &[u8; 32], label: &[u8], t: &[u8]) -> [u8; 32] {
    mac(key, label, t).finalize().into_bytes().into()
}

fn check(key: &[u8; 32], label: &[u8], t: &[u8], proof: &[u8; 32]) -> bool {
    mac(key, label, t).verify_slice(proof).is_ok()
}

const SERVER: &[u8] = b"standby-link/1 server";
const CLIENT: &[u8] = b"standby-link/1 client";

pub fn nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n)
        .map_err(|e| Error::Link(LinkError::Local(format!("no randomness: {e}"))))?;
    Ok(n)
}

/// Read the next message; an `Error` message from the peer becomes our error.
pub fn expect(r: &mut impl Read, buf: &mut Vec<u8>, what: &str) -> Result<Msg> {
    match wire::read_msg(r, buf)? {
        Some(Msg::Error { message }) => Err(Error::Link(LinkError::Refused { why: message })),
        Some(m) => Ok(m),
        None => Err(Error::Link(LinkError::ClosedWaiting {
            what: what.to_string(),
        })),
    }
}

/// Tell the peer why we close (best effort) and return the error.
pub fn refuse(w: &mut impl Write, why: LinkError) -> Error {
    let _ = wire::write_msg(
        w,
        &Msg::Error {
            message: why.to_string(),
        },
    );
    Error::Link(why)
}

/// The client's side: hello, check the server's proof, prove ours.
pub fn client(
    r: &mut impl Read,
    w: &mut impl Write,
    key: &[u8; 32],
    role: PeerRole,
    vm: &str,
    binding: Option<[u8; 32]>,
) -> Result<()> {
    let cn = nonce()?;
    wire::write_msg(
        w,
        &Msg::Hello {
            role,
            vm: vm.to_string(),
            nonce: cn,
        },
    )?;
    let mut buf = Vec::new();
    let (sn, proof) = match expect(r, &mut buf, "the challenge")? {
        Msg::Challenge { nonce, proof } => (nonce, proof),
        m => {
            return Err(refuse(
                w,
                LinkError::Unexpected {
                    wanted: "a challenge",
                    got: m.name(),
                },
            ))
        }
    };
    let t = transcript(role, vm, &cn, &sn, binding);
    if !check(key, SERVER, &t, &proof) {
        return Err(refuse(
            w,
            LinkError::WrongKey {
                who: "the cache service".into(),
                hint: " (check --creds on both sides)",
            },
        ));
    }
    wire::write_msg(
        w,
        &Msg::Auth {
            proof: prove(key, CLIENT, &t),
        },
    )
}

/// The server's side: read the hello, prove ours, check the client's. Returns who it is.
pub fn server(
    r: &mut impl Read,
    w: &mut impl Write,
    key: &[u8; 32],
    binding: Option<[u8; 32]>,
) -> Result<(PeerRole, String)> {
    let mut buf = Vec::new();
    let (role, vm, cn) = match expect(r, &mut buf, "the hello")? {
        Msg::Hello { role, vm, nonce } => (role, vm, nonce),
        m => {
            return Err(refuse(
                w,
                LinkError::Unexpected {
                    wanted: "a hello",
                    got: m.name(),
                },
            ))
        }
    };
    if let Err(e) = crate::util::names::check_name("VM", &vm) {
        return Err(refuse(w, LinkError::RefusedPeer { why: e.to_string() }));
    }
    let sn = nonce()?;
    let t = transcript(role, &vm, &cn, &sn, binding);
    wire::write_msg(
        w,
        &Msg::Challenge {
            nonce: sn,
            proof: prove(key, SERVER, &t),
        },
    )?;
    let proof = match expect(r, &mut buf, "the key proof")? {
        Msg::Auth { proof } => proof,
        m => {
            return Err(refuse(
                w,
                LinkError::Unexpected {
                    wanted: "a key proof",
                    got: m.name(),
                },
            ))
        }
    };
    if !check(key, CLIENT, &t, &proof) {
        return Err(refuse(
            w,
            LinkError::WrongKey {
                who: format!("the {} for '{vm}'", role.as_str()),
                hint: "",
            },
        ));
    }
    Ok((role, vm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn run(client_key: [u8; 32], server_key: [u8; 32]) -> (Result<()>, Result<(PeerRole, String)>) {
        let (a, b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || {
            let (mut r, mut w) = (b.try_clone().unwrap(), b);
            server(&mut r, &mut w, &server_key, Some([5; 32]))
        });
        let (mut r, mut w) = (a.try_clone().unwrap(), a);
        let c = client(
            &mut r,
            &mut w,
            &client_key,
            PeerRole::Agent,
            "web01",
            Some([5; 32]),
        );
        drop((r, w));
        (c, srv.join().unwrap())
    }

    #[test]
    fn same_key_passes_and_a_wrong_key_is_refused_on_both_sides() {
        let (c, s) = run([1; 32], [1; 32]);
        c.unwrap();
        assert_eq!(s.unwrap(), (PeerRole::Agent, "web01".to_string()));
        let (c, s) = run([1; 32], [2; 32]);
        let (c, s) = (c.unwrap_err().to_string(), s.unwrap_err().to_string());
        assert!(c.contains("wrong link key"), "{c}");
        assert!(s.contains("wrong link key"), "{s}");
    }

    #[test]
    fn a_wrong_key_is_a_typed_refusal_the_client_hears_in_the_servers_words() {
        let (c, s) = run([1; 32], [2; 32]);
        // The client finds the server's proof wrong first and says so; the server hears
        // that as a refusal carrying those words.
        match c {
            Err(Error::Link(LinkError::WrongKey { ref who, .. })) => {
                assert_eq!(who, "the cache service")
            }
            other => panic!("{other:?}"),
        }
        match s {
            Err(Error::Link(LinkError::Refused { why })) => {
                assert_eq!(why, c.unwrap_err().to_string().trim_start_matches("link: "))
            }
            other => panic!("{other:?}"),
        }
    }
}
