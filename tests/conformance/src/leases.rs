//! Cases of the delivery engine's timing: leases that start at hand-out,
//! late settlement, settlement of one member of a batch, resuming with a
//! start time, and many delayed nacks beside fresh traffic.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use oona_core::{Delivery, Envelope, ErrorKind, StartPosition, Subscription, Timestamp, Topic};

use crate::support::{
    check, expect_delivery, expect_quiet, failed, group, kind_of, next_within, publish, subscribe,
    take_acking, with_cx, Context, Cx,
};
use crate::{CaseError, CaseResult, Fixture};

fn sub(topic: &Topic, g: &oona_core::Name) -> Subscription {
    Subscription::new(topic.clone(), g.clone())
}

fn numbered(topic: &Topic, i: usize) -> Envelope {
    Envelope::builder(topic.clone(), format!("{{\"n\":{i}}}"))
        .sender_id("conformance")
        .build()
}

fn body(e: &Envelope) -> String {
    String::from_utf8_lossy(&e.payload).into_owned()
}

fn id(d: &Delivery) -> String {
    d.envelope().event_id.to_string()
}

/// A slow consumer with a deep prefetch: 40 messages, prefetch 40, each
/// handled for a tenth of the ack deadline (all of them take four
/// deadlines). The lease of a delivery starts when the consumer takes it,
/// so each is delivered once, at attempt 1, and every ack succeeds.
pub async fn slow_handler_no_redelivery(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, slow_handler_no_redelivery_in)
}

async fn slow_handler_no_redelivery_in(cx: &Cx<'_>) -> CaseResult {
    const N: usize = 40;
    let deadline = cx.t.ack_deadline;
    let topic = cx.topic("control")?;
    let a = cx.client().await?;
    let s = sub(&topic, &group("slow"))
        .prefetch(N)
        .ack_deadline(deadline);
    let mut st = subscribe(&a, s).await?;
    let sent: Vec<Envelope> = (0..N).map(|i| numbered(&topic, i)).collect();
    a.publish_batch(sent.clone()).await.ctx("publish_batch")?;
    let mut seen = HashSet::new();
    let started = Instant::now();
    for i in 0..N {
        let d =
            expect_delivery(&mut st, cx.t.wait(), &format!("delivery {} of {N}", i + 1)).await?;
        check!(
            d.attempt() == 1,
            "a healthy message was redelivered: {} at attempt {} after {i} slow handlings",
            body(d.envelope()),
            d.attempt()
        );
        check!(seen.insert(id(&d)), "delivered twice: {}", id(&d));
        tokio::time::sleep(deadline / 10).await;
        let r = d.ack().await;
        check!(
            r.is_ok(),
            "ack of delivery {} failed: {}",
            i + 1,
            kind_of(&r)
        );
    }
    let handled_for = started.elapsed();
    expect_quiet(
        &mut st,
        deadline + cx.t.quiet_for(),
        "a message handled in time came back",
    )
    .await?;
    println!(
        "slow_handler_no_redelivery [{}]: {N} messages read ahead at once, handled one by one for {handled_for:?} ({:.1} ack deadlines of {deadline:?}): each delivered once, at attempt 1",
        cx.fx.name(),
        handled_for.as_secs_f64() / deadline.as_secs_f64()
    );
    Ok(())
}

/// Late settlement, one rule: three deliveries outlive their lease and
/// come back at attempt 2; then the first deliveries' ack, nack and reject
/// each fail with `LeaseExpired` and change nothing (no dead letter, no
/// extra delivery, the redeliveries still settle).
pub async fn late_settlement_changes_nothing(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, late_settlement_changes_nothing_in)
}

