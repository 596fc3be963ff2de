//! Oona's in-memory transport (`memory://`) beside a `tokio::sync::mpsc`
//! channel doing the same work.
//!
//! ```text
//! cargo bench -p oona-benches --bench memory
//! ```
//!
//! No broker needed. 256-byte payloads; throughput figures are the median of
//! interleaved rounds (Oona, mpsc, Oona, mpsc, ...):
//! - publish, one call per message (`publish` vs `send`);
//! - publish, batches of 100 (`publish_batch` vs 100 `send`s: a channel
//!   has no batch send, and one `send` of a `Vec` would store one entry
//!   where Oona stores 100 individually consumable ones);
//! - the same with envelopes built before timing (transport cost only);
//! - end to end publish -> consume -> ack with one consumer and with 4
//!   competing consumers of one group (mpsc: 4 tasks sharing the receiver
//!   behind a mutex; ack is nothing);
//! - latency publish -> handler at a fixed 10,000 msg/s (p50 / p99 / p99.9);
//! - live heap and process RSS every 100,000 of 1,000,000 messages
//!   published and consumed + acked through one group, at capacity 10,000
//!   and at the default capacity, beside mpsc channels of those bounds.
//!
//! The mpsc side carries the payload `Bytes` (the prebuilt row carries the
//! same `Envelope`s); what differs is Oona's own work: building the
//! envelope, topic logs, consumer groups, pending sets, settlement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use oona_benches::{
    envelope, payload, percentiles, print_throughput, rounds, stamp_of, Percentiles, Res, PAYLOAD,
};
use oona_core::memory::{MemoryConfig, MemoryTransport};
use oona_core::{
    Envelope, ErrorKind, Name, StartPosition, Subscription, Timestamp, Topic, Transport,
};
use tokio::sync::{mpsc, Mutex, Notify};

const ROUNDS: usize = 3;
const BATCH: usize = 100;

fn main() {
    // Each RSS series runs in a fresh process of this binary, so that what
    // the allocator kept from earlier scenarios does not hide its growth.
    let child = std::env::var(MEM_CHILD).ok();
    if child.is_some() {
        COUNT.store(true, Ordering::Relaxed);
    }
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
    let result = match child {
        Some(side) => rt.block_on(memory_child(&side)),
        None => rt.block_on(run()),
    };
    if let Err(e) = result {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Res<()> {
    let total = Instant::now();
    let base = Instant::now();
    println!(
        "Oona memory:// vs tokio::sync::mpsc: {PAYLOAD}-byte payloads, 2 worker threads, \
         median of {ROUNDS} interleaved rounds"
    );
    println!();
    println!("| scenario | Oona | mpsc | Oona/mpsc | target |");
    println!("|---|---:|---:|---:|---|");

    // Development aid: `OONA_BENCH_ONLY=publish,e2e,...` runs only those.
    let only = std::env::var("OONA_BENCH_ONLY").ok();
    let want = |s: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == s));
    if want("publish") {
        let (o, r) = rounds(ROUNDS, |_| publish_single(true), |_| publish_single(false)).await?;
        print_throughput("publish, 1 per call (msg/s)", o, r, "");
    }
    if want("batch") {
        let (o, r) = rounds(
            ROUNDS,
            |_| publish_batched(true),
            |_| publish_batched(false),
        )
        .await?;
        print_throughput("publish, batches of 100 (msg/s)", o, r, "");
    }
    if want("prebuilt") {
        let (o, r) = rounds(
            ROUNDS,
            |_| publish_prebuilt(true),
            |_| publish_prebuilt(false),
        )
        .await?;
        print_throughput(
            "publish, batches of 100, envelopes built before timing (msg/s)",
            o,
            r,
            "",
        );
    }
    if want("consume") {
        for window in [1, 256] {
            let (o, r) = rounds(
                ROUNDS,
                |_| consume(window, true),
                |_| consume(window, false),
            )
            .await?;
            print_throughput(
                &format!("consume + ack, pre-filled, {window} unacked at a time (msg/s)"),
                o,
                r,
                "",
            );
        }
        let (o, r) = rounds(ROUNDS, |_| consume_at(true), |_| consume_at(false)).await?;
        print_throughput(
            "consume + ack, group starting At(now) after 100,000 retained entries (msg/s)",
            o,
            r,
            "",
        );
    }
    if want("e2e") {
        let (o, r) = rounds(
            ROUNDS,
            |_| end_to_end(1, 0, true),
            |_| end_to_end(1, 0, false),
        )
        .await?;
        print_throughput(
            "end to end publish→consume→ack, 1 consumer (msg/s)",
            o,
            r,
            "",
        );
        let (o, r) = rounds(
            ROUNDS,
            |_| end_to_end(4, 0, true),
            |_| end_to_end(4, 0, false),
        )
        .await?;
        print_throughput(
            "end to end publish→consume→ack, 4 competing consumers (msg/s)",
            o,
            r,
            "",
        );
        let (o, r) = rounds(
            ROUNDS,
            |_| end_to_end(1, 100, true),
            |_| end_to_end(1, 100, false),
        )
        .await?;
        print_throughput(
            "end to end, 1 consumer, 100 idle subscriptions on other topics (msg/s)",
            o,
            r,
            "",
        );
    }
    if want("latency") {
        latencies(base).await?;
    }
    if want("memory") {
        memories().await?;
    }
    println!();
    println!("total bench time {:.1} s", total.elapsed().as_secs_f64());
    Ok(())
}

