//! Oona on Pulsar beside the raw `pulsar` (pulsar-rs) client doing the same
//! work.
//!
//! ```text
//! scripts/brokers.sh up pulsar && set -a && . target/brokers.env && set +a
//! cargo bench -p oona-benches --bench pulsar
//! ```
//!
//! The broker is Apache Pulsar standalone (`scripts/brokers.sh`), both
//! sides on its main listener. Each figure is the median of
//! interleaved rounds (Oona, raw, Oona, raw, ...), 256-byte payloads, no
//! producer batching, and the raw side sends Oona's message properties
//! (built once up front), so the broker does the same work:
//! - publish, one awaited call at a time;
//! - publish, 100 in flight (`publish_batch` of 100 vs 100
//!   `send_non_blocking` receipts awaited together);
//! - consume + ack of a pre-filled topic (a Shared subscription acking
//!   every message on both sides), timed from the first message;
//! - latency publish -> handler at a fixed 1,000 msg/s (p50 / p99 / p99.9),
//!   each side publishing with its own producer and consuming from a
//!   Shared subscription made before the first publish.
//!
//! `OONA_BENCH_ONLY=publish|consume|latency` runs one part.

use oona_benches::{
    bench_topic, broker_url, envelope, percentiles, print_throughput as row, rounds, run_main,
    stamp_of, Percentiles, Res, PAYLOAD,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use oona_core::{Name, StartPosition, Subscription, Topic, Transport};
use oona_pulsar::PulsarTransport;
use pulsar::{Pulsar, TokioExecutor};

const ROUNDS: usize = 3;

fn main() {
    let url = broker_url("OONA_TEST_PULSAR_URL", "pulsar");
    run_main(run(&url));
}

struct Ctx {
    oona: PulsarTransport,
    raw: Pulsar<TokioExecutor>,
}

async fn run(url: &str) -> Res<()> {
    let oona = PulsarTransport::connect_url(url).await?;
    let raw = Pulsar::builder(oona.config().service_url.clone(), TokioExecutor)
        .build()
        .await?;
    let cx = Ctx { oona, raw };
    println!("Oona vs raw pulsar-rs on the Pulsar broker at {url}: {PAYLOAD}-byte payloads, median of {ROUNDS} interleaved rounds");
    println!();
    println!("| scenario | Oona | raw | Oona/raw | target |");
    println!("|---|---:|---:|---:|---|");
    let only = std::env::var("OONA_BENCH_ONLY").unwrap_or_default();
    let part = |p: &str| only.is_empty() || only == p;
    if part("publish") {
        let (o, r) = rounds(
            ROUNDS,
            |i| publish_single(&cx, i, true),
            |i| publish_single(&cx, i, false),
        )
        .await?;
        row("publish, 1 per call (msg/s)", o, r, "≥ 90%");
        let (o, r) = rounds(
            ROUNDS,
            |i| publish_batched(&cx, i, true),
            |i| publish_batched(&cx, i, false),
        )
        .await?;
        row("publish, 100 in flight (msg/s)", o, r, "≥ 90%");
    }
    if part("consume") {
        let (o, r) = rounds(
            ROUNDS,
            |i| consume(&cx, i, true),
            |i| consume(&cx, i, false),
        )
        .await?;
        row("consume + ack, pre-filled (msg/s)", o, r, "≥ 90%");
    }
    if part("latency") {
        let lo = latency(&cx, 0, true).await?;
        let lr = latency(&cx, 0, false).await?;
        println!();
        println!(
            "latency publish→handler at {LATENCY_RATE} msg/s ({} messages), ms:",
            lo.n
        );
        println!("| | p50 | p99 | p99.9 | max |");
        println!("|---|---:|---:|---:|---:|");
        for (who, l) in [("Oona", lo), ("raw", lr)] {
            println!(
                "| {who} | {:.3} | {:.3} | {:.3} | {:.3} |",
                l.p50, l.p99, l.p999, l.max
            );
        }
    }
    cx.oona.close().await?;
    Ok(())
}

/// What the raw side sends: Oona's properties for a typical envelope,
/// built once, and the payload.
struct RawRecord {
    properties: HashMap<String, String>,
    payload: Vec<u8>,
}

impl RawRecord {
    fn new(t: &Topic) -> Self {
        let e = envelope(t, 0);
        RawRecord {
            properties: oona_core::wire::fields::encode(&e).into_iter().collect(),
            payload: e.payload.to_vec(),
        }
    }

    fn message(&self, stamp: u64) -> pulsar::producer::Message {
        let mut p = self.payload.clone();
        p[..8].copy_from_slice(&stamp.to_le_bytes());
        pulsar::producer::Message {
            payload: p,
            properties: self.properties.clone(),
            ..Default::default()
        }
    }
}

impl Ctx {
    fn full(&self, t: &Topic) -> String {
        self.oona.pulsar_topic(t)
    }

    async fn raw_producer(&self, t: &Topic) -> Res<pulsar::Producer<TokioExecutor>> {
        Ok(self
            .raw
            .producer()
            .with_topic(self.full(t))
            .with_options(pulsar::ProducerOptions {
                block_queue_if_full: true,
                ..Default::default()
            })
            .build()
            .await?)
    }
}

async fn publish_single(cx: &Ctx, i: usize, oona: bool) -> Res<f64> {
    const N: usize = 2_000;
    let t = bench_topic("single", i, oona)?;
    // Both sides have a producer on an existing topic before timing.
    cx.oona.publish(envelope(&t, 0)).await?;
    let rec = RawRecord::new(&t);
    let mut producer = cx.raw_producer(&t).await?;
    let started = Instant::now();
    for n in 0..N {
        if oona {
            cx.oona.publish(envelope(&t, n as u64)).await?;
        } else {
            producer
                .send_non_blocking(rec.message(n as u64))
                .await?
                .await?;
        }
    }
    Ok(N as f64 / started.elapsed().as_secs_f64())
}

async fn publish_batched(cx: &Ctx, i: usize, oona: bool) -> Res<f64> {
    const N: usize = 20_000;
    const BATCH: usize = 100;
    let t = bench_topic("batch", i, oona)?;
    cx.oona.publish(envelope(&t, 0)).await?;
    let rec = RawRecord::new(&t);
    let mut producer = cx.raw_producer(&t).await?;
    let started = Instant::now();
    for b in 0..N / BATCH {
        if oona {
            let batch = (0..BATCH)
                .map(|n| envelope(&t, (b * BATCH + n) as u64))
                .collect();
            cx.oona.publish_batch(batch).await?;
        } else {
            let mut receipts = Vec::with_capacity(BATCH);
            for n in 0..BATCH {
                receipts.push(
                    producer
                        .send_non_blocking(rec.message((b * BATCH + n) as u64))
                        .await?,
                );
            }
            for r in receipts {
                r.await?;
            }
        }
    }
    Ok(N as f64 / started.elapsed().as_secs_f64())
}

async fn consume(cx: &Ctx, i: usize, oona: bool) -> Res<f64> {
    const N: usize = 20_000;
    let t = bench_topic("consume", i, oona)?;
    // Fill with the raw producer for both sides (same bytes on the broker).
    let rec = RawRecord::new(&t);
    let mut producer = cx.raw_producer(&t).await?;
    for b in 0..N / 1000 {
        let mut receipts = Vec::with_capacity(1000);
        for k in 0..1000 {
            receipts.push(
                producer
                    .send_non_blocking(rec.message((b * 1000 + k) as u64))
                    .await?,
            );
        }
        for r in receipts {
            r.await?;
        }
    }
    let took = if oona {
        let sub = Subscription::new(t.clone(), Name::new("bench")?)
            .start(StartPosition::Earliest)
            .prefetch(1000)
            .ack_deadline(Duration::from_secs(60));
        let mut s = cx.oona.subscribe(sub).await?;
        let mut first = None;
        for _ in 0..N {
            match s.next().await {
                Some(Ok(d)) => {
                    first.get_or_insert_with(Instant::now);
                    d.ack().await?;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err("stream ended".into()),
            }
        }
        first.map(|f| f.elapsed()).unwrap_or_default()
    } else {
        let mut c: pulsar::Consumer<Vec<u8>, _> = cx
            .raw
            .consumer()
            .with_topic(cx.full(&t))
            .with_subscription("bench")
            .with_subscription_type(pulsar::SubType::Shared)
            .with_batch_size(1000)
            .with_options(
                pulsar::ConsumerOptions::default()
                    .with_initial_position(pulsar::consumer::InitialPosition::Earliest),
            )
            .build()
            .await?;
        let mut first = None;
        for _ in 0..N {
            match c.next().await {
                Some(Ok(m)) => {
                    first.get_or_insert_with(Instant::now);
                    c.ack(&m).await?;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err("stream ended".into()),
            }
        }
        let took = first.map(|f| f.elapsed()).unwrap_or_default();
        let _ = c.close().await;
        took
    };
    Ok(N as f64 / took.as_secs_f64())
}

const LATENCY_RATE: u64 = 1_000;

/// Publish at [`LATENCY_RATE`] for 3 s (one message each tick, its receipt
/// not awaited before the next) and measure publish -> handler.
async fn latency(cx: &Ctx, i: usize, oona: bool) -> Res<Percentiles> {
    const SECS: u64 = 3;
    const N: usize = (LATENCY_RATE * SECS) as usize;
    let t = bench_topic("latency", i, oona)?;
    cx.oona.publish(envelope(&t, 0)).await?;
    let base = Instant::now();
    let nanos = move || u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let tick = Duration::from_nanos(1_000_000_000 / LATENCY_RATE);
    let mut lats: Vec<u64> = Vec::with_capacity(N);
    let mut record = |p: &[u8]| {
        let s = stamp_of(p);
        if s != 0 {
            lats.push(nanos().saturating_sub(s));
        }
    };
    if oona {
        let sub = Subscription::new(t.clone(), Name::new("bench")?).start(StartPosition::Earliest);
        let mut s = cx.oona.subscribe(sub).await?;
        let producer = async {
            let start = tokio::time::Instant::now();
            let mut inflight = Vec::with_capacity(N);
            for n in 0..N as u32 {
                tokio::time::sleep_until(start + tick * n).await;
                let o = cx.oona.clone();
                let e = envelope(&t, nanos().max(1));
                inflight.push(tokio::spawn(async move { o.publish(e).await.map(|_| ()) }));
            }
            for h in inflight {
                h.await??;
            }
            Res::Ok(())
        };
        let consumer = async {
            for _ in 0..=N {
                let d = s.next().await.ok_or("stream ended")??;
                record(&d.envelope().payload);
                d.ack().await?;
            }
            Res::Ok(())
        };
        let (p, c) = tokio::join!(producer, consumer);
        p?;
        c?;
    } else {
        let rec = RawRecord::new(&t);
        let mut producer = cx.raw_producer(&t).await?;
        let mut c: pulsar::Consumer<Vec<u8>, _> = cx
            .raw
            .consumer()
            .with_topic(cx.full(&t))
            .with_subscription("bench")
            .with_subscription_type(pulsar::SubType::Shared)
            .with_options(
                pulsar::ConsumerOptions::default()
                    .with_initial_position(pulsar::consumer::InitialPosition::Earliest),
            )
            .build()
            .await?;
        let produce = async {
            let start = tokio::time::Instant::now();
            let mut receipts = Vec::with_capacity(N);
            for n in 0..N as u32 {
                tokio::time::sleep_until(start + tick * n).await;
                receipts.push(
                    producer
                        .send_non_blocking(rec.message(nanos().max(1)))
                        .await?,
                );
            }
            for r in receipts {
                r.await?;
            }
            Res::Ok(())
        };
        let consume = async {
            for _ in 0..=N {
                let m = c.next().await.ok_or("stream ended")??;
                record(&m.payload.data);
                c.ack(&m).await?;
            }
            Res::Ok(())
        };
        let (p, r) = tokio::join!(produce, consume);
        p?;
        r?;
        let _ = c.close().await;
    }
    let _ = cx.oona.delete_topic(&t).await;
    Ok(percentiles(&mut lats))
}
