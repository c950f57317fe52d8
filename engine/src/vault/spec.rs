//! Naming a recovery point: `latest`, `latest-processed`, `latest-app-consistent`, a point
//! id, a point's name (`name:NAME`, or bare when it is none of the other forms), `seq:N`,
//! or `time:RFC3339`. Parsed here so every command accepts the same forms.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;
use std::time::UNIX_EPOCH;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PointSpec {
    /// Process everything pending, cut a point, use it (lowest RPO).
    Latest,
    /// The newest existing point (lowest RTO).
    LatestProcessed,
    LatestAppConsistent,
    Id(u64),
    /// The newest point with this name (as given to `standby point --name`).
    Name(String),
    /// Any sequence number inside the any-moment window.
    Seq(u64),
    /// The newest state at or before this time (microseconds since the Unix epoch),
    /// inside the any-moment window.
    Time(u64),
}

impl FromStr for PointSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<PointSpec> {
        let bad = || {
            Error::Invalid(format!(
                "'{s}' is not a point: use latest, latest-processed, latest-app-consistent, a point id, a point's name, seq:N or time:RFC3339"
            ))
        };
        Ok(match s {
            "latest" => PointSpec::Latest,
            "latest-processed" => PointSpec::LatestProcessed,
            "latest-app-consistent" => PointSpec::LatestAppConsistent,
            _ => {
                if let Some(n) = s.strip_prefix("seq:") {
                    PointSpec::Seq(n.parse().map_err(|_| bad())?)
                } else if let Some(t) = s.strip_prefix("time:") {
                    let t = humantime::parse_rfc3339_weak(t).map_err(|_| bad())?;
                    let us = t.duration_since(UNIX_EPOCH).map_err(|_| bad())?.as_micros() as u64;
                    PointSpec::Time(us)
                } else if let Some(n) = s.strip_prefix("name:") {
                    if n.is_empty() {
                        return Err(bad());
                    }
                    PointSpec::Name(n.to_string())
                } else if let Ok(id) = s.parse() {
                    PointSpec::Id(id)
                } else if is_bare_name(s) {
                    PointSpec::Name(s.to_string())
                } else {
                    return Err(bad());
                }
            }
        })
    }
}

impl fmt::Display for PointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointSpec::Latest => f.write_str("latest"),
            PointSpec::LatestProcessed => f.write_str("latest-processed"),
            PointSpec::LatestAppConsistent => f.write_str("latest-app-consistent"),
            PointSpec::Id(id) => write!(f, "{id}"),
            PointSpec::Name(n) if is_bare_name(n) && !is_keyword(n) => f.write_str(n),
            PointSpec::Name(n) => write!(f, "name:{n}"),
            PointSpec::Seq(n) => write!(f, "seq:{n}"),
            PointSpec::Time(us) if us % 1_000_000 == 0 => write!(f, "time:{}", rfc3339(*us)),
            PointSpec::Time(us) => write!(f, "time:{}", rfc3339_micros(*us)),
        }
    }
}

/// Whether a point's name can be given bare: not empty, no `:` (kept for the prefixed
/// forms), not starting with `-` (an option), and not all digits (an id).
fn is_bare_name(s: &str) -> bool {
    !s.is_empty()
        && !s.contains(':')
        && !s.starts_with('-')
        && !s.chars().all(|c| c.is_ascii_digit())
        && !s.chars().any(char::is_whitespace)
}

fn is_keyword(s: &str) -> bool {
    matches!(s, "latest" | "latest-processed" | "latest-app-consistent")
}

/// Format microseconds since the Unix epoch as RFC 3339 (UTC, seconds).
pub fn rfc3339(us: u64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_micros(us);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Format microseconds since the Unix epoch as RFC 3339 with every microsecond
/// (`2026-11-26T09:30:00.123456Z`): what a manifest records and `time:` accepts back.
pub fn rfc3339_micros(us: u64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_micros(us);
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back() {
        for s in [
            "latest",
            "latest-processed",
            "latest-app-consistent",
            "17",
            "seq:99",
            "time:2026-11-26T10:00:00Z",
            "time:2026-11-26T10:00:00.000042Z",
            "nightly",
            "before-upgrade",
            "name:latest",
            "name:42",
            "name:with space",
            "name:a:b",
        ] {
            let spec: PointSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "nightly".parse::<PointSpec>().unwrap(),
            PointSpec::Name("nightly".into())
        );
        assert_eq!(
            "name:7".parse::<PointSpec>().unwrap(),
            PointSpec::Name("7".into())
        );
        assert_eq!("7".parse::<PointSpec>().unwrap(), PointSpec::Id(7));
        for bad in [
            "",
            "seq:",
            "seq:x",
            "time:yesterday",
            "-1",
            "name:",
            "foo:bar",
        ] {
            assert!(bad.parse::<PointSpec>().is_err(), "{bad}");
        }
    }
}
