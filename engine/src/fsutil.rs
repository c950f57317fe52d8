//! Small durable-file helpers shared by the stores.

use crate::error::{IoContext, Result};
use crate::vfs::Vfs;
use std::path::Path;

/// Replace `dir/name` with `bytes` atomically: write a temporary file, sync it, rename it
/// over the old one, sync the directory. A crash at any point leaves the old or the new
/// contents, never a mix.
pub fn replace_atomic(vfs: &dyn Vfs, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    if vfs.exists(&tmp) {
        vfs.remove(&tmp).at(&tmp)?;
    }
    let f = vfs.create_new(&tmp).at(&tmp)?;
    f.write_all_at(bytes, 0).at(&tmp)?;
    f.sync_data().at(&tmp)?;
    vfs.rename(&tmp, &dst).at(&dst)?;
    vfs.sync_dir(dir).at(dir)?;
    Ok(())
}
