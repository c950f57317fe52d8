//! The name check: names of VMs, disks and policies become directory and file names, on
//! the vault's side and on the cache service's, so every service checks them the same way.

use crate::error::{Error, Result};

/// Names of VMs, disks and policies become directory and file names: keep them plain.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{kind} name '{name}' must be 1 to 64 letters, digits, '-', '_' or '.' (not starting with '.')"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass_and_path_like_ones_are_refused() {
        for ok in ["web01", "a", "disk-0_1.raw", &"x".repeat(64)] {
            check_name("VM", ok).unwrap();
        }
        for bad in ["", ".hidden", "..", "a/b", "a b", "é", &"x".repeat(65)] {
            match check_name("disk", bad) {
                Err(Error::Invalid(m)) => assert!(m.starts_with("disk name '"), "{m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
