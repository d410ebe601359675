//! Prometheus metrics of a node, in the text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS_S: [f64; 14] =
    [0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25, 1.0, 10.0];

/// A latency histogram with fixed buckets, updated without locks.
#[derive(Default)]
pub(crate) struct Latency {
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Latency {
    pub(crate) fn record(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(i) = BUCKETS_S.iter().position(|&b| seconds <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_S.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Escapes a label value.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Metrics of something that runs beside a node: given the exposition and the node's id,
/// it adds its families; it returns false once its owner is gone (it is then dropped).
pub(crate) type Source = Box<dyn Fn(&mut Exposition, &str) -> bool + Send + Sync>;

/// A metric family: its help and type lines, then samples.
pub(crate) struct Exposition {
    out: String,
}

impl Exposition {
    pub(crate) fn new() -> Exposition {
        Exposition { out: String::new() }
    }

    pub(crate) fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub(crate) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", label(v))).collect();
        let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
    }

    pub(crate) fn histogram(&mut self, name: &str, node: &str, latency: &Latency) {
        latency.render(&mut self.out, name, &format!("node=\"{}\"", label(node)));
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_accumulate() {
        let latency = Latency::default();
        latency.record(Duration::from_micros(20));
        latency.record(Duration::from_millis(3));
        let mut out = String::new();
        latency.render(&mut out, "x", "node=\"a\"");
        assert!(out.contains("x_bucket{node=\"a\",le=\"0.000025\"} 1"), "{out}");
        assert!(out.contains("x_bucket{node=\"a\",le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("x_count{node=\"a\"} 2"), "{out}");
    }
}
