//! Leases that nothing can starve and that expire by the holder's own clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use girder::placement::{FlockTable, TABLE_KEY};
use girder::structures::{Atom, Lock};
use girder::testing::RedisServer;
use girder::{NodeInfo, PoolSpec, RedisConfig, RedisStatekeeper, Registry, Statekeeper, WorkerSpec};

async fn statekeeper(server: &RedisServer, namespace: &str, node_ttl_ms: u64) -> Arc<dyn Statekeeper> {
    let mut config = RedisConfig::new(server.url());
    config.namespace = namespace.to_owned();
    config.node_ttl_ms = node_ttl_ms;
    config.response_timeout_ms = 200;
    Arc::new(RedisStatekeeper::connect(config).await.expect("connects"))
}

/// A listener whose accept queue is full: further connections to it hang until they time
/// out (Linux drops their SYNs), like a peer that never answers.
async fn hanging_listener() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, String) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("address")).expect("bind");
    let listener = socket.listen(1).expect("listen");
    let address = listener.local_addr().expect("address").to_string();
    let mut fillers = Vec::new();
    // Fill the queue; the connection that does not complete at once shows it is full.
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(&address)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            _ => break,
        }
    }
    (listener, fillers, address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_node_keeps_its_lease_while_probes_hang_and_placement_conflicts() {
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let ttl_ms = 1_000;
    let sk = statekeeper(&server, "starve", ttl_ms).await;
    let node = girder::Node::builder()
        .id("busy")
        .statekeeper(sk.clone())
        .registry(Registry::with_examples())
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 1))
        .heartbeat_ms(100)
        .start()
        .await
        .expect("node starts");
    // Peers whose HTTP address hangs: every round-trip probe to them times out.
    let (_listener, _fillers, hanging) = hanging_listener().await;
    let probe = tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(&hanging)).await;
    assert!(probe.is_err(), "a connection to the full listener should hang");
    let peers = 48;
    for i in 0..peers {
        sk.register_node(&girder::control::NodeId::new(format!("hang{i}")), &[]).await.expect("register");
    }
    // A writer that rewrites the placement table all the time: the node's compare-and-set
    // refreshes keep conflicting.
    let table: Atom<FlockTable> = Atom::new(sk.structures(), TABLE_KEY).expect("atom");
    let conflicts = tokio::spawn(async move {
        let mut epoch = 1_000_000;
        loop {
            epoch += 1;
            let bogus = FlockTable { epoch, ..FlockTable::default() };
            if table.reset(&bogus).await.is_err() {
                tokio::task::yield_now().await;
            }
        }
    });
    let began = Instant::now();
    let mut checks = 0;
    while began.elapsed() < Duration::from_secs(20) {
        // Keep the hanging peers alive, and play the peer that reaps.
        for i in 0..peers {
            let info = NodeInfo {
                id: format!("hang{i}"),
                http: Some(format!("http://{hanging}")),
                heartbeat_ms: 100,
                workers: vec![girder::control::WorkerInfo::default()],
                ..NodeInfo::default()
            };
            sk.heartbeat(&girder::control::NodeId::new(format!("hang{i}")), &info).await.expect("heartbeat");
        }
        let reaped = sk.reap().await.expect("reap");
        assert!(!reaped.iter().any(|n| n.as_str() == "busy"), "the busy node was reaped after {:?}", began.elapsed());
        let live = sk.live_nodes().await.expect("live nodes");
        assert!(live.iter().any(|n| n.id == "busy"), "the busy node is not live after {:?}", began.elapsed());
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    conflicts.abort();
    assert!(checks >= 50, "only {checks} checks in 20 s");
    let stats = node.stats().await;
    assert!(stats.workers.len() == 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_cut_off_from_redis_lets_go_before_anyone_else_can_take_it() {
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let holder_sk = statekeeper(&server, "locks", 3_000).await;
    let other_sk = statekeeper(&server, "locks", 3_000).await;
    let lease = Duration::from_millis(600);
    let lock = Lock::new(holder_sk.structures(), "ledger", lease).expect("lock");
    let guard = lock.try_lock_now().await.expect("reachable").expect("free");
    assert!(guard.is_held());
    server.pause();
    let paused_at = Instant::now();
    // The holder's own clock ends the lease while Redis cannot answer anyone.
    let mut let_go_at = None;
    while paused_at.elapsed() < lease * 3 {
        if !guard.is_held() {
            let_go_at = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let let_go_at = let_go_at.expect("is_held() turned false while Redis was paused");
    assert!(let_go_at.duration_since(paused_at) <= lease, "held for {:?} past a pause", let_go_at - paused_at);
    // Redis comes back; another holder gets the lock once its lease ran out there, which
    // is after the first holder let go.
    server.resume();
    let other = Lock::new(other_sk.structures(), "ledger", lease).expect("lock");
    let taken = other.try_lock(Duration::from_secs(5)).await.expect("reachable").expect("free after the lease");
    let taken_at = Instant::now();
    assert!(let_go_at < taken_at, "the old holder let go at {let_go_at:?}, after the new one took it at {taken_at:?}");
    assert!(
        taken_at.duration_since(paused_at) >= lease - lease / 8,
        "taken {:?} after the pause",
        taken_at - paused_at
    );
    assert!(taken.token() > guard.token(), "fencing tokens grow");
    assert!(!guard.is_held(), "a lease once lost stays lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_lease_lapsed_while_redis_was_frozen_works_again_after() {
    let server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let ttl_ms = 600;
    let sk = statekeeper(&server, "lapse", ttl_ms).await;
    let node = girder::Node::builder()
        .id("lapsing")
        .statekeeper(sk.clone())
        .registry(Registry::with_examples())
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 2))
        .heartbeat_ms(100)
        .start()
        .await
        .expect("node starts");
    let client = node.client().with_deadline(Duration::from_secs(20));
    assert_eq!(girder::examples::fib::call(&client, 20).await.expect("before"), 6765);
    // Frozen well past the lease: by its own clock the node stops claiming.
    server.pause();
    let during = tokio::spawn({
        let client = client.clone();
        async move { girder::examples::fib::call(&client, 30).await }
    });
    tokio::time::sleep(Duration::from_millis(3 * ttl_ms)).await;
    server.resume();
    // Once a heartbeat renews it, the node claims again: what waited and what comes next
    // both complete.
    assert_eq!(during.await.expect("task").expect("the call made during the freeze"), 832_040);
    assert_eq!(girder::examples::fib::call(&client, 31).await.expect("after"), 1_346_269);
    node.shutdown().await;
}
