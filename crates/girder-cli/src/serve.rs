//! `girder node`: a long-lived node serving the HTTP API until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::future::IntoFuture;

use anyhow::Context;
use girder::http::{router, HttpConfig};
use girder::structures::{CacheConfig, Compression};
use girder::{
    Embedded, EmbeddedConfig, Node, PoolSpec, RedisConfig, RedisStatekeeper, Registry, ResultStoreConfig, Statekeeper,
    WorkerSpec,
};

/// Arguments of `girder node`.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Address for the HTTP API; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// This node's id, unique in the grid (default: host, process id and a random suffix).
    #[arg(long)]
    id: Option<String>,
    /// The pool this node's workers join and HTTP calls are submitted to.
    #[arg(long, default_value = "main")]
    pool: String,
    /// The pool's parent: it volunteers there when idle (declared too, if new).
    #[arg(long)]
    parent: Option<String>,
    /// Where the grid's state lives: `embedded` (this process only) or
    /// `redis://[:PASSWORD@]HOST:PORT/DB` (`rediss://` for TLS) to join a cluster.
    #[arg(long, default_value = "embedded", env = "GIRDER_STATEKEEPER", hide_env_values = true)]
    statekeeper: String,
    /// The CPU count this node reports (default: the machine's); CPU-weighted placement uses it.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    cpus: Option<u32>,
    /// This node's memory budget (e.g. 512M); memory-weighted placement uses it.
    #[arg(long, value_parser = parse_memory)]
    max_memory: Option<u64>,
    /// With Redis: grids with different namespaces share a server without seeing each other.
    #[arg(long, default_value = "girder")]
    namespace: String,
    /// Serve only these functions (comma separated); default: all registered.
    #[arg(long, value_delimiter = ',')]
    functions: Vec<String>,
    /// With Redis: a node silent for this long is dead and its work runs elsewhere.
    #[arg(long, default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    node_ttl_ms: u64,
    /// How often the node renews its lease; keep it well under --node-ttl-ms.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    heartbeat_ms: u64,
    /// Workers on this node; 0 makes a gateway that takes calls and submits them to the
    /// grid, running nothing itself.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=girder::WORKERS_MAX as u64))]
    workers: u64,
    /// Evaluation slots per worker.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=girder::SLOTS_MAX as u64))]
    slots: u64,
    /// Requests each worker takes ahead of its free slots: more keeps it busier between
    /// hand-offs over Redis, fewer spreads work more evenly (helpers hoist the surplus).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    prefetch: u32,
    /// Most memoized results kept.
    #[arg(long, default_value_t = 1_000_000)]
    results_max_entries: usize,
    /// Most bytes of memoized results kept.
    #[arg(long, default_value_t = 256 << 20)]
    results_max_bytes: usize,
    /// Drop memoized results after this many milliseconds (default: keep until evicted).
    #[arg(long)]
    results_ttl_ms: Option<u64>,
    /// Compression of cache values: lz4, zstd or none.
    #[arg(long, default_value = "lz4", value_parser = ["lz4", "zstd", "none"])]
    cache_compression: String,
    /// Largest cache value, in bytes as stored.
    #[arg(long, default_value_t = 64 << 20)]
    cache_value_max_bytes: usize,
    /// On SIGTERM or SIGINT, finish held work for at most this long before leaving.
    #[arg(long, default_value_t = 30_000)]
    drain_timeout_ms: u64,
    // The bearer token every HTTP route but /v1/health requires.
    #[command(flatten)]
    auth: crate::auth::TokenArgs,
    /// Largest HTTP request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    body_max_bytes: usize,
}

fn parse_memory(text: &str) -> Result<u64, String> {
    girder::config::parse_bytes(text)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{text:?} is not a size like 512M or 2G"))
}

/// Opens the statekeeper named on the command line.
pub async fn open_statekeeper(
    spec: &str,
    namespace: &str,
    results: ResultStoreConfig,
    node_ttl_ms: u64,
) -> anyhow::Result<Arc<dyn Statekeeper>> {
    if spec == "embedded" {
        return Ok(Arc::new(Embedded::new(EmbeddedConfig { results, node_ttl_ms, ..Default::default() })));
    }
    if !(spec.starts_with("redis://") || spec.starts_with("rediss://")) {
        anyhow::bail!(
            "--statekeeper must be `embedded` or a redis:// or rediss:// URL, got {:?}",
            girder::redacted(spec)
        );
    }
    let mut config = RedisConfig::new(spec);
    config.namespace = namespace.to_owned();
    config.node_ttl_ms = node_ttl_ms;
    config.results_ttl_ms = results.ttl_ms.or(config.results_ttl_ms);
    config.near_cache.entries_max = results.entries_max.min(config.near_cache.entries_max);
    config.near_cache.bytes_max = results.bytes_max.min(config.near_cache.bytes_max);
    let redis = RedisStatekeeper::connect(config).await?;
    Ok(Arc::new(redis))
}

