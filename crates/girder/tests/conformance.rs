//! The statekeeper conformance suite on both statekeepers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use girder::statekeeper::conformance::{run_all, Factory};
use girder::testing::RedisServer;
use girder::{Embedded, EmbeddedConfig, RedisConfig, RedisStatekeeper, Statekeeper};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_passes_the_conformance_suite() {
    let factory: Factory = Arc::new(|ttl_ms| {
        Box::pin(async move {
            let config = EmbeddedConfig { node_ttl_ms: ttl_ms, ..Default::default() };
            Arc::new(Embedded::new(config)) as Arc<dyn Statekeeper>
        })
    });
    run_all(factory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_passes_the_conformance_suite() {
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    static NAMESPACE: AtomicU64 = AtomicU64::new(0);
    let factory: Factory = Arc::new(move |ttl_ms| {
        let url = url.clone();
        Box::pin(async move {
            // A namespace of its own per case: a fresh, empty grid on the same server.
            let mut config = RedisConfig::new(url);
            config.namespace = format!("conformance-{}", NAMESPACE.fetch_add(1, Ordering::Relaxed));
            config.node_ttl_ms = ttl_ms;
            Arc::new(RedisStatekeeper::connect(config).await.expect("connects")) as Arc<dyn Statekeeper>
        })
    });
    run_all(factory).await;
}
