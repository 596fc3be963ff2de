//! Oona benches: see `benches/`. Helpers shared by the bench binaries.

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

/// Percentiles of latency samples given in nanoseconds (sorts them).
/// All zero when there are no samples.
pub fn percentiles(samples_ns: &mut [u64]) -> Percentiles {
    samples_ns.sort_unstable();
    let n = samples_ns.len();
    let q = |p: f64| {
        if n == 0 {
            return 0.0;
        }
        samples_ns[((n as f64 * p) as usize).min(n - 1)] as f64 / 1e6
    };
    Percentiles {
        n,
        p50: q(0.50),
        p99: q(0.99),
        p999: q(0.999),
        max: q(1.0),
    }
}

/// Print one markdown row: scenario, Oona's figure, the raw baseline's, the
/// ratio and the target.
pub fn print_throughput(name: &str, oona: f64, raw: f64, target: &str) {
    println!(
        "| {name} | {oona:.0} | {raw:.0} | {:.0}% | {target} |",
        100.0 * oona / raw.max(1.0)
    );
}
