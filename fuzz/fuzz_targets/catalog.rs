//! Feeds arbitrary bytes to the vault catalog decoder: a damaged or hostile catalog is an
//! error naming the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby_engine::vault::catalog;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = catalog::decode(data, Path::new("catalog")) {
        let again = catalog::encode(&c).expect("a decoded catalog encodes");
        assert_eq!(catalog::decode(&again, Path::new("catalog")).ok(), Some(c));
    }
});