async fn late_settlement_changes_nothing_in(cx: &Cx<'_>) -> CaseResult {
    let deadline = cx.t.ack_deadline;
    let topic = cx.topic("control")?;
    let dlq = topic.dead_letter();
    cx.track(&dlq);
    let a = cx.client().await?;
    let g = group("late");
    let mut dl = subscribe(&a, sub(&dlq, &group("dlq")).ack_deadline(deadline * 30)).await?;
    let mut st = subscribe(&a, sub(&topic, &g).ack_deadline(deadline)).await?;
    for i in 0..3 {
        publish(&a, numbered(&topic, i)).await?;
    }
    let mut first = Vec::new();
    for i in 0..3 {
        first.push(expect_delivery(&mut st, cx.t.wait(), &format!("first delivery {i}")).await?);
    }
    let mut again = HashMap::new();
    for i in 0..3 {
        let d = expect_delivery(
            &mut st,
            deadline + cx.t.late(),
            &format!("redelivery {i} after the lease ran out"),
        )
        .await?;
        check!(d.attempt() == 2, "redelivery at attempt {}", d.attempt());
        again.insert(id(&d), d);
    }
    let mut late = first.into_iter();
    let (Some(x), Some(y), Some(z)) = (late.next(), late.next(), late.next()) else {
        return Err(failed("three first deliveries expected"));
    };
    let results = [
        ("ack", x.ack().await),
        ("nack", y.nack(None).await),
        ("reject", z.reject("late reject").await),
    ];
    for (what, r) in results {
        check!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::LeaseExpired),
            "late {what}: expected Err(LeaseExpired), got {}",
            kind_of(&r)
        );
    }
    expect_quiet(&mut st, cx.t.quiet_for(), "a late nack redelivered").await?;
    expect_quiet(&mut dl, cx.t.quiet_for(), "a late reject dead-lettered").await?;
    for (_, d) in again {
        d.ack().await.ctx("ack of the redelivery")?;
    }
    expect_quiet(
        &mut st,
        deadline + cx.t.quiet_for(),
        "an acked redelivery came back",
    )
    .await
}

/// A batch of ten published together (one broker batch where the broker
/// has them): one member is nacked and the other nine acked. Only the
/// nacked one comes back (attempt 2); nothing else, before or after its
/// ack.
pub async fn batch_member_nacked_alone(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, batch_member_nacked_alone_in)
}

async fn batch_member_nacked_alone_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("control")?;
    let a = cx.client().await?;
    let s = sub(&topic, &group("batch")).ack_deadline(Duration::from_secs(30));
    let mut st = subscribe(&a, s).await?;
    let sent: Vec<Envelope> = (0..10).map(|i| numbered(&topic, i)).collect();
    let nacked = sent[3].event_id.to_string();
    match cx.fx.publish_producer_batch(&topic, sent.clone()).await {
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            a.publish_batch(sent).await.ctx("publish_batch")?;
        }
        r => r.ctx("a producer batch of the broker's client")?,
    }
    for i in 0..10 {
        let d = expect_delivery(&mut st, cx.t.wait(), &format!("member {i}")).await?;
        if id(&d) == nacked {
            d.nack(None).await.ctx("nack")?;
        } else {
            d.ack().await.ctx("ack")?;
        }
    }
    let d = expect_delivery(&mut st, cx.t.wait(), "the nacked member again").await?;
    check!(
        id(&d) == nacked && d.attempt() == 2,
        "expected the nacked member at attempt 2, got {} at attempt {}",
        body(d.envelope()),
        d.attempt()
    );
    d.ack().await.ctx("ack")?;
    expect_quiet(
        &mut st,
        cx.t.quiet_for() * 3,
        "an acked member of the batch came back",
    )
    .await
}

/// `StartPosition::At` applies when the group is created, never on resume:
/// a group made with `At(t0)` consumes two of five messages and leaves; it
/// resumes with `At(later than all five)` and still gets the other three,
/// at attempt 1 (read ahead but never handed out is not an attempt).
pub async fn resume_with_start_at_keeps_backlog(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, resume_with_start_at_keeps_backlog_in)
}

async fn resume_with_start_at_keeps_backlog_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("control")?;
    let g = group("resume-at");
    let long = Duration::from_secs(30);
    let a = cx.client().await?;
    if !a.capabilities().start_at_time {
        return Err(CaseError::LeftOut(
            "the transport declares start_at_time = false".into(),
        ));
    }
    let at = |t: Timestamp| {
        sub(&topic, &g)
            .ack_deadline(long)
            .start(StartPosition::At(t))
    };
    let mut sa = subscribe(&a, at(Timestamp::now())).await?;
    let sent: Vec<Envelope> = (0..5).map(|i| numbered(&topic, i)).collect();
    for e in &sent {
        publish(&a, e.clone()).await?;
    }
    let got = take_acking(&mut sa, 2, cx.t.wait(), "the first two").await?;
    drop(sa);
    a.close().await.ctx("close")?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later = Timestamp::now();
    let b = cx.client().await?;
    let mut sb = subscribe(&b, at(later)).await?;
    let rest = take_acking(&mut sb, 3, cx.t.wait(), "the backlog after resuming").await?;
    let mut ids: HashSet<String> = got.iter().map(|(e, _)| e.event_id.to_string()).collect();
    for (e, attempt) in &rest {
        check!(
            ids.insert(e.event_id.to_string()),
            "{} delivered again after resuming",
            body(e)
        );
        check!(*attempt == 1, "{} at attempt {attempt}", body(e));
    }
    check!(ids.len() == 5, "got {} distinct of 5", ids.len());
    expect_quiet(&mut sb, cx.t.quiet_for(), "more than the five").await
}

