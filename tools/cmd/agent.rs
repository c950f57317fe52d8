//! `agent`: local (serving a vault's VM), or at a source site shipping to a cache service.
//! Its loops live in the engine; see `crate::agent` and `crate::remote`.

use super::vault;
use crate::cli::AgentArgs;
use crate::{agent, remote};
use standby_engine::Error;
use std::path::PathBuf;

pub(crate) fn run(a: AgentArgs) -> Result<(), Error> {
    let AgentArgs {
        vm,
        listen,
        process_every,
        cache,
        creds,
        journal,
        journal_capacity,
        disks,
        insecure_loopback,
        metrics,
        seeded,
    } = a;
    match cache {
        Some(cache) => remote::agent(remote::AgentOptions {
            vm,
            cache,
            creds: creds.unwrap_or_default(),
            insecure_loopback,
            journal: journal.unwrap_or_default(),
            journal_capacity: Some(journal_capacity),
            disks: disks
                .into_iter()
                .map(|(n, p)| (n, PathBuf::from(p)))
                .collect(),
            listen,
            metrics,
            seeded,
        }),
        None => agent::run(
            &vault()?,
            &vm,
            agent::Options {
                listen,
                process_every,
                metrics,
            },
        ),
    }
}
