//! Memoized results on Redis are capped by count besides their TTL (their bytes are Redis's
//! `maxmemory`'s to bound): past the cap the oldest are forgotten, the newest always kept;
//! and finished call trees leave no keys behind.

use bytes::Bytes;
use girder::control::{Memo, NodeId, PoolId, QueueId, Submitted};
use girder::testing::RedisServer;
use girder::{RedisConfig, RedisStatekeeper, Request, Statekeeper};

async fn memoize(sk: &RedisStatekeeper, count: u32, payload_bytes: usize) -> Vec<Request> {
    let node = NodeId::new("n1");
    let queue = QueueId::worker("n1/w0");
    let mut requests = Vec::new();
    for n in 0..count {
        let request = Request::new("f", 1, Bytes::from(n.to_le_bytes().to_vec()));
        assert_eq!(sk.submit(&request, &queue, false, &node).await.unwrap(), Submitted::Queued);
        let claimed = sk.claim(&queue, &node, 1).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let value = Ok(Bytes::from(vec![b'x'; payload_bytes]));
        sk.complete(&request, &value, Memo::Keep, &node).await.unwrap();
        requests.push(request);
    }
    requests
}

async fn setup(entries_max: u64) -> (RedisServer, RedisStatekeeper, redis::aio::MultiplexedConnection) {
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let mut config = RedisConfig::new(server.url());
    config.results_entries_max = entries_max;
    // No near cache: every read below goes to Redis.
    config.near_cache.entries_max = 0;
    let sk = RedisStatekeeper::connect(config).await.expect("connects");
    sk.register_node(&NodeId::new("n1"), &[("f".to_owned(), 1)]).await.unwrap();
    sk.declare_pool(&PoolId::new("p"), None, &NodeId::new("n1")).await.unwrap();
    sk.join_pool(&PoolId::new("p"), &QueueId::worker("n1/w0"), &NodeId::new("n1")).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    (server, sk, conn)
}

async fn stored_results(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    let keys: Vec<String> = redis::cmd("KEYS").arg("girder:{girder}:res:*").query_async(conn).await.unwrap();
    keys.len()
}

#[tokio::test]
async fn results_past_the_count_cap_forget_the_oldest() {
    let (_server, sk, mut conn) = setup(100).await;
    let requests = memoize(&sk, 300, 10).await;
    assert_eq!(stored_results(&mut conn).await, 100);
    for (n, request) in requests.iter().enumerate() {
        let kept = sk.result(&request.id).await.unwrap().is_some();
        assert_eq!(kept, n >= 200, "result {n}: only the newest 100 are kept");
    }
}

#[tokio::test]
async fn finished_call_trees_leave_no_keys_behind() {
    let (_server, sk, mut conn) = setup(1_000).await;
    let (node, queue) = (NodeId::new("n1"), QueueId::worker("n1/w0"));
    for n in 0..50u64 {
        let budget = girder::Budget::root(10, 10);
        let root = Request::new("f", 1, Bytes::from(n.to_le_bytes().to_vec())).with_budget(budget);
        assert_eq!(sk.submit(&root, &queue, false, &node).await.unwrap(), Submitted::Queued);
        assert_eq!(sk.claim(&queue, &node, 1).await.unwrap().len(), 1);
        sk.complete(&root, &Ok(Bytes::from_static(b"v")), Memo::Keep, &node).await.unwrap();
    }
    let keys: Vec<String> = redis::cmd("KEYS").arg("girder:{girder}:tree:*").query_async(&mut conn).await.unwrap();
    assert!(keys.is_empty(), "trees of one request are forgotten when done: {keys:?}");
}
