//! `girder node`: a long-lived node serving the HTTP API until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use girder::http::{router, HttpConfig, Server, ServerConfig};
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
    #[command(flatten)]
    password: PasswordArgs,
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
    /// Most new requests one call tree may create (its root included); past it the tree
    /// ends and its caller gets `budget_exceeded`. Per call, `?requests_max=` may lower it.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    call_requests_max: u64,
    /// Deepest a call tree may nest (a top-level call is depth 0); per call,
    /// `?depth_max=` may lower it.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..))]
    call_depth_max: u32,
    /// With the embedded statekeeper: most bytes its data structures (cache values, atoms,
    /// maps, ...) may hold, like 512M or 2G; past it values with a TTL are evicted
    /// (soonest to expire first), then writes fail with 507 `full`.
    #[arg(long, value_parser = parse_memory, default_value = "1G")]
    structures_bytes_max: u64,
    /// Longest an evaluation may run here before the grid abandons it
    /// (`time_limit_exceeded`), for functions without a limit of their own.
    #[arg(long, default_value_t = 3_600_000, value_parser = clap::value_parser!(u64).range(1..))]
    time_limit_ms: u64,
    /// A function's policy on this node, over its attribute's:
    /// NAME:retries=3,timeout_ms=500,ttl_ms=60000 (any of the fields). Repeat it per
    /// function, and give every node serving the function the same.
    #[arg(long = "policy", value_name = "NAME:FIELD=VALUE,...", value_parser = girder::NodeBuilder::parse_policy)]
    policies: Vec<(String, girder::Policy)>,
    // The bearer tokens every HTTP route but /v1/health requires.
    #[command(flatten)]
    auth: crate::auth::NodeTokenArgs,
    /// Largest HTTP request body, in bytes; a larger announced body is refused (413) before
    /// it is sent.
    #[arg(long, default_value_t = 4 << 20)]
    body_max_bytes: usize,
    /// Where this node keeps its farm of the bucket store (created if missing); without
    /// it, the store lives in memory and is lost with the process.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run workflow instances here (the built-in `examples/counter` type): this node takes
    /// the instances of the flocks it is the primary of.
    #[arg(long)]
    workflows: bool,
    /// Feed `examples/counter` the messages of this reliable topic, each to the instance its
    /// `id` field names (repeatable; every node running workflows must name the same ones).
    #[arg(long = "counter-topic", value_name = "TOPIC", requires = "workflows")]
    counter_topics: Vec<String>,
    /// Run the example components here: the singleton `examples/ticker` (a fenced counter
    /// ticking on one node at a time) and the cluster watch (node events on
    /// `girder/events`).
    #[arg(long)]
    components: bool,
    /// Address of the data plane other nodes move store bytes over; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    data_listen: String,
    /// The data-plane address other nodes should use, when it differs from --data-listen
    /// (e.g. listening on 0.0.0.0).
    #[arg(long)]
    data_advertise: Option<String>,
    /// When a store write is durable: `always` (fsync before it is acknowledged, shared by
    /// concurrent writes) or `buffered` (the OS's buffers, synced every 200 ms: a machine's
    /// crash may lose the last moments).
    #[arg(long, default_value = "always", value_parser = ["always", "buffered"])]
    fsync: String,
    /// Owners that must hold a store write before it is acknowledged (default: all of
    /// them, so no single death loses an acknowledged write; 1 is lossy).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    write_quorum: Option<u32>,
    /// Largest store item, in bytes (also the HTTP body limit of store writes).
    #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1..=(1 << 30)))]
    item_max_bytes: u64,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Most open HTTP connections; at the cap the longest-idle ones make room for new ones
    /// (default: 10,000, fewer if the file-descriptor limit is lower).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    connections_max: Option<u64>,
    /// A request's head must arrive within this many milliseconds of its first byte (and a
    /// new connection's first request within this long of connecting).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    header_timeout_ms: u64,
    /// A keep-alive connection without a request for this long closes, as does one whose
    /// client stops reading its response for this long.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    idle_timeout_ms: u64,
    /// A request body must arrive whole within this many milliseconds of its head (408).
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    body_timeout_ms: u64,
    /// Most calls in flight through this node's HTTP API; more are answered 503 at once.
    #[arg(long, default_value_t = 4_096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    calls_max: u64,
    /// The share of this node's slots one caller (a token, else a connection) may keep busy
    /// with calls in flight, at least one call: a fraction (0.5) or a percentage (50%); more
    /// are answered 429 at once.
    #[arg(long, default_value = "0.5", value_parser = parse_share)]
    caller_share: f64,
    /// The deadline of an HTTP call that names none (?timeout_ms=), in milliseconds.
    #[arg(long, default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    http_deadline_ms: u64,
    /// /v1/health says "degraded" once every slot has been busy for this many milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    degraded_after_ms: u64,
}

