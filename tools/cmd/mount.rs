//! `mount`: serve a recovery point's disks over NBD, through the VM's running owner if
//! there is one, else from this process.

use super::{vault, wait, who};
use crate::{agent, output, owner};
use standby_engine::vault::{PointSpec, Vault};
use standby_engine::Error;
use std::time::Duration;

pub(crate) fn run(vm: &str, point: PointSpec, listen: &str, writable: bool) -> Result<(), Error> {
    let req = standby_engine::runtime::control::Request::Mount {
        point: point.clone(),
        listen: listen.to_string(),
        writable,
    };
    // Until the point's index is built and the server is up (its owner's or ours).
    let spinner = std::cell::RefCell::new(crate::progress::Spinner::start(&format!(
        "mount of {vm}: reading the point's index"
    )));
    owner::run(
        &vault()?,
        &who(&format!("mount {vm}")),
        vm,
        &req,
        wait(),
        |v| serve(v, vm, point.clone(), listen, writable, &spinner),
        |reply, session| {
            spinner.borrow_mut().stop();
            mounted_through_owner(vm, reply, session, writable)
        },
    )
}

/// Serve the mount from this process until Ctrl-C.
fn serve(
    vault: &Vault,
    vm: &str,
    spec: PointSpec,
    listen: &str,
    writable: bool,
    spinner: &std::cell::RefCell<crate::progress::Spinner>,
) -> Result<(), Error> {
    use standby_engine::mount::MountDisk;
    use standby_engine::nbd::{BlockDevice, ExportList, Server, ServerConfig};
    let m = vault.mount(vm, spec)?;
    let mut exports: Vec<(String, std::sync::Arc<dyn BlockDevice>)> = Vec::new();
    for (i, name) in m.disks.iter().enumerate() {
        let dev = if writable {
            let scratch = m
                .scratch
                .join(format!("mount-{}-{name}.overlay", std::process::id()));
            MountDisk::writable(m.view.clone(), i as u16, &scratch)?
        } else {
            MountDisk::read_only(m.view.clone(), i as u16)?
        };
        exports.push((name.clone(), std::sync::Arc::new(dev)));
    }
    let stop = agent::stop_flag()?;
    let mut server = Server::start(
        listen,
        std::sync::Arc::new(ExportList(exports)),
        ServerConfig::default(),
    )
    .map_err(|e| Error::Invalid(format!("cannot listen on {listen}: {e}")))?;
    let addr = server.local_addr();
    spinner.borrow_mut().stop();
    let what = match m.view.point() {
        Some(p) => format!(
            "point {} ({}, seq {}, {})",
            p.id,
            output::kind(p.kind),
            p.seq,
            output::rfc3339(p.time_us)
        ),
        None => format!(
            "seq {} ({})",
            m.view.seq(),
            output::rfc3339(m.view.time_us())
        ),
    };
    println!(
        "mounted {vm} at {what}, {} on {addr} (pid {})",
        if writable {
            "writable (throw-away overlay)"
        } else {
            "read-only"
        },
        std::process::id()
    );
    for name in &m.disks {
        println!("  nbd://{addr}/{name}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    server.stop();
    eprintln!("standby: mount of {vm} stopped");
    Ok(())
}

/// A mount served by the VM's owner (its agent or follower): print where, and keep the
/// session open until Ctrl-C (the owner stops serving when this command goes).
fn mounted_through_owner(
    vm: &str,
    reply: standby_engine::runtime::control::Reply,
    session: standby_engine::runtime::control::Session,
    writable: bool,
) -> Result<(), Error> {
    use standby_engine::runtime::control::Reply;
    let Reply::Mounted {
        addr,
        disks,
        point,
        seq,
        time_us,
    } = reply
    else {
        return Err(owner::unexpected(&reply));
    };
    let stop = agent::stop_flag()?;
    let what = match point {
        Some(p) => format!(
            "point {} ({}, seq {}, {})",
            p.id,
            output::kind(p.kind),
            p.seq,
            output::rfc3339(p.time_us)
        ),
        None => format!("seq {seq} ({})", output::rfc3339(time_us)),
    };
    println!(
        "mounted {vm} at {what}, {} on {addr} (served by the VM's running agent; this command keeps it up)",
        if writable {
            "writable (throw-away overlay)"
        } else {
            "read-only"
        },
    );
    for name in &disks {
        println!("  nbd://{addr}/{name}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    session.wait(&stop);
    eprintln!("standby: mount of {vm} stopped");
    Ok(())
}
