//! `girder call`: one function call against a running node's HTTP API.

use std::time::Duration;

use anyhow::{bail, Context};

/// Arguments of `girder call`.
#[derive(Debug, clap::Args)]
pub struct CallArgs {
    /// The function, e.g. `examples/fib`.
    function: String,
    /// The arguments, each one JSON value: `90`, `'"text"'`, `'[1,2]'`.
    args: Vec<String>,
    /// The node's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "GIRDER_NODE", hide_env_values = true)]
    node: String,
    /// Give up after this many milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Run on a node that owns this key when one has a free slot.
    #[arg(long, conflicts_with = "bucket")]
    affinity: Option<String>,
    /// Run on a node that holds this bucket of the store, where the function reads it
    /// without the network.
    #[arg(long)]
    bucket: Option<String>,
    /// Most new requests the call's tree may create (at most the node's limit).
    #[arg(long)]
    requests_max: Option<u64>,
    /// Deepest the call's tree may nest (at most the node's limit).
    #[arg(long)]
    depth_max: Option<u32>,
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
}

/// The command line's arguments, each one JSON value.
pub(crate) fn json_args(args: &[String]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut values = Vec::with_capacity(args.len());
    for (index, text) in args.iter().enumerate() {
        let value: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("argument {} ({text:?}) is not JSON; quote strings as '\"{text}\"'", index + 1))?;
        values.push(value);
    }
    Ok(values)
}

/// Sends `request` to the node at `base` and returns its JSON answer; an error answer
/// becomes its message.
pub(crate) async fn send_json(request: reqwest::RequestBuilder, base: &str) -> anyhow::Result<serde_json::Value> {
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the girder node at {base} (is `girder node` running there?)"))?;
    let status = response.status();
    let body: serde_json::Value =
        response.json().await.with_context(|| format!("the node at {base} answered {status} without a JSON body"))?;
    if status.is_success() {
        return Ok(body);
    }
    match body.get("message").and_then(|m| m.as_str()) {
        Some(message) => bail!("{message}"),
        None => bail!("the node answered {status}: {body}"),
    }
}

pub async fn run(args: CallArgs) -> anyhow::Result<()> {
    let values = json_args(&args.args)?;
    let base = args.node.trim_end_matches('/');
    let url = format!("{base}/v1/call/{}", args.function);
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(timeout_ms) = args.timeout_ms {
        query.push(("timeout_ms", timeout_ms.to_string()));
    }
    if let Some(key) = &args.affinity {
        query.push(("affinity", key.clone()));
    }
    if let Some(bucket) = &args.bucket {
        query.push(("bucket", bucket.clone()));
    }
    if let Some(max) = args.requests_max {
        query.push(("requests_max", max.to_string()));
    }
    if let Some(max) = args.depth_max {
        query.push(("depth_max", max.to_string()));
    }
    // The node enforces the deadline; the client waits a little longer to hear about it.
    // Without one, the node's default deadline (`--http-deadline-ms`, 300,000) applies; a
    // node configured longer still answers, as this waits up to the longest deadline.
    let client_timeout = Duration::from_millis(args.timeout_ms.unwrap_or(3_600_000).saturating_add(5_000));
    let client = args.auth.client(reqwest::Client::builder().timeout(client_timeout))?;
    let request = client.post(&url).query(&query).json(&serde_json::Value::Array(values));
    let body = send_json(request, base).await?;
    outln!("{body}");
    Ok(())
}
