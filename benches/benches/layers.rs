//! What the observability layers cost per message, beside no layers in the
//! same run, on the in-memory transport (no broker: the transport's own
//! cost stays small, so the layers' cost shows).
//!
//! ```text
//! cargo bench -p oona-benches --bench layers
//! ```
//!
//! 256-byte payloads, medians of interleaved rounds (with, without, ...):
//! - publishing through the publish chain, one call per message;
//! - consuming and acking through the consume chain;
//!
//! each with the `Metrics` layer vs none, and with `otel::TraceLayer` (the
//! OpenTelemetry SDK's tracer, spans kept by its in-memory exporter) vs
//! none.
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
use oona_core::otel::TraceLayer;
use oona_core::{Delivery, Name, Outcome, StartPosition, Subscription, Topic, Transport};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracer, SdkTracerProvider};

const ROUNDS: usize = 5;
const N: usize = 50_000;
const CHUNK: usize = 5_000;

fn main() {
    run_main(run());
}

fn topic(what: &str, i: usize, with: Stack) -> Res<Topic> {
    let name = format!("telemetry.bench.layers_{what}_{with:?}_{i}");
    Ok(Topic::new(name.to_lowercase())?)
}

/// The layers under test.
#[derive(Debug, Clone, Copy)]
enum Stack {
    None,
    Metrics,
    Trace,
}

fn tracer() -> SdkTracer {
    SdkTracerProvider::builder()
        .with_simple_exporter(InMemorySpanExporter::default())
        .build()
        .tracer("bench")
}

fn publish_layers(stack: Stack) -> Vec<Arc<dyn PublishLayer>> {
    match stack {
        Stack::None => Vec::new(),
        Stack::Metrics => vec![Arc::new(Metrics::new())],
        Stack::Trace => vec![Arc::new(TraceLayer::new(tracer(), "memory"))],
    }
}

fn consume_layers(stack: Stack) -> Vec<Arc<dyn ConsumeLayer>> {
    match stack {
        Stack::None => Vec::new(),
        Stack::Metrics => vec![Arc::new(Metrics::new())],
        Stack::Trace => vec![Arc::new(TraceLayer::new(tracer(), "memory"))],
    }
}

fn sub(t: &Topic) -> Res<Subscription> {
    Ok(Subscription::new(t.clone(), Name::new("bench")?).start(StartPosition::Earliest))
}

async fn run() -> Res<()> {
    println!("observability layers on memory://: {PAYLOAD}-byte payloads, {N} messages, median of {ROUNDS} interleaved rounds");
    println!();
    println!("| scenario | with | without | with/without | cost per message |");
    println!("|---|---:|---:|---:|---|");
    for stack in [Stack::Metrics, Stack::Trace] {
        let (w, wo) = rounds(ROUNDS, |i| publish(i, stack), |i| publish(i, Stack::None)).await?;
        let name = format!("publish + {stack:?} (msg/s)");
        print_throughput(&name, w, wo, &per_message(w, wo));
        let (w, wo) = rounds(ROUNDS, |i| consume(i, stack), |i| consume(i, Stack::None)).await?;
        let name = format!("consume + ack + {stack:?} (msg/s)");
        print_throughput(&name, w, wo, &per_message(w, wo));
    }
    Ok(())
}

/// The extra time per message of the slower rate, in nanoseconds.
fn per_message(with: f64, without: f64) -> String {
    format!("{:+.0} ns", (1.0 / with - 1.0 / without) * 1e9)
}

async fn publish(i: usize, stack: Stack) -> Res<f64> {
    let m = MemoryTransport::new();
    let t = topic("publish", i, stack)?;
    let layers = publish_layers(stack);
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

async fn consume(i: usize, stack: Stack) -> Res<f64> {
    let m = MemoryTransport::new();
    let t = topic("consume", i, stack)?;
    let layers = consume_layers(stack);
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
