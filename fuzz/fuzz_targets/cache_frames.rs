//! Stored cache values (frames, each raw, LZ4 or zstd): whatever bytes a store holds under a
//! cache key, reading, appending to and decoding it answers a value or an error, never a
//! panic or an unbounded allocation.
#![no_main]

use std::sync::OnceLock;

use girder::structures::{Cache, CacheConfig, Kind, Store};
use girder::Statekeeper;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static (tokio::runtime::Runtime, Store) {
    static RUNTIME: OnceLock<(tokio::runtime::Runtime, Store)> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let store = runtime.block_on(async { girder::Embedded::default().structures() });
        (runtime, store)
    })
}

fuzz_target!(|data: &[u8]| {
    let (runtime, store) = runtime();
    runtime.block_on(async {
        store.value_set(Kind::Value, "fuzzed", data, None).await.expect("a raw write");
        let cache = Cache::new(store.clone(), CacheConfig::default());
        let read = cache.get_bytes("fuzzed").await;
        let _ = cache.get::<String>("fuzzed").await;
        if cache.append("fuzzed", b"more").await.is_ok() {
            // Valid frames plus a valid frame stay valid.
            if let Ok(Some(before)) = read {
                let after = cache.get_bytes("fuzzed").await.expect("still decodes").expect("present");
                assert_eq!(&after[..before.len()], &before[..]);
                assert_eq!(&after[before.len()..], b"more");
            }
        }
    });
});
