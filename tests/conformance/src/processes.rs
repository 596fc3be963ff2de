//! Cases with consumer processes: killed with SIGKILL mid-batch, or
//! exiting right after a graceful shutdown (see [`crate::child`]). Left
//! out where the broker lives in the test process.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use oona_core::rules::DeadLetterInfo;
use oona_core::{Envelope, Subscription, Topic};

use crate::child::{Child, Spec, CRASH};
use crate::support::{
    check, expect_quiet, failed, group, next_within, subscribe, take_acking, with_cx, Context, Cx,
};
use crate::{CaseError, CaseResult, Fixture};

fn numbered(topic: &Topic, i: usize) -> Envelope {
    Envelope::builder(topic.clone(), format!("{{\"n\":{i}}}"))
        .sender_id("conformance")
        .build()
}

fn multi_process(cx: &Cx<'_>) -> CaseResult {
    if cx.fx.multi_process() {
        Ok(())
    } else {
        Err(CaseError::LeftOut(
            "the broker lives in the test process; no other process reaches it".into(),
        ))
    }
}

fn spawn(spec: &Spec) -> Result<Child, CaseError> {
    Child::spawn(spec).map_err(|e| failed(format!("start a consumer process: {e}")))
}

/// `acked <id> <attempt>` of a child's line.
fn acked(line: &str) -> Option<(String, u32)> {
    let mut w = line.strip_prefix("acked ")?.split(' ');
    Some((w.next()?.to_string(), w.next()?.parse().ok()?))
}

const KILLS: usize = 20;
const NORMAL: usize = 1000;

/// Consumer processes of one group, prefetch 20, are killed with SIGKILL
/// mid-batch 20 times (after five acks each, holding a first delivery and
/// what they read ahead) while a message among 1,000
/// aborts every process it is handed to. Nothing is lost: every message is
/// acked at least once (duplicates are counted, at-least-once); the
/// aborting message is dead-lettered after `max_attempts` crashes, and
/// alone: none of its neighbours reaches the dead-letter topic.
pub async fn killed_consumers_lose_nothing(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, killed_consumers_lose_nothing_in)
}

async fn killed_consumers_lose_nothing_in(cx: &Cx<'_>) -> CaseResult {
    multi_process(cx)?;
    let topic = cx.topic("control")?;
    let dlq = topic.dead_letter();
    cx.track(&dlq);
    let g = group("killed");
    let deadline = cx.t.ack_deadline;
    let max_attempts = 5;
    let a = cx.client().await?;
    let mut dl = subscribe(
        &a,
        Subscription::new(dlq.clone(), group("dlq")).ack_deadline(Duration::from_secs(60)),
    )
    .await?;
    // The group exists before anything is published.
    drop(
        subscribe(
            &a,
            Subscription::new(topic.clone(), g.clone()).ack_deadline(deadline),
        )
        .await?,
    );
    let mut sent: Vec<Envelope> = (0..NORMAL).map(|i| numbered(&topic, i)).collect();
    let crash = Envelope::builder(topic.clone(), CRASH)
        .sender_id("conformance")
        .build();
    let crash_id = crash.event_id.to_string();
    sent.insert(5, crash);
    a.publish_batch(sent.clone()).await.ctx("publish_batch")?;
    // One consumer, restarted after each kill (a transport that knows
    // restarted members may hand back their share at once).
    let mut spec = Spec {
        topic: topic.clone(),
        group: g.clone(),
        consumer: Some(group("restarted")),
        prefetch: 20,
        ack_deadline: deadline,
        max_attempts,
        exit_after: None,
        hang_after: None,
    };
    let mut acks: HashMap<String, Vec<u32>> = HashMap::new();
    let mut dead: Vec<DeadLetterInfo> = Vec::new();
    let (mut killed, mut aborted, mut idle) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    let limit = cx.t.wait() * 6;
    let mut transient_dl = 0;
    while (killed < KILLS || dead.is_empty()) && idle < 2 && started.elapsed() < limit {
        // Killed after five acks, holding a first delivery and what it
        // read ahead; once there were enough kills, children run until
        // the crashing message is dead-lettered.
        spec.hang_after = (killed < KILLS).then_some(5);
        let mut child = spawn(&spec)?;
        let outcome = loop {
            let Some(line) = child.line(deadline * 3 + cx.t.late()).await else {
                break None; // nothing to do (or it exited)
            };
            if line == "crash" {
                break Some(true);
            }
            if line == "hung" {
                break Some(false);
            }
            if let Some((id, attempt)) = acked(&line) {
                acks.entry(id).or_default().push(attempt);
            }
        };
        match outcome {
            Some(true) => {
                aborted += 1;
                let code = child.wait(cx.t.wait()).await;
                check!(
                    code.is_none(),
                    "an aborted consumer exited with code {code:?}"
                );
            }
            Some(false) => {
                killed += 1;
                child.kill().await;
            }
            None => {
                idle += 1;
                child.kill().await;
            }
        }
        if outcome.is_some() {
            idle = 0;
        }
        while let Some(d) =
            next_within(&mut dl, Duration::from_millis(10), &mut transient_dl).await?
        {
            let info = DeadLetterInfo::parse(d.envelope())
                .ok_or_else(|| failed("a dead letter without its headers"))?;
            d.ack().await.ctx("ack dead letter")?;
            dead.push(info);
        }
    }
    // One consumer in this process takes what is left; a delivery of the
    // aborting message is left unsettled (it would abort this process).
    let mut st = subscribe(
        &a,
        Subscription::new(topic.clone(), g.clone())
            .ack_deadline(deadline)
            .max_attempts(max_attempts),
    )
    .await?;
    let normal: HashSet<String> = sent
        .iter()
        .map(|e| e.event_id.to_string())
        .filter(|id| *id != crash_id)
        .collect();
    let mut transient = 0;
    let until = Instant::now() + cx.t.wait() + deadline * (max_attempts + 2);
    while normal.iter().any(|id| !acks.contains_key(id)) || dead.is_empty() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::select! {
            d = next_within(&mut st, left.min(Duration::from_millis(200)), &mut transient) => {
                if let Some(d) = d? {
                    let id = d.envelope().event_id.to_string();
                    if id != crash_id {
                        let attempt = d.attempt();
                        d.ack().await.ctx("ack")?;
                        acks.entry(id).or_default().push(attempt);
                    }
                }
            }
            d = next_within(&mut dl, Duration::from_millis(200), &mut transient_dl) => {
                if let Some(d) = d? {
                    let info = DeadLetterInfo::parse(d.envelope())
                        .ok_or_else(|| failed("a dead letter without its headers"))?;
                    d.ack().await.ctx("ack dead letter")?;
                    dead.push(info);
                }
            }
        }
    }
    let lost: Vec<&String> = normal.iter().filter(|id| !acks.contains_key(*id)).collect();
    let duplicates: usize = acks.values().map(|v| v.len().saturating_sub(1)).sum();
    let max_attempt = acks.values().flatten().max().copied().unwrap_or(0);
    let (most_charged_id, most_charged) = acks
        .iter()
        .max_by_key(|(_, v)| v.iter().max().copied().unwrap_or(0))
        .map(|(id, v)| (id.clone(), v.clone()))
        .unwrap_or_default();
    println!(
        "killed_consumers_lose_nothing [{}]: {} published, {killed} SIGKILLs, {aborted} aborts by the crashing message, lost {}, duplicates {duplicates}, highest attempt of a healthy message {max_attempt} ({most_charged_id}, acked at attempts {most_charged:?}), {} dead letters, {:?}",
        cx.fx.name(),
        sent.len(),
        lost.len(),
        dead.len(),
        started.elapsed()
    );
    check!(
        killed >= KILLS && aborted >= 1,
        "the consumer processes did not run as planned: {killed} of {KILLS} killed, {aborted} aborted by the crashing message"
    );
    check!(
        lost.is_empty(),
        "{} messages lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    check!(
        dead.len() == 1,
        "expected one dead letter (the crashing message), got {}: {:?}",
        dead.len(),
        dead.iter().map(|d| &d.reason).collect::<Vec<_>>()
    );
    let d = &dead[0];
    check!(
        d.original.event_id.to_string() == crash_id,
        "a healthy message was dead-lettered: {}",
        d.reason
    );
    check!(
        d.attempts == max_attempts,
        "the crashing message was dead-lettered after {} attempts, not {max_attempts}: {}",
        d.attempts,
        d.reason
    );
    check!(
        max_attempt < max_attempts,
        "a healthy message reached attempt {max_attempt}: crashes were charged to it"
    );
    expect_quiet(&mut dl, cx.t.quiet_for(), "a second dead letter").await
}

