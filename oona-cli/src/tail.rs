//! `oona tail` (follow a topic) and `oona replay` (read its history, print
//! it or copy it into another topic at a rate).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use oona::{Bus, Delivery, StartPosition, Topic};

use crate::exit::{Code, Context as _, Failure};
use crate::out::{envelope_json, say, stdout_gone, Out};
use crate::read::{
    parse_header_filter, parse_position, parse_positive_duration, parse_start, End, Filter,
    HeaderFilter, Position, Reader, Stop,
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
    #[arg(long, value_parser = parse_positive_duration)]
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
    #[arg(long, default_value = "3s", value_parser = parse_positive_duration)]
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

/// The most --rate takes (a pace of 1 µs), and the least.
const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.001..=1_000_000.0;

pub async fn tail(bus: &Bus, out: &Out, stop: &Stop, a: TailArgs) -> Result<(), Failure> {
    let from = start_of(&a.read, a.from);
    let mut r = open(bus, &a.read, from, stop).await?;
    let res = read_loop(&mut r, &a.read, a.idle, None, stop, |d| {
        let shown = show(out, d);
        async move { shown }
    })
    .await;
    r.close().await;
    // Following ends by a signal (or a closed pipe): that is done.
    finish(res?, "shown", false)
}

pub async fn replay(bus: &Bus, out: &Out, stop: &Stop, a: ReplayArgs) -> Result<(), Failure> {
    let into = a
        .to_topic
        .as_deref()
        .map(Topic::new)
        .transpose()
        .ctx("--to-topic")?;
    if into.as_ref().is_some_and(|t| t.as_str() == a.read.topic) {
        return Err(Failure::usage(
            "--to-topic is the topic replayed: it would never catch up",
        ));
    }
    if a.rate.is_some_and(|r| !RATE_RANGE.contains(&r)) {
        return Err(Failure::usage(
            "--rate must be between 0.001 and 1000000 per second",
        ));
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
    let res = read_loop(&mut r, &a.read, Some(a.idle), pace, stop, |d| {
        let from = format!(
            "{}@{}",
            d.envelope().topic,
            d.info().position.as_deref().unwrap_or("?")
        );
        let copy = into.clone().map(|t| {
            let mut env = d.envelope().clone();
            env.topic = t;
            env.headers
                .insert("oona-replayed-from".into(), from.clone());
            env
        });
        let shown = match copy {
            None => show(out, d),
            Some(_) => Ok(()),
        };
        let (bar, id) = (bar.clone(), d.envelope().event_id.clone());
        async move {
            shown?;
            if let Some(env) = copy {
                bus.publish_envelope(env)
                    .await
                    .ctx(&format!("copying {id} ({from})"))?;
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
    finish(res?, &what, true)
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

fn show(out: &Out, d: &Delivery) -> Result<(), Failure> {
    if out.json {
        let line = envelope_json(d.envelope(), Some(d.info())).ctx("the JSON form")?;
        say!("{line}");
    } else {
        out.envelope(d.envelope(), Some(d.info()));
    }
    Ok(())
}

/// How a read ended.
enum Ended {
    /// Caught up (idle), at the limit, or stdout closed.
    Done,
    /// A signal stopped it.
    Interrupted,
}

/// Read until the limit, the idle time, a signal, a closed stdout or the
/// end of the stream; `each` runs on every message the filters let
/// through, which is then acked (the group is the CLI's own).
async fn read_loop<F, Fut>(
    r: &mut Reader,
    read: &ReadOpts,
    idle: Option<Duration>,
    pace: Option<Duration>,
    stop: &Stop,
    mut each: F,
) -> Result<(Counts, Ended), Failure>
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
    while read.limit.is_none_or(|l| counts.matched < l) && !stdout_gone() {
        let d = match r.next(idle).await? {
            Ok(d) => d,
            Err(End::Idle) => break,
            Err(End::Signal) => return Ok((counts, Ended::Interrupted)),
            Err(End::Closed) => {
                return Err(Failure::new(
                    Code::Unavailable,
                    "the transport closed the stream",
                ))
            }
        };
        let at = match &read.position {
            None => true,
            Some(p) => p
                .admits(d.info().position.as_deref())
                .map_err(Failure::usage)?,
        };
        if !at || !filter.matches(d.envelope()) {
            counts.skipped += 1;
            d.ack().await.ctx("ack")?;
            continue;
        }
        if let Some(p) = pace {
            tokio::select! {
                _ = tokio::time::sleep_until(next_at) => {}
                _ = stop.stopped() => return Ok((counts, Ended::Interrupted)),
            }
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
    Ok((counts, Ended::Done))
}

/// The summary on stderr, and the exit: 5 when some failed, the failures'
/// code when all did, 130 when a signal cut a finite read short.
fn finish((c, ended): (Counts, Ended), what: &str, finite: bool) -> Result<(), Failure> {
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
        let code = if c.matched == 0 {
            Code::Failed
        } else {
            Code::Partial
        };
        return Err(Failure::new(code, format!("{} messages failed", c.failed)));
    }
    match ended {
        Ended::Interrupted if finite => Err(Failure::new(
            Code::Interrupted,
            "interrupted before catching up",
        )),
        _ => Ok(()),
    }
}
