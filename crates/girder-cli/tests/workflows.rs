//! Workflows across real `girder node --workflows` processes on a real Redis: counter
//! instances count every message exactly once while nodes are SIGKILLed, SIGTERMed,
//! restarted and added; an owner frozen past its lease cannot commit when it resumes.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::NodeProcess;
use girder::testing::RedisServer;

/// `girder workflow ARGS --node NODE`'s stdout; fails the test when it fails.
fn cli(node: &NodeProcess, args: &[&str]) -> String {
    let out = std::process::Command::new(common::GIRDER)
        .arg("workflow")
        .args(args)
        .args(["--node", &node.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "girder workflow {args:?}: {}", common::text(&out.stderr));
    common::text(&out.stdout)
}

fn start(redis: &str, id: &str) -> NodeProcess {
    NodeProcess::on_redis(redis, id, &["--workers", "1", "--slots", "2", "--workflows"])
}

/// The instance's record over HTTP (`None`: no message handled or claimed yet).
fn record(client: &reqwest::blocking::Client, url: &str, id: &str) -> Option<serde_json::Value> {
    let response = client.get(format!("{url}/v1/workflows/examples%2Fcounter/{id}")).send().unwrap();
    match response.status().as_u16() {
        200 => Some(response.json().unwrap()),
        404 => None,
        other => panic!("GET {id}: {other} {}", response.text().unwrap_or_default()),
    }
}

fn counted(record: &Option<serde_json::Value>) -> u64 {
    record.as_ref().and_then(|r| r["state"]["counts"]["mailbox"].as_u64()).unwrap_or(0)
}

/// Sends `count` messages round-robin over `ids` through `urls`; how many each id got.
/// Every send must be acknowledged (a node that is down is skipped, not counted).
fn send_all(
    client: &reqwest::blocking::Client,
    urls: &[String],
    ids: usize,
    count: usize,
    sent: &mut BTreeMap<String, u64>,
) {
    for i in 0..count {
        let id = format!("c{}", i % ids);
        let body = format!("{i}");
        let ok = urls.iter().cycle().skip(i).take(urls.len()).any(|url| {
            client
                .post(format!("{url}/v1/workflows/examples%2Fcounter/{id}"))
                .body(body.clone())
                .send()
                .is_ok_and(|r| r.status().as_u16() == 202)
        });
        assert!(ok, "no node took message {i}");
        *sent.entry(id).or_default() += 1;
    }
}

/// Waits until every instance counted exactly what was sent to it (at most 60 s); a count
/// above it fails at once.
fn all_counted(client: &reqwest::blocking::Client, url: &str, sent: &BTreeMap<String, u64>) {
    let begun = Instant::now();
    loop {
        let mut behind = None;
        for (id, want) in sent {
            let got = counted(&record(client, url, id));
            assert!(got <= *want, "{id} counted {got} of {want}: a message was applied twice");
            if got < *want {
                behind = behind.or(Some((id.clone(), got, *want)));
            }
        }
        let Some((id, got, want)) = behind else { return };
        assert!(begun.elapsed() < Duration::from_secs(60), "{id} counted {got} of {want}: messages lost");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Nodes that run counters fed by topics `feed-a` and `feed-b` too.
fn start_fed(redis: &str, id: &str) -> NodeProcess {
    let args =
        ["--workers", "1", "--slots", "2", "--workflows", "--counter-topic", "feed-a", "--counter-topic", "feed-b"];
    NodeProcess::on_redis(redis, id, &args)
}

/// The grid's data structures, as the nodes on `redis` see them.
async fn structures(redis: &str) -> girder::structures::Store {
    use girder::Statekeeper;
    let sk = girder::RedisStatekeeper::connect(girder::RedisConfig::new(redis)).await.unwrap();
    sk.structures()
}

/// Sends `count` inputs round-robin over `ids` instances, starting at input `first`: two in
/// five to each topic, one in five to the mailbox, 16 at a time; adds them to `sent` by
/// instance and source.
async fn feed(
    store: &girder::structures::Store,
    first: u64,
    count: u64,
    ids: u64,
    sent: &mut BTreeMap<String, BTreeMap<String, u64>>,
) {
    let retention = girder::structures::Retention { count_max: 1_000_000, age_ms_max: None };
    let inputs: Vec<(String, &str)> = (first..first + count)
        .map(|i| {
            (format!("c{}", (i * 7_919) % ids), ["feed-a", "feed-b", "feed-a", "feed-b", "mailbox"][i as usize % 5])
        })
        .collect();
    for chunk in inputs.chunks(16) {
        let sends = chunk.iter().map(|(id, source)| async move {
            if *source == "mailbox" {
                girder::workflow::send(store, "examples/counter", id, &"m").await.map(|_| ()).map_err(|e| e.to_string())
            } else {
                let message = rmp_serde::to_vec_named(&serde_json::json!({ "id": id })).unwrap();
                store.reliable_publish(source, &message, retention).await.map(|_| ()).map_err(|e| e.to_string())
            }
        });
        for result in futures::future::join_all(sends).await {
            result.unwrap();
        }
        for (id, source) in chunk {
            let source = if *source == "mailbox" { "mailbox".to_owned() } else { format!("topic:{source}") };
            *sent.entry(id.clone()).or_default().entry(source).or_default() += 1;
        }
    }
}

/// Waits until every instance counted exactly what was sent to it, by source (at most
/// 180 s); a count above it fails at once. The instances' records, by id.
async fn all_counted_by_source(
    store: &girder::structures::Store,
    sent: &BTreeMap<String, BTreeMap<String, u64>>,
) -> BTreeMap<String, girder::workflow::Instance> {
    let begun = Instant::now();
    loop {
        let mut behind = None;
        let mut records = BTreeMap::new();
        for (id, want) in sent {
            let Some(instance) = girder::workflow::instance(store, "examples/counter", id).await.unwrap() else {
                behind = behind.or(Some((id.clone(), BTreeMap::new())));
                continue;
            };
            let state: girder::workflow::CounterState =
                instance.state.as_ref().map(|s| rmp_serde::from_slice(s).unwrap()).unwrap_or_default();
            for (source, got) in &state.counts {
                let sent = want.get(source).copied().unwrap_or(0);
                assert!(*got <= sent, "{id} counted {got} from {source} of {sent}: a message was applied twice");
            }
            if &state.counts != want {
                behind = behind.or(Some((id.clone(), state.counts)));
            }
            records.insert(id.clone(), instance);
        }
        let Some((id, got)) = behind else { return records };
        assert!(begun.elapsed() < Duration::from_secs(180), "{id} counted {got:?} of {:?}: messages lost", sent[&id]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The test: 1,000 counters over 3 nodes fed 50,000 messages from two topics and
/// their mailboxes while nodes are SIGKILLed, SIGTERMed and restarted and a 4th joins.
#[test]
fn counters_count_every_input_once_across_kills_drains_restarts_and_a_join() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(structures(&url));
    let mut w1 = start_fed(&url, "w1");
    let _w2 = start_fed(&url, "w2");
    let mut w3 = start_fed(&url, "w3");
    let (ids, per_phase) = (1_000, 12_500);
    let mut sent = BTreeMap::new();
    runtime.block_on(feed(&store, 0, per_phase, ids, &mut sent));
    // SIGKILL mid-stream: w3's instances and forwarders move after its lease.
    w3.kill();
    runtime.block_on(feed(&store, per_phase, per_phase, ids, &mut sent));
    // SIGTERM: w1 stops its steps and leaves; w3 comes back.
    assert!(w1.terminate(Duration::from_secs(30)), "w1 did not exit after SIGTERM");
    let _w3 = start_fed(&url, "w3");
    runtime.block_on(feed(&store, 2 * per_phase, per_phase, ids, &mut sent));
    // A 4th joins.
    let _w4 = start_fed(&url, "w4");
    runtime.block_on(feed(&store, 3 * per_phase, per_phase, ids, &mut sent));
    assert_eq!(sent.values().flat_map(|s| s.values()).sum::<u64>(), 4 * per_phase);
    let records = runtime.block_on(all_counted_by_source(&store, &sent));
    let (count, ids) = runtime.block_on(girder::workflow::list(&store, "examples/counter", 10)).unwrap();
    assert_eq!((count, ids.len()), (ids_count(&sent), 10), "the listing");
    let moves: u64 = records.values().map(|r| r.claims.saturating_sub(1)).sum();
    eprintln!("{moves} ownership changes over {} instances", records.len());
    assert!(moves >= 100, "only {moves} ownership changes");
    let owners: std::collections::BTreeSet<&str> = records.values().map(|r| r.owner.as_str()).collect();
    assert!(owners.len() >= 2, "the instances ended on one node only: {owners:?}");
}

fn ids_count(sent: &BTreeMap<String, BTreeMap<String, u64>>) -> u64 {
    sent.len() as u64
}

/// Timers set before their owner dies fire once, on the new owner.
#[test]
fn a_timer_set_before_its_owner_is_sigkilled_fires_once_on_the_new_owner() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(structures(&url));
    let mut nodes: Vec<(&str, NodeProcess)> = ["t1", "t2", "t3"].into_iter().map(|n| (n, start(&url, n))).collect();
    let ids: Vec<String> = (0..30).map(|i| format!("timed-{i}")).collect();
    for id in &ids {
        let arm = serde_json::json!({ "after_ms": 4_000 });
        runtime.block_on(girder::workflow::send(&store, "examples/counter", id, &arm)).unwrap();
    }
    // Every timer is committed; kill the node that owns the most of them.
    let begun = Instant::now();
    let owners = loop {
        let records: Vec<_> = ids
            .iter()
            .map(|id| runtime.block_on(girder::workflow::instance(&store, "examples/counter", id)).unwrap())
            .collect();
        if records.iter().all(|r| r.as_ref().is_some_and(|r| r.timers.contains_key("t"))) {
            break records.into_iter().flatten().map(|r| r.owner).collect::<Vec<_>>();
        }
        assert!(begun.elapsed() < Duration::from_secs(30), "the timers were never all set");
        std::thread::sleep(Duration::from_millis(50));
    };
    let victim = ["t1", "t2", "t3"].into_iter().max_by_key(|n| owners.iter().filter(|o| o == n).count()).unwrap();
    let orphans: Vec<&String> = ids.iter().zip(&owners).filter(|(_, o)| *o == victim).map(|(id, _)| id).collect();
    assert!(!orphans.is_empty());
    nodes.iter_mut().find(|(name, _)| *name == victim).expect("the victim").1.kill();
    let mut sent: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for id in &ids {
        sent.insert(id.clone(), BTreeMap::from([("mailbox".to_owned(), 1), ("timer:t".to_owned(), 1)]));
    }
    let records = runtime.block_on(all_counted_by_source(&store, &sent));
    for id in &ids {
        let record = &records[id];
        assert!(record.timers.is_empty(), "{id}'s timer is still set after it fired: it could fire again");
    }
    for id in orphans {
        assert_ne!(records[id].owner, victim, "{id} fired on its dead owner");
    }
}

#[test]
fn an_owner_frozen_past_its_lease_cannot_commit_when_it_resumes() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let f1 = start(&url, "f1");
    let f2 = start(&url, "f2");
    // The CLI: send twice, then read the count back.
    for _ in 0..2 {
        let out = cli(&f1, &["send", "examples/counter", "by-cli", "\"hello\""]);
        assert!(out.parse::<u64>().is_ok(), "send printed {out:?}");
    }
    let begun = Instant::now();
    while counted(&record(&client, &f2.url, "by-cli")) < 2 {
        assert!(begun.elapsed() < Duration::from_secs(30), "by-cli never counted 2");
        std::thread::sleep(Duration::from_millis(50));
    }
    let got: serde_json::Value = serde_json::from_str(&cli(&f2, &["get", "examples/counter", "by-cli"])).unwrap();
    assert_eq!((got["state"]["counts"]["mailbox"].as_u64(), got["status"].as_str()), (Some(2), Some("running")));
    let listed = cli(&f1, &["list", "examples/counter"]);
    assert_eq!(listed.lines().collect::<Vec<_>>(), ["1", "by-cli"], "girder workflow list");
    // Metrics: the owner's steps, their latency, and nothing waiting in its mailboxes.
    let owner = got["owner"].as_str().unwrap().to_owned();
    let url = if owner == "f1" { &f1.url } else { &f2.url };
    let metrics = client.get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    let sample = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics:\n{metrics}"))
    };
    assert!(sample("girder_workflow_steps_total{") >= 2.0);
    assert!(sample("girder_workflow_step_duration_seconds_count{") >= 2.0);
    assert!(sample("girder_workflow_instances_owned{") >= 1.0);
    assert_eq!(sample("girder_workflow_lag_messages{node=\"") as u64, 0);
    let (ids, mut sent) = (30, BTreeMap::new());
    send_all(&client, &[f1.url.clone(), f2.url.clone()], ids, 300, &mut sent);
    all_counted(&client, &f2.url, &sent);
    // Freeze f1 past its lease (1.5 s): f2 takes its instances over.
    f1.signal("STOP");
    std::thread::sleep(Duration::from_millis(2_500));
    send_all(&client, std::slice::from_ref(&f2.url), ids, 300, &mut sent);
    all_counted(&client, &f2.url, &sent);
    // f1 resumes with steps it may have had in hand: none of them may land.
    f1.signal("CONT");
    send_all(&client, &[f1.url.clone(), f2.url.clone()], ids, 300, &mut sent);
    all_counted(&client, &f2.url, &sent);
    std::thread::sleep(Duration::from_millis(500));
    for (id, want) in &sent {
        assert_eq!(counted(&record(&client, &f2.url, id)), *want, "{id} after f1 resumed");
    }
}
