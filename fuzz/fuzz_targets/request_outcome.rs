//! Requests and outcomes as read back from a statekeeper (Redis holds them as MessagePack):
//! corrupt bytes are an error, never a panic, and what decodes encodes to bytes that decode
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = girder::codec::decode::<girder::Request>(data) {
        let again = girder::codec::encode(&request).expect("encodes");
        assert_eq!(girder::codec::decode::<girder::Request>(&again).expect("decodes"), request);
    }
    if let Ok(outcome) = girder::codec::decode::<girder::Outcome>(data) {
        let again = girder::codec::encode(&outcome).expect("encodes");
        assert_eq!(girder::codec::decode::<girder::Outcome>(&again).expect("decodes"), outcome);
    }
});
