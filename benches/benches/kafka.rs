//! Oona on Kafka beside the raw `rdkafka` client doing the same work.
//!
//! ```text
//! scripts/brokers.sh up kafka && set -a && . target/brokers.env && set +a
//! cargo bench -p oona-benches --bench kafka
//! ```
//!
//! Each figure is the median of interleaved rounds (Oona, raw, Oona, raw,
//! ...), 256-byte payloads, acks=all, idempotent producer, linger 0 on both
//! sides, and the same record headers (the raw side sends Oona's
//! CloudEvents headers, encoded once up front), so the broker does the same
//! work and what differs is Oona's own:
//! - publish, one awaited call at a time;
//! - publish, 100 in flight (`publish_batch` of 100 vs 100 `send` futures
//!   joined);
//! - consume + commit of a pre-filled topic (subscription acking every
//!   message vs a `StreamConsumer` committing every 1,000), timed from the
//!   first message, so the group join is not counted;
//! - end to end: publish (100 in flight) -> handler -> ack, concurrently;
//! - latency publish -> handler at a fixed 5,000 msg/s (p50 / p99 / p99.9).
//!
//! Both sides wait at most 10 ms in an empty fetch (`fetch.wait.max.ms`;
//! Kafka answers at once when records are there), one partition, so the
//! pace figures compare the clients, not their idle polling.

use oona_benches::{
    bench_topic, broker_url, envelope, print_throughput as row, rounds, run_main, stamp_of,
    BoxError, Res, PAYLOAD,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use oona_core::{Name, StartPosition, Subscription, Topic, Transport};
use oona_kafka::KafkaTransport;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

const ROUNDS: usize = 3;
/// Client settings of the Oona side; the raw side mirrors them.
const PARAMS: &str = "fetch_wait=10ms&partitions=1";

fn main() {
    let url = broker_url("OONA_TEST_KAFKA_URL", "kafka");
    run_main(run(&url));
}

struct Ctx {
    oona: KafkaTransport,
    raw: FutureProducer,
    bootstrap: String,
    base: Instant,
}

async fn run(url: &str) -> Res<()> {
    let sep = if url.contains('?') { '&' } else { '?' };
    let oona = oona_kafka::connect(&format!("{url}{sep}{PARAMS}")).await?;
    let bootstrap = oona.options().brokers.join(",");
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("socket.nagle.disable", "true")
        .create()?;
    let cx = Ctx {
        oona,
        raw,
        bootstrap,
        base: Instant::now(),
    };
    println!("Oona vs raw rdkafka on the Kafka broker at {url}: {PAYLOAD}-byte payloads, acks=all, median of {ROUNDS} interleaved rounds");
    println!();
    println!("| scenario | Oona | raw | Oona/raw | target |");
    println!("|---|---:|---:|---:|---|");
    // OONA_BENCH_ONLY=publish|consume|e2e|latency runs one part.
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
        row("consume + commit, pre-filled (msg/s)", o, r, "≥ 90%");
    }
    if part("e2e") {
        let (o, r) = rounds(
            ROUNDS,
            |i| end_to_end(&cx, i, true),
            |i| end_to_end(&cx, i, false),
        )
        .await?;
        row("end to end publish→handler→ack (msg/s)", o, r, "");
    }
    if part("latency") {
        let lo = latency(&cx, 0, true).await?;
        let lr = latency(&cx, 0, false).await?;
        println!();
        println!(
            "latency publish→handler at 5,000 msg/s ({} messages; fetch.wait.max.ms=10), ms:",
            lo.n
        );
        println!("| | p50 | p99 | p99.9 | max |");
        println!("|---|---:|---:|---:|---:|");
        println!(
            "| Oona | {:.3} | {:.3} | {:.3} | {:.3} |",
            lo.p50, lo.p99, lo.p999, lo.max
        );
        println!(
            "| raw | {:.3} | {:.3} | {:.3} | {:.3} |",
            lr.p50, lr.p99, lr.p999, lr.max
        );
    }
    cx.oona.close().await?;
    Ok(())
}

/// What the raw side sends: Oona's headers for a typical envelope, encoded
/// once, and a payload with the stamp written in.
struct RawRecord {
    headers: OwnedHeaders,
    payload: Vec<u8>,
}

impl RawRecord {
    fn new(t: &Topic) -> Self {
        let e = envelope(t, 0);
        RawRecord {
            headers: oona_kafka::headers::encode(&e, &[]),
            payload: e.payload.to_vec(),
        }
    }

    async fn send(&self, raw: &FutureProducer, t: &str, stamp: u64) -> Res<()> {
        let mut p = self.payload.clone();
        p[..8].copy_from_slice(&stamp.to_le_bytes());
        raw.send(
            FutureRecord::<(), [u8]>::to(t)
                .payload(&p)
                .headers(self.headers.clone()),
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| BoxError::from(e))
    }
}

