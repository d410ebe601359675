//! Any path, query, method and body against the HTTP API (through the router, in-process):
//! an answer in time, a JSON body with `kind` and `message` for every error, and never a 500.
//! The input is `METHOD-BYTE PATH-AND-QUERY \n BODY`.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let router = runtime.block_on(async {
            // Only functions that answer at once: a fuzzed `examples/sleep` would just wait.
            let registry = girder::Registry::with_examples()
                .only(&["examples/echo", "examples/fail", "examples/fib"])
                .expect("known functions");
            let node = girder::Node::builder()
                .registry(registry)
                .pool(girder::PoolSpec::new("main"))
                .workers(girder::WorkerSpec::new("main", 1, 2))
                .start()
                .await
                .expect("node starts");
            girder::http::router(Arc::new(node), girder::http::HttpConfig::default())
        });
        Fixture { runtime, router }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&method, rest)) = data.split_first() else { return };
    let method = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"][usize::from(method) % 6];
    let (target, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let target = String::from_utf8_lossy(target);
    let uri = if target.starts_with('/') { target.into_owned() } else { format!("/v1/{target}") };
    let Ok(request) =
        axum::http::Request::builder().method(method).uri(&uri).body(axum::body::Body::from(body.to_vec()))
    else {
        return; // Not a request line any client could send.
    };
    let fixture = fixture();
    let (status, bytes) = fixture.runtime.block_on(async {
        let response = tokio::time::timeout(Duration::from_secs(10), fixture.router.clone().oneshot(request))
            .await
            .unwrap_or_else(|_| panic!("{method} {uri}: no answer within 10 s"))
            .expect("infallible");
        let status = response.status();
        (status, axum::body::to_bytes(response.into_body(), 64 << 20).await.expect("body"))
    });
    assert_ne!(status, 500, "{method} {uri} -> 500: {bytes:?}");
    if (status.is_client_error() || status.is_server_error()) && method != "HEAD" {
        let body: serde_json::Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{method} {uri} -> {status} without JSON: {e}"));
        assert!(body["kind"].is_string() && body["message"].is_string(), "{method} {uri} -> {status}: {body}");
    }
});
