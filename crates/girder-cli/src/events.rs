//! `girder events [--after N] [--follow]`: the grid's lifecycle events through a node, one
//! JSON object a line (nodes joining, leaving, dying; components starting, stopping,
//! moving).

/// Events asked for at once.
const PAGE: u64 = 1_000;
/// How long one request waits for an event while following.
const FOLLOW_WAIT_MS: u64 = 5_000;

/// Arguments of `girder events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Print the events after this sequence id (0: every event kept).
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Keep waiting for new events until interrupted.
    #[arg(long)]
    follow: bool,
    /// The node's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "GIRDER_NODE", hide_env_values = true)]
    node: String,
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
}

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    let client = args.auth.client(reqwest::Client::builder())?;
    let base = args.node.trim_end_matches('/').to_owned();
    let wait_ms = if args.follow { FOLLOW_WAIT_MS } else { 0 };
    let mut after = args.after;
    loop {
        let request =
            client.get(format!("{base}/v1/events")).query(&[("after", after), ("limit", PAGE), ("wait_ms", wait_ms)]);
        let body = crate::workflow::json_answer(request, &base).await?;
        let events = body["events"].as_array().cloned().unwrap_or_default();
        for event in &events {
            outln!("{event}");
        }
        after = body["next"].as_u64().unwrap_or(after);
        if !args.follow && (events.len() as u64) < PAGE {
            return Ok(());
        }
    }
}
