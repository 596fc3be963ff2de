//! `oona dlq list | inspect | requeue | purge`.
//!
//! Dead-letter topics are logs: `inspect` and `requeue` read every dead
//! letter retained (through the CLI's own group, deleted afterwards), and
//! a requeued dead letter stays in the log until `purge` deletes the
//! dead-letter topic.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::ProgressBar;
use oona::rules::DeadLetterInfo;
use oona::{Bus, Envelope, StartPosition, Topic};
use serde_json::json;

use crate::exit::{Code, Context as _, Failure};
use crate::out::{envelope_json, payload_text, say, Out};
use crate::read::{parse_positive_duration, End, Reader, Stop};

/// Dead letters: list the dead-letter topics, inspect them, requeue them
/// onto their topics, purge them.
#[derive(Debug, clap::Subcommand)]
pub enum Dlq {
    /// The dead-letter topics (`<topic>.dlq`) and how many dead letters
    /// each holds.
    #[command(after_help = "Example:\n  oona dlq list --json")]
    List,
    /// Show the dead letters of a topic: why, how many attempts, which
    /// group, and the original message; a count by reason and type at the
    /// end.
    #[command(after_help = "\
Examples:
  oona dlq inspect compilation.blueprint.submitted
  oona dlq inspect compilation.blueprint.submitted.dlq --json --limit 10")]
    Inspect(Which),
    /// Publish dead letters again to their original topic: the original
    /// envelope as it was published (event id, key, headers, payload), so
    /// attempts start again at 1.
    #[command(after_help = "\
Examples:
  oona dlq requeue compilation.blueprint.submitted --all
  oona dlq requeue compilation.blueprint.submitted --id 7b0c9c1e-... --id 0f4e...
  oona dlq requeue compilation.blueprint.submitted --reason-contains decode --dry-run")]
    Requeue(Requeue),
    /// Run the dead-letter auditor: count dead letters by topic, type and
    /// reason as they arrive, print a report every --every and publish it
    /// on telemetry.oona.dead_letters, until Ctrl-C.
    #[command(after_help = "\
Examples:
  oona dlq audit
  oona dlq audit compilation.blueprint.submitted --every 10s --json")]
    Audit(Audit),
    /// Delete the dead-letter topic and every dead letter in it.
    #[command(after_help = "Example:\n  oona dlq purge compilation.blueprint.submitted --yes")]
    Purge(Purge),
}

/// A topic or its dead-letter topic.
#[derive(Debug, clap::Args)]
pub struct Which {
    /// The topic, or its dead-letter topic.
    topic: String,
    /// Show at most this many.
    #[arg(long)]
    limit: Option<u64>,
    /// Stop reading once nothing arrived for this long.
    #[arg(long, default_value = "3s", value_parser = parse_positive_duration)]
    idle: Duration,
}

#[derive(Debug, clap::Args)]
pub struct Requeue {
    #[command(flatten)]
    which: Which,
    /// Requeue every dead letter (but those of entries that did not
    /// decode, unless --include-poison).
    #[arg(long, conflicts_with_all = ["ids", "reason_contains"])]
    all: bool,
    /// Requeue the dead letter of this original event id (repeatable).
    #[arg(long = "id", value_name = "EVENT_ID")]
    ids: Vec<String>,
    /// Requeue those whose reason contains this text (with --id: both must
    /// hold).
    #[arg(long)]
    reason_contains: Option<String>,
    /// Requeue `decode:` dead letters too: their original is the raw entry
    /// in an envelope Oona made, not a message anyone published.
    #[arg(long)]
    include_poison: bool,
    /// Publish to this topic instead of the original one.
    #[arg(long)]
    to_topic: Option<String>,
    /// Show what would be requeued, publish nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct Audit {
    /// The topics (or their dead-letter topics); every dead-letter topic
    /// the broker holds when left out.
    topics: Vec<String>,
    /// Print and publish a report this often.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    every: Duration,
    /// The auditor's group (it keeps its place across runs).
    #[arg(long, default_value = "oona-dlq-auditor")]
    group: String,
}

#[derive(Debug, clap::Args)]
pub struct Purge {
    /// The topic, or its dead-letter topic.
    topic: String,
    /// Do it without asking.
    #[arg(long)]
    yes: bool,
}

pub async fn run(bus: &Bus, out: &Out, stop: &Stop, d: Dlq) -> Result<(), Failure> {
    match d {
        Dlq::List => list(bus, out).await,
        Dlq::Inspect(w) => inspect(bus, out, stop, w).await,
        Dlq::Requeue(r) => requeue(bus, out, stop, r).await,
        Dlq::Audit(a) => audit(bus, out, stop, a).await,
        Dlq::Purge(p) => purge(bus, out, p).await,
    }
}

