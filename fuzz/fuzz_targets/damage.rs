//! Feeds arbitrary bytes to the damage record decoder: a damaged record is an error naming
//! the file, never a panic, and whatever decodes encodes back to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby_engine::vault::damage;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = damage::decode(data, Path::new("damage")) {
        let again = damage::encode(&d);
        assert_eq!(damage::decode(&again, Path::new("damage")).ok(), Some(d));
    }
});
