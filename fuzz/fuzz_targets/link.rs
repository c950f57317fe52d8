//! Feeds arbitrary bytes to the link's message decoder, both as raw bytes off the wire and
//! sealed (valid header and crc) around an arbitrary payload so the payload decoders are
//! reached; record batches go through the record checks. A hostile peer gets an error,
//! never a panic or an allocation beyond the stated bounds; what decodes re-encodes to the
//! same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby_engine::link::wire::{self, DiskInfo, Msg};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let Some((&ty, payload)) = rest.split_first() else {
            return;
        };
        wire::frame_raw(ty % 16, payload)
    };
    let mut r = &bytes[..];
    let mut buf = Vec::new();
    if let Ok(Some(msg)) = wire::read_msg(&mut r, &mut buf) {
        let again = msg.encode();
        assert_eq!(&again[..], &bytes[..again.len()], "re-encoding differs");
        if let Msg::Records(payload) = &msg {
            let disks = [DiskInfo {
                name: "os".into(),
                size_bytes: 1 << 40,
            }];
            let _ = wire::check_records(payload, &disks);
        }
    }
});
