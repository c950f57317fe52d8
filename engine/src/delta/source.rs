//! The sides a comparison reads: a raw image file (its holes found with SEEK_DATA and
//! SEEK_HOLE) and a disk of a replica view (its holes from the view's extent map).

use super::BlockSource;
use crate::error::{IoContext, Result};
use crate::replica::View;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A raw image, read-only. Bytes past the file's end (a short file) read as zeros.
pub struct FileImage {
    file: File,
    path: PathBuf,
    size_bytes: u64,
}

impl FileImage {
    /// Open `path` as a disk of `size_bytes`.
    pub fn open(path: &Path, size_bytes: u64) -> Result<FileImage> {
        let file = File::open(path).at(path)?;
        Ok(FileImage {
            file,
            path: path.to_path_buf(),
            size_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Over an image the caller has open.
    pub fn from_file(file: File, path: &Path, size_bytes: u64) -> FileImage {
        FileImage {
            file,
            path: path.to_path_buf(),
            size_bytes,
        }
    }
}

impl BlockSource for FileImage {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        crate::fsutil::data_ranges(&self.file, self.size_bytes).at(&self.path)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = self
                .file
                .read_at(&mut buf[done..], offset + done as u64)
                .at(&self.path)?;
            if n == 0 {
                buf[done..].fill(0); // past the end of a short file: zeros
                break;
            }
            done += n;
        }
        Ok(())
    }
}

/// One disk of a replica view.
pub struct ViewDisk<'a> {
    pub view: &'a View,
    pub disk: u16,
}

impl BlockSource for ViewDisk<'_> {
    fn size_bytes(&self) -> u64 {
        self.view
            .disks()
            .get(self.disk as usize)
            .map_or(0, |d| d.size_bytes)
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        Ok(self
            .view
            .extents(self.disk)?
            .into_iter()
            .map(|e| (e.offset, e.offset + e.len))
            .collect())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.view.read(self.disk, offset, buf)
    }
}