/// Delete a round's topic, so rounds do not fill the broker's disk.
async fn cleanup(cx: &Ctx, t: &Topic) -> Res<()> {
    Ok(cx.oona.delete_topic(t).await?)
}

async fn publish_single(cx: &Ctx, i: usize, oona: bool) -> Res<f64> {
    const N: usize = 2_000;
    let t = bench_topic("single", i, oona)?;
    // Both sides publish to a topic that exists.
    cx.oona.publish(envelope(&t, 0)).await?;
    let rec = RawRecord::new(&t);
    let started = Instant::now();
    for n in 0..N {
        if oona {
            cx.oona.publish(envelope(&t, n as u64)).await?;
        } else {
            rec.send(&cx.raw, t.as_str(), n as u64).await?;
        }
    }
    let rate = N as f64 / started.elapsed().as_secs_f64();
    cleanup(cx, &t).await?;
    Ok(rate)
}

async fn publish_hundred(cx: &Ctx, t: &Topic, rec: &RawRecord, b: usize, oona: bool) -> Res<()> {
    const BATCH: usize = 100;
    if oona {
        let batch = (0..BATCH)
            .map(|n| envelope(t, (b * BATCH + n) as u64))
            .collect();
        cx.oona.publish_batch(batch).await?;
    } else {
        let sends = (0..BATCH).map(|n| rec.send(&cx.raw, t.as_str(), (b * BATCH + n) as u64));
        for r in futures::future::join_all(sends).await {
            r?;
        }
    }
    Ok(())
}

async fn publish_batched(cx: &Ctx, i: usize, oona: bool) -> Res<f64> {
    const N: usize = 50_000;
    let t = bench_topic("batch", i, oona)?;
    cx.oona.publish(envelope(&t, 0)).await?;
    let rec = RawRecord::new(&t);
    let started = Instant::now();
    for b in 0..N / 100 {
        publish_hundred(cx, &t, &rec, b, oona).await?;
    }
    let rate = N as f64 / started.elapsed().as_secs_f64();
    cleanup(cx, &t).await?;
    Ok(rate)
}

struct Joined(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>);
impl ClientContext for Joined {}
impl ConsumerContext for Joined {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = r {
            if let Some(tx) = self.0.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(());
            }
        }
    }
}

/// Raw: a `StreamConsumer` committing every 1,000 messages and at the end.
/// Returns the time from the first message to the last.
async fn raw_consume(
    cx: &Ctx,
    t: &Topic,
    group: &str,
    n: usize,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
    mut on_msg: impl FnMut(&[u8]),
) -> Res<Duration> {
    let (jtx, jrx) = tokio::sync::oneshot::channel();
    let c: StreamConsumer<Joined> = ClientConfig::new()
        .set("bootstrap.servers", &cx.bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "10")
        .set("socket.nagle.disable", "true")
        .create_with_context(Joined(std::sync::Mutex::new(Some(jtx))))?;
    c.subscribe(&[t.as_str()])?;
    let mut got = 0;
    let mut first = None;
    let mut ready = ready;
    let mut joined = jrx;
    loop {
        tokio::select! {
            m = c.recv() => {
                let m = m?;
                first.get_or_insert_with(Instant::now);
                on_msg(m.payload().unwrap_or_default());
                let last_offset = m.offset();
                got += 1;
                if got % 1000 == 0 || got == n {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(t.as_str(), m.partition(), Offset::Offset(last_offset + 1))?;
                    c.commit(&tpl, if got == n { CommitMode::Sync } else { CommitMode::Async })?;
                }
                if got >= n {
                    break;
                }
            }
            _ = &mut joined, if ready.is_some() => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
        }
    }
    Ok(first.map(|f| f.elapsed()).unwrap_or_default())
}

