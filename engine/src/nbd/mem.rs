//! A block device in memory, for tests, benchmarks and the fuzzer: the bytes, a minimum
//! block size, and which 4 KiB blocks were ever written (the rest are reported as holes).

use super::{BlockDevice, DevError, DevResult, Extent};
use parking_lot::Mutex;

const BLOCK: u64 = 4096;

struct Inner {
    data: Vec<u8>,
    written: Vec<bool>,
}

/// A RAM disk. Offsets are checked by the server; the device checks them again, so a
/// server bug is an error reply, never a panic.
pub struct MemDisk {
    inner: Mutex<Inner>,
    min_block: u32,
    read_only: bool,
}

impl MemDisk {
    pub fn new(size: usize, min_block: u32, read_only: bool) -> MemDisk {
        MemDisk {
            inner: Mutex::new(Inner {
                data: vec![0; size],
                written: vec![false; size.div_ceil(BLOCK as usize)],
            }),
            min_block,
            read_only,
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.inner.lock().data.clone()
    }

    fn range(&self, offset: u64, len: u64) -> DevResult<(usize, usize)> {
        let size = self.inner.lock().data.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok((offset as usize, end as usize)),
            _ => Err(DevError::invalid("outside the device")),
        }
    }
}

impl Inner {
    fn mark(&mut self, s: usize, e: usize, on: bool) {
        if s < e {
            for b in s / BLOCK as usize..e.div_ceil(BLOCK as usize) {
                self.written[b] = on;
            }
        }
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.inner.lock().data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn min_block_bytes(&self) -> u32 {
        self.min_block
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        let (s, e) = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.inner.lock().data[s..e]);
        Ok(())
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Option<DevResult<()>> {
        // All in memory: the server's request reader answers every read itself (the
        // worker read path is the agent's).
        Some(self.read(offset, buf))
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> DevResult<()> {
        let (s, e) = self.range(offset, data.len() as u64)?;
        let mut i = self.inner.lock();
        i.data[s..e].copy_from_slice(data);
        i.mark(s, e, true);
        Ok(())
    }
    fn flush(&self) -> DevResult<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> DevResult<()> {
        self.write_zeroes(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> DevResult<()> {
        let (s, e) = self.range(offset, len)?;
        self.inner.lock().data[s..e].fill(0);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        let (s, e) = self.range(offset, len)?;
        let i = self.inner.lock();
        let mut out: Vec<Extent> = Vec::new();
        let mut at = s;
        while at < e {
            let b = at / BLOCK as usize;
            let end = ((b + 1) * BLOCK as usize).min(e);
            let hole = !i.written[b];
            match out.last_mut() {
                Some(x) if x.hole == hole => x.len += (end - at) as u64,
                _ => out.push(Extent {
                    len: (end - at) as u64,
                    hole,
                    zero: hole,
                }),
            }
            at = end;
        }
        Ok(out)
    }
}
