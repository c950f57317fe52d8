//! Feeds arbitrary bytes to the change-log record decoder: it must never panic, never
//! allocate beyond the bounds its length check allows, and anything it accepts must
//! re-encode to a frame that decodes to the same record. The same bytes are then resealed
//! (length check and crc rewritten) so the body decoders behind the checksums — lz4,
//! markers, field validation — get fuzzed too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby_engine::record;

fn check(bytes: &[u8], segment_id: u64) {
    if let Ok((rec, n)) = record::decode(bytes, segment_id) {
        assert!(n <= bytes.len());
        for compress in [false, true] {
            let again = record::encode(&rec.op.as_entry(), segment_id, rec.seq, rec.time_us, compress)
                .expect("a decoded record is valid");
            let (back, m) = record::decode(&again, segment_id).expect("re-encoded record decodes");
            assert_eq!(m, again.len());
            assert_eq!(back, rec);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&data[..8]);
    let segment_id = u64::from_le_bytes(id);
    check(&data[8..], segment_id);
    let mut sealed = data[8..].to_vec();
    if record::reseal(&mut sealed, segment_id).is_some() {
        check(&sealed, segment_id);
    }
});
