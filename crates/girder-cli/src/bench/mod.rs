//! `girder bench`: figures beside baselines measured in the same run, on the embedded
//! statekeeper (`embedded`) or on Redis (`redis`), with shared measuring tools (`measure`).

mod args;
mod embedded;
mod measure;
mod redis;

pub use args::BenchArgs;

use girder::Registry;

/// Runs the benchmarks `args` ask for.
pub async fn run(registry: Registry, args: BenchArgs) -> anyhow::Result<()> {
    match args.redis.clone() {
        Some(url) => redis::run(&url, &args).await,
        None => embedded::run(registry, args).await,
    }
}
