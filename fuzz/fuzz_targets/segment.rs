//! Feeds arbitrary bytes to the segment header decoder and, as a whole segment file, to the
//! change log's recovery and reader: opening must either fail with an error or yield only
//! records that verify, in sequence, never panic. A second pass gives the bytes a valid
//! header and reseals every frame it can find, so recovery's sequence and tail logic and
//! the reader's body decoding are reached behind the checksums.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby_engine::cache::{Cache, CacheConfig};
use standby_engine::record;
use standby_engine::segment::{self, SegmentHeader, SEGMENT_HEADER_BYTES};
use standby_engine::vfs::{SimFs, Vfs};
use std::path::Path;
use std::sync::Arc;

fn open_and_read(bytes: &[u8]) {
    let fs = SimFs::new();
    let dir = Path::new("/c");
    fs.create_dir_all(dir).unwrap();
    let f = fs.create_new(&dir.join(segment::file_name(1))).unwrap();
    f.write_all_at(bytes, 0).unwrap();
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
}

fuzz_target!(|data: &[u8]| {
    let _ = SegmentHeader::decode(data);
    open_and_read(data);
    if data.len() < 8 {
        return;
    }
    let base_seq = u64::from(data[0]).max(1);
    let mut bytes = SegmentHeader { segment_id: 1, base_seq, compat: 0 }.encode().to_vec();
    let mut frames = data[1..].to_vec();
    let mut at = 0;
    while let Some(n) = record::reseal(&mut frames[at..], 1) {
        at += n;
    }
    bytes.extend_from_slice(&frames);
    debug_assert!(bytes.len() >= SEGMENT_HEADER_BYTES);
    open_and_read(&bytes);
});
