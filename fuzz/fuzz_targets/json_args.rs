//! JSON call arguments (the body of `POST /v1/call/...`, `girder call`'s ARGs) to MessagePack:
//! any bytes are refused or encoded, never a panic, and what encodes decodes back to the
//! same JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(packed) = girder::codec::json_args_to_msgpack(&json) else {
        assert!(!json.is_array(), "every JSON array encodes");
        return;
    };
    let back = girder::codec::msgpack_to_json(&packed).expect("what was encoded decodes");
    assert_eq!(back, json, "JSON arguments round-trip through MessagePack");
});
