//! Whatever a peer sends: a frame header and payload, then the request inside it. The
//! decoder must never panic, never accept a frame over the cap, and a request that
//! decodes must survive a round trip.
#![no_main]

use dove_proto::{decode_frame, encode_frame, RequestEnvelope, MAX_REQUEST_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((payload, _consumed))) = decode_frame(data, MAX_REQUEST_BYTES) else {
        return;
    };
    assert!(payload.len() <= MAX_REQUEST_BYTES);
    if let Ok(request) = serde_json::from_slice::<RequestEnvelope>(payload) {
        let again = serde_json::to_vec(&request).expect("a decoded request encodes");
        let back: RequestEnvelope = serde_json::from_slice(&again).expect("and decodes");
        assert_eq!(back, request);
        encode_frame(&again).expect("a request that fitted still fits");
    }
});
