//! The arguments of `girder bench`.

/// Arguments of `girder bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Sequential round trips measured (and memo hits, ten times as many).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    pub(crate) round_trips: u64,
    /// Requests submitted at once in the throughput test.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    pub(crate) batch: u64,
    /// Repetitions of the throughput and tree tests; the median is reported.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub(crate) rounds: u64,
    /// Workers of the benchmarked node.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub(crate) workers: u64,
    /// Slots per worker.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub(crate) slots: u64,
    /// Benchmark over Redis instead: a redis:// URL, or `auto` to start a redis-server on a
    /// free loopback port for the run. Workers run in separate `girder node` processes.
    #[arg(long)]
    pub(crate) redis: Option<String>,
    /// Benchmark the bucket store and the data plane instead (nodes in this process, data
    /// directories under the system's temp dir).
    #[arg(long, conflicts_with = "redis")]
    pub(crate) store: bool,
    /// Benchmark only the data plane's node-to-node transfer (beside a bare TCP copy).
    #[arg(long, conflicts_with_all = ["redis", "store"])]
    pub(crate) transfer: bool,
    /// Benchmark workflows instead: step latency and throughput (embedded, or on --redis).
    #[arg(long, conflicts_with_all = ["store", "transfer"])]
    pub(crate) workflows: bool,
    /// Bytes the data-plane transfer benchmark moves, in MiB.
    #[arg(long, default_value_t = 1_024, value_parser = clap::value_parser!(u64).range(16..=65_536))]
    pub(crate) transfer_mib: u64,
}
