//! `oona tail` (follow a topic) and `oona replay` (read its history, print
//! it or copy it into another topic at a rate).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use oona::{Bus, Delivery, StartPosition, Topic};

use crate::exit::{Code, Context as _, Failure};
use crate::out::{envelope_json, Out};
use crate::read::{
    parse_duration, parse_header_filter, parse_position, parse_start, End, Filter, HeaderFilter,
    Position, Reader, Stop,
};

/// What to read, shared by tail and replay.
#[derive(Debug, clap::Args)]
pub struct ReadOpts {
    /// The topic.
    topic: String,
    /// Start at/after this broker position (as receipts and --json print
    /// it: Redis 1700000000000-0, Kafka partition/offset, Pulsar
    /// ledger:entry); reads from the earliest message and skips what comes
    /// before it.
    #[arg(long, value_parser = parse_position)]
    position: Option<Position>,
    /// Only messages with this key.
    #[arg(long)]
    key: Option<String>,
    /// Only messages with this header: NAME=VALUE, or NAME for any value
    /// (repeatable: all must match).
    #[arg(long = "header", value_name = "NAME[=VALUE]", value_parser = parse_header_filter)]
    headers: Vec<HeaderFilter>,
    /// Stop after this many messages.
    #[arg(long)]
    limit: Option<u64>,
}

/// Follow a topic: print each message as it arrives, until Ctrl-C.
///
/// Reads through a group of its own, deleted on exit: the topic's groups
/// are not disturbed.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  oona tail telemetry.seed.health
  oona tail telemetry.seed.health --from 10m --key layer-3
  oona tail compilation.blueprint.submitted --from earliest --json --idle 2s > history.ndjson")]
pub struct TailArgs {
    #[command(flatten)]
    read: ReadOpts,
    /// Where to start: latest, earliest, an RFC 3339 time or a duration ago
    /// (10m, 2h).
    #[arg(long, default_value = "latest", value_parser = parse_start)]
    from: StartPosition,
    /// Stop once nothing arrived for this long (500ms, 5s, 1m).
    #[arg(long, value_parser = parse_duration)]
    idle: Option<Duration>,
}

/// Read a topic's history from a point: print it, or copy it into another
/// topic (with a rate limit). Stops when it has caught up (nothing for
/// --idle).
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  oona replay innovation.field_reports --from earliest --limit 100
  oona replay innovation.field_reports --from 2026-11-30T00:00:00Z --to-topic innovation.field_reports_backfill --rate 500
  oona replay control.kasmina.commands --position 1733100000000-0 --json")]
pub struct ReplayArgs {
    #[command(flatten)]
    read: ReadOpts,
    /// Where to start: earliest, latest, an RFC 3339 time or a duration ago.
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    from: StartPosition,
    /// Stop once nothing arrived for this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    idle: Duration,
    /// Copy each message into this topic (same envelope, header
    /// oona-replayed-from naming where it came from) instead of printing.
    #[arg(long)]
    to_topic: Option<String>,
    /// At most this many messages per second.
    #[arg(long)]
    rate: Option<f64>,
}

/// Counts of one read.
#[derive(Debug, Default)]
struct Counts {
    matched: u64,
    skipped: u64,
    failed: u64,
}

pub async fn tail(bus: &Bus, out: &Out, stop: &Stop, a: TailArgs) -> Result<(), Failure> {
    let from = start_of(&a.read, a.from);
    let mut r = open(bus, &a.read, from, stop).await?;
    let res = read_loop(&mut r, &a.read, a.idle, None, |d| {
        show(out, d);
        async { Ok(()) }
    })
    .await;
    r.close().await;
    finish(res?, "shown")
}

