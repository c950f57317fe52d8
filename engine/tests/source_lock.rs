//! One agent at a time serves a source image: the first `Agent::open` of an image holds an
//! exclusive lock on it for as long as the agent lives, and a second one is refused with
//! one line naming the holder.

use standby_engine::agent::{Agent, SourceDisk};
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::Error;
use std::sync::Arc;

#[test]
fn a_second_agent_on_one_image_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("os.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disks = || {
        vec![SourceDisk {
            name: "os".into(),
            path: image.clone(),
            size_bytes: 1 << 20,
        }]
    };
    let log = |name: &str| {
        Arc::new(
            Cache::open(dir.path().join(name), CacheConfig::default())
                .unwrap()
                .0,
        )
    };
    let first = Agent::open(log("a"), disks()).unwrap();
    match Agent::open(log("b"), disks()) {
        Err(e @ Error::Conflict(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("os.raw"), "{msg}");
            assert!(
                msg.contains(&format!("pid {}", std::process::id())),
                "{msg}"
            );
            assert!(!msg.contains('\n'), "{msg}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("two agents opened one image"),
    }
    // Released with the agent.
    first.close().unwrap();
    Agent::open(log("b"), disks()).unwrap().close().unwrap();
}
