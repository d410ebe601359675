//! Per-node configuration values (`girder config set NODE KEY VALUE`, applied by running
//! nodes): any key and value are stored or refused, and a refused one changes nothing.
#![no_main]

use std::sync::OnceLock;

use girder::structures::Store;
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
    let Some((&selector, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest).into_owned();
    // The first byte picks a known key, or takes `KEY=VALUE` from the input.
    let (key, value) = match selector % 4 {
        0 => ("slots".to_owned(), text),
        1 => ("max-memory".to_owned(), text),
        2 => ("cpus".to_owned(), text),
        _ => match text.split_once('=') {
            Some((key, value)) => (key.to_owned(), value.to_owned()),
            None => (text, String::new()),
        },
    };
    if let Some(bytes) = girder::config::parse_bytes(&value) {
        assert!(bytes > 0 || value.trim().starts_with('0'), "{value:?} parsed as 0 bytes");
    }
    let (runtime, store) = runtime();
    runtime.block_on(async {
        let before = girder::config::get(store, "fuzzed").await.expect("readable");
        match girder::config::set(store, "fuzzed", &key, &value).await {
            Ok(()) => {
                let after = girder::config::get(store, "fuzzed").await.expect("readable");
                assert_eq!(after.get(&key), Some(&value), "a value accepted is stored");
            }
            Err(_) => {
                let after = girder::config::get(store, "fuzzed").await.expect("readable");
                assert_eq!(before, after, "a refused value changes nothing");
            }
        }
    });
});
