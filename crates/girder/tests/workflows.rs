//! Workflows with several nodes in one process on one embedded statekeeper: every message
//! handled exactly once while ownership moves, a panicking message parks only its
//! instance. (The multi-process kill tests are in girder-cli.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use girder::workflow::{self, CounterState, Status, WorkflowRuntime, Workflows, MAILBOX};
use girder::{Embedded, EmbeddedConfig, Node, PoolSpec, Statekeeper, WorkerSpec};

async fn node(sk: &Arc<dyn Statekeeper>, id: &str) -> (Node, WorkflowRuntime) {
    node_with(sk, id, Workflows::new().with_examples()).await
}

async fn node_with(sk: &Arc<dyn Statekeeper>, id: &str, workflows: Workflows) -> (Node, WorkflowRuntime) {
    let node = Node::builder()
        .id(id)
        .statekeeper(sk.clone())
        .heartbeat_ms(50)
        .pool(PoolSpec::new("main"))
        .workers(WorkerSpec::new("main", 1, 1))
        .start()
        .await
        .unwrap_or_else(|e| panic!("node {id} starts: {e}"));
    let runtime = WorkflowRuntime::start(&node, workflows);
    (node, runtime)
}

fn grid() -> Arc<dyn Statekeeper> {
    Arc::new(Embedded::new(EmbeddedConfig { node_ttl_ms: 1_000, ..EmbeddedConfig::default() }))
}

/// The instance's count of mailbox messages (0 before its first step).
async fn count(sk: &Arc<dyn Statekeeper>, id: &str) -> u64 {
    let Some(instance) = workflow::instance(&sk.structures(), "examples/counter", id).await.unwrap() else {
        return 0;
    };
    let Some(state) = instance.state else { return 0 };
    let state: CounterState = rmp_serde::from_slice(&state).unwrap();
    state.counts.get(MAILBOX).copied().unwrap_or(0)
}

/// The instance's counts by source (empty before its first step).
async fn counts(sk: &Arc<dyn Statekeeper>, id: &str) -> BTreeMap<String, u64> {
    let Some(instance) = workflow::instance(&sk.structures(), "examples/counter", id).await.unwrap() else {
        return BTreeMap::new();
    };
    let Some(state) = instance.state else { return BTreeMap::new() };
    rmp_serde::from_slice::<CounterState>(&state).unwrap().counts
}

