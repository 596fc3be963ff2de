//! What signing and verifying cost, beside the unsigned path in the same
//! run, on the in-memory transport (no broker: the transport's own cost
//! stays small, so the layers' cost shows).
//!
//! ```text
//! cargo bench -p oona-benches --bench signing
//! ```
//!
//! 256-byte payloads, a `traceparent` header, medians of interleaved
//! rounds (signed, unsigned, signed, ...):
//! - publish through the publish chain, one call per message: with
//!   `SignLayer` vs without;
//! - consume + ack through the consume chain: signed deliveries with
//!   `VerifyLayer` vs unsigned deliveries without it.

use std::time::Instant;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use oona_benches::{envelope, print_throughput, rounds, run_main, Res, PAYLOAD};
use oona_core::layer::{ConsumeLayer, ConsumeNext, Handled, PublishLayer, PublishNext};
use oona_core::memory::MemoryTransport;
use oona_core::security::{Keyring, Keys, SignLayer, VerifyLayer};
use oona_core::{Delivery, Name, Outcome, StartPosition, Subscription, Topic, Transport};

const ROUNDS: usize = 5;
const N: usize = 50_000;

fn main() {
    run_main(run());
}

fn keys() -> Res<Keys> {
    let ring = Keyring::parse("k1:YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=")?;
    Ok(Keys::new().with_default(ring))
}

fn topic(what: &str, i: usize, signed: bool) -> Res<Topic> {
    Ok(Topic::new(format!(
        "control.bench.sign_{what}_{signed}_{i}"
    ))?)
}

fn message(t: &Topic, n: usize) -> oona_core::Envelope {
    let mut e = envelope(t, n as u64 + 1);
    e.headers.insert(
        "traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    );
    e
}

async fn run() -> Res<()> {
    println!("signing on memory://: {PAYLOAD}-byte payloads, {N} messages, median of {ROUNDS} interleaved rounds");
    println!();
    println!("| scenario | signed | unsigned | signed/unsigned | |");
    println!("|---|---:|---:|---:|---|");
    let (s, u) = rounds(ROUNDS, |i| publish(i, true), |i| publish(i, false)).await?;
    print_throughput("publish, 1 per call (msg/s)", s, u, "");
    let (s, u) = rounds(ROUNDS, |i| consume(i, true), |i| consume(i, false)).await?;
    print_throughput("consume + ack (msg/s)", s, u, "");
    Ok(())
}

async fn publish(i: usize, signed: bool) -> Res<f64> {
    let m = MemoryTransport::new();
    let t = topic("publish", i, signed)?;
    let layers: Vec<std::sync::Arc<dyn PublishLayer>> = if signed {
        vec![std::sync::Arc::new(SignLayer::new(keys()?))]
    } else {
        Vec::new()
    };
    // Kept from growing past the memory transport's capacity: read and
    // ack as it goes.
    let mut s = m.subscribe(sub(&t)?).await?;
    let started = Instant::now();
    for n in 0..N {
        PublishNext::new(&layers, &m)
            .run(vec![message(&t, n)])
            .await?;
        if let Some(Some(Ok(d))) = s.next().now_or_never() {
            d.ack().await?;
        }
    }
    Ok(N as f64 / started.elapsed().as_secs_f64())
}

fn sub(t: &Topic) -> Res<Subscription> {
    Ok(Subscription::new(t.clone(), Name::new("bench")?).start(StartPosition::Earliest))
}

async fn consume(i: usize, signed: bool) -> Res<f64> {
    let m = MemoryTransport::new();
    let t = topic("consume", i, signed)?;
    let keys = keys()?;
    let sign: Vec<std::sync::Arc<dyn PublishLayer>> =
        vec![std::sync::Arc::new(SignLayer::new(keys.clone()))];
    let layers: Vec<std::sync::Arc<dyn ConsumeLayer>> = if signed {
        vec![std::sync::Arc::new(VerifyLayer::new(keys))]
    } else {
        Vec::new()
    };
    let mut s = m.subscribe(sub(&t)?).await?;
    let terminal =
        |d: Delivery| -> BoxFuture<'_, Handled> { Handled::settle(d, Outcome::Ack).boxed() };
    let mut took = std::time::Duration::ZERO;
    // In chunks below the transport's capacity; only consuming is timed.
    for chunk in 0..N / 5_000 {
        for n in 0..5_000 {
            let e = message(&t, chunk * 5_000 + n);
            if signed {
                PublishNext::new(&sign, &m).run(vec![e]).await?;
            } else {
                m.publish(e).await?;
            }
        }
        let started = Instant::now();
        for _ in 0..5_000 {
            let d = s.next().await.ok_or("stream ended")??;
            let h = ConsumeNext::new(&layers, &terminal).run(d).await;
            if !matches!(h.outcome, Outcome::Ack) || h.dead_lettered {
                return Err(format!("a delivery was refused: {:?}", h.outcome).into());
            }
            h.settled?;
        }
        took += started.elapsed();
    }
    Ok(N as f64 / took.as_secs_f64())
}