async fn latencies(base: Instant) -> Res<()> {
    println!();
    println!(
        "latency publish→handler at 10,000 msg/s ({LAT_SECS} s per run, 10 publishes each ms), ms:"
    );
    println!("| | p50 | p99 | p99.9 | max | samples |");
    println!("|---|---:|---:|---:|---:|---:|");
    for run in 1..=2 {
        let o = latency(base, true).await?;
        lat_row(&format!("Oona, run {run}"), &o);
        let r = latency(base, false).await?;
        lat_row(&format!("mpsc, run {run}"), &r);
    }
    Ok(())
}

async fn memories() -> Res<()> {
    println!();
    println!(
        "memory after every 100,000 of {MEM_N} messages published and consumed + acked \
         through one group, each series in a fresh process; MiB, live heap (bytes allocated \
         and not freed, counted by the bench's allocator) / RSS (/proc/self/statm × 4 KiB):"
    );
    let series = [
        ("Oona, capacity 10,000", "oona:10000"),
        ("Oona, default capacity 100,000", "oona:default"),
        ("mpsc, bounded 10,000", "mpsc:10000"),
        ("mpsc, bounded 100,000", "mpsc:100000"),
    ];
    for (name, side) in series {
        let out = std::process::Command::new(std::env::current_exe()?)
            .env(MEM_CHILD, side)
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "memory series {side} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let mut samples = Vec::new();
        for line in String::from_utf8(out.stdout)?.lines() {
            let (heap, rss) = line.split_once(' ').ok_or("bad memory sample line")?;
            samples.push(Sample {
                heap: heap.parse()?,
                rss: rss.parse()?,
            });
        }
        let (start, samples) = samples
            .split_first()
            .ok_or("memory series printed nothing")?;
        print_series(name, start, samples);
    }
    Ok(())
}

fn topic(what: &str) -> Res<Topic> {
    Ok(Topic::new(format!("telemetry.bench.memory_{what}"))?)
}

fn transport(capacity: usize) -> Res<MemoryTransport> {
    Ok(MemoryTransport::with_config(
        MemoryConfig::default().capacity(capacity)?,
    ))
}

fn subscription(t: &Topic) -> Res<Subscription> {
    Ok(Subscription::new(t.clone(), Name::new("bench")?).start(StartPosition::Earliest))
}