/// A consumer process acks 30 of 100 messages (prefetch 64, so it has read
/// ahead), then does what a service does after its runner's graceful
/// shutdown: closes the stream, flushes, exits without closing the
/// transport. A second consumer of the group gets exactly the other 70, at
/// attempt 1: nothing acked comes back, nothing read ahead is charged.
pub async fn shutdown_then_exit_keeps_acks(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, shutdown_then_exit_keeps_acks_in)
}

async fn shutdown_then_exit_keeps_acks_in(cx: &Cx<'_>) -> CaseResult {
    multi_process(cx)?;
    let topic = cx.topic("control")?;
    let g = group("exit");
    let long = Duration::from_secs(60);
    let a = cx.client().await?;
    drop(
        subscribe(
            &a,
            Subscription::new(topic.clone(), g.clone()).ack_deadline(long),
        )
        .await?,
    );
    let sent: Vec<Envelope> = (0..100).map(|i| numbered(&topic, i)).collect();
    a.publish_batch(sent.clone()).await.ctx("publish_batch")?;
    let mut child = spawn(&Spec {
        topic: topic.clone(),
        group: g.clone(),
        consumer: None,
        prefetch: 64,
        ack_deadline: long,
        max_attempts: 5,
        exit_after: Some(30),
        hang_after: None,
    })?;
    let mut first = HashSet::new();
    let mut flushed = false;
    while let Some(line) = child.line(cx.t.wait()).await {
        if let Some((id, _)) = acked(&line) {
            first.insert(id);
        } else if line == "flushed" {
            flushed = true;
        }
    }
    let code = child.wait(cx.t.wait()).await;
    check!(
        flushed && code == Some(0) && first.len() == 30,
        "the consumer process acked {} of 30, flushed {flushed}, exit code {code:?}",
        first.len()
    );
    let mut st = subscribe(
        &a,
        Subscription::new(topic.clone(), g.clone()).ack_deadline(long),
    )
    .await?;
    let rest = take_acking(
        &mut st,
        70,
        cx.t.wait() * 2,
        "the messages the first process did not ack",
    )
    .await?;
    for (e, attempt) in &rest {
        let id = e.event_id.to_string();
        check!(
            !first.contains(&id),
            "a message acked before the exit came back (attempt {attempt})"
        );
        check!(
            *attempt == 1,
            "a message read ahead came back at attempt {attempt}"
        );
        first.insert(id);
    }
    check!(first.len() == 100, "{} distinct of 100", first.len());
    expect_quiet(&mut st, cx.t.quiet_for(), "more than the 100").await
}