/// 10,000 messages nacked with a delay while fresh ones keep flowing: the
/// fresh ones arrive at once (delayed nacks hold no slot), and each delayed
/// one comes back at attempt 2, not before its delay.
pub async fn delayed_nacks_beside_fresh(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, delayed_nacks_beside_fresh_in)
}

async fn delayed_nacks_beside_fresh_in(cx: &Cx<'_>) -> CaseResult {
    const N: usize = 10_000;
    const FRESH: usize = 100;
    let delay = cx.t.scaled(Duration::from_secs(10));
    let topic = cx.topic("telemetry")?;
    let a = cx.client().await?;
    let s = sub(&topic, &group("delayed")).ack_deadline(Duration::from_secs(60));
    let mut st = subscribe(&a, s).await?;
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let batch = chunk.iter().map(|i| numbered(&topic, *i)).collect();
        a.publish_batch(batch).await.ctx("publish_batch")?;
    }
    let started = Instant::now();
    let mut nacked_at = HashMap::new();
    let mut transient = 0;
    // Settled concurrently, as a runner with many handlers would: a
    // broker that needs a write per nack is not timed on its round trips.
    let mut nacks = tokio::task::JoinSet::new();
    while nacked_at.len() < N {
        let Some(d) = next_within(&mut st, cx.t.wait(), &mut transient).await? else {
            return Err(failed(format!(
                "{} of {N} first deliveries",
                nacked_at.len()
            )));
        };
        check!(
            d.attempt() == 1,
            "first delivery at attempt {}",
            d.attempt()
        );
        nacked_at.insert(id(&d), Instant::now());
        nacks.spawn(async move { d.nack(Some(delay)).await });
        while let Some(r) = nacks.try_join_next() {
            r.map_err(|e| failed(format!("nack task: {e}")))?
                .ctx("delayed nack")?;
        }
    }
    while let Some(r) = nacks.join_next().await {
        r.map_err(|e| failed(format!("nack task: {e}")))?
            .ctx("delayed nack")?;
    }
    let nacking = started.elapsed();
    check!(
        nacking < delay,
        "nacking {N} took {nacking:?}, longer than the delay {delay:?}: the case cannot tell"
    );
    let fresh: Vec<Envelope> = (N..N + FRESH).map(|i| numbered(&topic, i)).collect();
    let fresh_ids: HashSet<String> = fresh.iter().map(|e| e.event_id.to_string()).collect();
    let fresh_sent = Instant::now();
    a.publish_batch(fresh).await.ctx("publish_batch fresh")?;
    let mut fresh_got = HashSet::new();
    let mut back = HashSet::new();
    let until = Instant::now() + delay + cx.t.wait();
    while fresh_got.len() < FRESH || back.len() < N {
        let left = until.saturating_duration_since(Instant::now());
        let Some(d) = next_within(&mut st, left, &mut transient).await? else {
            return Err(failed(format!(
                "{} of {FRESH} fresh and {} of {N} delayed within {:?}",
                fresh_got.len(),
                back.len(),
                delay + cx.t.wait()
            )));
        };
        let key = id(&d);
        if fresh_ids.contains(&key) {
            let after = fresh_sent.elapsed();
            check!(
                after < cx.t.late(),
                "a fresh message took {after:?} behind {N} delayed nacks"
            );
            check!(fresh_got.insert(key), "a fresh message came twice");
        } else {
            let Some(at) = nacked_at.get(&key) else {
                return Err(failed("a message that was never sent"));
            };
            let waited = at.elapsed();
            check!(
                waited + cx.t.early >= delay,
                "a nack delayed {delay:?} came back after {waited:?}"
            );
            check!(
                d.attempt() == 2,
                "delayed nack back at attempt {}",
                d.attempt()
            );
            check!(back.insert(key), "a delayed nack came back twice");
        }
        d.ack().await.ctx("ack")?;
    }
    expect_quiet(&mut st, cx.t.quiet_for(), "an acked message came back").await
}