/// `x.y.z` or `x.y.z.dlq` → `x.y.z.dlq`.
fn dead_letter_topic(s: &str) -> Result<Topic, Failure> {
    Ok(Topic::new(s).ctx("topic")?.dead_letter())
}

async fn list(bus: &Bus, out: &Out) -> Result<(), Failure> {
    let t = bus.transport();
    let topics = t.list_topics().await.ctx("listing topics")?;
    let mut rows = Vec::new();
    for dlq in topics.into_iter().filter(Topic::is_dead_letter) {
        let info = t
            .describe_topic(&dlq)
            .await
            .ctx(&format!("describing {dlq}"))?;
        let original = dlq
            .as_str()
            .strip_suffix(".dlq")
            .unwrap_or(dlq.as_str())
            .to_string();
        if out.json {
            out.json_line(&json!({"topic": dlq.as_str(), "original_topic": original, "messages": info.messages}));
        } else {
            let n = info.messages.map_or("?".into(), |n| n.to_string());
            rows.push(vec![dlq.to_string(), original, n]);
        }
    }
    if !out.json {
        out.table(&["DEAD-LETTER TOPIC", "OF", "MESSAGES"], &rows);
    }
    Ok(())
}

/// Every dead letter of `w` (up to its limit) with its position, read
/// through a group of the CLI's own. A signal or a closed stream before
/// the end is a failure: half a list must not be taken for all of it.
async fn read_all(
    bus: &Bus,
    stop: &Stop,
    w: &Which,
) -> Result<Vec<(Envelope, Option<String>)>, Failure> {
    let dlq = dead_letter_topic(&w.topic)?;
    let mut r = Reader::open(bus, &dlq, StartPosition::Earliest, stop).await?;
    let mut got = Vec::new();
    let res = async {
        while w.limit.is_none_or(|l| (got.len() as u64) < l) {
            match r.next(Some(w.idle)).await? {
                Ok(d) => {
                    got.push((d.envelope().clone(), d.info().position.clone()));
                    d.ack().await.ctx("ack")?;
                }
                Err(End::Idle) => break,
                Err(End::Signal) => {
                    return Err(Failure::new(
                        Code::Interrupted,
                        format!("interrupted after {} dead letters", got.len()),
                    ))
                }
                Err(End::Closed) => {
                    return Err(Failure::new(
                        Code::Unavailable,
                        "the transport closed the stream",
                    ))
                }
            }
        }
        Ok::<_, Failure>(())
    }
    .await;
    r.close().await;
    res.map(|()| got)
}

/// One dead letter as `inspect --json` prints it; the original in Oona's
/// JSON wire form, byte for byte.
#[derive(serde::Serialize)]
struct DeadLetterLine<'a> {
    event_id: String,
    original_topic: Option<&'a str>,
    reason: Option<&'a str>,
    attempts: Option<u32>,
    group: Option<&'a str>,
    at: Option<String>,
    original_position: Option<&'a str>,
    schema_id: Option<&'a str>,
    content_type: &'a str,
    position: Option<&'a str>,
    not_a_dead_letter: bool,
    original: Box<serde_json::value::RawValue>,
}

fn dead_letter_line(
    env: &Envelope,
    info: Option<&DeadLetterInfo>,
    position: Option<&str>,
) -> Result<String, Failure> {
    let shown = info.map_or(env, |i| &i.original);
    let form = envelope_json(shown, None).ctx("the JSON form")?;
    let original = serde_json::value::RawValue::from_string(form)
        .map_err(|e| Failure::new(Code::Failed, format!("the JSON form: {e}")))?;
    let line = DeadLetterLine {
        event_id: shown.event_id.to_string(),
        original_topic: info.map(|i| i.original.topic.as_str()),
        reason: info.map(|i| i.reason.as_str()),
        attempts: info.map(|i| i.attempts),
        group: info.map(|i| i.group.as_str()),
        at: info.and_then(|i| i.at).map(|t| t.to_string()),
        original_position: info.and_then(|i| i.original_position.as_deref()),
        schema_id: shown.schema_id.as_deref(),
        content_type: shown.content_type.as_str(),
        position,
        not_a_dead_letter: info.is_none(),
        original,
    };
    serde_json::to_string(&line).map_err(|e| Failure::new(Code::Failed, format!("JSON: {e}")))
}

/// The message type of a dead letter: its schema id, else its content
/// type.
fn type_of(i: &DeadLetterInfo) -> String {
    i.original
        .schema_id
        .clone()
        .unwrap_or_else(|| i.original.content_type.as_str().to_string())
}