/// Where the statekeeper's password comes from, so that it never needs to be on a command
/// line (where `ps` shows it) nor in a URL.
#[derive(Debug, Clone, clap::Args)]
pub struct PasswordArgs {
    /// A file holding the Redis password (surrounding whitespace is ignored); the
    /// --statekeeper URL then has none.
    #[arg(long, global = true, env = "GIRDER_STATEKEEPER_PASSWORD_FILE", hide_env_values = true)]
    statekeeper_password_file: Option<PathBuf>,
}

impl PasswordArgs {
    /// The password file, from the flag or, for verbs without it, the environment.
    fn file(&self) -> Option<PathBuf> {
        self.statekeeper_password_file
            .clone()
            .or_else(|| std::env::var_os(PASSWORD_FILE_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
    }
}

const PASSWORD_FILE_ENV: &str = "GIRDER_STATEKEEPER_PASSWORD_FILE";
/// Longest password file read.
const PASSWORD_FILE_BYTES_MAX: u64 = 4_096;

fn parse_share(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let share = match text.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
        None => text.parse::<f64>(),
    };
    match share {
        Ok(share) if share > 0.0 && share <= 1.0 => Ok(share),
        _ => Err(format!("{text:?} is not a share like 0.5 or 50% (more than 0, at most 1)")),
    }
}

/// `spec` with the password of `file` in it, percent-encoded. The URL must have none.
fn with_password(spec: &str, file: &Path) -> anyhow::Result<String> {
    let password = crate::auth::read_secret_file(file, PASSWORD_FILE_BYTES_MAX, "statekeeper password")?;
    let password = password.trim();
    anyhow::ensure!(!password.is_empty(), "the statekeeper password file {} is empty", file.display());
    let Some((scheme, rest)) = spec.split_once("://") else {
        anyhow::bail!("the statekeeper URL {:?} has no scheme", girder::redacted(spec));
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (user, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            anyhow::ensure!(
                !userinfo.contains(':'),
                "the statekeeper URL {:?} has a password and --statekeeper-password-file gives one: keep one",
                girder::redacted(spec)
            );
            (userinfo, host)
        }
        None => ("", authority),
    };
    let encoded = percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC);
    Ok(format!("{scheme}://{user}:{encoded}@{host}{tail}"))
}

fn parse_memory(text: &str) -> Result<u64, String> {
    girder::config::parse_bytes(text)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{text:?} is not a size like 512M or 2G"))
}

/// Opens the statekeeper named on the command line, with the password of `password`.
pub async fn open_statekeeper_with(
    spec: &str,
    password: &PasswordArgs,
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
    let url = match password.file() {
        Some(file) => with_password(spec, &file)?,
        None => spec.to_owned(),
    };
    // Errors name the URL only through `redacted`, which hides the password.
    let mut config = RedisConfig::new(url);
    config.namespace = namespace.to_owned();
    config.node_ttl_ms = node_ttl_ms;
    config.results_ttl_ms = results.ttl_ms.or(config.results_ttl_ms);
    config.results_entries_max = results.entries_max as u64;
    config.near_cache.entries_max = results.entries_max.min(config.near_cache.entries_max);
    config.near_cache.bytes_max = results.bytes_max.min(config.near_cache.bytes_max);
    let redis = RedisStatekeeper::connect(config).await?;
    Ok(Arc::new(redis))
}

