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
        "{:<14} {:<8} {:<16} {:>5} {:>5} {:>6} {:>7} {:>6} {:>9} {:>11}  heartbeat",
        "node",
        "health",
        "pools",
        "cpus",
        "load",
        "slots",
        "busy",
        "queued",
        "flocks",
        "evaluations"
    );
    for node in &nodes {
        let (busy, slots) = node.slots();
        let queued: u64 = node.workers.iter().map(|w| w.queue_len).sum();
        let health =
            serde_json::to_value(node.health).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        outln!(
            "{:<14} {:<8} {:<16} {:>5} {:>5.2} {:>6} {:>7} {:>6} {:>9} {:>11}  {} ms ago",
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
            node.heartbeat_age_ms
        );
    }
    Ok(())
}
