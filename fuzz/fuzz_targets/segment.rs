//! Feeds arbitrary bytes to the segment header decoder and, as a whole segment file, to the
//! change log's recovery and reader: opening must either fail with an error or yield only
//! records that verify, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::segment::{self, SegmentHeader};
use standby_engine::vfs::{SimFs, Vfs};
use std::path::Path;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let _ = SegmentHeader::decode(data);
    let fs = SimFs::new();
    let dir = Path::new("/c");
    fs.create_dir_all(dir).unwrap();
    let f = fs.create_new(&dir.join(segment::file_name(1))).unwrap();
    f.write_all_at(data, 0).unwrap();
    let config = CacheConfig { auto_sync: None, ..CacheConfig::default() };
    if let Ok((cache, report)) = Cache::open_with(Arc::new(fs), dir, config) {
        let mut n = 0;
        if let Ok(reader) = cache.reader(report.first_seq) {
            for rec in reader {
                match rec {
                    Ok(r) => {
                        assert_eq!(r.seq, report.first_seq + n);
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        assert!(n <= report.records);
    }
});
