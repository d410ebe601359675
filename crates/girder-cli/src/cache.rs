//! `girder cache get|set|append|delete KEY [VALUE]`: the cache through a node's HTTP API.

use std::io::Write;

use anyhow::{bail, Context};

/// Arguments of `girder cache`.
#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    op: CacheOp,
    /// The node's base URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7070", env = "GIRDER_NODE", hide_env_values = true)]
    node: String,
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
}

#[derive(Debug, clap::Subcommand)]
enum CacheOp {
    /// Print KEY's value (raw bytes) on stdout.
    Get {
        /// The key.
        key: String,
    },
    /// Set KEY to VALUE.
    Set {
        /// The key.
        key: String,
        /// The value (stored as the UTF-8 bytes given).
        value: String,
        /// Expire it after this many milliseconds.
        #[arg(long)]
        ttl_ms: Option<u64>,
    },
    /// Append VALUE to KEY's value.
    Append {
        /// The key.
        key: String,
        /// The bytes to append.
        value: String,
    },
    /// Delete KEY.
    Delete {
        /// The key.
        key: String,
    },
}

/// `text` as one URL path segment: everything but unreserved characters percent-escaped.
pub(crate) fn segment(text: &str) -> String {
    let mut escaped = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => escaped.push(byte as char),
            other => escaped.push_str(&format!("%{other:02X}")),
        }
    }
    escaped
}

fn url(base: &str, key: &str) -> String {
    format!("{}/v1/cache/{}", base.trim_end_matches('/'), segment(key))
}

pub async fn run(args: CacheArgs) -> anyhow::Result<()> {
    let client = args.auth.client(reqwest::Client::builder())?;
    let base = args.node.trim_end_matches('/').to_owned();
    let request = match &args.op {
        CacheOp::Get { key } => client.get(url(&base, key)),
        CacheOp::Set { key, value, ttl_ms } => {
            let mut target = url(&base, key);
            if let Some(ttl) = ttl_ms {
                target.push_str(&format!("?ttl_ms={ttl}"));
            }
            client.put(target).body(value.clone())
        }
        CacheOp::Append { key, value } => client.post(url(&base, key)).body(value.clone()),
        CacheOp::Delete { key } => client.delete(url(&base, key)),
    };
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the girder node at {base} (is `girder node` running there?)"))?;
    let status = response.status();
    let body = response.bytes().await.context("reading the node's answer")?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("the node answered {status}"));
        bail!("{message}");
    }
    if let CacheOp::Get { .. } = args.op {
        std::io::stdout().write_all(&body).context("writing the value")?;
    }
    Ok(())
}
