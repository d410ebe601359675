//! MessagePack results (from any worker, any statekeeper) to JSON, and the typed decoder:
//! any bytes give a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(json) = girder::codec::msgpack_to_json(data) {
        // Whatever decoded renders as JSON text.
        let _ = serde_json::to_string(&json).expect("renders");
    }
    let _ = girder::codec::decode::<Vec<rmpv::Value>>(data);
    let _ = girder::codec::decode::<(u64, String)>(data);
});
