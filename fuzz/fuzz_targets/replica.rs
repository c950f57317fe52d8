//! Feeds arbitrary bytes to every replica decoder (data-file header, extent frame, layer
//! index, manifest), chosen by the first byte: each must return an error or a value,
//! never panic, never allocate beyond what its checked lengths allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby_engine::replica::{datafile, extent, index, manifest};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 4 {
        0 => {
            let _ = datafile::decode_data_header(rest);
        }
        1 => {
            if rest.len() >= 8 {
                let id = u64::from_le_bytes(rest[..8].try_into().unwrap_or([0; 8]));
                if let Ok((_, n)) = extent::decode_extent(&rest[8..], id) {
                    assert!(n <= rest.len() - 8);
                }
            }
        }
        2 => {
            // The offset a failure names lies within the file (or at its end).
            if let Err((at, _)) = index::decode_layer_index_located(rest) {
                assert!(at <= rest.len() as u64);
            }
        }
        _ => {
            let _ = manifest::decode_manifest(rest);
        }
    }
});
