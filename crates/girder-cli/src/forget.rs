//! `girder forget`: forgets memoized results through a running node's HTTP API, so the next
//! call evaluates again.

use std::time::Duration;

/// Arguments of `girder forget`.
#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    /// The function, e.g. `examples/fib`.
    function: String,
    /// The arguments of the result to forget, each one JSON value, as for `girder call`.
    args: Vec<String>,
    /// Forget every memoized result of the function's current version instead.
    #[arg(long, conflicts_with = "args")]
    all: bool,
    /// The node's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "GIRDER_NODE", hide_env_values = true)]
    node: String,
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
}

/// Longest a forget may take: `--all` goes through every result of a version in batches.
const FORGET_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn run(args: ForgetArgs) -> anyhow::Result<()> {
    let values = crate::call::json_args(&args.args)?;
    let base = args.node.trim_end_matches('/');
    let url = format!("{base}/v1/forget/{}", args.function);
    let client = args.auth.client(reqwest::Client::builder().timeout(FORGET_TIMEOUT))?;
    let request = if args.all {
        client.post(&url).query(&[("all", "true")])
    } else {
        client.post(&url).json(&serde_json::Value::Array(values))
    };
    let body = crate::call::send_json(request, base).await?;
    outln!("{body}");
    Ok(())
}