/// Publish, retrying while the topic is full: the memory transport refuses
/// (never drops) when `capacity` entries are unsettled, like a bounded
/// channel's `send` waits. A refused envelope was not stored, so the retry
/// builds a fresh one rather than paying a clone on every call.
async fn publish(m: &MemoryTransport, t: &Topic, stamp: u64) -> Res<()> {
    loop {
        match m.publish(envelope(t, stamp)).await {
            Ok(_) => return Ok(()),
            Err(err) if err.kind() == ErrorKind::ResourceExhausted => {
                tokio::task::yield_now().await
            }
            Err(err) => return Err(err.into()),
        }
    }
}

const PUBLISH_N: usize = 100_000;

async fn publish_single(oona: bool) -> Res<f64> {
    let t = topic("publish")?;
    if oona {
        let m = transport(PUBLISH_N)?;
        let started = Instant::now();
        for n in 0..PUBLISH_N {
            m.publish(envelope(&t, n as u64)).await?;
        }
        Ok(rate(PUBLISH_N, started))
    } else {
        let (tx, _rx) = mpsc::channel(PUBLISH_N);
        let started = Instant::now();
        for n in 0..PUBLISH_N {
            tx.send(payload(n as u64)).await?;
        }
        Ok(rate(PUBLISH_N, started))
    }
}

async fn publish_batched(oona: bool) -> Res<f64> {
    const N: usize = 300_000;
    let t = topic("batch")?;
    if oona {
        let m = transport(N)?;
        let started = Instant::now();
        for b in 0..N / BATCH {
            let batch = (0..BATCH)
                .map(|n| envelope(&t, (b * BATCH + n) as u64))
                .collect();
            m.publish_batch(batch).await?;
        }
        Ok(rate(N, started))
    } else {
        let (tx, _rx) = mpsc::channel(N);
        let started = Instant::now();
        for b in 0..N / BATCH {
            let batch: Vec<Bytes> = (0..BATCH)
                .map(|n| payload((b * BATCH + n) as u64))
                .collect();
            for p in batch {
                tx.send(p).await?;
            }
        }
        Ok(rate(N, started))
    }
}

async fn publish_prebuilt(oona: bool) -> Res<f64> {
    const N: usize = 300_000;
    let t = topic("prebuilt")?;
    let mut batches: Vec<Vec<Envelope>> = (0..N / BATCH)
        .map(|b| {
            (0..BATCH)
                .map(|n| envelope(&t, (b * BATCH + n) as u64))
                .collect()
        })
        .collect();
    if oona {
        let m = transport(N)?;
        let started = Instant::now();
        for batch in batches.drain(..) {
            m.publish_batch(batch).await?;
        }
        Ok(rate(N, started))
    } else {
        let (tx, _rx) = mpsc::channel(N);
        let started = Instant::now();
        for batch in batches.drain(..) {
            for e in batch {
                tx.send(e).await?;
            }
        }
        Ok(rate(N, started))
    }
}

fn rate(n: usize, started: Instant) -> f64 {
    n as f64 / started.elapsed().as_secs_f64()
}

/// Consume + ack a pre-filled topic with one consumer, keeping up to
/// `window` deliveries unacked (as a handler runner with that concurrency
/// does; the oldest is acked when the window is full). mpsc: `recv` only.
async fn consume(window: usize, oona: bool) -> Res<f64> {
    const N: usize = 200_000;
    let t = topic("consume")?;
    if oona {
        let m = transport(N)?;
        let mut s = m
            .subscribe(subscription(&t)?.prefetch(window.max(1)))
            .await?;
        for b in 0..N / BATCH {
            let batch = (0..BATCH)
                .map(|n| envelope(&t, (b * BATCH + n) as u64))
                .collect();
            m.publish_batch(batch).await?;
        }
        let mut held = std::collections::VecDeque::with_capacity(window);
        let started = Instant::now();
        for _ in 0..N {
            if held.len() == window {
                if let Some(d) = held.pop_front() {
                    oona_core::Delivery::ack(d).await?;
                }
            }
            held.push_back(s.next().await.ok_or("stream ended")??);
        }
        for d in held {
            d.ack().await?;
        }
        Ok(rate(N, started))
    } else {
        consume_n(N).await
    }
}

