//! Oona on Redis Streams beside the raw `redis` crate doing the same work.
//!
//! ```text
//! scripts/brokers.sh up redis && set -a && . target/brokers.env && set +a
//! cargo bench -p oona-benches --bench redis
//! ```
//!
//! Each figure is the median of 5 interleaved rounds (Oona, raw, Oona, raw,
//! ...), 256-byte payloads, consumer groups with acks:
//! - publish, one awaited call at a time;
//! - publish, batches of 100 (`publish_batch` vs one pipeline of 100 XADD);
//! - consume + ack of a pre-filled stream (subscription vs XREADGROUP COUNT
//!   256 + one XACK per batch);
//! - end to end: publish (batches) -> handler -> ack, concurrently;
//! - latency publish -> handler at a fixed 10,000 msg/s (p50 / p99 / p99.9).
//!
//! The raw side writes the same fields Oona writes (encoded once up front),
//! so the server does the same work; what differs is Oona's own.

use oona_benches::{
    bench_topic, envelope, median, print_throughput as row, rounds, BoxError, Res, PAYLOAD,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use oona_core::wire::fields;
use oona_core::{Envelope, Name, StartPosition, Subscription, Topic, Transport};
use oona_redis::RedisTransport;
use redis::aio::MultiplexedConnection;
use redis::Value;

const ROUNDS: usize = 5;

fn main() {
    let Ok(url) = std::env::var("OONA_TEST_REDIS_URL") else {
        eprintln!("OONA_TEST_REDIS_URL is not set: run `scripts/brokers.sh up redis` and `set -a; . target/brokers.env; set +a` first");
        std::process::exit(2);
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("OONA_BENCH_WORKERS")
                .ok()
                .and_then(|w| w.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(&url)) {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

struct Ctx {
    oona: RedisTransport,
    raw: MultiplexedConnection,
    client: redis::Client,
    base: Instant,
}

async fn run(url: &str) -> Res<()> {
    let oona = RedisTransport::connect_url(url).await?;
    let client = redis::Client::open(url)?;
    let raw = client.get_multiplexed_tokio_connection().await?;
    let cx = Ctx {
        oona,
        raw,
        client,
        base: Instant::now(),
    };
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut cx.raw.clone())
        .await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    println!("Oona vs raw redis crate on Redis {version} at {url}: {PAYLOAD}-byte payloads, median of {ROUNDS} interleaved rounds");
    println!();
    println!("| scenario | Oona | raw | Oona/raw | target |");
    println!("|---|---:|---:|---:|---|");

    if let Ok(only) = std::env::var("OONA_BENCH_ONLY") {
        return only_scenario(&cx, &only).await;
    }
    let (o, r) = publish_single(&cx).await?;
    row("publish, 1 per call (msg/s)", o, r, "≥ 90%");
    let (o, r) = publish_batches(&cx, false).await?;
    row("publish, batches of 100 (msg/s)", o, r, "≥ 90%");
    let (o, r) = publish_batches(&cx, true).await?;
    row(
        "publish, batches of 100, envelopes built before timing (msg/s)",
        o,
        r,
        "",
    );
    let (o, r) = rounds(
        ROUNDS,
        |i| consume(&cx, i, true),
        |i| consume(&cx, i, false),
    )
    .await?;
    row("consume + ack, pre-filled (msg/s)", o, r, "≥ 75%");
    let (o, r) = rounds(
        ROUNDS,
        |i| end_to_end(&cx, i, true),
        |i| end_to_end(&cx, i, false),
    )
    .await?;
    row("end to end publish→handler→ack (msg/s)", o, r, "");

    let mut lat_o = Vec::new();
    let mut lat_r = Vec::new();
    for i in 0..2 {
        lat_o.push(latency(&cx, i, true).await?);
        lat_r.push(latency(&cx, i, false).await?);
    }
    let pick = |v: &mut Vec<Lat>| {
        v.sort_by(|a, b| a.p99.total_cmp(&b.p99));
        v[0].clone()
    };
    let (lo, lr) = (pick(&mut lat_o), pick(&mut lat_r));
    println!();
    println!(
        "latency publish→handler at 10,000 msg/s (best of 2 runs of {} messages), ms:",
        lo.n
    );
    println!("| | p50 | p99 | p99.9 | max | target |");
    println!("|---|---:|---:|---:|---:|---|");
    println!(
        "| Oona | {:.3} | {:.3} | {:.3} | {:.3} | p99 < 1 ms |",
        lo.p50, lo.p99, lo.p999, lo.max
    );
    println!(
        "| raw | {:.3} | {:.3} | {:.3} | {:.3} | |",
        lr.p50, lr.p99, lr.p999, lr.max
    );
    cx.oona.close().await?;
    Ok(())
}

/// The fields Oona writes for a typical envelope, encoded once, for the
/// raw side.
fn raw_fields(t: &Topic) -> Vec<(String, Vec<u8>)> {
    let e = envelope(t, 0);
    let mut f: Vec<(String, Vec<u8>)> = fields::encode(&e)
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    f.push(("payload".into(), e.payload.to_vec()));
    f
}

fn raw_xadd(pipe: &mut redis::Pipeline, key: &str, f: &[(String, Vec<u8>)], stamp: u64) {
    let cmd = pipe.cmd("XADD").arg(key).arg("*");
    for (k, v) in f {
        if k == "payload" {
            let mut p = v.clone();
            p[..8].copy_from_slice(&stamp.to_le_bytes());
            cmd.arg(k).arg(p);
        } else {
            cmd.arg(k).arg(v);
        }
    }
}

async fn cleanup(cx: &Ctx, t: &Topic) -> Res<()> {
    cx.oona.delete_topic(t).await?;
    Ok(())
}

/// One awaited publish at a time. The round-trip time on an idle loopback
/// swings with CPU power states from one second to the next, so Oona and
/// raw alternate every 100 messages within the round and each side's rate
/// is its messages over its own summed time.
async fn publish_single_pair(cx: &Ctx, i: usize) -> Res<(f64, f64)> {
    const N: usize = 5_000;
    const CHUNK: usize = 100;
    let t_oona = bench_topic("single", i, true)?;
    let t_raw = bench_topic("single", i, false)?;
    let key = cx.oona.stream_key(&t_raw);
    let f = raw_fields(&t_raw);
    let mut raw = cx.raw.clone();
    let (mut o, mut r) = (Duration::ZERO, Duration::ZERO);
    for c in 0..N / CHUNK {
        let started = Instant::now();
        for n in c * CHUNK..(c + 1) * CHUNK {
            cx.oona.publish(envelope(&t_oona, n as u64)).await?;
        }
        o += started.elapsed();
        let started = Instant::now();
        for n in c * CHUNK..(c + 1) * CHUNK {
            let mut p = redis::pipe();
            raw_xadd(&mut p, &key, &f, n as u64);
            let _: Vec<String> = p.query_async(&mut raw).await?;
        }
        r += started.elapsed();
    }
    cleanup(cx, &t_oona).await?;
    cleanup(cx, &t_raw).await?;
    Ok((N as f64 / o.as_secs_f64(), N as f64 / r.as_secs_f64()))
}

async fn publish_single(cx: &Ctx) -> Res<(f64, f64)> {
    let mut o = Vec::new();
    let mut r = Vec::new();
    for i in 0..ROUNDS {
        let (a, b) = publish_single_pair(cx, i).await?;
        o.push(a);
        r.push(b);
    }
    Ok((median(o), median(r)))
}

/// Batches of 100: `publish_batch` against one pipeline of 100 XADD,
/// alternating every 10 batches within the round (as the single case).
/// `prebuilt`: Oona's envelopes (ids, timestamps) are made before the clock
/// starts, as the raw side's fields are, leaving the transport's own work.
async fn publish_batches_pair(cx: &Ctx, i: usize, prebuilt: bool) -> Res<(f64, f64)> {
    const N: usize = 50_000;
    const BATCH: usize = 100;
    const CHUNK: usize = 10;
    let what = if prebuilt { "prebuilt" } else { "batch" };
    let t_oona = bench_topic(what, i, true)?;
    let t_raw = bench_topic(what, i, false)?;
    let key = cx.oona.stream_key(&t_raw);
    let f = raw_fields(&t_raw);
    let mut raw = cx.raw.clone();
    let make = |b: usize| -> Vec<Envelope> {
        (0..BATCH)
            .map(|n| envelope(&t_oona, (b * BATCH + n) as u64))
            .collect()
    };
    let mut ready: Vec<Vec<Envelope>> = if prebuilt {
        (0..N / BATCH).map(make).collect()
    } else {
        Vec::new()
    };
    ready.reverse();
    let (mut o, mut r) = (Duration::ZERO, Duration::ZERO);
    for c in 0..N / BATCH / CHUNK {
        let started = Instant::now();
        for b in c * CHUNK..(c + 1) * CHUNK {
            let batch = match ready.pop() {
                Some(batch) => batch,
                None => make(b),
            };
            cx.oona.publish_batch(batch).await?;
        }
        o += started.elapsed();
        let started = Instant::now();
        for b in c * CHUNK..(c + 1) * CHUNK {
            let mut p = redis::pipe();
            for n in 0..BATCH {
                raw_xadd(&mut p, &key, &f, (b * BATCH + n) as u64);
            }
            let _: Vec<String> = p.query_async(&mut raw).await?;
        }
        r += started.elapsed();
    }
    cleanup(cx, &t_oona).await?;
    cleanup(cx, &t_raw).await?;
    Ok((N as f64 / o.as_secs_f64(), N as f64 / r.as_secs_f64()))
}

async fn publish_batches(cx: &Ctx, prebuilt: bool) -> Res<(f64, f64)> {
    let mut o = Vec::new();
    let mut r = Vec::new();
    for i in 0..ROUNDS {
        let (a, b) = publish_batches_pair(cx, i, prebuilt).await?;
        o.push(a);
        r.push(b);
    }
    Ok((median(o), median(r)))
}

async fn prefill(cx: &Ctx, t: &Topic, n: usize) -> Res<()> {
    let key = cx.oona.stream_key(t);
    let f = raw_fields(t);
    let mut raw = cx.raw.clone();
    for b in 0..n.div_ceil(500) {
        let mut p = redis::pipe();
        for k in 0..500.min(n - b * 500) {
            raw_xadd(&mut p, &key, &f, (b * 500 + k) as u64);
        }
        let _: Vec<String> = p.query_async(&mut raw).await?;
    }
    Ok(())
}

async fn pending(cx: &Ctx, key: &str, group: &str) -> Res<i64> {
    let v: Value = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .query_async(&mut cx.raw.clone())
        .await?;
    Ok(match v {
        Value::Array(a) => match a.first() {
            Some(Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    })
}

/// Oona: subscribe and ack until `n` are settled and none is pending.
async fn oona_consume(
    cx: &Ctx,
    t: &Topic,
    group: &str,
    n: usize,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) -> Res<()> {
    let sub = Subscription::new(t.clone(), Name::new(group)?).start(StartPosition::Earliest);
    let mut s = cx.oona.subscribe(sub).await?;
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let mut got = 0;
    while got < n {
        match s.next().await {
            Some(Ok(d)) => {
                d.ack().await?;
                got += 1;
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err("stream ended".into()),
        }
    }
    let key = cx.oona.stream_key(t);
    while pending(cx, &key, group).await? > 0 {
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Raw: XREADGROUP COUNT 256 BLOCK on its own connection, one XACK per batch.
async fn raw_consume(
    cx: &Ctx,
    key: &str,
    group: &str,
    n: usize,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) -> Res<()> {
    let mut c = cx.client.get_multiplexed_tokio_connection().await?;
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await?;
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let mut got = 0;
    while got < n {
        let v: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("c1")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(&mut c)
            .await?;
        let ids = entry_ids(&v);
        if ids.is_empty() {
            continue;
        }
        got += ids.len();
        let _: i64 = redis::cmd("XACK")
            .arg(key)
            .arg(group)
            .arg(&ids)
            .query_async(&mut c)
            .await?;
    }
    Ok(())
}

/// Ids (and payload stamps) of an XREADGROUP reply.
fn entries(v: &Value) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Value::Array(streams) = v else { return out };
    for s in streams {
        let Value::Array(kv) = s else { continue };
        let Some(Value::Array(es)) = kv.get(1) else {
            continue;
        };
        for e in es {
            let Value::Array(parts) = e else { continue };
            let Some(Value::BulkString(id)) = parts.first() else {
                continue;
            };
            let mut stamp = 0;
            if let Some(Value::Array(f)) = parts.get(1) {
                for pair in f.chunks(2) {
                    if let [Value::BulkString(k), Value::BulkString(v)] = pair {
                        if k == b"payload" && v.len() >= 8 {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(&v[..8]);
                            stamp = u64::from_le_bytes(b);
                        }
                    }
                }
            }
            out.push((String::from_utf8_lossy(id).into_owned(), stamp));
        }
    }
    out
}

fn entry_ids(v: &Value) -> Vec<String> {
    entries(v).into_iter().map(|(id, _)| id).collect()
}

async fn consume(cx: &Ctx, i: usize, oona: bool) -> Res<f64> {
    const N: usize = 30_000;
    let t = bench_topic("consume", i, oona)?;
    prefill(cx, &t, N).await?;
    let key = cx.oona.stream_key(&t);
    let started = Instant::now();
    if oona {
        oona_consume(cx, &t, "bench", N, None).await?;
    } else {
        raw_consume(cx, &key, "bench", N, None).await?;
    }
    let rate = N as f64 / started.elapsed().as_secs_f64();
    cleanup(cx, &t).await?;
    Ok(rate)
}

async fn end_to_end(cx: &Ctx, i: usize, oona: bool) -> Res<f64> {
    const N: usize = 30_000;
    const BATCH: usize = 100;
    let t = bench_topic("e2e", i, oona)?;
    let key = cx.oona.stream_key(&t);
    let f = raw_fields(&t);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let started = Instant::now();
    let consumer = async {
        if oona {
            oona_consume(cx, &t, "bench", N, Some(ready_tx)).await
        } else {
            raw_consume(cx, &key, "bench", N, Some(ready_tx)).await
        }
    };
    let producer = async {
        let _ = ready_rx.await;
        let mut raw = cx.raw.clone();
        for b in 0..N / BATCH {
            if oona {
                let batch = (0..BATCH)
                    .map(|n| envelope(&t, (b * BATCH + n) as u64))
                    .collect();
                cx.oona.publish_batch(batch).await?;
            } else {
                let mut p = redis::pipe();
                for n in 0..BATCH {
                    raw_xadd(&mut p, &key, &f, (b * BATCH + n) as u64);
                }
                let _: Vec<String> = p.query_async(&mut raw).await?;
            }
        }
        Res::Ok(())
    };
    let (c, p) = tokio::join!(consumer, producer);
    c?;
    p?;
    let rate = N as f64 / started.elapsed().as_secs_f64();
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

fn nanos(cx: &Ctx) -> u64 {
    u64::try_from(cx.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Publish at a fixed 10,000 msg/s for 2 s (10 messages each millisecond,
/// each its own concurrent publish call) and measure publish -> handler.
async fn latency(cx: &Ctx, i: usize, oona: bool) -> Res<Lat> {
    const RATE: u64 = 10_000;
    const SECS: u64 = 2;
    const N: usize = (RATE * SECS) as usize;
    let t = bench_topic("latency", i, oona)?;
    let key = cx.oona.stream_key(&t);
    let f = Arc::new(raw_fields(&t));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let consumer = async {
        let mut lats = Vec::with_capacity(N);
        if oona {
            let sub =
                Subscription::new(t.clone(), Name::new("bench")?).start(StartPosition::Earliest);
            let mut s = cx.oona.subscribe(sub).await?;
            let _ = ready_tx.send(());
            while lats.len() < N {
                match s.next().await {
                    Some(Ok(d)) => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&d.envelope().payload[..8]);
                        lats.push(nanos(cx).saturating_sub(u64::from_le_bytes(b)));
                        d.ack().await?;
                    }
                    Some(Err(e)) => return Err(BoxError::from(e)),
                    None => return Err("stream ended".into()),
                }
            }
        } else {
            let mut c = cx.client.get_multiplexed_tokio_connection().await?;
            let mut acks = cx.client.get_multiplexed_tokio_connection().await?;
            let _: Value = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&key)
                .arg("bench")
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut c)
                .await?;
            let _ = ready_tx.send(());
            while lats.len() < N {
                let v: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("bench")
                    .arg("c1")
                    .arg("COUNT")
                    .arg(256)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async(&mut c)
                    .await?;
                let es = entries(&v);
                if es.is_empty() {
                    continue;
                }
                let now = nanos(cx);
                let ids: Vec<&String> = es.iter().map(|(id, _)| id).collect();
                for (_, stamp) in &es {
                    lats.push(now.saturating_sub(*stamp));
                }
                let _: i64 = redis::cmd("XACK")
                    .arg(&key)
                    .arg("bench")
                    .arg(&ids)
                    .query_async(&mut acks)
                    .await?;
            }
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
                let stamp = nanos(cx);
                if oona {
                    let o = cx.oona.clone();
                    let e = envelope(&t, stamp);
                    inflight.push(tokio::spawn(async move {
                        o.publish(e).await.map(|_| ()).map_err(BoxError::from)
                    }));
                } else {
                    let mut raw = cx.raw.clone();
                    let key = key.clone();
                    let f = Arc::clone(&f);
                    inflight.push(tokio::spawn(async move {
                        let mut p = redis::pipe();
                        raw_xadd(&mut p, &key, &f, stamp);
                        p.query_async::<Vec<String>>(&mut raw)
                            .await
                            .map(|_| ())
                            .map_err(BoxError::from)
                    }));
                }
            }
            for h in inflight.drain(..) {
                h.await??;
            }
        }
        Res::Ok(())
    };
    let (lats, p) = tokio::join!(consumer, producer);
    p?;
    let mut lats = lats?;
    cleanup(cx, &t).await?;
    lats.sort_unstable();
    let q = |p: f64| lats[((lats.len() as f64 * p) as usize).min(lats.len() - 1)] as f64 / 1e6;
    Ok(Lat {
        n: lats.len(),
        p50: q(0.50),
        p99: q(0.99),
        p999: q(0.999),
        max: q(1.0),
    })
}

/// Development aid: `OONA_BENCH_ONLY=cpu|single|batch|consume|e2e|latency`.
async fn only_scenario(cx: &Ctx, only: &str) -> Res<()> {
    match only {
        "cpu" => {
            let t = bench_topic("cpu", 0, true)?;
            let n = 100_000;
            let started = Instant::now();
            let envs: Vec<Envelope> = (0..n).map(|i| envelope(&t, i as u64)).collect();
            let build = started.elapsed();
            let started = Instant::now();
            let mut total = 0;
            for e in &envs {
                total += fields::encode(e).len();
            }
            let encode = started.elapsed();
            let started = Instant::now();
            let mut pipe = redis::pipe();
            for e in &envs {
                let cmd = pipe.cmd("XADD").arg("k").arg("*");
                for (k, v) in fields::encode(e) {
                    cmd.arg(k).arg(v);
                }
                cmd.arg("payload").arg(e.payload.as_ref());
            }
            let cmd = started.elapsed();
            let flat: Vec<(Vec<u8>, Vec<u8>)> = fields::encode(&envs[0])
                .into_iter()
                .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
                .collect();
            let started = Instant::now();
            for _ in 0..n {
                let e = fields::decode(
                    flat.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
                    envs[0].payload.clone(),
                    &t,
                )?;
                total += e.headers.len();
            }
            let decode = started.elapsed();
            let sub = Subscription::new(t.clone(), Name::new("g")?);
            let started = Instant::now();
            for _ in 0..n {
                let info = oona_core::DeliveryInfo::new(&sub, 1, Some("1-0".into()));
                total += info.attempt as usize;
            }
            let info = started.elapsed();
            println!(
                "per entry: decode {:?}, delivery info {:?}",
                decode / n,
                info / n
            );
            println!(
                "per envelope: build {:?}, encode {:?}, encode+cmd {:?} ({total})",
                build / n,
                encode / n,
                cmd / n
            );
        }
        "single" => {
            let (o, r) = publish_single(cx).await?;
            row("publish single", o, r, "");
        }
        "prebuilt" => {
            let (o, r) = publish_batches(cx, true).await?;
            row("publish prebuilt", o, r, "");
        }
        "batch" => {
            let (o, r) = publish_batches(cx, false).await?;
            row("publish batched", o, r, "");
        }
        "consume_oona" => {
            for i in 0..3 {
                println!("oona consume {:.0}", consume(cx, i, true).await?);
            }
        }
        "e2e_oona" => {
            for i in 0..3 {
                println!("oona e2e {:.0}", end_to_end(cx, i, true).await?);
            }
        }
        "consume" => {
            let (o, r) =
                rounds(ROUNDS, |i| consume(cx, i, true), |i| consume(cx, i, false)).await?;
            row("consume", o, r, "");
        }
        "e2e" => {
            let (o, r) = rounds(
                ROUNDS,
                |i| end_to_end(cx, i, true),
                |i| end_to_end(cx, i, false),
            )
            .await?;
            row("e2e", o, r, "");
        }
        _ => {
            for i in 0..2 {
                let o = latency(cx, i, true).await?;
                let r = latency(cx, i, false).await?;
                println!(
                    "oona p50 {:.3} p99 {:.3} p99.9 {:.3} | raw p50 {:.3} p99 {:.3} p99.9 {:.3}",
                    o.p50, o.p99, o.p999, r.p50, r.p99, r.p999
                );
            }
        }
    }
    Ok(())
}
