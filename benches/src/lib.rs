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

/// The error type of the bench binaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The result type of the bench binaries.
pub type Res<T> = Result<T, BoxError>;

/// Payload size of every bench, in bytes (PERFORMANCE.md's 256).
pub const PAYLOAD: usize = 256;

/// Median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run `n` interleaved rounds of Oona's and the raw client's version of one
/// scenario (interleaved so machine noise hits both sides alike) and return
/// the medians. `OONA_BENCH_VERBOSE` prints every round.
pub async fn rounds<F, G, FO, GO>(n: usize, mut oona: F, mut raw: G) -> Res<(f64, f64)>
where
    F: FnMut(usize) -> FO,
    G: FnMut(usize) -> GO,
    FO: std::future::Future<Output = Res<f64>>,
    GO: std::future::Future<Output = Res<f64>>,
{
    let verbose = std::env::var_os("OONA_BENCH_VERBOSE").is_some();
    let mut o = Vec::with_capacity(n);
    let mut r = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b) = (oona(i).await?, raw(i).await?);
        if verbose {
            eprintln!("round {i}: oona {a:.0} raw {b:.0}");
        }
        o.push(a);
        r.push(b);
    }
    Ok((median(o), median(r)))
}

/// A fresh topic for scenario `what`, round `i`, Oona's or the raw side;
/// the plane is `OONA_BENCH_PLANE` (default `telemetry`).
pub fn bench_topic(what: &str, i: usize, oona: bool) -> Res<oona_core::Topic> {
    let side = if oona { "oona" } else { "raw" };
    let plane = std::env::var("OONA_BENCH_PLANE").unwrap_or_else(|_| "telemetry".into());
    let n = std::process::id();
    Ok(oona_core::Topic::new(format!(
        "{plane}.bench.{what}_{side}_{n}_{i}"
    ))?)
}

/// A [`PAYLOAD`]-byte payload whose first 8 bytes carry `stamp` (a sequence
/// number or a send time, read back with [`stamp_of`]).
pub fn payload(stamp: u64) -> bytes::Bytes {
    let mut p = vec![b'x'; PAYLOAD];
    p[..8].copy_from_slice(&stamp.to_le_bytes());
    bytes::Bytes::from(p)
}

/// An envelope on `t` with a stamped [`payload`].
pub fn envelope(t: &oona_core::Topic, stamp: u64) -> oona_core::Envelope {
    oona_core::Envelope::builder(t.clone(), payload(stamp))
        .sender_id("bench")
        .build()
}

/// The stamp of a [`payload`] (0 for a payload shorter than 8 bytes).
pub fn stamp_of(payload: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if let Some(head) = payload.get(..8) {
        b.copy_from_slice(head);
    }
    u64::from_le_bytes(b)
}

/// The broker URL in `var` (written by `scripts/brokers.sh up <broker>`);
/// a missing one ends the bench with exit code 2, saying how to start it.
pub fn broker_url(var: &str, broker: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => {
            eprintln!("{var} is not set: run `scripts/brokers.sh up {broker}` and `set -a; . target/brokers.env; set +a` first");
            std::process::exit(2);
        }
    }
}

/// Run a bench's `main` future on a two-worker runtime; a failure ends the
/// bench with exit code 1, printing it.
pub fn run_main(main: impl std::future::Future<Output = Res<()>>) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(main) {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}