pub async fn run(registry: Registry, args: NodeArgs) -> anyhow::Result<()> {
    let tokens = args.auth.tokens()?;
    if args.http_deadline_ms > HttpConfig::default().timeout_ms_max {
        anyhow::bail!(
            "--http-deadline-ms ({}) must be at most the longest timeout_ms a caller may ask for ({})",
            args.http_deadline_ms,
            HttpConfig::default().timeout_ms_max
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(girder::http::tls_config(cert, key)?),
        _ => None,
    };
    let connections_max = connections_max(args.connections_max);
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
    let statekeeper: Arc<dyn Statekeeper> = if args.statekeeper == "embedded" {
        let structures = girder::structures::memory::InMemoryConfig { bytes_max: args.structures_bytes_max };
        let node_ttl_ms = args.node_ttl_ms;
        Arc::new(Embedded::new(EmbeddedConfig { results, node_ttl_ms, structures, ..Default::default() }))
    } else {
        open_statekeeper_with(&args.statekeeper, &args.password, &args.namespace, results, args.node_ttl_ms).await?
    };
    // Bind first: the address is part of what the node reports about itself.
    let listener = girder::http::bind(args.listen)
        .with_context(|| format!("cannot listen on {} (is the port taken?)", args.listen))?;
    let addr = listener.local_addr().context("cannot read the bound address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut builder = Node::builder();
    if let Some(id) = &args.id {
        builder = builder.id(id.clone());
    }
    let mut builder = builder
        .registry(registry)
        .statekeeper(statekeeper)
        .heartbeat_ms(args.heartbeat_ms)
        .http_address(format!("{scheme}://{addr}"));
    if let Some(cpus) = args.cpus {
        builder = builder.cpus(cpus);
    }
    if let Some(bytes) = args.max_memory {
        builder = builder.max_memory_bytes(bytes);
    }
    builder = builder
        .call_limits(girder::CallLimits { requests_max: args.call_requests_max, depth_max: args.call_depth_max })
        .time_limit(Duration::from_millis(args.time_limit_ms));
    for (name, policy) in &args.policies {
        builder = builder.policy(name.clone(), *policy);
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
        .store(store_config(&args))
        .workers(WorkerSpec::new(args.pool.clone(), args.workers as usize, args.slots as usize).prefetch(args.prefetch))
        .entry_pool(args.pool.clone())
        .start()
        .await
        .context("cannot start the node")?;
    let node = Arc::new(node);
    let workflows = if args.workflows {
        let mut types = girder::workflow::Workflows::new().with_examples();
        for topic in &args.counter_topics {
            types = types.with_counter_topic(topic).context("--counter-topic")?;
        }
        Some(girder::workflow::WorkflowRuntime::start(&node, types))
    } else {
        None
    };
    let components = match args.components {
        true => Some(
            girder::component::ComponentSystem::start(&node, girder::component::Components::new().with_examples())
                .await
                .context("cannot start the components")?,
        ),
        false => None,
    };
    {
        // The address line is the ready signal; a node whose stdout is closed keeps serving.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "girder node {} listening on {scheme}://{addr}", node.id()).and_then(|()| out.flush());
    }
    let compression = match args.cache_compression.as_str() {
        "zstd" => Compression::Zstd(3),
        "none" => Compression::None,
        _ => Compression::Lz4,
    };
    let cache = CacheConfig { compression, value_bytes_max: args.cache_value_max_bytes, ..Default::default() };
    if tokens.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening beyond this machine without a token: anyone who reaches the port can call \
            any function and read or change any cache key; set one with --token-file or GIRDER_TOKEN");
    }
    let config = HttpConfig {
        cache,
        tokens: tokens.into_iter().map(Into::into).collect(),
        body_bytes_max: args.body_max_bytes,
        store_bytes_max: usize::try_from(args.item_max_bytes).unwrap_or(usize::MAX),
        deadline_ms: args.http_deadline_ms,
        calls_max: usize::try_from(args.calls_max).unwrap_or(usize::MAX),
        caller_share: args.caller_share,
        degraded_after_ms: args.degraded_after_ms,
        ..Default::default()
    };
    let server_config = ServerConfig {
        connections_max,
        header_timeout_ms: args.header_timeout_ms,
        idle_timeout_ms: args.idle_timeout_ms,
        body_timeout_ms: args.body_timeout_ms,
        tls,
    };
    let server = Server::start(listener, router(node.clone(), config), server_config);
    stop_signal().await;
    // No new connections from here on (the listener closes), idle ones close, requests in
    // flight may finish. Held work finishes for up to the drain timeout, then the node stops
    // and callers still waiting get a shutdown error, which ends their requests.
    server.shut_down();
    // Workflow steps stop first: what they committed stands, the next owner goes on.
    if let Some(workflows) = &workflows {
        workflows.shutdown();
    }
    // Singletons stop and give their locks up, so another node starts them at once.
    if let Some(components) = &components {
        components.shutdown().await;
    }
    node.drain(Duration::from_millis(args.drain_timeout_ms)).await;
    // Connections that still linger (slow clients) do not hold the process.
    let closed = server.close(SERVER_CLOSE_GRACE).await;
    if closed > 0 {
        tracing::warn!(connections = closed, "closed connections that did not finish in time");
    }
    Ok(())
}

/// The bucket store's configuration from the flags.
fn store_config(args: &NodeArgs) -> girder::store::StoreConfig {
    let durability = match args.fsync.as_str() {
        "buffered" => girder::store::Durability::Buffered,
        _ => girder::store::Durability::Immediate,
    };
    girder::store::StoreConfig {
        data_dir: args.data_dir.clone(),
        engine: girder::store::EngineConfig { durability, ..Default::default() },
        data_listen: args.data_listen.clone(),
        data_advertise: args.data_advertise.clone(),
        item_bytes_max: args.item_max_bytes,
        write_quorum: args.write_quorum,
        ..Default::default()
    }
}

/// The connection cap: the one asked for, else 10,000, either way no more than the
/// file-descriptor limit allows (raised to its hard limit first).
fn connections_max(asked: Option<u64>) -> usize {
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(nofile) => nofile,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the file-descriptor limit; assuming 1,024");
            1_024
        }
    };
    let preferred = asked.map_or(DEFAULT_CONNECTIONS_MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let allowed = girder::http::connections_max_for(nofile, preferred);
    if allowed < preferred && asked.is_some() {
        tracing::warn!(
            asked = preferred,
            allowed,
            nofile,
            "--connections-max is over what the file-descriptor limit allows; using less"
        );
    }
    allowed
}

/// The connection cap when none is asked for.
const DEFAULT_CONNECTIONS_MAX: usize = 10_000;

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