async fn inspect(bus: &Bus, out: &Out, stop: &Stop, w: Which) -> Result<(), Failure> {
    let all = read_all(bus, stop, &w).await?;
    let mut by: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (env, pos) in &all {
        let info = DeadLetterInfo::parse(env);
        if out.json {
            say!("{}", dead_letter_line(env, info.as_ref(), pos.as_deref())?);
        } else {
            print_dead_letter(out, env, info.as_ref());
        }
        let key = match &info {
            Some(i) => (
                oona::metrics::reason_class(&i.reason).to_string(),
                type_of(i),
            ),
            None => ("not a dead letter".into(), env.content_type.as_str().into()),
        };
        *by.entry(key).or_default() += 1;
    }
    if !out.json {
        say!();
        let rows: Vec<Vec<String>> = by
            .into_iter()
            .map(|((reason, ty), n)| vec![n.to_string(), reason, ty])
            .collect();
        out.table(&["COUNT", "REASON", "TYPE"], &rows);
    }
    eprintln!("oona: {} dead letters", all.len());
    Ok(())
}

fn print_dead_letter(out: &Out, env: &Envelope, info: Option<&DeadLetterInfo>) {
    let Some(i) = info else {
        say!("{} {}", out.warn("not a dead letter:"), env.event_id);
        return;
    };
    let at = i.at.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
    say!(
        "{} {} from {} {}",
        out.bold(&i.original.event_id.to_string()),
        out.dim(&at),
        i.original.topic,
        out.dim(&format!(
            "@{}",
            i.original_position.as_deref().unwrap_or("?")
        ))
    );
    say!(
        "  {} {} after {} attempts in group {}",
        out.bad("reason:"),
        i.reason,
        i.attempts,
        i.group
    );
    let key = i
        .original
        .key
        .as_deref()
        .map(|k| format!(" key={k}"))
        .unwrap_or_default();
    say!("  type={}{key}", type_of(i));
    say!("  {}", payload_text(&i.original));
}

/// The dead letters `r` selects, the latest of each original event id (a
/// message requeued and dead-lettered again is in the log twice), and how
/// many older copies were left out.
fn select(r: &Requeue, all: &[(Envelope, Option<String>)]) -> (Vec<DeadLetterInfo>, usize) {
    let wanted = |i: &DeadLetterInfo| {
        let id = i.original.event_id.to_string();
        let by_id = r.ids.is_empty() || r.ids.iter().any(|x| x.eq_ignore_ascii_case(&id));
        let by_reason = r
            .reason_contains
            .as_ref()
            .is_none_or(|s| i.reason.contains(s.as_str()));
        // A `decode:` dead letter holds the raw entry in an envelope Oona
        // made: it was never published as such.
        let poison = i.reason.starts_with("decode");
        by_id && by_reason && (!poison || r.include_poison || !r.ids.is_empty())
    };
    let mut latest: Vec<DeadLetterInfo> = Vec::new();
    let mut older = 0;
    for info in all.iter().filter_map(|(env, _)| DeadLetterInfo::parse(env)) {
        if !wanted(&info) {
            continue;
        }
        match latest
            .iter_mut()
            .find(|l| l.original.event_id == info.original.event_id)
        {
            Some(l) => {
                *l = info;
                older += 1;
            }
            None => latest.push(info),
        }
    }
    (latest, older)
}

