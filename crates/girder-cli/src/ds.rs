//! `girder ds`: drive the grid's data structures from the command line, directly on the
//! statekeeper: contention and failure drills for atoms, locks and reliable topics.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use girder::structures::{Atom, Counter, List, Lock, ReliableTopic, Retention, Store};
use girder::ResultStoreConfig;

/// Arguments of `girder ds`.
#[derive(Debug, clap::Args)]
pub struct DsArgs {
    #[command(subcommand)]
    op: DsOp,
    /// The statekeeper: a redis:// URL (or `embedded`, this process only).
    #[arg(long, global = true, default_value = "embedded", env = "GIRDER_STATEKEEPER", hide_env_values = true)]
    statekeeper: String,
    /// The grid's namespace.
    #[arg(long, global = true, default_value = "girder")]
    namespace: String,
    #[command(flatten)]
    password: crate::serve::PasswordArgs,
}

#[derive(Debug, clap::Subcommand)]
enum DsOp {
    /// Add 1 to the atom KEY TIMES times with swap, CONCURRENCY at once; print the last value.
    AtomAdd {
        /// The atom.
        key: String,
        /// How many swaps.
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        times: u64,
        /// How many at once.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        concurrency: u64,
    },
    /// Contend for the lock KEY: CONTENDERS tasks take it ROUNDS times each; while holding
    /// they check nobody else holds it and log their fencing token. Prints the violations.
    LockContend {
        /// The lock.
        key: String,
        /// Contending tasks in this process.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1_000))]
        contenders: u64,
        /// Acquisitions per task.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        rounds: u64,
        /// The lease.
        #[arg(long, default_value_t = 2_000)]
        lease_ms: u64,
        /// How long each acquisition holds the lock.
        #[arg(long, default_value_t = 5)]
        hold_ms: u64,
    },
    /// Take the lock KEY, print "held TOKEN", and hold it until killed.
    LockHold {
        /// The lock.
        key: String,
        /// The lease.
        #[arg(long, default_value_t = 1_000)]
        lease_ms: u64,
    },
    /// Publish COUNT messages (their numbers) to the reliable topic.
    TopicPublish {
        /// The topic.
        topic: String,
        /// How many.
        #[arg(long, default_value_t = 1_000)]
        count: u64,
        /// Messages retained.
        #[arg(long, default_value_t = 100_000)]
        retain: u64,
    },
    /// Read the reliable topic after sequence id AFTER, printing "SEQ VALUE" per message,
    /// until COUNT messages were read.
    TopicSubscribe {
        /// The topic.
        topic: String,
        /// Start after this sequence id (0: the oldest retained).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Stop after this many.
        #[arg(long, default_value_t = u64::MAX)]
        count: u64,
        /// Messages retained.
        #[arg(long, default_value_t = 100_000)]
        retain: u64,
    },
}

async fn store(args: &DsArgs) -> anyhow::Result<Store> {
    let statekeeper = crate::serve::open_statekeeper_with(
        &args.statekeeper,
        &args.password,
        &args.namespace,
        ResultStoreConfig::default(),
        3_000,
    )
    .await?;
    Ok(statekeeper.structures())
}

pub async fn run(args: DsArgs) -> anyhow::Result<()> {
    let store = store(&args).await?;
    match args.op {
        DsOp::AtomAdd { key, times, concurrency } => {
            let atom: Arc<Atom<u64>> = Arc::new(Atom::new(store, key)?);
            let last = futures::stream::iter(0..times)
                .map(|_| {
                    let atom = atom.clone();
                    async move { atom.swap(|v| v.unwrap_or(0) + 1).await }
                })
                .buffer_unordered(concurrency as usize)
                .fold(Ok(0u64), |acc, r| async move { acc.and_then(|a| r.map(|v| a.max(v))) })
                .await?;
            outln!("{last}");
        }
        DsOp::LockContend { key, contenders, rounds, lease_ms, hold_ms } => {
            let tasks = (0..contenders).map(|_| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move { contend(store, key, rounds, lease_ms, hold_ms).await })
            });
            let mut violations = 0;
            for task in futures::future::join_all(tasks).await {
                violations += task.context("a contender panicked")??;
            }
            outln!("violations {violations}");
        }
        DsOp::LockHold { key, lease_ms } => {
            let lock = Lock::new(store, key, Duration::from_millis(lease_ms))?;
            let guard = lock.lock().await?;
            outln!("held {}", guard.token());
            std::io::stdout().flush().context("stdout")?;
            std::future::pending::<()>().await;
        }
        DsOp::TopicPublish { topic, count, retain } => {
            let topic: ReliableTopic<u64> =
                ReliableTopic::new(store, topic, Retention { count_max: retain, age_ms_max: None })?;
            for n in 1..=count {
                topic.publish(&n).await?;
            }
        }
        DsOp::TopicSubscribe { topic, after, count, retain } => {
            let topic: ReliableTopic<u64> =
                ReliableTopic::new(store, topic, Retention { count_max: retain, age_ms_max: None })?;
            let mut messages = topic.subscribe_after(after);
            let mut stdout = std::io::stdout();
            for _ in 0..count {
                let Some(message) = messages.next().await else { break };
                let (seq, value) = message?;
                writeln!(stdout, "{seq} {value}").context("stdout")?;
                stdout.flush().context("stdout")?;
            }
        }
    }
    Ok(())
}

/// One contender: takes the lock `rounds` times; returns how often it saw another holder.
async fn contend(store: Store, key: String, rounds: u64, lease_ms: u64, hold_ms: u64) -> anyhow::Result<u64> {
    let lock = Lock::new(store.clone(), key.clone(), Duration::from_millis(lease_ms))?;
    let holders = Counter::new(store.clone(), format!("{key}:holders"))?;
    let tokens: List<u64> = List::new(store, format!("{key}:tokens"))?;
    let mut violations = 0;
    for _ in 0..rounds {
        let guard = lock.lock().await?;
        if holders.add(1).await? != 1 {
            violations += 1;
        }
        tokens.push_back(&guard.token()).await?;
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        holders.add(-1).await?;
        guard.release().await?;
    }
    Ok(violations)
}
