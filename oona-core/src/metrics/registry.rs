//! The metric kinds and their Prometheus text exposition (version 0.0.4).
//!
//! Hand-rolled rather than a client crate: histograms must also be read
//! in the process (quantiles for the health snapshot), which the crates
//! keep private, and the format is a page long.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::sync::{read, write};

/// Label values of one series, in the order of its family's label names.
pub type Labels = Vec<String>;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Add `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Set it to `v`.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The value now.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of latency buckets: 100 µs to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Observations counted in fixed buckets, with their sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the `+Inf` bucket (not cumulative).
    counts: Vec<AtomicU64>,
    /// The sum, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    /// Buckets with the upper bounds `bounds` (ascending) and `+Inf`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Count `v`.
    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((f64::from_bits(s) + v).to_bits())
            });
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Their sum.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }

    /// The `q` quantile (0 to 1), interpolated within its bucket as
    /// Prometheus' `histogram_quantile` does; `None` before any
    /// observation. Past the last bound it is the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantiles(&[q]).map(|v| v[0])
    }

    /// Several quantiles from one reading of the buckets (so they are
    /// ordered as the `qs` are, whatever is observed meanwhile).
    pub fn quantiles(&self, qs: &[f64]) -> Option<Vec<f64>> {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        Some(qs.iter().map(|q| self.rank(&counts, total, *q)).collect())
    }

    fn rank(&self, counts: &[u64], total: u64, q: f64) -> f64 {
        let last = self.bounds.last().copied().unwrap_or(0.0);
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in counts.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = self.bounds.get(i) else {
                    return last;
                };
                let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                let within = (rank - below as f64) / n as f64;
                return lower + (upper - lower) * within;
            }
            below += n;
        }
        last
    }
}

/// What a family holds, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `counter`
    Counter,
    /// `gauge`
    Gauge,
    /// `histogram`
    Histogram,
}

/// A metric that can be exposed.
pub trait Metric: Send + Sync + 'static {
    /// Its kind.
    const KIND: Kind;
    /// A new series.
    fn make() -> Self;
    /// Write the series' sample lines: `name{labels} value`.
    fn write(&self, out: &mut String, name: &str, labels: &str);
}

impl Metric for Counter {
    const KIND: Kind = Kind::Counter;
    fn make() -> Self {
        Counter::default()
    }
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.get());
    }
}

impl Metric for Gauge {
    const KIND: Kind = Kind::Gauge;
    fn make() -> Self {
        Gauge::default()
    }
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.get());
    }
}

impl Metric for Histogram {
    const KIND: Kind = Kind::Histogram;
    fn make() -> Self {
        Histogram::new(LATENCY_BUCKETS)
    }
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum());
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines
/// escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Series of one metric, one per set of label values.
pub struct Family<M> {
    name: &'static str,
    help: &'static str,
    label_names: &'static [&'static str],
    /// By the label values joined with `\u{1f}` (one key to build per
    /// lookup), with the values themselves.
    series: RwLock<HashMap<String, (Labels, Arc<M>)>>,
}

fn key_of(labels: &[&str]) -> String {
    labels.join("\u{1f}")
}

impl<M: Metric> Family<M> {
    /// A family `name` with `help` and the label names `label_names`.
    pub fn new(
        name: &'static str,
        help: &'static str,
        label_names: &'static [&'static str],
    ) -> Self {
        Family {
            name,
            help,
            label_names,
            series: RwLock::default(),
        }
    }

    /// The series of `labels` (one value per label name), made on first
    /// use.
    pub fn get(&self, labels: &[&str]) -> Arc<M> {
        debug_assert_eq!(labels.len(), self.label_names.len(), "{}", self.name);
        let key = key_of(labels);
        {
            let series = read(&self.series);
            if let Some((_, m)) = series.get(&key) {
                return Arc::clone(m);
            }
        }
        let mut series = write(&self.series);
        let (_, m) = series.entry(key).or_insert_with(|| {
            let values = labels.iter().map(|s| s.to_string()).collect();
            (values, Arc::new(M::make()))
        });
        Arc::clone(m)
    }

    /// Forget the series of `labels` (a group no longer watched).
    pub fn remove(&self, labels: &[&str]) {
        let mut series = write(&self.series);
        series.remove(&key_of(labels));
    }

    /// Every series, with its label values.
    pub fn snapshot(&self) -> Vec<(Labels, Arc<M>)> {
        let series = read(&self.series);
        series
            .values()
            .map(|(l, m)| (l.clone(), Arc::clone(m)))
            .collect()
    }

    /// Append the family in the text format: `# HELP`, `# TYPE`, then its
    /// series sorted by labels (a stable page).
    pub fn render(&self, out: &mut String) {
        let kind = match M::KIND {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        let mut all = self.snapshot();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        for (values, m) in all {
            let labels: Vec<String> = self
                .label_names
                .iter()
                .zip(&values)
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            m.write(out, self.name, &labels.join(","));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_sum_and_read_quantiles() {
        let h = Histogram::new(&[1.0, 2.0, 4.0]);
        assert_eq!(h.quantile(0.5), None);
        for v in [0.5, 1.5, 1.5, 3.0, 9.0] {
            h.observe(v);
        }
        assert_eq!(h.count(), 5);
        assert!((h.sum() - 15.5).abs() < 1e-9);
        // Ranks: 2.5 of 5 falls in (1, 2], which holds the 2nd and 3rd.
        assert!((h.quantile(0.5).unwrap() - 1.75).abs() < 1e-9);
        assert_eq!(h.quantile(1.0), Some(4.0), "past the last bound");
        let mut out = String::new();
        h.write(&mut out, "x", "a=\"1\"");
        assert!(out.contains("x_bucket{a=\"1\",le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"1\",le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_count{a=\"1\"} 5\n"), "{out}");
    }

    #[test]
    fn families_render_sorted_escaped_series() {
        let f: Family<Counter> = Family::new("oona_x_total", "Things.", &["topic"]);
        f.get(&["b.c"]).add(2);
        f.get(&["a\"b"]).inc();
        f.get(&["b.c"]).inc();
        let mut out = String::new();
        f.render(&mut out);
        assert_eq!(
            out,
            "# HELP oona_x_total Things.\n# TYPE oona_x_total counter\n\
             oona_x_total{topic=\"a\\\"b\"} 1\noona_x_total{topic=\"b.c\"} 3\n"
        );
    }
}