/// A group that starts at a time, on a topic with 100,000 older entries
/// kept: consume + ack 20,000 newer ones. mpsc: `recv` only (a channel has
/// no history to skip).
async fn consume_at(oona: bool) -> Res<f64> {
    const HISTORY: usize = 100_000;
    const N: usize = 20_000;
    let t = topic("at")?;
    if !oona {
        return consume_n(N).await;
    }
    let m = transport(HISTORY + N)?;
    for b in 0..HISTORY / BATCH {
        let batch = (0..BATCH)
            .map(|n| envelope(&t, (b * BATCH + n) as u64))
            .collect();
        m.publish_batch(batch).await?;
    }
    // Strictly after the history's store times.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let sub = subscription(&t)?.start(StartPosition::At(Timestamp::now()));
    let mut s = m.subscribe(sub).await?;
    for b in 0..N / BATCH {
        let batch = (0..BATCH)
            .map(|n| envelope(&t, (b * BATCH + n) as u64))
            .collect();
        m.publish_batch(batch).await?;
    }
    let started = Instant::now();
    for _ in 0..N {
        s.next().await.ok_or("stream ended")??.ack().await?;
    }
    Ok(rate(N, started))
}

async fn consume_n(n: usize) -> Res<f64> {
    let (tx, mut rx) = mpsc::channel(n);
    for i in 0..n {
        tx.send(payload(i as u64)).await?;
    }
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(rx.recv().await.ok_or("channel closed")?);
    }
    Ok(rate(n, started))
}

/// Publish (one call per message) while `consumers` consumers of one group
/// take and ack; the clock stops at the last ack. `idle` subscriptions
/// (receivers) on other topics wait meanwhile: they should cost nothing.
async fn end_to_end(consumers: usize, idle: usize, oona: bool) -> Res<f64> {
    const N: usize = 300_000;
    let t = topic("e2e")?;
    let acked = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    if oona {
        let m = Arc::new(MemoryTransport::new());
        for i in 0..idle {
            let mut s = m
                .subscribe(subscription(&topic(&format!("idle{i}"))?)?)
                .await?;
            tasks.push(tokio::spawn(async move {
                while let Some(d) = s.next().await {
                    d?.ack().await?;
                }
                Res::Ok(())
            }));
        }
        for _ in 0..consumers {
            let mut s = m.subscribe(subscription(&t)?).await?;
            let (acked, all_done) = (acked.clone(), all_done.clone());
            tasks.push(tokio::spawn(async move {
                while let Some(d) = s.next().await {
                    d?.ack().await?;
                    if acked.fetch_add(1, Ordering::Relaxed) + 1 == N {
                        all_done.notify_one();
                    }
                }
                Res::Ok(())
            }));
        }
        let started = Instant::now();
        let producer = {
            let (m, t) = (m.clone(), t.clone());
            tokio::spawn(async move {
                for n in 0..N {
                    publish(&m, &t, n as u64).await?;
                }
                Res::Ok(())
            })
        };
        all_done.notified().await;
        let r = rate(N, started);
        producer.await??;
        m.close().await?;
        for task in tasks {
            task.await??;
        }
        Ok(r)
    } else {
        // Same bound as the transport's default capacity.
        let (tx, rx) = mpsc::channel::<Bytes>(MemoryConfig::DEFAULT_CAPACITY);
        let rx = Arc::new(Mutex::new(rx));
        let mut idle_tx = Vec::new();
        for _ in 0..idle {
            let (tx, mut rx) = mpsc::channel::<Bytes>(1);
            idle_tx.push(tx);
            tasks.push(tokio::spawn(async move {
                while rx.recv().await.is_some() {}
                Res::Ok(())
            }));
        }
        for _ in 0..consumers {
            let (acked, all_done, rx) = (acked.clone(), all_done.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(p) = rx.lock().await.recv().await else {
                        break;
                    };
                    std::hint::black_box(p);
                    if acked.fetch_add(1, Ordering::Relaxed) + 1 == N {
                        all_done.notify_one();
                    }
                }
                Res::Ok(())
            }));
        }
        let started = Instant::now();
        let producer = tokio::spawn(async move {
            for n in 0..N {
                tx.send(payload(n as u64)).await?;
            }
            Res::Ok(())
        });
        all_done.notified().await;
        let r = rate(N, started);
        producer.await??;
        drop(idle_tx);
        for task in tasks {
            task.await??;
        }
        Ok(r)
    }
}

