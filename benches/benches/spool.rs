//! What the degradation path costs, on the genuine Redis
//! (`OONA_TEST_REDIS_URL`), each beside direct publishing in the same run:
//!
//! ```text
//! cargo bench -p oona-benches --bench spool
//! ```
//!
//! - publishing through `Spooled` while the broker is up (the wrapper's
//!   own cost: a clone kept for a failure) vs publishing to the transport;
//! - appending to the spool, as publishes do during an outage, with
//!   `SpoolSync::Always` (fsync, shared by concurrent appends) and
//!   `SpoolSync::Never`, vs publishing to the broker.
//!
//! 256-byte payloads, `CONCURRENCY` publishers at once, medians of
//! interleaved rounds.

use std::sync::Arc;
use std::time::Instant;

use oona_benches::{
    bench_topic, broker_url, envelope, print_throughput, rounds, run_main, Res, PAYLOAD,
};
use oona_core::degrade::{BreakerConfig, Spool, SpoolConfig, SpoolSync, Spooled};
use oona_core::{Envelope, Topic, Transport};
use oona_redis::RedisTransport;

const ROUNDS: usize = 5;
const N: usize = 20_000;
const CONCURRENCY: usize = 16;

fn main() {
    let url = broker_url("OONA_TEST_REDIS_URL", "redis");
    run_main(run(&url));
}

fn spool_dir(what: &str, i: usize) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "oona-bench-spool-{}-{what}-{i}",
        std::process::id()
    ))
}

/// `N` envelopes on `topic`, sent by `CONCURRENCY` tasks through `send`;
/// messages per second.
async fn drive<F, Fut>(topic: &Topic, send: F) -> Res<f64>
where
    F: Fn(Envelope) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = oona_core::Result<()>> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let (send, topic) = (send.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            for n in (w..N).step_by(CONCURRENCY) {
                send(envelope(&topic, n as u64)).await?;
            }
            Ok::<_, oona_core::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(N as f64 / started.elapsed().as_secs_f64())
}

async fn direct(url: &str, what: &str, i: usize) -> Res<f64> {
    let t = Arc::new(RedisTransport::connect_url(url).await?);
    let topic = bench_topic(what, i, false)?;
    let rate = {
        let t = Arc::clone(&t);
        drive(&topic, move |e| {
            let t = Arc::clone(&t);
            async move { t.publish(e).await.map(|_| ()) }
        })
        .await?
    };
    t.delete_topic(&topic).await?;
    t.close().await?;
    Ok(rate)
}

async fn through_spooled(url: &str, i: usize) -> Res<f64> {
    let inner: Arc<dyn Transport> = Arc::new(RedisTransport::connect_url(url).await?);
    let dir = spool_dir("wrapper", i);
    let t = Arc::new(Spooled::new(
        inner,
        SpoolConfig::new(&dir),
        BreakerConfig::default(),
    )?);
    let topic = bench_topic("spooled", i, true)?;
    let rate = {
        let t = Arc::clone(&t);
        drive(&topic, move |e| {
            let t = Arc::clone(&t);
            async move { t.publish(e).await.map(|_| ()) }
        })
        .await?
    };
    if t.stats().direct != N as u64 {
        return Err(format!("{} of {N} went direct", t.stats().direct).into());
    }
    t.delete_topic(&topic).await?;
    t.close().await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(rate)
}

async fn appends(sync: SpoolSync, i: usize) -> Res<f64> {
    let dir = spool_dir("append", i);
    let spool = Spool::open(SpoolConfig::new(&dir).sync(sync))?;
    let topic = bench_topic("append", i, true)?;
    let rate = {
        let spool = spool.clone();
        drive(&topic, move |e| {
            let spool = spool.clone();
            async move { spool.append(&e).await.map(|_| ()) }
        })
        .await?
    };
    if spool.stats().records != N as u64 {
        return Err(format!("{} of {N} spooled", spool.stats().records).into());
    }
    drop(spool);
    let _ = std::fs::remove_dir_all(dir);
    Ok(rate)
}

async fn run(url: &str) -> Res<()> {
    println!(
        "spool on {url}: {PAYLOAD}-byte payloads, {N} messages, {CONCURRENCY} publishers at once, median of {ROUNDS} interleaved rounds"
    );
    println!();
    println!("| scenario | degradation path | direct to Redis | ratio | |");
    println!("|---|---:|---:|---:|---|");
    let (s, d) = rounds(
        ROUNDS,
        |i| through_spooled(url, i),
        |i| direct(url, "direct_a", i),
    )
    .await?;
    print_throughput("publish through Spooled, broker up (msg/s)", s, d, "");
    let (s, d) = rounds(
        ROUNDS,
        |i| appends(SpoolSync::Always, i),
        |i| direct(url, "direct_b", i),
    )
    .await?;
    print_throughput("spool append, fsync (msg/s)", s, d, "");
    let (s, d) = rounds(
        ROUNDS,
        |i| appends(SpoolSync::Never, i),
        |i| direct(url, "direct_c", i),
    )
    .await?;
    print_throughput("spool append, no fsync (msg/s)", s, d, "");
    Ok(())
}