/// Oona: subscribe and ack until `n` are settled; time from the first
/// message to the last ack.
async fn oona_consume(
    cx: &Ctx,
    t: &Topic,
    group: &str,
    n: usize,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
    mut on_msg: impl FnMut(&[u8]),
) -> Res<Duration> {
    let sub = Subscription::new(t.clone(), Name::new(group)?).start(StartPosition::Earliest);
    let mut s = cx.oona.subscribe(sub).await?;
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let mut got = 0;
    let mut first = None;
    while got < n {
        match s.next().await {
            Some(Ok(d)) => {
                first.get_or_insert_with(Instant::now);
                on_msg(&d.envelope().payload);
                d.ack().await?;
                got += 1;
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err("stream ended".into()),
        }
    }
    Ok(first.map(|f| f.elapsed()).unwrap_or_default())
}

async fn consume(cx: &Ctx, i: usize, oona: bool) -> Res<f64> {
    const N: usize = 50_000;
    let t = bench_topic("consume", i, oona)?;
    cx.oona.publish(envelope(&t, 0)).await?;
    let rec = RawRecord::new(&t);
    for b in 0..(N - 1).div_ceil(1000) {
        let sends =
            (0..1000.min(N - 1 - b * 1000)).map(|k| rec.send(&cx.raw, t.as_str(), k as u64));
        for r in futures::future::join_all(sends).await {
            r?;
        }
    }
    let took = if oona {
        oona_consume(cx, &t, "bench", N, None, |_| {}).await?
    } else {
        raw_consume(cx, &t, "bench", N, None, |_| {}).await?
    };
    let rate = N as f64 / took.as_secs_f64();
    cleanup(cx, &t).await?;
    Ok(rate)
}

async fn end_to_end(cx: &Ctx, i: usize, oona: bool) -> Res<f64> {
    const N: usize = 30_000;
    let t = bench_topic("e2e", i, oona)?;
    cx.oona.publish(envelope(&t, 0)).await?;
    let rec = RawRecord::new(&t);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    // The first message was published above: N + 1 in all.
    let consumer = async {
        if oona {
            oona_consume(cx, &t, "bench", N + 1, Some(ready_tx), |_| {}).await
        } else {
            raw_consume(cx, &t, "bench", N + 1, Some(ready_tx), |_| {}).await
        }
    };
    let producer = async {
        let _ = ready_rx.await;
        let started = Instant::now();
        for b in 0..N / 100 {
            publish_hundred(cx, &t, &rec, b, oona).await?;
        }
        Res::Ok(started)
    };
    let (c, p) = tokio::join!(consumer, producer);
    c?;
    let rate = N as f64 / p?.elapsed().as_secs_f64();
    cleanup(cx, &t).await?;
    Ok(rate)
}

#[derive(Clone)]
struct Lat {
    n: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn nanos(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Publish at a fixed 5,000 msg/s for 2 s (5 messages each millisecond,
/// each its own concurrent publish call) and measure publish -> handler.
async fn latency(cx: &Ctx, i: usize, oona: bool) -> Res<Lat> {
    const RATE: u64 = 5_000;
    const SECS: u64 = 2;
    const N: usize = (RATE * SECS) as usize;
    let t = bench_topic("latency", i, oona)?;
    // A marker to create the topic; the consumers skip it (stamp 0).
    cx.oona.publish(envelope(&t, 0)).await?;
    let rec = Arc::new(RawRecord::new(&t));
    let base = cx.base;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let consumer = async {
        let mut lats = Vec::with_capacity(N);
        let record = |p: &[u8], lats: &mut Vec<u64>| {
            let s = stamp_of(p);
            if s != 0 {
                lats.push(nanos(base).saturating_sub(s));
            }
        };
        if oona {
            oona_consume(cx, &t, "bench", N + 1, Some(ready_tx), |p| {
                record(p, &mut lats)
            })
            .await?;
        } else {
            raw_consume(cx, &t, "bench", N + 1, Some(ready_tx), |p| {
                record(p, &mut lats)
            })
            .await?;
        }
        Res::Ok(lats)
    };
    let producer = async {
        let _ = ready_rx.await;
        let start = tokio::time::Instant::now();
        let mut inflight = Vec::with_capacity(16);
        for ms in 0..(SECS * 1000) {
            tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
            for _ in 0..(RATE / 1000) {
                let stamp = nanos(base).max(1);
                if oona {
                    let o = cx.oona.clone();
                    let e = envelope(&t, stamp);
                    inflight.push(tokio::spawn(async move {
                        o.publish(e).await.map(|_| ()).map_err(BoxError::from)
                    }));
                } else {
                    let (raw, rec, name) = (cx.raw.clone(), Arc::clone(&rec), t.to_string());
                    inflight.push(tokio::spawn(
                        async move { rec.send(&raw, &name, stamp).await },
                    ));
                }
            }
            // Reap finished publishes without waiting, so the rate holds.
            let mut still = Vec::with_capacity(inflight.len());
            for h in inflight.drain(..) {
                if h.is_finished() {
                    h.await??;
                } else {
                    still.push(h);
                }
            }
            inflight = still;
        }
        for h in inflight {
            h.await??;
        }
        Res::Ok(())
    };
    let (lats, p) = tokio::join!(consumer, producer);
    p?;
    let mut lats = lats?;
    cleanup(cx, &t).await?;
    lats.sort_unstable();
    if lats.is_empty() {
        return Err("no latencies measured".into());
    }
    let q = |p: f64| lats[((lats.len() as f64 * p) as usize).min(lats.len() - 1)] as f64 / 1e6;
    Ok(Lat {
        n: lats.len(),
        p50: q(0.50),
        p99: q(0.99),
        p999: q(0.999),
        max: q(1.0),
    })
}
