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

#[test]
fn counters_count_every_message_once_across_kills_drains_restarts_and_a_join() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let mut w1 = start(&url, "w1");
    let w2 = start(&url, "w2");
    let mut w3 = start(&url, "w3");
    let (ids, mut sent) = (60, BTreeMap::new());
    let urls = |nodes: &[&NodeProcess]| nodes.iter().map(|n| n.url.clone()).collect::<Vec<_>>();
    send_all(&client, &urls(&[&w1, &w2, &w3]), ids, 600, &mut sent);
    // SIGKILL mid-stream: w3's instances move after its lease.
    w3.kill();
    send_all(&client, &urls(&[&w1, &w2]), ids, 600, &mut sent);
    // SIGTERM: w1 stops its steps and leaves; w3 comes back; w4 joins.
    assert!(w1.terminate(Duration::from_secs(30)), "w1 did not exit after SIGTERM");
    let w3 = start(&url, "w3");
    send_all(&client, &urls(&[&w2, &w3]), ids, 600, &mut sent);
    let w4 = start(&url, "w4");
    send_all(&client, &urls(&[&w2, &w3, &w4]), ids, 600, &mut sent);
    all_counted(&client, &w4.url, &sent);
    let owners: std::collections::BTreeSet<String> = sent
        .keys()
        .filter_map(|id| record(&client, &w2.url, id).and_then(|r| r["owner"].as_str().map(str::to_owned)))
        .collect();
    assert!(owners.len() >= 2, "the instances ended on one node only: {owners:?}");
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
