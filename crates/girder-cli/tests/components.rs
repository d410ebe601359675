//! Components across real `girder node --components` processes on a real Redis: the
//! singleton `examples/ticker` runs on one node at a time (its fenced counter says so)
//! across SIGKILL, SIGSTOP and SIGTERM, restarts elsewhere within its lease, and the
//! lifecycle events report what happened.

mod common;

use std::time::{Duration, Instant};

use common::NodeProcess;
use girder::component::{events, Lifecycle, TickerState, SINGLETON_LEASE, TICKER_KEY};
use girder::structures::Kind;
use girder::testing::RedisServer;

fn start(redis: &str, id: &str) -> NodeProcess {
    NodeProcess::on_redis(redis, id, &["--workers", "1", "--slots", "1", "--components"])
}

struct Grid {
    runtime: tokio::runtime::Runtime,
    store: girder::structures::Store,
}

impl Grid {
    fn on(redis: &str) -> Grid {
        use girder::Statekeeper;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let sk = runtime.block_on(girder::RedisStatekeeper::connect(girder::RedisConfig::new(redis))).unwrap();
        Grid { store: sk.structures(), runtime }
    }

    fn ticker(&self) -> TickerState {
        let found = self.runtime.block_on(self.store.value_get(Kind::Atom, TICKER_KEY)).unwrap();
        found.map(|v| rmp_serde::from_slice(&v.bytes).unwrap()).unwrap_or_default()
    }

    /// Waits until the ticker ticks on a node other than `not` (at most `within`): the
    /// new holder and how long it took.
    fn ticking_elsewhere(&self, not: &str, within: Duration) -> (String, Duration) {
        let begun = Instant::now();
        loop {
            let state = self.ticker();
            let holder = state.holdings.last().map(|(_, node, _)| node.clone()).unwrap_or_default();
            let ticked_since = state.holdings.last().is_some_and(|(_, _, first)| state.ticks > *first + 1);
            if !holder.is_empty() && holder != not && ticked_since {
                return (holder, begun.elapsed());
            }
            assert!(
                begun.elapsed() < within,
                "the ticker did not tick elsewhere than {not:?} within {within:?}: {state:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn the_singleton_runs_on_one_node_at_a_time_across_kills_and_restarts_within_its_lease() {
    let redis = RedisServer::start(false).unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let grid = Grid::on(&url);
    let mut nodes: Vec<(String, NodeProcess)> =
        ["s1", "s2", "s3"].iter().map(|n| (n.to_string(), start(&url, n))).collect();
    let (first, _) = grid.ticking_elsewhere("", Duration::from_secs(30));
    // Moving needs the lease to run out (a dead or frozen holder says nothing), plus the
    // supervisor's look and the first tick; the slack is for a loaded machine.
    let bound = SINGLETON_LEASE + Duration::from_millis(1_500);
    // SIGKILL the holder.
    let at = nodes.iter().position(|(n, _)| *n == first).unwrap();
    nodes[at].1.kill();
    let (second, took) = grid.ticking_elsewhere(&first, bound);
    assert!(took <= bound, "restarted after {took:?}");
    // SIGSTOP the next past its lease, then let it go on: it must not tick over the new one.
    let at = nodes.iter().position(|(n, _)| *n == second).unwrap();
    nodes[at].1.signal("STOP");
    let (third, _) = grid.ticking_elsewhere(&second, bound);
    nodes[at].1.signal("CONT");
    let before = grid.ticker();
    // Ticks go on from the new holder only: give the resumed one time to try.
    let begun = Instant::now();
    while grid.ticker().ticks < before.ticks + 50 {
        assert!(begun.elapsed() < Duration::from_secs(20), "the ticker stalled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = grid.ticker();
    assert_eq!(after.holdings.last().map(|h| h.1.as_str()), Some(third.as_str()), "{after:?}");
    // SIGTERM the holder: it gives the singleton up at once.
    let at = nodes.iter().position(|(n, _)| *n == third).unwrap();
    assert!(nodes[at].1.terminate(Duration::from_secs(30)), "{third} did not exit after SIGTERM");
    let (fourth, took) = grid.ticking_elsewhere(&third, bound);
    assert!(took < SINGLETON_LEASE, "a drained holder's singleton took {took:?} to move");
    // The killed node comes back.
    nodes.push((first.clone(), start(&url, &first)));
    let state = grid.ticker();
    // One holder at a time: every holding has a newer token than the one before, began
    // after it (counted ticks only grow), and on another node.
    for pair in state.holdings.windows(2) {
        let ((t1, n1, c1), (t2, n2, c2)) = (&pair[0], &pair[1]);
        assert!(t2 > t1 && c2 >= c1 && n2 != n1, "holdings out of order: {:?}", state.holdings);
    }
    let holders: Vec<&str> = state.holdings.iter().map(|h| h.1.as_str()).collect();
    assert!(holders.ends_with(&[first.as_str(), second.as_str(), third.as_str(), fourth.as_str()]), "{holders:?}");
    // The events say the same.
    let begun = Instant::now();
    let wanted = |all: &[Lifecycle]| {
        let moved = all.iter().filter(|e| matches!(e, Lifecycle::ComponentMoved { .. })).count();
        // Killed, and frozen past its lease: both died, as far as the grid can tell.
        let died = all.contains(&Lifecycle::NodeDied { node: first.clone() })
            && all.contains(&Lifecycle::NodeDied { node: second.clone() });
        let rejoined = all.iter().filter(|e| **e == Lifecycle::NodeJoined { node: first.clone() }).count() >= 2;
        let gone = all
            .iter()
            .any(|e| matches!(e, Lifecycle::NodeLeft { node } | Lifecycle::NodeDied { node } if *node == third));
        moved >= 3 && died && rejoined && gone
    };
    loop {
        let all: Vec<Lifecycle> = grid
            .runtime
            .block_on(events::read(&grid.store, 0, 1_000, 0))
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        if wanted(&all) {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(20), "the events do not tell what happened: {all:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The same from the shell: one JSON object a line.
    let (_, live) = nodes.iter().find(|(n, _)| *n == fourth).expect("the holder");
    let out = std::process::Command::new(common::GIRDER).args(["events", "--node", &live.url]).output().unwrap();
    assert!(out.status.success(), "girder events: {}", common::text(&out.stderr));
    let lines: Vec<serde_json::Value> =
        common::text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let moved = lines.iter().filter(|e| e["event"] == "component_moved" && e["component"] == TICKER_KEY).count();
    assert!(moved >= 3, "girder events printed {} moves of the ticker", moved);
    assert!(lines.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()), "events out of order");
}
