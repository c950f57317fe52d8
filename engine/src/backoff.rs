//! When the owner of a failed store (a log, a replica) tries to reopen it: at once, then
//! after [`BACKOFF_FIRST`], doubling up to [`BACKOFF_MAX`] while it keeps failing. Shared by
//! the runtimes and the cache service, so it sits below both.

use std::time::Duration;

/// After a store (a log, a replica) failed, its owner reopens it this long after the
/// failure, doubling up to [`BACKOFF_MAX`] while it keeps failing.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// When to try again a store that failed: at once until it fails, then after
/// [`BACKOFF_FIRST`], doubling up to [`BACKOFF_MAX`], until it is [`Backoff::reset`].
#[derive(Debug)]
pub(crate) struct Backoff {
    delay: Duration,
    next: Option<std::time::Instant>,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            delay: BACKOFF_FIRST,
            next: None,
        }
    }

    /// True if it is time to try (again).
    pub(crate) fn ready(&self) -> bool {
        self.next.is_none_or(|at| std::time::Instant::now() >= at)
    }

    /// The try failed: wait before the next, longer each time.
    pub(crate) fn failed(&mut self) {
        self.next = Some(std::time::Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }

    /// It worked: the next failure is retried soon again.
    pub(crate) fn reset(&mut self) {
        *self = Backoff::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_half_a_second_to_ten_and_resets() {
        let mut b = Backoff::new();
        assert!(b.ready(), "the first try is at once");
        let mut delays = Vec::new();
        for _ in 0..7 {
            delays.push(b.delay);
            b.failed();
            assert!(!b.ready(), "a failed try waits");
        }
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
        b.reset();
        assert!(b.ready());
        assert_eq!(b.delay, BACKOFF_FIRST);
    }
}
