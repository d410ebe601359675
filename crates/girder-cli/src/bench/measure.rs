//! What every benchmark measures with: histograms, the no-op round trip and throughput
//! loops, medians.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use girder::examples::{echo, nap_tree};
use girder::{CallError, Client, Node};
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

/// Requests per second, one figure per round of `batch` no-ops through `client.map` with
/// `concurrency` calls in flight.
pub(crate) async fn map_throughput(
    client: &Client,
    fresh: &mut Fresh,
    batch: u64,
    rounds: u64,
    concurrency: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut rates = Vec::new();
    for _ in 0..rounds {
        let values: Vec<_> = (0..batch).map(|_| (fresh.next(),)).collect();
        let begun = Instant::now();
        let mut results = client.map::<echo, _>(values, concurrency);
        let mut answered = 0;
        while let Some((_, result)) = results.next().await {
            result.context("a map request failed")?;
            answered += 1;
        }
        let took = begun.elapsed();
        anyhow::ensure!(answered == batch, "the map answered {answered} of {batch}");
        rates.push(batch as f64 / took.as_secs_f64());
    }
    Ok(rates)
}

/// How long cancelling a call takes, over `rounds` rounds: until its caller is answered,
/// and until every evaluation of its tree (a 3-level `nap_tree` of 13 requests whose
/// leaves sleep a minute) stopped on `node`, which must have 13 slots free.
pub(crate) async fn cancel_latency(node: &Node, rounds: u64) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    let client = node.client();
    let (mut answered, mut stopped) = (histogram()?, histogram()?);
    for round in 0..rounds {
        let call = client.spawn::<nap_tree>((2, 3, round * 100, 60_000))?;
        let begun = Instant::now();
        while node.running() < 13 {
            anyhow::ensure!(begun.elapsed() < Duration::from_secs(10), "the tree never ran whole");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let cancelled = Instant::now();
        call.cancel();
        let outcome = call.await;
        record(&mut answered, cancelled.elapsed());
        anyhow::ensure!(matches!(outcome, Err(CallError::Cancelled { .. })), "a cancelled call gave {outcome:?}");
        while node.running() > 0 {
            anyhow::ensure!(cancelled.elapsed() < Duration::from_secs(10), "the tree ran on");
            tokio::task::yield_now().await;
        }
        record(&mut stopped, cancelled.elapsed());
    }
    Ok((answered, stopped))
}

/// The middle value (the upper one of an even count); `values` must not be empty.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
