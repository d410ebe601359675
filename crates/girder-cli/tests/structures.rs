//! Data structures across real processes on a real Redis: atoms under contention, locks
//! with fencing and dead holders, reliable topics across a subscriber's restart, and the
//! near cache's staleness bound.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{text, NodeProcess, GIRDER};
use girder::structures::{Atom, List, Lock, ReliableTopic, Retention, Store};
use girder::testing::RedisServer;
use girder::{RedisConfig, RedisStatekeeper, Statekeeper};

async fn store(url: &str) -> Store {
    RedisStatekeeper::connect(RedisConfig::new(url)).await.expect("connects").structures()
}

fn ds(url: &str, args: &[&str]) -> Child {
    Command::new(GIRDER)
        .arg("ds")
        .args(args)
        .args(["--statekeeper", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("girder ds starts")
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().expect("girder ds ends");
    assert!(out.status.success(), "girder ds failed: {}", text(&out.stderr));
    text(&out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_swap_one_atom_two_thousand_times() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let swappers: Vec<Child> =
        (0..2).map(|_| ds(&url, &["atom-add", "hits", "--times", "1000", "--concurrency", "1000"])).collect();
    for swapper in swappers {
        finish(swapper);
    }
    let atom: Atom<u64> = Atom::new(store(&url).await, "hits").unwrap();
    assert_eq!(atom.get().await.unwrap(), Some(2_000), "every swap counted exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_excludes_fences_and_outlives_a_killed_holder() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let args = ["lock-contend", "L", "--contenders", "2", "--rounds", "10", "--hold-ms", "3"];
    let contenders: Vec<Child> = (0..2).map(|_| ds(&url, &args)).collect();
    for contender in contenders {
        assert_eq!(finish(contender), "violations 0", "never two holders at once");
    }
    let tokens: List<u64> = List::new(store(&url).await, "L:tokens").unwrap();
    let tokens = tokens.range(0, -1).await.unwrap();
    assert_eq!(tokens.len(), 40, "4 contenders x 10 rounds");
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "fencing tokens strictly increase: {tokens:?}");

    // A holder killed with SIGKILL frees the lock within its lease.
    let lease = Duration::from_millis(1_000);
    let mut holder = ds(&url, &["lock-hold", "K", "--lease-ms", "1000"]);
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let held: u64 = line.trim().strip_prefix("held ").and_then(|t| t.parse().ok()).expect("holder reports its token");
    let lock = Lock::new(store(&url).await, "K", lease).unwrap();
    assert!(lock.try_lock_now().await.unwrap().is_none(), "held by the other process");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let killed = Instant::now();
    let guard = lock.try_lock(Duration::from_secs(10)).await.unwrap().expect("free after the lease");
    let waited = killed.elapsed();
    assert!(waited <= lease + Duration::from_millis(500), "freed {waited:?} after the kill (lease {lease:?})");
    assert!(guard.token() > held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_subscriber_misses_no_message() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let total = 10_000u64;
    let topic: ReliableTopic<u64> =
        ReliableTopic::new(store(&url).await, "events", Retention { count_max: 100_000, age_ms_max: None }).unwrap();
    topic.publish(&0).await.unwrap(); // seq 1: the topic exists before the subscriber starts
    let mut subscriber = ds(&url, &["topic-subscribe", "events", "--after", "1"]);
    let publisher = tokio::spawn(async move {
        for n in 1..=total {
            topic.publish(&n).await.unwrap();
        }
    });
    // Read until the subscriber has seen a good part of the stream, then kill it.
    let mut seen = BTreeSet::new();
    let mut last = 1;
    let mut lines = BufReader::new(subscriber.stdout.take().unwrap()).lines();
    while seen.len() < 2_000 {
        let line = lines.next().expect("the subscriber prints").unwrap();
        let (seq, value) = line.split_once(' ').unwrap();
        let (seq, value): (u64, u64) = (seq.parse().unwrap(), value.parse().unwrap());
        assert_eq!(seq, value + 1, "sequence ids follow publication order");
        seen.insert(value);
        last = seq;
    }
    subscriber.kill().unwrap();
    subscriber.wait().unwrap();
    publisher.await.unwrap();
    // Restarted from the last sequence id it printed, it reads the rest.
    let rest = (total + 1 - last).to_string();
    let resumed = ds(&url, &["topic-subscribe", "events", "--after", &last.to_string(), "--count", &rest]);
    for line in finish(resumed).lines() {
        let value: u64 = line.split_once(' ').unwrap().1.parse().unwrap();
        seen.insert(value);
    }
    assert_eq!(seen.len() as u64, total, "no message of {total} missed");
    assert_eq!(seen.first(), Some(&1));
    assert_eq!(seen.last(), Some(&total));
}

#[test]
fn near_caches_serve_a_new_value_within_the_bound() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let args = |id: &'static str| vec!["--statekeeper", &url, "--id", id, "--workers", "1", "--slots", "1"];
    let writer = NodeProcess::start(&args("writer").iter().map(|s| &**s).collect::<Vec<_>>());
    let reader = NodeProcess::start(&args("reader").iter().map(|s| &**s).collect::<Vec<_>>());
    let cache = |node: &NodeProcess, op: &[&str]| {
        Command::new(GIRDER).arg("cache").args(op).args(["--node", &node.url]).output().unwrap()
    };
    assert!(cache(&writer, &["set", "greeting", "old"]).status.success());
    for _ in 0..3 {
        assert_eq!(text(&cache(&reader, &["get", "greeting"]).stdout), "old"); // now near-cached on the reader
    }
    let out = cache(&writer, &["set", "greeting", "new"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = Instant::now();
    assert_eq!(text(&cache(&writer, &["get", "greeting"]).stdout), "new", "the writer reads its own write");
    loop {
        if text(&cache(&reader, &["get", "greeting"]).stdout) == "new" {
            break;
        }
        assert!(written.elapsed() < Duration::from_secs(5), "the reader still serves the old value");
    }
    let stale = written.elapsed();
    eprintln!("the other node served the new value {stale:?} after the write");
    assert!(stale < Duration::from_millis(2_000), "beyond the near cache's bound: {stale:?}");

    // Wrong kinds and over-size values are refused over HTTP, leaving the data as it was.
    let out = cache(&writer, &["append", "greeting", "!"]);
    assert!(out.status.success());
    assert_eq!(text(&cache(&reader, &["get", "greeting"]).stdout).trim_end_matches('!'), "new");
    let out = cache(&writer, &["get", "missing"]);
    assert!(!out.status.success() && text(&out.stderr).contains("no cache entry"), "{}", text(&out.stderr));
}

#[test]
fn structures_reject_bad_input_over_http() {
    let node = NodeProcess::start(&[
        "--workers",
        "1",
        "--slots",
        "1",
        "--cache-value-max-bytes",
        "64",
        "--cache-compression",
        "none",
    ]);
    let put = |key: &str, body: &str| {
        Command::new(GIRDER).args(["cache", "set", key, body, "--node", &node.url]).output().unwrap()
    };
    assert!(put("small", "fits").status.success());
    let out = put("small", &"x".repeat(100));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("limit is 64"), "{}", text(&out.stderr));
    let out = Command::new(GIRDER).args(["cache", "get", "small", "--node", &node.url]).output().unwrap();
    assert_eq!(text(&out.stdout), "fits", "the refused write changed nothing");
}
