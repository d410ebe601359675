//! `girder status`: the grid's live nodes, from any node's HTTP API or from the statekeeper.

use anyhow::Context;
use girder::control::NodeInfo;
use girder::ResultStoreConfig;

/// Arguments of `girder status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Ask this node (its base URL).
    #[arg(
        long,
        default_value = "http://127.0.0.1:7070",
        env = "GIRDER_NODE",
        hide_env_values = true,
        conflicts_with = "statekeeper"
    )]
    node: String,
    /// Read the statekeeper directly instead (a redis:// URL).
    #[arg(long)]
    statekeeper: Option<String>,
    #[command(flatten)]
    password: crate::serve::PasswordArgs,
    /// The grid's namespace, with --statekeeper.
    #[arg(long, default_value = "girder")]
    namespace: String,
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let nodes: Vec<NodeInfo> = match &args.statekeeper {
        Some(spec) => {
            let statekeeper = crate::serve::open_statekeeper_with(
                spec,
                &args.password,
                &args.namespace,
                ResultStoreConfig::default(),
                3_000,
            )
            .await?;
            statekeeper.live_nodes().await?
        }
        None => {
            let base = args.node.trim_end_matches('/');
            let client = args.auth.client(reqwest::Client::builder())?;
            let body: serde_json::Value = client
                .get(format!("{base}/v1/status"))
                .send()
                .await
                .with_context(|| format!("cannot reach the girder node at {base} (is `girder node` running there?)"))?
                .json()
                .await
                .context("the node's status is not JSON")?;
            serde_json::from_value(body["nodes"].clone()).context("the node's status has no node list")?
        }
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    outln!("{} live node(s)", nodes.len());
    outln!(
        "{:<14} {:<8} {:<16} {:>5} {:>5} {:>6} {:>7} {:>6} {:>9} {:>11} {:>9} {:>6} {:>10}  heartbeat",
        "node",
        "health",
        "pools",
        "cpus",
        "load",
        "slots",
        "busy",
        "queued",
        "flocks",
        "evaluations",
        "items",
        "ready",
        "stored"
    );
    for node in &nodes {
        let (busy, slots) = node.slots();
        let queued: u64 = node.workers.iter().map(|w| w.queue_len).sum();
        let health =
            serde_json::to_value(node.health).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let store = StoreColumns::of(node);
        outln!(
            "{:<14} {:<8} {:<16} {:>5} {:>5.2} {:>6} {:>7} {:>6} {:>9} {:>11} {:>9} {:>6} {:>10}  {} ms ago",
            node.id,
            health,
            if node.pools.is_empty() { "-".to_owned() } else { node.pools.join(",") },
            node.cpus,
            node.load_1m,
            slots,
            busy,
            queued,
            node.flocks,
            node.evaluations,
            store.items,
            store.ready,
            store.stored,
            node.heartbeat_age_ms
        );
    }
    Ok(())
}

/// A node's bucket store in the table: items, flocks held ready (serving reads; `+N` more
/// being copied in) and bytes stored; `-` for a node that runs none.
struct StoreColumns {
    items: String,
    ready: String,
    stored: String,
}

impl StoreColumns {
    fn of(node: &NodeInfo) -> StoreColumns {
        let Some(report) = &node.store else {
            return StoreColumns { items: "-".into(), ready: "-".into(), stored: "-".into() };
        };
        let ready: u32 = report.ready.iter().map(|byte| byte.count_ones()).sum();
        let ready = if report.syncing > 0 { format!("{ready}+{}", report.syncing) } else { ready.to_string() };
        StoreColumns { items: report.items.to_string(), ready, stored: human_bytes(report.bytes) }
    }
}

/// `bytes` in binary units, three significant digits at most: `512 B`, `1.50 MiB`, `20.0 GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if value < 10.0 => format!("{value:.2} {}", UNITS[unit]),
        _ if value < 100.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.0} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.00 KiB");
        assert_eq!(human_bytes(3 << 19), "1.50 MiB");
        assert_eq!(human_bytes(20 << 30), "20.0 GiB");
        assert_eq!(human_bytes(1000 << 20), "1000 MiB");
        assert_eq!(human_bytes(u64::MAX), "16384 PiB");
    }
}
