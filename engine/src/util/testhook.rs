//! A test hook that holds a process at a named step, so that a test can kill -9 it (or
//! anything else) in the middle of an operation without racing it: with
//! `STANDBY_TEST_PAUSE=STEP` and `STANDBY_TEST_PAUSE_FILE=PATH` in its environment, the
//! first time the process reaches `STEP` it creates `PATH` (holding the step's name) and
//! waits until `PATH` is removed (then goes on). Without the variables it costs one
//! environment lookup per call; nothing else.

use std::time::Duration;

/// Steps the engine pauses at.
pub const SEED_RESYNC: &str = "seed-resync";
pub const FAILBACK_PULL: &str = "failback-pull";
pub const FAILBACK_WRITE: &str = "failback-write";

/// Pause here if the environment asks for `step` (once per process).
pub fn pause(step: &str) {
    static DONE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if std::env::var("STANDBY_TEST_PAUSE").ok().as_deref() != Some(step) {
        return;
    }
    let Ok(path) = std::env::var("STANDBY_TEST_PAUSE_FILE") else {
        return;
    };
    {
        let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
        if done.iter().any(|s| s == step) {
            return;
        }
        done.push(step.to_string());
    }
    let path = std::path::PathBuf::from(path);
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, step).is_err() || std::fs::rename(&tmp, &path).is_err() {
        return;
    }
    while path.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}
