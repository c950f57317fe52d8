//! A replication policy: how often points are cut, how long they are kept, how they are
//! thinned, how long every write is kept (the any-moment window), and when an RPO alert is
//! raised. Plain durations, shared by the processor, the replica's pruning, the catalog and
//! the CLI. Invariant of a validated policy: 1 s <= crash_interval, window <= retention,
//! thin_after <= retention.

use crate::error::{Error, Result};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Cut a crash-consistent point once this much time has passed since the last point
    /// (measured in record times) and something changed. Default 5 min; at least 1 s.
    pub crash_interval: Duration,
    /// How often the agent should take app-consistent markers (None: never).
    pub app_interval: Option<Duration>,
    /// Points older than this are pruned. Default 24 h.
    pub retention: Duration,
    /// Points older than this are thinned to one per hour. Default 2 h.
    pub thin_after: Duration,
    /// Every write newer than this is kept, so any moment inside it can be recovered.
    /// Default 1 h.
    pub any_moment_window: Duration,
    /// Replication health turns critical once the newest point is older than this.
    /// Default 30 min.
    pub rpo_threshold: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            crash_interval: Duration::from_secs(5 * 60),
            app_interval: Some(Duration::from_secs(60 * 60)),
            retention: Duration::from_secs(24 * 60 * 60),
            thin_after: Duration::from_secs(2 * 60 * 60),
            any_moment_window: Duration::from_secs(60 * 60),
            rpo_threshold: Duration::from_secs(30 * 60),
        }
    }
}

/// Thinning keeps one point per bucket of this length.
pub const THIN_BUCKET: Duration = Duration::from_secs(60 * 60);

impl Policy {
    /// Refuse settings that cannot work together.
    pub fn validate(&self) -> Result<()> {
        if self.crash_interval < Duration::from_secs(1) {
            return Err(Error::Invalid(
                "crash-consistent interval must be at least 1 second".into(),
            ));
        }
        if let Some(a) = self.app_interval {
            if a < Duration::from_secs(1) {
                return Err(Error::Invalid(
                    "app-consistent interval must be at least 1 second".into(),
                ));
            }
        }
        if self.thin_after > self.retention {
            return Err(Error::Invalid(
                "thinning must start before the retention limit".into(),
            ));
        }
        if self.any_moment_window > self.retention {
            return Err(Error::Invalid(
                "the any-moment window cannot exceed the retention".into(),
            ));
        }
        Ok(())
    }
}

pub(crate) fn us(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_settings_are_refused() {
        Policy::default().validate().unwrap();
        let p = Policy {
            crash_interval: Duration::from_millis(10),
            ..Policy::default()
        };
        assert!(p.validate().is_err());
        let p = Policy {
            thin_after: Duration::from_secs(100 * 3600),
            ..Policy::default()
        };
        assert!(p.validate().is_err());
    }
}
