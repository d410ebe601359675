//! `girder workflow send|get TYPE ID`, `girder workflow list TYPE`: workflow instances
//! through a node's HTTP API.

use anyhow::{bail, Context};

/// Arguments of `girder workflow`.
#[derive(Debug, clap::Args)]
pub struct WorkflowArgs {
    #[command(subcommand)]
    op: WorkflowOp,
    /// The node's base URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7070", env = "GIRDER_NODE", hide_env_values = true)]
    node: String,
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
}

#[derive(Debug, clap::Subcommand)]
enum WorkflowOp {
    /// Send MESSAGE (JSON) to instance ID of workflow type TYPE; prints its sequence id.
    Send {
        /// The workflow type, e.g. `examples/counter`.
        workflow: String,
        /// The instance id (created by its first message).
        id: String,
        /// The message, as JSON (`1`, `'"text"'`, `'{"a": 1}'`).
        message: String,
    },
    /// Print the instance's record as JSON: state, owner, epoch, positions, timers, status.
    Get {
        /// The workflow type.
        workflow: String,
        /// The instance id.
        id: String,
    },
    /// Print how many instances TYPE has, then their ids (up to --limit), one a line.
    List {
        /// The workflow type.
        workflow: String,
        /// At most this many ids (1 to 1,000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// Sends `request` to the node at `base`; its JSON answer, or its error message.
pub(crate) async fn json_answer(request: reqwest::RequestBuilder, base: &str) -> anyhow::Result<serde_json::Value> {
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the girder node at {base} (is `girder node` running there?)"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("reading the node's answer")?;
    if !status.is_success() {
        let message = body["message"].as_str().map_or_else(|| format!("the node answered {status}"), str::to_owned);
        bail!("{message}");
    }
    Ok(body)
}

pub async fn run(args: WorkflowArgs) -> anyhow::Result<()> {
    let client = args.auth.client(reqwest::Client::builder())?;
    let base = args.node.trim_end_matches('/').to_owned();
    let path = |workflow: &str, id: &str| {
        format!("{base}/v1/workflows/{}/{}", crate::cache::segment(workflow), crate::cache::segment(id))
    };
    let request = match &args.op {
        WorkflowOp::Send { workflow, id, message } => {
            let json: serde_json::Value =
                serde_json::from_str(message).with_context(|| format!("the message is not JSON: {message}"))?;
            client.post(path(workflow, id)).json(&json)
        }
        WorkflowOp::Get { workflow, id } => client.get(path(workflow, id)),
        WorkflowOp::List { workflow, limit } => {
            client.get(format!("{base}/v1/workflows/{}", crate::cache::segment(workflow))).query(&[("limit", limit)])
        }
    };
    let body = json_answer(request, &base).await?;
    let out = match args.op {
        WorkflowOp::Send { .. } => body["seq"].to_string(),
        WorkflowOp::Get { .. } => serde_json::to_string_pretty(&body)?,
        WorkflowOp::List { .. } => {
            let ids = body["ids"].as_array().into_iter().flatten().filter_map(|id| id.as_str());
            std::iter::once(body["count"].to_string()).chain(ids.map(str::to_owned)).collect::<Vec<_>>().join("\n")
        }
    };
    println!("{out}");
    Ok(())
}