pub async fn run(registry: Registry, args: NodeArgs) -> anyhow::Result<()> {
    let token = args.auth.token()?;
    let results = ResultStoreConfig {
        entries_max: args.results_max_entries,
        bytes_max: args.results_max_bytes,
        ttl_ms: args.results_ttl_ms,
    };
    if args.heartbeat_ms * 2 > args.node_ttl_ms {
        anyhow::bail!(
            "--heartbeat-ms ({}) must be at most half of --node-ttl-ms ({})",
            args.heartbeat_ms,
            args.node_ttl_ms
        );
    }
    let registry = if args.functions.is_empty() {
        registry
    } else {
        let names: Vec<&str> = args.functions.iter().map(String::as_str).collect();
        registry.only(&names).map_err(anyhow::Error::msg)?
    };
    let statekeeper = open_statekeeper(&args.statekeeper, &args.namespace, results, args.node_ttl_ms).await?;
    // Bind first: the address is part of what the node reports about itself.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is the port taken?)", args.listen))?;
    let addr = listener.local_addr().context("cannot read the bound address")?;
    let mut builder = Node::builder();
    if let Some(id) = &args.id {
        builder = builder.id(id.clone());
    }
    let mut builder = builder
        .registry(registry)
        .statekeeper(statekeeper)
        .heartbeat_ms(args.heartbeat_ms)
        .http_address(format!("http://{addr}"));
    if let Some(cpus) = args.cpus {
        builder = builder.cpus(cpus);
    }
    if let Some(bytes) = args.max_memory {
        builder = builder.max_memory_bytes(bytes);
    }
    if let Some(parent) = &args.parent {
        builder = builder.pool(PoolSpec::new(parent.clone()));
    }
    let mut pool = PoolSpec::new(args.pool.clone());
    if let Some(parent) = &args.parent {
        pool = pool.parent(parent.clone());
    }
    let node = builder
        .pool(pool)
        .workers(WorkerSpec::new(args.pool.clone(), args.workers as usize, args.slots as usize).prefetch(args.prefetch))
        .entry_pool(args.pool.clone())
        .start()
        .await
        .context("cannot start the node")?;
    let node = Arc::new(node);
    {
        // The address line is the ready signal; a node whose stdout is closed keeps serving.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "girder node {} listening on http://{addr}", node.id()).and_then(|()| out.flush());
    }
    let compression = match args.cache_compression.as_str() {
        "zstd" => Compression::Zstd(3),
        "none" => Compression::None,
        _ => Compression::Lz4,
    };
    let cache = CacheConfig { compression, value_bytes_max: args.cache_value_max_bytes, ..Default::default() };
    if token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening beyond this machine without a token: anyone who reaches the port can call \
            any function and read or change any cache key; set one with --token-file or GIRDER_TOKEN");
    }
    let config =
        HttpConfig { cache, token: token.map(Into::into), body_bytes_max: args.body_max_bytes, ..Default::default() };
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(node.clone(), config)).with_graceful_shutdown(async move {
        stop_signal().await;
        let _ = stopping_tx.send(());
    });
    let mut server = tokio::spawn(server.into_future());
    tokio::select! {
        ended = &mut server => {
            // The server stopped without a signal: that is a failure.
            ended.context("the HTTP server task failed")?.context("the HTTP server failed")?;
            anyhow::bail!("the HTTP server stopped unexpectedly");
        }
        _ = stopping => {}
    }
    // No new work from here on; held work finishes for up to the drain timeout, then the
    // node stops and callers still waiting get a shutdown error, which ends their requests.
    node.drain(Duration::from_millis(args.drain_timeout_ms)).await;
    // Connections that still linger (slow clients) do not hold the process.
    if tokio::time::timeout(SERVER_CLOSE_GRACE, server).await.is_err() {
        tracing::warn!("closing connections that did not finish in time");
    }
    Ok(())
}

/// How long open connections may take to finish after the node stopped.
const SERVER_CLOSE_GRACE: Duration = Duration::from_secs(1);

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
