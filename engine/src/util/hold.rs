//! The acknowledgement hold of a group point's barrier: while a hold is in force, a VM's
//! writes still go into its change log, but their acknowledgements wait — so nothing
//! appended after the group point's marker is acknowledged before every member has its
//! marker (docs/groups.md says why that makes a group point causally consistent).
//!
//! Invariant: a hold always ends — released by the coordinator, or on its own at its
//! deadline — so a coordinator that dies never leaves a VM's writes waiting. A hold
//! remembers whether it lapsed at its deadline: a group point cut under a lapsed hold is
//! not causally safe and the coordinator fails it.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The longest hold an agent accepts: past it the agent releases on its own.
pub const MAX_HOLD: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct State {
    /// The hold in force: its id and deadline.
    held: Option<(String, Instant)>,
    /// Ids of holds that lapsed at their deadline (the latest few), so a late release
    /// learns that its hold did not last.
    lapsed: Vec<String>,
}

/// The hold of one VM's acknowledgements.
#[derive(Debug, Default)]
pub struct Hold {
    /// Whether a hold may be in force: the write path's fast check. Set (under the lock)
    /// before the hold's answer goes out, so a write appended after the group point's
    /// marker — which the log's own lock orders after that answer — sees it.
    active: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

impl Hold {
    /// Hold acknowledgements under `id` for at most `for_at_most` (capped at
    /// [`MAX_HOLD`]). `false` if another hold is in force.
    pub fn hold(&self, id: &str, for_at_most: Duration) -> bool {
        let mut s = self.state.lock();
        self.expire(&mut s);
        if s.held.is_some() {
            return false;
        }
        s.held = Some((id.to_string(), Instant::now() + for_at_most.min(MAX_HOLD)));
        self.active.store(true, Ordering::SeqCst);
        true
    }

    /// Whether the hold `id` is still in force (not released, not lapsed).
    pub fn holding(&self, id: &str) -> bool {
        let mut s = self.state.lock();
        self.expire(&mut s);
        s.held.as_ref().is_some_and(|(h, _)| h == id)
    }

    /// End the hold `id`: `true` if it was in force until now, `false` if it lapsed at its
    /// deadline (or was never taken).
    pub fn release(&self, id: &str) -> bool {
        let mut s = self.state.lock();
        self.expire(&mut s);
        let was = s.held.as_ref().is_some_and(|(h, _)| h == id);
        if was {
            s.held = None;
            self.active.store(false, Ordering::SeqCst);
            self.changed.notify_all();
        }
        was
    }

    fn expire(&self, s: &mut State) {
        if let Some((id, deadline)) = &s.held {
            if Instant::now() >= *deadline {
                s.lapsed.push(id.clone());
                if s.lapsed.len() > 16 {
                    s.lapsed.remove(0);
                }
                s.held = None;
                self.active.store(false, Ordering::SeqCst);
                self.changed.notify_all();
            }
        }
    }

    /// Whether the hold `id` lapsed at its deadline.
    pub fn lapsed(&self, id: &str) -> bool {
        let mut s = self.state.lock();
        self.expire(&mut s);
        s.lapsed.iter().any(|l| l == id)
    }

    /// Wait while a hold is in force (returns at once when none is: the write path's
    /// common case costs one atomic load).
    pub fn pass(&self) {
        if !self.active.load(Ordering::SeqCst) {
            return;
        }
        let mut s = self.state.lock();
        loop {
            self.expire(&mut s);
            let Some((_, deadline)) = &s.held else {
                return;
            };
            let deadline = *deadline;
            self.changed.wait_until(&mut s, deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_held_ack_waits_for_the_release() {
        let h = Arc::new(Hold::default());
        assert!(h.hold("g/1", Duration::from_secs(5)));
        assert!(!h.hold("g/2", Duration::from_secs(5)), "one hold at a time");
        let (tx, rx) = std::sync::mpsc::channel();
        let t = {
            let h = h.clone();
            std::thread::spawn(move || {
                h.pass();
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "still held"
        );
        assert!(h.holding("g/1"));
        assert!(h.release("g/1"));
        rx.recv().unwrap();
        t.join().unwrap();
        assert!(!h.release("g/1"), "released once");
        h.pass();
    }

    #[test]
    fn a_hold_lapses_on_its_own_and_says_so() {
        let h = Hold::default();
        assert!(h.hold("g/1", Duration::from_millis(1)));
        h.pass(); // returns once the deadline passed
        assert!(!h.holding("g/1"));
        assert!(h.lapsed("g/1"));
        assert!(!h.release("g/1"), "a lapsed hold is not a successful one");
        assert!(
            h.hold("g/2", Duration::from_secs(1)),
            "a new hold can begin"
        );
        assert!(h.release("g/2"));
        assert!(!h.lapsed("g/2"));
    }
}
