//! `girder map`: calls a function once per argument array read from stdin, through a
//! running node's `POST /v1/map`, printing each result as an NDJSON line as it completes.

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;

/// Most bytes read from stdin.
const STDIN_BYTES_MAX: u64 = 256 << 20;
/// Longest result line accepted from the node.
const LINE_BYTES_MAX: usize = 64 << 20;
/// Most inputs per map (the node's limit).
const INPUTS_MAX: usize = 100_000;

/// Arguments of `girder map`.
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    /// The function, e.g. `examples/fib`. Its inputs come on stdin, one JSON argument array
    /// per line (`[30]`, `["text", 2]`); blank lines are skipped.
    function: String,
    /// The node's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "GIRDER_NODE", hide_env_values = true)]
    node: String,
    /// Most calls in flight at once (the node caps it at the caller's share of its calls).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Print results in input order instead of as they complete.
    #[arg(long)]
    ordered: bool,
    /// Each call gives up after this many milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Do not draw a progress bar on stderr.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
}

/// The argument arrays on stdin, one per line.
fn read_inputs() -> anyhow::Result<Vec<serde_json::Value>> {
    let mut text = String::new();
    std::io::stdin().take(STDIN_BYTES_MAX + 1).read_to_string(&mut text).context("cannot read stdin")?;
    if text.len() as u64 > STDIN_BYTES_MAX {
        bail!("stdin is over {STDIN_BYTES_MAX} bytes; split the inputs into several maps");
    }
    let mut inputs = Vec::new();
    for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("line {} of stdin is not JSON; write one argument array per line", number + 1))?;
        if !value.is_array() {
            bail!("line {} of stdin is not an argument array (e.g. [30])", number + 1);
        }
        inputs.push(value);
    }
    if inputs.len() > INPUTS_MAX {
        bail!("{} inputs; a map takes at most {INPUTS_MAX}, split them into several maps", inputs.len());
    }
    Ok(inputs)
}

fn progress(total: usize, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    // Drawn only when stderr is a terminal.
    let bar = indicatif::ProgressBar::new(total as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} calls, {per_sec}, eta {eta}") {
        bar.set_style(style);
    }
    bar
}

pub async fn run(args: MapArgs) -> anyhow::Result<()> {
    let inputs = read_inputs()?;
    let total = inputs.len();
    let base = args.node.trim_end_matches('/');
    let url = format!("{base}/v1/map/{}", args.function);
    let mut query = vec![("concurrency", args.concurrency.to_string()), ("ordered", args.ordered.to_string())];
    if let Some(timeout_ms) = args.timeout_ms {
        query.push(("timeout_ms", timeout_ms.to_string()));
    }
    // Results stream for as long as the map runs; only a silent connection is given up.
    let client = args.auth.client(reqwest::Client::builder().read_timeout(Duration::from_secs(3_600)))?;
    let response = client
        .post(&url)
        .query(&query)
        .json(&inputs)
        .send()
        .await
        .with_context(|| format!("cannot reach the girder node at {base} (is `girder node` running there?)"))?;
    let status = response.status();
    if !status.is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        match body.get("message").and_then(|m| m.as_str()) {
            Some(message) => bail!("{message}"),
            None => bail!("the node answered {status}"),
        }
    }
    let bar = progress(total, args.quiet);
    let (mut done, mut failed) = (0usize, 0usize);
    let mut pending: Vec<u8> = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        pending.extend_from_slice(&chunk.context("the node broke off the map's results")?);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]);
            let parsed: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("the node sent a line that is not JSON: {line}"))?;
            failed += usize::from(parsed.get("error").is_some());
            done += 1;
            bar.inc(1);
            bar.suspend(|| outln!("{line}"));
        }
        if pending.len() > LINE_BYTES_MAX {
            bail!("a result line from the node is over {LINE_BYTES_MAX} bytes");
        }
    }
    bar.finish_and_clear();
    if done < total {
        bail!("the node answered {done} of {total} inputs before the map ended");
    }
    if failed > 0 {
        bail!("{failed} of {total} calls failed");
    }
    Ok(())
}
