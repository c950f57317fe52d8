//! Feeds arbitrary bytes to the NBD request parser and the option-data parsers
//! (NBD_OPT_INFO/GO, NBD_OPT_{LIST,SET}_META_CONTEXT): they must never panic, and a
//! request that parses re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby_engine::nbd::proto::{InfoRequest, MetaRequest, Request, REQUEST_BYTES};

fuzz_target!(|data: &[u8]| {
    if data.len() >= REQUEST_BYTES {
        let mut h = [0u8; REQUEST_BYTES];
        h.copy_from_slice(&data[..REQUEST_BYTES]);
        if let Ok(r) = Request::parse(&h) {
            assert_eq!(r.encode(), h);
        }
    }
    let _ = InfoRequest::parse(data);
    let _ = MetaRequest::parse(data);
});
