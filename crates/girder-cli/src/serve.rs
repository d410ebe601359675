//! `girder node`: a long-lived node serving the HTTP API until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use girder::http::{router, HttpConfig};
use girder::{Embedded, EmbeddedConfig, Node, PoolSpec, Registry, ResultStoreConfig, WorkerSpec};

/// Arguments of `girder node`.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Address for the HTTP API; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// This node's id, unique in the grid.
    #[arg(long, default_value = "node")]
    id: String,
    /// The pool this node's workers join and HTTP calls are submitted to.
    #[arg(long, default_value = "main")]
    pool: String,
    /// Workers on this node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=girder::WORKERS_MAX as u64))]
    workers: u64,
    /// Evaluation slots per worker.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=girder::SLOTS_MAX as u64))]
    slots: u64,
    /// Most memoized results kept.
    #[arg(long, default_value_t = 1_000_000)]
    results_max_entries: usize,
    /// Most bytes of memoized results kept.
    #[arg(long, default_value_t = 256 << 20)]
    results_max_bytes: usize,
    /// Drop memoized results after this many milliseconds (default: keep until evicted).
    #[arg(long)]
    results_ttl_ms: Option<u64>,
    /// Largest HTTP request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    body_max_bytes: usize,
}

pub async fn run(registry: Registry, args: NodeArgs) -> anyhow::Result<()> {
    let results = ResultStoreConfig {
        entries_max: args.results_max_entries,
        bytes_max: args.results_max_bytes,
        ttl_ms: args.results_ttl_ms,
    };
    let statekeeper = Arc::new(Embedded::new(EmbeddedConfig { results, ..Default::default() }));
    let node = Node::builder()
        .id(args.id.clone())
        .registry(registry)
        .statekeeper(statekeeper)
        .pool(PoolSpec::new(args.pool.clone()))
        .workers(WorkerSpec::new(args.pool.clone(), args.workers as usize, args.slots as usize))
        .start()
        .await
        .context("cannot start the node")?;
    let node = Arc::new(node);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is the port taken?)", args.listen))?;
    let addr = listener.local_addr().context("cannot read the bound address")?;
    println!("girder node {} listening on http://{addr}", args.id);
    let config = HttpConfig { body_bytes_max: args.body_max_bytes, ..Default::default() };
    axum::serve(listener, router(node.clone(), config))
        .with_graceful_shutdown(stop_signal())
        .await
        .context("the HTTP server failed")?;
    node.shutdown().await;
    Ok(())
}

async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("stopping");
}