async fn requeue(bus: &Bus, out: &Out, stop: &Stop, r: Requeue) -> Result<(), Failure> {
    if !r.all && r.ids.is_empty() && r.reason_contains.is_none() {
        return Err(Failure::usage(
            "say which: --all, --id EVENT_ID or --reason-contains TEXT",
        ));
    }
    let into = r
        .to_topic
        .as_deref()
        .map(Topic::new)
        .transpose()
        .ctx("--to-topic")?;
    let all = read_all(bus, stop, &r.which).await?;
    let (chosen, older) = select(&r, &all);
    let bar = if chosen.len() > 1 && !r.dry_run {
        ProgressBar::new(chosen.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    let (mut done, mut failed, mut last_error) = (0u64, 0u64, None);
    for i in &chosen {
        if stop.is_stopped() {
            break;
        }
        let mut env = i.original.clone();
        if let Some(t) = &into {
            env.topic = t.clone();
        }
        let (id, topic) = (env.event_id.to_string(), env.topic.to_string());
        let result = if r.dry_run {
            Ok(None)
        } else {
            bus.publish_envelope(env).await.map(|rc| rc.position)
        };
        match result {
            Ok(position) => {
                done += 1;
                if out.json {
                    out.json_line(&json!({"event_id": id, "topic": topic, "position": position, "dry_run": r.dry_run}));
                } else {
                    let verb = if r.dry_run {
                        "would requeue"
                    } else {
                        "requeued"
                    };
                    bar.suspend(|| say!("{verb} {id} to {topic}"));
                }
            }
            Err(e) => {
                failed += 1;
                bar.suspend(|| eprintln!("oona: requeueing {id}: {e}"));
                last_error = Some(e);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let missing: Vec<&str> = r
        .ids
        .iter()
        .filter(|id| {
            !chosen
                .iter()
                .any(|i| i.original.event_id.to_string().eq_ignore_ascii_case(id))
        })
        .map(String::as_str)
        .collect();
    let dlq = dead_letter_topic(&r.which.topic)?;
    let verb = if r.dry_run {
        "would be requeued"
    } else {
        "requeued"
    };
    eprintln!(
        "oona: {done} of {} dead letters {verb} ({older} older copies of the same messages left out); they stay in {dlq} until `oona dlq purge`",
        all.len(),
    );
    if stop.is_stopped() {
        return Err(Failure::new(
            Code::Interrupted,
            format!("interrupted after {done} requeued"),
        ));
    }
    if let (Some(e), 0) = (&last_error, done) {
        return Err(Failure::new(
            crate::exit::code_of(e),
            format!("nothing requeued: {e}"),
        ));
    }
    if failed > 0 || !missing.is_empty() {
        let ids = if missing.is_empty() {
            "none".into()
        } else {
            missing.join(", ")
        };
        return Err(Failure::new(
            Code::Partial,
            format!("{failed} failed; not found: {ids}"),
        ));
    }
    Ok(())
}

async fn audit(bus: &Bus, out: &Out, stop: &Stop, a: Audit) -> Result<(), Failure> {
    let topics: Vec<Topic> = if a.topics.is_empty() {
        let all = bus.transport().list_topics().await.ctx("listing topics")?;
        all.into_iter().filter(Topic::is_dead_letter).collect()
    } else {
        a.topics
            .iter()
            .map(|t| dead_letter_topic(t))
            .collect::<Result<_, _>>()?
    };
    if topics.is_empty() {
        return Err(Failure::new(
            Code::NotFound,
            "no dead-letter topics to audit",
        ));
    }
    let group = oona::Name::new(&a.group).ctx("--group")?;
    let mut auditor = oona::audit::DeadLetterAuditor::new(bus)
        .ctx("the auditor")?
        .group(group)
        .report_every(a.every);
    for t in &topics {
        auditor = auditor.watch(t.clone()).ctx("the auditor")?;
    }
    let shutdown = oona::Shutdown::new();
    let handle = auditor
        .start(shutdown.clone())
        .await
        .ctx("starting the auditor")?;
    eprintln!(
        "oona: auditing {} dead-letter topics; Ctrl-C stops",
        topics.len()
    );
    loop {
        tokio::select! {
            _ = stop.stopped() => break,
            _ = tokio::time::sleep(a.every) => print_report(out, &handle.report()),
        }
    }
    shutdown.trigger();
    let report = handle.report();
    handle.join().await;
    print_report(out, &report);
    Ok(())
}

fn print_report(out: &Out, r: &oona::audit::AuditReport) {
    if out.json {
        match serde_json::to_value(r) {
            Ok(v) => out.json_line(&v),
            Err(e) => eprintln!("oona: the report as JSON: {e}"),
        }
        return;
    }
    let rows: Vec<Vec<String>> = r
        .counts
        .iter()
        .map(|c| {
            vec![
                c.count.to_string(),
                c.topic.clone(),
                c.reason.clone(),
                c.message_type.clone(),
            ]
        })
        .collect();
    out.table(&["COUNT", "DEAD-LETTER TOPIC", "REASON", "TYPE"], &rows);
}

async fn purge(bus: &Bus, out: &Out, p: Purge) -> Result<(), Failure> {
    let dlq = dead_letter_topic(&p.topic)?;
    let info = bus
        .transport()
        .describe_topic(&dlq)
        .await
        .ctx(dlq.as_str())?;
    if !p.yes {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::usage(format!(
                "purging {dlq} deletes its dead letters: pass --yes"
            )));
        }
        let n = info.messages.map_or("its".into(), |n| n.to_string());
        eprint!("Delete {dlq} and {n} dead letters? Type the topic name to confirm: ");
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .map_err(|e| Failure::usage(format!("reading the answer: {e}")))?;
        if answer.trim() != dlq.as_str() {
            return Err(Failure::usage("not confirmed; nothing deleted"));
        }
    }
    bus.transport()
        .delete_topic(&dlq)
        .await
        .ctx(&format!("deleting {dlq}"))?;
    if out.json {
        out.json_line(&json!({"purged": dlq.as_str(), "messages": info.messages}));
    } else {
        say!("purged {dlq}");
    }
    Ok(())
}
