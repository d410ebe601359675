//! `girder bench`: figures beside baselines measured in the same run, on the embedded
//! statekeeper (`embedded`) or on Redis (`redis`), of the bucket store (`store`) and the
//! data plane (`transfer`), of workflows (`workflow`), with shared measuring tools
//! (`measure`).

mod args;
mod embedded;
mod measure;
mod redis;
mod store;
mod transfer;
mod workflow;

pub use args::BenchArgs;

use girder::Registry;

/// Runs the benchmarks `args` ask for.
pub async fn run(registry: Registry, args: BenchArgs) -> anyhow::Result<()> {
    if args.workflows {
        return workflow::run(args.redis.as_deref()).await;
    }
    if args.transfer {
        return transfer::run(usize::try_from(args.transfer_mib << 20)?).await;
    }
    if args.store {
        transfer::run(usize::try_from(args.transfer_mib << 20)?).await?;
        return store::run().await;
    }
    match args.redis.clone() {
        Some(url) => redis::run(&url, &args).await,
        None => embedded::run(registry, args).await,
    }
}
