//! What the observability layers cost per message, beside no layers in the
//! same run, on the in-memory transport (no broker: the transport's own
//! cost stays small, so the layers' cost shows).
//!
//! ```text
//! cargo bench -p oona-benches --bench layers
//! ```
//!
//! 256-byte payloads, medians of interleaved rounds (with, without, ...):
//! - publish through the publish chain, one call per message: with the
//!   `Metrics` layer vs none;
//! - consume + ack through the consume chain: with `Metrics` vs none.
//!
//! Each line also gives the cost per message in nanoseconds (the
//! difference of the inverse rates).

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use oona_benches::{envelope, print_throughput, rounds, run_main, Res, PAYLOAD};
use oona_core::layer::{ConsumeLayer, ConsumeNext, Handled, PublishLayer, PublishNext};
use oona_core::memory::MemoryTransport;
use oona_core::metrics::Metrics;
use oona_core::{Delivery, Name, Outcome, StartPosition, Subscription, Topic, Transport};

const ROUNDS: usize = 5;
const N: usize = 50_000;
const CHUNK: usize = 5_000;

fn main() {
    run_main(run());
}

fn topic(what: &str, i: usize, with: bool) -> Res<Topic> {
    Ok(Topic::new(format!(
        "telemetry.bench.layers_{what}_{with}_{i}"
    ))?)
}

fn sub(t: &Topic) -> Res<Subscription> {
    Ok(Subscription::new(t.clone(), Name::new("bench")?).start(StartPosition::Earliest))
}

async fn run() -> Res<()> {
    println!("observability layers on memory://: {PAYLOAD}-byte payloads, {N} messages, median of {ROUNDS} interleaved rounds");
    println!();
    println!("| scenario | with | without | with/without | cost per message |");
    println!("|---|---:|---:|---:|---|");
    let (w, wo) = rounds(ROUNDS, |i| publish(i, true), |i| publish(i, false)).await?;
    print_throughput("publish + Metrics (msg/s)", w, wo, &per_message(w, wo));
    let (w, wo) = rounds(ROUNDS, |i| consume(i, true), |i| consume(i, false)).await?;
    print_throughput(
        "consume + ack + Metrics (msg/s)",
        w,
        wo,
        &per_message(w, wo),
    );
    Ok(())
}

/// The extra time per message of the slower rate, in nanoseconds.
fn per_message(with: f64, without: f64) -> String {
    format!("{:+.0} ns", (1.0 / with - 1.0 / without) * 1e9)
}

async fn publish(i: usize, with: bool) -> Res<f64> {
    let m = MemoryTransport::new();
    let t = topic("publish", i, with)?;
    let layers: Vec<Arc<dyn PublishLayer>> = if with {
        vec![Arc::new(Metrics::new())]
    } else {
        Vec::new()
    };
    // Read and ack as it goes: the memory transport's capacity is bounded.
    let mut s = m.subscribe(sub(&t)?).await?;
    let started = Instant::now();
    for n in 0..N {
        PublishNext::new(&layers, &m)
            .run(vec![envelope(&t, n as u64 + 1)])
            .await?;
        if let Some(Some(Ok(d))) = s.next().now_or_never() {
            d.ack().await?;
        }
    }
    Ok(N as f64 / started.elapsed().as_secs_f64())
}

async fn consume(i: usize, with: bool) -> Res<f64> {
    let m = MemoryTransport::new();
    let t = topic("consume", i, with)?;
    let layers: Vec<Arc<dyn ConsumeLayer>> = if with {
        vec![Arc::new(Metrics::new())]
    } else {
        Vec::new()
    };
    let mut s = m.subscribe(sub(&t)?).await?;
    let terminal =
        |d: Delivery| -> BoxFuture<'_, Handled> { Handled::settle(d, Outcome::Ack).boxed() };
    let mut took = std::time::Duration::ZERO;
    // In chunks below the transport's capacity; only consuming is timed.
    for chunk in 0..N / CHUNK {
        for n in 0..CHUNK {
            m.publish(envelope(&t, (chunk * CHUNK + n) as u64 + 1))
                .await?;
        }
        let started = Instant::now();
        for _ in 0..CHUNK {
            let d = s.next().await.ok_or("stream ended")??;
            let h = ConsumeNext::new(&layers, &terminal).run(d).await;
            h.settled?;
        }
        took += started.elapsed();
    }
    Ok(N as f64 / took.as_secs_f64())
}
