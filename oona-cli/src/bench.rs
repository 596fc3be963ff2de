//! `oona bench`: publish and consume through the broker, with throughput
//! and latency figures.

use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use oona::{Bus, Envelope, Name, StartPosition, Subscription, Topic};
use serde_json::json;

use crate::exit::{Code, Context as _, Failure};
use crate::out::{say, Out};
use crate::read::Stop;

/// Publish messages and consume them with a group, in one process:
/// publish rate and per-call latency, consume rate, end-to-end latency
/// (p50, p95, p99, max). Uses a fresh topic, deleted afterwards (a
/// --topic given is left as it is, and must be empty).
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  oona bench --url redis://127.0.0.1:6379/0
  oona bench --messages 100000 --size 1024 --batch 100 --json")]
pub struct Args {
    /// How many messages.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Messages per publish call (1: one call per message).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// The topic (default: a fresh system.oona_bench.* topic).
    #[arg(long)]
    topic: Option<String>,
    /// Keep the topic afterwards.
    #[arg(long)]
    keep: bool,
    /// Give up consuming after this long.
    #[arg(long, default_value = "120s", value_parser = crate::read::parse_positive_duration)]
    timeout: Duration,
}

#[derive(Debug)]
struct Figures {
    published_per_s: f64,
    publish_call_ms: Vec<f64>,
    consumed: u64,
    consumed_per_s: f64,
    end_to_end_ms: Vec<f64>,
}

pub async fn run(bus: &Bus, out: &Out, stop: &Stop, a: Args) -> Result<(), Failure> {
    if a.messages == 0 || a.batch == 0 {
        return Err(Failure::usage("--messages and --batch must be at least 1"));
    }
    // A topic of its own, deleted afterwards; a topic named by --topic is
    // never deleted and must be empty (what is there would be counted).
    let (topic, own) = match &a.topic {
        Some(t) => {
            let t = Topic::new(t).ctx("--topic")?;
            match bus.transport().describe_topic(&t).await {
                // Pulsar does not count: an existing topic may hold any.
                Ok(i) if i.messages != Some(0) => {
                    return Err(Failure::usage(format!(
                        "{t} holds messages (or its broker does not count them): bench a fresh or empty topic"
                    )))
                }
                _ => (t, false),
            }
        }
        None => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let t = Topic::new(format!("system.oona_bench.r{}", &id[..10])).ctx("topic")?;
            (t, true)
        }
    };
    let group = Name::unique("oona-bench");
    let result = bench(bus, &topic, &group, stop, &a).await;
    let t = bus.transport();
    if let Err(e) = t.delete_group(&topic, &group).await {
        if e.kind() != oona::ErrorKind::NotFound {
            eprintln!("oona: deleting the bench group {group} on {topic}: {e}");
        }
    }
    if own && !a.keep {
        if let Err(e) = t.delete_topic(&topic).await {
            eprintln!("oona: deleting the bench topic {topic}: {e}");
        }
    }
    let f = result?;
    report(out, &topic, &a, &f);
    if stop.is_stopped() {
        return Err(Failure::new(Code::Interrupted, "interrupted"));
    }
    if f.consumed < a.messages {
        return Err(Failure::new(
            Code::Partial,
            format!(
                "consumed {} of {} within {:?}",
                f.consumed, a.messages, a.timeout
            ),
        ));
    }
    Ok(())
}