pub async fn replay(bus: &Bus, out: &Out, stop: &Stop, a: ReplayArgs) -> Result<(), Failure> {
    let into = a
        .to_topic
        .as_deref()
        .map(Topic::new)
        .transpose()
        .ctx("--to-topic")?;
    if a.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err(Failure::usage("--rate must be above 0"));
    }
    let pace = a.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let from = start_of(&a.read, a.from);
    let mut r = open(bus, &a.read, from, stop).await?;
    let bar = match &into {
        Some(_) => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {pos} copied ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
        None => ProgressBar::hidden(),
    };
    let res = read_loop(&mut r, &a.read, Some(a.idle), pace, |d| {
        let copy = into.clone().map(|t| {
            let mut env = d.envelope().clone();
            let from = format!(
                "{}@{}",
                env.topic,
                d.info().position.as_deref().unwrap_or("?")
            );
            env.topic = t;
            env.headers.insert("oona-replayed-from".into(), from);
            env
        });
        if copy.is_none() {
            show(out, d);
        }
        let bar = bar.clone();
        async move {
            if let Some(env) = copy {
                bus.publish_envelope(env).await.ctx("copying")?;
                bar.inc(1);
            }
            Ok(())
        }
    })
    .await;
    bar.finish_and_clear();
    r.close().await;
    let what = match &into {
        Some(t) => format!("copied into {t}"),
        None => "shown".into(),
    };
    finish(res?, &what)
}

/// Reading from a position starts at the earliest message unless --from
/// says otherwise.
fn start_of(read: &ReadOpts, from: StartPosition) -> StartPosition {
    match (&read.position, from) {
        (Some(_), StartPosition::Latest) => StartPosition::Earliest,
        (_, f) => f,
    }
}

async fn open(
    bus: &Bus,
    read: &ReadOpts,
    from: StartPosition,
    stop: &Stop,
) -> Result<Reader, Failure> {
    let topic = Topic::new(&read.topic).ctx("topic")?;
    Reader::open(bus, &topic, from, stop).await
}

fn show(out: &Out, d: &Delivery) {
    if out.json {
        out.json_line(&envelope_json(d.envelope(), Some(d.info())));
    } else {
        out.envelope(d.envelope(), Some(d.info()));
    }
}

/// Read until the limit, the idle time, a signal or the end; `each` runs on
/// every message the filters let through, which is then acked (the group
/// is the CLI's own).
async fn read_loop<F, Fut>(
    r: &mut Reader,
    read: &ReadOpts,
    idle: Option<Duration>,
    pace: Option<Duration>,
    mut each: F,
) -> Result<Counts, Failure>
where
    F: FnMut(&Delivery) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let filter = Filter {
        key: read.key.clone(),
        headers: read.headers.clone(),
    };
    let mut counts = Counts::default();
    let mut next_at = tokio::time::Instant::now();
    while read.limit.is_none_or(|l| counts.matched < l) {
        let d = match r.next(idle).await? {
            Ok(d) => d,
            Err(End::Idle | End::Signal | End::Closed) => break,
        };
        let at = read
            .position
            .as_ref()
            .is_none_or(|p| p.admits(d.info().position.as_deref()));
        if !at || !filter.matches(d.envelope()) {
            counts.skipped += 1;
            d.ack().await.ctx("ack")?;
            continue;
        }
        if let Some(p) = pace {
            tokio::time::sleep_until(next_at).await;
            next_at = next_at.max(tokio::time::Instant::now()) + p;
        }
        match each(&d).await {
            Ok(()) => counts.matched += 1,
            Err(f) if f.code == Code::Usage => return Err(f),
            Err(f) => {
                counts.failed += 1;
                eprintln!("oona: {f}");
            }
        }
        d.ack().await.ctx("ack")?;
    }
    Ok(counts)
}

fn finish(c: Counts, what: &str) -> Result<(), Failure> {
    eprintln!(
        "oona: {} {what}, {} skipped by the filters{}",
        c.matched,
        c.skipped,
        if c.failed > 0 {
            format!(", {} failed", c.failed)
        } else {
            String::new()
        }
    );
    if c.failed > 0 {
        return Err(Failure::new(
            Code::Partial,
            format!("{} messages failed", c.failed),
        ));
    }
    Ok(())
}
