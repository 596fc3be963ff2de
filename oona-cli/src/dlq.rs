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
use serde_json::{json, Value};

use crate::exit::{Code, Context as _, Failure};
use crate::out::{envelope_json, payload_text, Out};
use crate::read::{parse_duration, End, Reader, Stop};

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
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    idle: Duration,
}

#[derive(Debug, clap::Args)]
pub struct Requeue {
    #[command(flatten)]
    which: Which,
    /// Requeue every dead letter.
    #[arg(long, conflicts_with_all = ["ids", "reason_contains"])]
    all: bool,
    /// Requeue the dead letter of this original event id (repeatable).
    #[arg(long = "id", value_name = "EVENT_ID")]
    ids: Vec<String>,
    /// Requeue those whose reason contains this text.
    #[arg(long)]
    reason_contains: Option<String>,
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
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
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
        let original = dlq.as_str().trim_end_matches(".dlq").to_string();
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

/// Every dead letter of `w` (up to its limit), read through a group of
/// the CLI's own.
async fn read_all(
    bus: &Bus,
    stop: &Stop,
    w: &Which,
) -> Result<Vec<(Envelope, Option<String>)>, Failure> {
    let dlq = dead_letter_topic(&w.topic)?;
    let exists = bus.transport().describe_topic(&dlq).await;
    if let Err(e) = exists {
        return Err(Failure::new(
            crate::exit::code_of(&e),
            format!("{dlq}: {e}"),
        ));
    }
    let mut r = Reader::open(bus, &dlq, StartPosition::Earliest, stop).await?;
    let mut got = Vec::new();
    let res = async {
        while w.limit.is_none_or(|l| (got.len() as u64) < l) {
            match r.next(Some(w.idle)).await? {
                Ok(d) => {
                    got.push((d.envelope().clone(), d.info().position.clone()));
                    d.ack().await.ctx("ack")?;
                }
                Err(End::Idle | End::Signal | End::Closed) => break,
            }
        }
        Ok::<_, Failure>(())
    }
    .await;
    r.close().await;
    res.map(|()| got)
}

fn dead_letter_json(
    env: &Envelope,
    info: Option<&DeadLetterInfo>,
    position: Option<&str>,
) -> Value {
    match info {
        Some(i) => json!({
            "event_id": i.original.event_id.to_string(),
            "original_topic": i.original.topic.as_str(),
            "reason": i.reason,
            "attempts": i.attempts,
            "group": i.group,
            "at": i.at.map(|t| t.to_string()),
            "original_position": i.original_position,
            "schema_id": i.original.schema_id,
            "content_type": i.original.content_type.as_str(),
            "position": position,
            "original": envelope_json(&i.original, None),
        }),
        None => json!({
            "event_id": env.event_id.to_string(),
            "reason": null,
            "not_a_dead_letter": true,
            "position": position,
            "envelope": envelope_json(env, None),
        }),
    }
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
            out.json_line(&dead_letter_json(env, info.as_ref(), pos.as_deref()));
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
        println!();
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
        println!("{} {}", out.warn("not a dead letter:"), env.event_id);
        return;
    };
    let at = i.at.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
    println!(
        "{} {} from {} {}",
        out.bold(&i.original.event_id.to_string()),
        out.dim(&at),
        i.original.topic,
        out.dim(&format!(
            "@{}",
            i.original_position.as_deref().unwrap_or("?")
        ))
    );
    println!(
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
    println!("  type={}{key}", type_of(i));
    println!("  {}", payload_text(&i.original));
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
    let chosen: Vec<DeadLetterInfo> = all
        .iter()
        .filter_map(|(env, _)| DeadLetterInfo::parse(env))
        .filter(|i| {
            r.all
                || r.ids
                    .iter()
                    .any(|id| *id == i.original.event_id.to_string())
                || r.reason_contains
                    .as_ref()
                    .is_some_and(|s| i.reason.contains(s.as_str()))
        })
        .collect();
    let bar = if chosen.len() > 1 && !r.dry_run {
        ProgressBar::new(chosen.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    let (mut done, mut failed) = (0u64, 0u64);
    for i in &chosen {
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
                    bar.suspend(|| println!("{verb} {id} to {topic}"));
                }
            }
            Err(e) => {
                failed += 1;
                bar.suspend(|| eprintln!("oona: requeueing {id}: {e}"));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let missing: Vec<&String> = r
        .ids
        .iter()
        .filter(|id| {
            !chosen
                .iter()
                .any(|i| i.original.event_id.to_string() == **id)
        })
        .collect();
    eprintln!(
        "oona: {done} of {} dead letters requeued; they stay in {} until `oona dlq purge`",
        all.len(),
        dead_letter_topic(&r.which.topic)?
    );
    if failed > 0 || !missing.is_empty() {
        let ids: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        return Err(Failure::new(
            Code::Partial,
            format!(
                "{failed} failed; not found: {}",
                if ids.is_empty() {
                    "none".into()
                } else {
                    ids.join(", ")
                }
            ),
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
        println!("purged {dlq}");
    }
    Ok(())
}