/// Waits until every instance of `want` counted exactly what it lists, by source (at most
/// 60 s); panics at once when one counted more than it was sent.
async fn all_counted_by_source(sk: &Arc<dyn Statekeeper>, want: &BTreeMap<String, BTreeMap<String, u64>>) {
    let begun = Instant::now();
    loop {
        let mut behind = None;
        for (id, wanted) in want {
            let got = counts(sk, id).await;
            for (source, n) in &got {
                let sent = wanted.get(source).copied().unwrap_or(0);
                assert!(*n <= sent, "{id} counted {n} messages from {source} of {sent}: one was handled twice");
            }
            if &got != wanted && behind.is_none() {
                behind = Some((id.clone(), got));
            }
        }
        let Some((id, got)) = behind else { return };
        assert!(begun.elapsed() < Duration::from_secs(60), "{id} counted {got:?}, not {:?}", want[&id]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every instance of `sent` counted what was sent to it (at most 60 s);
/// panics naming the first that did not, or one that counted more.
async fn all_counted(sk: &Arc<dyn Statekeeper>, sent: &BTreeMap<String, u64>) {
    let begun = Instant::now();
    loop {
        let mut behind = None;
        for (id, want) in sent {
            let got = count(sk, id).await;
            assert!(got <= *want, "{id} counted {got} of {want} messages: one was handled twice");
            if got < *want && behind.is_none() {
                behind = Some((id.clone(), got, *want));
            }
        }
        let Some((id, got, want)) = behind else { return };
        assert!(begun.elapsed() < Duration::from_secs(60), "{id} counted {got} of {want} messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `done` every 5 ms for at most 20 s.
async fn wait_for(done: impl Fn() -> bool, what: &str) {
    let begun = Instant::now();
    while !done() {
        assert!(begun.elapsed() < Duration::from_secs(20), "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_counted_once_while_nodes_leave_and_join() {
    let sk = grid();
    let (a, ra) = node(&sk, "a").await;
    let (b, rb) = node(&sk, "b").await;
    let (c, rc) = node(&sk, "c").await;
    for (runtime, name) in [(&ra, "a"), (&rb, "b"), (&rc, "c")] {
        wait_for(|| runtime.stats().flocks_owned > 0, &format!("{name} never took a flock")).await;
    }
    let store = sk.structures();
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    let total = 3_000u64;
    let mut d = None;
    for i in 0..total {
        let id = format!("counter-{}", (i * 7919) % 150);
        workflow::send(&store, "examples/counter", &id, &i).await.unwrap();
        *sent.entry(id).or_default() += 1;
        if i == total / 3 {
            // c leaves mid-run, once it has handled some: its flocks move to the others.
            wait_for(|| rc.stats().steps > 0, "c never handled a message").await;
            rc.shutdown();
            c.shutdown().await;
        }
        if i == 2 * total / 3 {
            let (dn, dr) = node(&sk, "d").await;
            wait_for(|| dr.stats().flocks_owned > 0, "d never took a flock").await;
            d = Some((dn, dr));
        }
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    all_counted(&sk, &sent).await;
    assert!(d.as_ref().is_some_and(|(_, r)| r.stats().steps > 0), "d, which joined, handled nothing");
    let steps: u64 =
        [&ra, &rb, &rc].iter().map(|r| r.stats().steps).sum::<u64>() + d.as_ref().map_or(0, |(_, r)| r.stats().steps);
    assert!(steps >= total, "{steps} steps for {total} messages");
    for (n, r) in [(a, ra), (b, rb)].into_iter().chain(d) {
        r.shutdown();
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_message_parks_its_instance_and_the_others_go_on() {
    let sk = grid();
    let (a, ra) = node(&sk, "a").await;
    let store = sk.structures();
    for i in 0..3u64 {
        workflow::send(&store, "examples/counter", "sick", &i).await.unwrap();
    }
    workflow::send(&store, "examples/counter", "sick", &"panic").await.unwrap();
    for i in 0..5u64 {
        workflow::send(&store, "examples/counter", "sick", &i).await.unwrap();
        workflow::send(&store, "examples/counter", "well", &i).await.unwrap();
    }
    let sent = BTreeMap::from([("well".to_owned(), 5)]);
    all_counted(&sk, &sent).await;
    let begun = Instant::now();
    let sick = loop {
        let sick = workflow::instance(&store, "examples/counter", "sick").await.unwrap().unwrap();
        if matches!(sick.status, Status::Parked { .. }) {
            break sick;
        }
        assert!(begun.elapsed() < Duration::from_secs(30), "sick never parked: {:?}", sick.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Status::Parked { error, seq, .. } = &sick.status else { unreachable!() };
    assert!(error.contains("panicked"), "{error}");
    assert_eq!(sick.handled, 3, "the messages before the panic were handled, none after");
    assert_eq!(sick.positions.get(MAILBOX), Some(&(seq - 1)), "the failed message's position was not consumed");
    assert_eq!(count(&sk, "sick").await, 3);
    assert!(ra.stats().handler_errors >= u64::from(workflow::STEP_ATTEMPTS_MAX));
    ra.shutdown();
    a.shutdown().await;
}

/// Two topics, mailboxes, sends between instances and timers, while a node leaves and
/// another joins: every instance counts each input once, by source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_sends_and_timers_reach_each_instance_once_while_ownership_moves() {
    let sk = grid();
    let types =
        || Workflows::new().with_examples().with_counter_topic("feed-a").unwrap().with_counter_topic("feed-b").unwrap();
    let (a, ra) = node_with(&sk, "a", types()).await;
    let (b, rb) = node_with(&sk, "b", types()).await;
    for (runtime, name) in [(&ra, "a"), (&rb, "b")] {
        wait_for(|| runtime.stats().flocks_owned > 0, &format!("{name} never took a flock")).await;
    }
    let store = sk.structures();
    let ids = 20;
    let mut want: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let retention = girder::structures::Retention { count_max: 100_000, age_ms_max: None };
    let mut c = None;
    for i in 0..1_000u64 {
        let id = format!("c{}", (i * 7) % ids);
        let topic = if i % 3 == 0 { "feed-b" } else { "feed-a" };
        let message = rmp_serde::to_vec_named(&serde_json::json!({ "id": id, "i": i })).unwrap();
        store.reliable_publish(topic, &message, retention).await.unwrap();
        *want.entry(id.clone()).or_default().entry(format!("topic:{topic}")).or_default() += 1;
        if i < ids {
            // Each counter sets a timer and sends to its peer, through its mailbox.
            let id = format!("c{i}");
            workflow::send(&store, "examples/counter", &id, &serde_json::json!({ "after_ms": 300 })).await.unwrap();
            let peer = format!("peer{i}");
            workflow::send(&store, "examples/counter", &id, &serde_json::json!({ "send_to": peer })).await.unwrap();
            let counts = want.entry(id.clone()).or_default();
            *counts.entry(MAILBOX.to_owned()).or_default() += 2;
            counts.insert("timer:t".to_owned(), 1);
            want.entry(peer).or_default().insert(format!("wf:examples/counter/{id}"), 1);
        }
        if i == 400 {
            // a leaves (with its timers and forwarders), c joins.
            ra.shutdown();
            a.shutdown().await;
            let (cn, cr) = node_with(&sk, "c", types()).await;
            wait_for(|| cr.stats().flocks_owned > 0, "c never took a flock").await;
            c = Some((cn, cr));
        }
    }
    all_counted_by_source(&sk, &want).await;
    let (cn, cr) = c.expect("c joined");
    let fired = rb.stats().timers_fired + cr.stats().timers_fired + ra.stats().timers_fired;
    assert!(fired >= ids, "{fired} timers fired of {ids}");
    for (n, r) in [(b, rb), (cn, cr)] {
        r.shutdown();
        n.shutdown().await;
    }
}