const LAT_RATE: u64 = 10_000;
const LAT_SECS: u64 = 2;

fn nanos(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Publish at a fixed 10,000 msg/s (10 each millisecond: tokio's timer has
/// millisecond resolution) and measure publish -> handler, acking each.
async fn latency(base: Instant, oona: bool) -> Res<Percentiles> {
    const N: usize = (LAT_RATE * LAT_SECS) as usize;
    let t = topic("latency")?;
    let m = Arc::new(MemoryTransport::new());
    let (tx, mut rx) = mpsc::channel::<Bytes>(MemoryConfig::DEFAULT_CAPACITY);
    let consumer = if oona {
        let mut s = m.subscribe(subscription(&t)?).await?;
        tokio::spawn(async move {
            let mut lats = Vec::with_capacity(N);
            while lats.len() < N {
                let d = s.next().await.ok_or("stream ended")??;
                lats.push(nanos(base).saturating_sub(stamp_of(&d.envelope().payload)));
                d.ack().await?;
            }
            Res::Ok(lats)
        })
    } else {
        tokio::spawn(async move {
            let mut lats = Vec::with_capacity(N);
            while lats.len() < N {
                let p = rx.recv().await.ok_or("channel closed")?;
                lats.push(nanos(base).saturating_sub(stamp_of(&p)));
            }
            Res::Ok(lats)
        })
    };
    let start = tokio::time::Instant::now();
    for ms in 0..(LAT_SECS * 1000) {
        tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
        for _ in 0..(LAT_RATE / 1000) {
            if oona {
                publish(&m, &t, nanos(base)).await?;
            } else {
                tx.send(payload(nanos(base))).await?;
            }
        }
    }
    let mut lats = consumer.await??;
    m.close().await?;
    Ok(percentiles(&mut lats))
}

fn lat_row(name: &str, p: &Percentiles) {
    println!(
        "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
        p.p50, p.p99, p.p999, p.max, p.n
    );
}

const MEM_N: usize = 1_000_000;
const MEM_CHILD: &str = "OONA_BENCH_MEMORY_SERIES";
const MEM_EVERY: usize = 100_000;

enum Side {
    Oona(usize),
    Mpsc(usize),
}

/// The child process: run one series (`oona:<capacity>|oona:default|
/// mpsc:<bound>`) and print `heap rss` in bytes, before and per sample.
async fn memory_child(spec: &str) -> Res<()> {
    let side = match spec.split_once(':') {
        Some(("oona", "default")) => Side::Oona(MemoryConfig::DEFAULT_CAPACITY),
        Some(("oona", n)) => Side::Oona(n.parse()?),
        Some(("mpsc", n)) => Side::Mpsc(n.parse()?),
        _ => return Err(format!("bad {MEM_CHILD}={spec}").into()),
    };
    let (start, samples) = memory(side).await?;
    for s in std::iter::once(start).chain(samples) {
        println!("{} {}", s.heap, s.rss);
    }
    Ok(())
}

/// Resident set size in KiB. statm counts pages; 4 KiB pages on the
/// machines we bench on (x86_64, aarch64 Linux defaults).
fn rss_kib() -> Res<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or("short /proc/self/statm")?
        .parse()?;
    Ok(pages * 4)
}

/// Publish `MEM_N` messages while one consumer takes and acks them; sample
/// memory after every `MEM_EVERY` acks. Returns the memory before and the
/// samples.
async fn memory(side: Side) -> Res<(Sample, Vec<Sample>)> {
    let t = topic("rss")?;
    let start = sample()?;
    let mut samples = Vec::new();
    match side {
        Side::Oona(capacity) => {
            let m = Arc::new(transport(capacity)?);
            let mut s = m.subscribe(subscription(&t)?).await?;
            let producer = {
                let (m, t) = (m.clone(), t.clone());
                tokio::spawn(async move {
                    for n in 0..MEM_N {
                        publish(&m, &t, n as u64).await?;
                    }
                    Res::Ok(())
                })
            };
            for n in 1..=MEM_N {
                s.next().await.ok_or("stream ended")??.ack().await?;
                if n % MEM_EVERY == 0 {
                    samples.push(sample()?);
                }
            }
            producer.await??;
            m.close().await?;
        }
        Side::Mpsc(bound) => {
            let (tx, mut rx) = mpsc::channel::<Envelope>(bound);
            let producer = tokio::spawn(async move {
                for n in 0..MEM_N {
                    tx.send(envelope(&t, n as u64)).await?;
                }
                Res::Ok(())
            });
            for n in 1..=MEM_N {
                std::hint::black_box(rx.recv().await.ok_or("channel closed")?);
                if n % MEM_EVERY == 0 {
                    samples.push(sample()?);
                }
            }
            producer.await??;
        }
    }
    Ok((start, samples))
}

/// Print the series and whether it is flat. A leak shows in the live heap;
/// RSS also moves with the allocator's free lists and per-thread arenas,
/// so the verdict is on the heap: from 300,000 messages on (past either
/// capacity plus the consumer's lag) it may not grow by more than
/// max(1 MiB, 5%). The margin is for the consumer's lag: a stored payload
/// gains a small shared header (`bytes`) when first delivered, so the heap
/// moves by up to ~32 bytes × capacity as the lag changes; a leak of a few
/// bytes per message over 700,000 messages still exceeds it. RSS growth
/// over the same span is printed beside it.
fn print_series(name: &str, start: &Sample, samples: &[Sample]) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let list: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.1}/{:.1}", mib(s.heap), mib(s.rss)))
        .collect();
    let growth = |f: fn(&Sample) -> u64| {
        let tail = samples.get(2..).unwrap_or(&[]);
        let first = tail.first().map_or(0, f);
        let last = tail.last().map_or(0, f);
        (first, last.saturating_sub(first))
    };
    let (heap_at, heap_growth) = growth(|s| s.heap);
    let (_, rss_growth) = growth(|s| s.rss);
    let allowed = (heap_at / 20).max(1 << 20);
    let verdict = if heap_growth <= allowed {
        "flat"
    } else {
        "GROWING"
    };
    println!(
        "- {name}: before {:.1}/{:.1}; {} → {verdict} (300k→1M: heap +{:.2} MiB, \
         allowed {:.2}; RSS +{:.2} MiB)",
        mib(start.heap),
        mib(start.rss),
        list.join(", "),
        mib(heap_growth),
        mib(allowed),
        mib(rss_growth),
    );
}

/// One memory sample, in bytes.
struct Sample {
    heap: u64,
    rss: u64,
}

/// The system allocator, counting live bytes once [`COUNT`] is set (only
/// in the memory child processes, so the throughput scenarios pay one
/// relaxed load per call).
struct Counting;

static COUNT: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicI64 = AtomicI64::new(0);

#[global_allocator]
static ALLOC: Counting = Counting;

// SAFETY: every call is forwarded unchanged to `System`; the counters are
// side bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && COUNT.load(Ordering::Relaxed) {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && COUNT.load(Ordering::Relaxed) {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        if COUNT.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && COUNT.load(Ordering::Relaxed) {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

fn sample() -> Res<Sample> {
    Ok(Sample {
        heap: u64::try_from(LIVE.load(Ordering::Relaxed)).unwrap_or(0),
        rss: rss_kib()? * 1024,
    })
}
