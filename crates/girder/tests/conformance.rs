//! The statekeeper conformance suite on both statekeepers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use girder::control::conformance::{run_all, Factory};
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

/// The embedded inbox is bounded: an event that finds it full is dropped and counted as a
/// disruption, after which nodes resubmit what they wait for (and get it from the memo).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_embedded_inbox_drops_events_and_counts_a_disruption() {
    use bytes::Bytes;
    use girder::control::{Memo, NodeId, PoolId, QueueId, Submitted};
    use girder::Request;
    let sk = Embedded::new(EmbeddedConfig { inbox_len_max: 1, ..Default::default() });
    let (n1, n2) = (NodeId::new("n1"), NodeId::new("n2"));
    sk.register_node(&n1, &[("f".to_owned(), 1)]).await.unwrap();
    sk.register_node(&n2, &[]).await.unwrap();
    let pool = PoolId::new("p");
    sk.declare_pool(&pool, None, &n1).await.unwrap();
    let queue = QueueId::pool(&pool);
    let requests: Vec<Request> = (0..2u8).map(|n| Request::new("f", 1, Bytes::from(vec![n]))).collect();
    for req in &requests {
        sk.submit(req, &queue, false, &n2).await.unwrap();
    }
    assert_eq!(sk.claim(&queue, &n1, 2).await.unwrap().len(), 2);
    let value = Ok(Bytes::from_static(b"v"));
    for req in &requests {
        sk.complete(req, &value, Memo::Keep, &n1).await.unwrap();
    }
    assert_eq!(sk.disruptions(), 1, "the second event found the inbox full");
    // What the node does on a disruption: submit again, and the memo answers.
    assert_eq!(sk.submit(&requests[1], &queue, false, &n2).await.unwrap(), Submitted::Done(value));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_and_with_a_password_works_and_bad_urls_are_clear_errors() {
    let server = RedisServer::start_tls().unwrap_or_else(|e| panic!("{e}"));
    let statekeeper = RedisStatekeeper::connect(RedisConfig::new(server.url())).await.expect("rediss:// connects");
    statekeeper.ping().await.expect("TLS round trip");
    assert_eq!(statekeeper.function_version("f").await.unwrap(), None);

    let plain = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let mut admin = redis::Client::open(plain.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg("s3cret").query_async(&mut admin).await.unwrap();
    let with_password = plain.url().replace("redis://", "redis://:s3cret@");
    RedisStatekeeper::connect(RedisConfig::new(with_password)).await.expect("the password in the URL is used");
    let refused = RedisStatekeeper::connect(RedisConfig::new(plain.url())).await;
    assert!(refused.is_err(), "no password, no connection");
    let wrong = RedisStatekeeper::connect(RedisConfig::new(plain.url().replace("redis://", "redis://:wrong@"))).await;
    let message = wrong.err().expect("a wrong password is refused").to_string();
    assert!(!message.contains("wrong"), "the password stays out of messages: {message}");

    for bad in ["redis://", "http://127.0.0.1:1", "not a url"] {
        let err = RedisStatekeeper::connect(RedisConfig::new(bad)).await.err().expect("refused");
        assert!(err.to_string().contains("Redis"), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_structures_pass_their_suite() {
    use girder::structures::{conformance, memory::InMemory, Store};
    let factory: conformance::Factory = Arc::new(|| Box::pin(async { Arc::new(InMemory::new()) as Store }));
    conformance::run_all(factory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_structures_pass_their_suite() {
    use girder::structures::conformance;
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    static NAMESPACE: AtomicU64 = AtomicU64::new(0);
    let factory: conformance::Factory = Arc::new(move || {
        let url = url.clone();
        Box::pin(async move {
            let mut config = RedisConfig::new(url);
            config.namespace = format!("structures-{}", NAMESPACE.fetch_add(1, Ordering::Relaxed));
            RedisStatekeeper::connect(config).await.expect("connects").structures()
        })
    });
    conformance::run_all(factory).await;
}