async fn bench(
    bus: &Bus,
    topic: &Topic,
    group: &Name,
    stop: &Stop,
    a: &Args,
) -> Result<Figures, Failure> {
    bus.ensure_topic(topic.clone())
        .await
        .ctx("creating the topic")?;
    let sub = Subscription::new(topic.clone(), group.clone()).start(StartPosition::Earliest);
    let mut stream = bus.subscribe_raw(sub).await.ctx("subscribing")?;
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>9} {bar:30} {pos}/{len} {per_sec}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let pub_bar = bars.add(
        ProgressBar::new(a.messages)
            .with_style(style.clone())
            .with_prefix("publish"),
    );
    let con_bar = bars.add(
        ProgressBar::new(a.messages)
            .with_style(style)
            .with_prefix("consume"),
    );
    let n = a.messages;
    let timeout = a.timeout;
    let stopped = stop.clone();
    let consumer = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n as usize);
        let (mut first, mut last) = (None, None);
        let deadline = tokio::time::Instant::now() + timeout;
        while (lat.len() as u64) < n {
            let next = tokio::select! {
                _ = stopped.stopped() => break,
                next = tokio::time::timeout_at(deadline, stream.next()) => next,
            };
            let d = match next {
                Ok(Some(Ok(d))) => d,
                Ok(Some(Err(e))) if e.is_temporary() => continue,
                Ok(Some(Err(e))) => return Err(Failure::from(e)),
                Ok(None) | Err(_) => break,
            };
            let now = SystemTime::now();
            first.get_or_insert_with(Instant::now);
            last = Some(Instant::now());
            let sent = d.envelope().timestamp.system_time();
            lat.push(now.duration_since(sent).unwrap_or_default().as_secs_f64() * 1e3);
            d.ack().await.ctx("ack")?;
            con_bar.inc(1);
        }
        stream.close().await;
        con_bar.finish();
        let span = match (first, last) {
            (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
            _ => 0.0,
        };
        Ok::<_, Failure>((lat, span))
    });
    let published = publish_all(bus, topic, stop, a, &pub_bar).await;
    pub_bar.finish();
    let (calls, published_per_s) = match published {
        Ok(p) => p,
        Err(f) => {
            consumer.abort();
            return Err(f);
        }
    };
    let (lat, span) = consumer
        .await
        .map_err(|e| Failure::new(Code::Failed, format!("the consumer task: {e}")))??;
    bars.clear().ok();
    let consumed = lat.len() as u64;
    Ok(Figures {
        published_per_s,
        publish_call_ms: calls,
        consumed,
        consumed_per_s: if span > 0.0 {
            consumed as f64 / span
        } else {
            0.0
        },
        end_to_end_ms: lat,
    })
}

/// Publish the messages: each call's time, and the rate.
async fn publish_all(
    bus: &Bus,
    topic: &Topic,
    stop: &Stop,
    a: &Args,
    bar: &ProgressBar,
) -> Result<(Vec<f64>, f64), Failure> {
    let payload = "x".repeat(a.size.saturating_sub(12));
    let started = Instant::now();
    let mut calls = Vec::new();
    let (n, mut i) = (a.messages, 0u64);
    while i < n && !stop.is_stopped() {
        let take = (a.batch as u64).min(n - i);
        let mut batch: Vec<Envelope> = (i..i + take)
            .map(|k| {
                let body = json!({"i": k, "p": payload}).to_string();
                Envelope::builder(topic.clone(), body).build()
            })
            .collect();
        let t0 = Instant::now();
        if take == 1 {
            if let Some(env) = batch.pop() {
                bus.publish_envelope(env).await.ctx("publishing")?;
            }
        } else {
            bus.publish_envelopes(batch).await.ctx("publishing")?;
        }
        calls.push(t0.elapsed().as_secs_f64() * 1e3);
        i += take;
        bar.inc(take);
    }
    Ok((calls, i as f64 / started.elapsed().as_secs_f64()))
}

/// The `q` quantile (0..=1) of `v`, nearest rank.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn report(out: &Out, topic: &Topic, a: &Args, f: &Figures) {
    let mut calls = f.publish_call_ms.clone();
    let mut e2e = f.end_to_end_ms.clone();
    let q = |v: &mut Vec<f64>| {
        [0.5, 0.95, 0.99, 1.0].map(|p| (quantile(v, p) * 1000.0).round() / 1000.0)
    };
    let (c, e) = (q(&mut calls), q(&mut e2e));
    if out.json {
        out.json_line(&json!({
            "topic": topic.as_str(), "messages": a.messages, "size": a.size, "batch": a.batch,
            "published_per_s": f.published_per_s.round(), "consumed": f.consumed,
            "consumed_per_s": f.consumed_per_s.round(),
            "publish_call_ms": {"p50": c[0], "p95": c[1], "p99": c[2], "max": c[3]},
            "end_to_end_ms": {"p50": e[0], "p95": e[1], "p99": e[2], "max": e[3]},
        }));
        return;
    }
    say!(
        "{} messages of {} bytes, {} per call, on {topic}",
        a.messages,
        a.size,
        a.batch
    );
    let row = |name: &str, rate: f64, v: [f64; 4]| {
        vec![
            name.to_string(),
            format!("{rate:.0}"),
            format!("{:.3}", v[0]),
            format!("{:.3}", v[1]),
            format!("{:.3}", v[2]),
            format!("{:.3}", v[3]),
        ]
    };
    out.table(
        &["", "MSG/S", "P50 MS", "P95 MS", "P99 MS", "MAX MS"],
        &[
            row("publish call", f.published_per_s, c),
            row("end to end", f.consumed_per_s, e),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }
}
