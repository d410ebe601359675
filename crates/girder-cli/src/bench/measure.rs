//! What every benchmark measures with: histograms, the no-op round trip and throughput
//! loops, medians.

use std::time::{Duration, Instant};

use anyhow::Context;
use girder::examples::echo;
use girder::Client;
use hdrhistogram::Histogram;

pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram bounds")
}

pub(crate) fn record(hist: &mut Histogram<u64>, took: Duration) {
    hist.saturating_record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1));
}

pub(crate) fn us(nanos: u64) -> f64 {
    nanos as f64 / 1_000.0
}

/// Distinct no-op arguments: every request is new, nothing is served from the cache.
#[derive(Default)]
pub(crate) struct Fresh(u64);

impl Fresh {
    fn next(&mut self) -> rmpv::Value {
        self.0 += 1;
        rmpv::Value::from(self.0)
    }
}

/// Latencies of `count` no-op calls made one at a time, after `warm_up` unmeasured ones.
pub(crate) async fn round_trips(
    client: &Client,
    fresh: &mut Fresh,
    warm_up: u64,
    count: u64,
) -> anyhow::Result<Histogram<u64>> {
    for _ in 0..warm_up {
        echo::call(client, fresh.next()).await?;
    }
    let mut trip = histogram()?;
    for _ in 0..count {
        let value = fresh.next();
        let begun = Instant::now();
        echo::call(client, value).await?;
        record(&mut trip, begun.elapsed());
    }
    Ok(trip)
}

/// Requests per second, one figure per round of `batch` no-ops submitted at once.
pub(crate) async fn throughput(
    client: &Client,
    fresh: &mut Fresh,
    batch: u64,
    rounds: u64,
) -> anyhow::Result<Vec<f64>> {
    let mut rates = Vec::new();
    for _ in 0..rounds {
        let values: Vec<_> = (0..batch).map(|_| fresh.next()).collect();
        let begun = Instant::now();
        let results = futures::future::join_all(values.into_iter().map(|v| echo::call(client, v))).await;
        let took = begun.elapsed();
        if let Some(Err(err)) = results.into_iter().find(Result::is_err) {
            return Err(err).context("a throughput request failed");
        }
        rates.push(batch as f64 / took.as_secs_f64());
    }
    Ok(rates)
}

/// The middle value (the upper one of an even count); `values` must not be empty.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
