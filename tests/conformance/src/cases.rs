//! The cases. Each takes the fixture, uses fresh random topics and groups,
//! and deletes its topics (and dead-letter topics) at the end.
//!
//! Every case is strict: exact counts, exact bytes, every envelope field,
//! attempt numbers, and time bounds in both directions where time matters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use oona_core::rules::DeadLetterInfo;
use oona_core::{
    header, DeliveryStream, Envelope, ErrorKind, HealthStatus, Name, PolicySet, Priority,
    Retention, StartPosition, Subscription, Timestamp, Topic, TopicPolicy,
};
use rand::Rng;

use crate::admin::admin_describes_topics_and_groups;
use crate::degrade::spooled_publishes_survive_a_cut;
use crate::depth::depth_follows_settlement;
use crate::leases::{
    batch_member_nacked_alone, delayed_nacks_beside_fresh, late_settlement_changes_nothing,
    resume_with_start_at_keeps_backlog, slow_handler_no_redelivery,
};
use crate::processes::{killed_consumers_lose_nothing, shutdown_then_exit_keeps_acks};
use crate::support::{
    check, diff, duplicates, expect_delivery, expect_quiet, failed, group, hook, is_kind, kind_of,
    left_out, next_within, publish, random_suffix, same_envelope, subscribe, take_acking, with_cx,
    Context, Cx,
};
use crate::{Case, CaseError, CaseFuture, CaseResult, Fixture};

/// A long ack deadline, for cases where only an explicit settlement may
/// cause a redelivery.
const LONG_DEADLINE: Duration = Duration::from_secs(30);

macro_rules! cases {
    ($( $(#[$exclusive:ident])? $name:ident ),* $(,)?) => {
        /// Every case, in order.
        pub static ALL: &[Case] = &[
            $( Case {
                name: stringify!($name),
                exclusive: cases!(@exclusive $($exclusive)?),
                run: {
                    fn wrap(fx: &dyn Fixture) -> CaseFuture<'_> {
                        Box::pin($name(fx))
                    }
                    wrap
                },
            } ),*
        ];
    };
    (@exclusive exclusive) => { true };
    (@exclusive) => { false };
}

cases![
    round_trip,
    trace_context_and_headers,
    redeliver_after_ack_deadline,
    nack_redelivers,
    nack_delay_respected,
    dead_letter_after_max_attempts,
    dead_letter_after_deadline_expiry,
    reject_dead_letters_at_once,
    dead_letter_topic_override,
    competing_consumers,
    independent_groups,
    per_key_order,
    key_ordered_competing,
    earliest_replays_history,
    latest_skips_history,
    start_at_time,
    existing_group_resumes_ignoring_start,
    acked_not_redelivered_after_restart,
    concurrent_publishers_and_subscribers,
    close_ends_streams_and_flushes_acks,
    #[exclusive]
    reconnect_after_cut,
    #[exclusive]
    spooled_publishes_survive_a_cut,
    invalid_topic_names,
    oversized_payload_rejected,
    poison_goes_to_dead_letter,
    retention_applied,
    publish_batch_in_order,
    prefetch_limits_unsettled,
    health_reports_up,
    depth_follows_settlement,
    admin_describes_topics_and_groups,
    slow_handler_no_redelivery,
    late_settlement_changes_nothing,
    batch_member_nacked_alone,
    resume_with_start_at_keeps_backlog,
    delayed_nacks_beside_fresh,
    killed_consumers_lose_nothing,
    shutdown_then_exit_keeps_acks,
];

fn sub(topic: &Topic, group: &Name) -> Subscription {
    Subscription::new(topic.clone(), group.clone()).start(StartPosition::Earliest)
}

fn simple(topic: &Topic, i: usize) -> Envelope {
    Envelope::builder(topic.clone(), format!("{{\"i\":{i}}}"))
        .sender_id("oona-conformance")
        .build()
}

/// The dead-letter checks shared by the dead-letter cases.
fn check_dead_letter(
    dl: &Envelope,
    original: &Envelope,
    dlq: &Topic,
    group: &Name,
    attempts: u32,
    reason: impl Fn(&str) -> bool,
    reason_wanted: &str,
) -> CaseResult {
    check!(
        dl.topic == *dlq,
        "dead letter on topic {}, expected {dlq}",
        dl.topic
    );
    let info = DeadLetterInfo::parse(dl)
        .ok_or_else(|| failed(format!("not a dead letter (no oona-dlq-* headers): {dl:?}")))?;
    check!(
        reason(&info.reason),
        "dead-letter reason {:?}, expected {reason_wanted}",
        info.reason
    );
    check!(
        info.attempts == attempts,
        "dead letter says {} attempts, expected {attempts}",
        info.attempts
    );
    check!(
        info.group == group.as_str(),
        "dead letter names group {:?}, expected {group}",
        info.group
    );
    check!(
        info.at.is_some(),
        "dead letter has no valid {} header",
        header::DLQ_AT
    );
    same_envelope(original, &info.original, "original inside the dead letter")
}

// ---------------------------------------------------------------- 1

/// Case 1: Round trip: [`crate::Timing::round_trip_messages`] (1000) varied
/// envelopes — JSON, binary with every byte value, empty, JSON-typed bytes
/// that are not JSON, every priority, optional fields set and unset,
/// unicode, nanosecond timestamps — arrive exactly once, attempt 1, with
/// every field and every payload byte unchanged.
pub async fn round_trip(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, round_trip_in)
}

fn varied(topic: &Topic, i: usize, rng: &mut impl Rng) -> Envelope {
    let (payload, ct): (Vec<u8>, &str) = match i % 5 {
        // JSON as producers write it: the literal `null`, whitespace and a
        // trailing newline around a document, escapes, unicode.
        0 if i % 20 == 0 => (b"null".to_vec(), "application/json"),
        0 if i % 20 == 10 => (
            format!(" {{\"i\": {i}}}\n").into_bytes(),
            "application/json",
        ),
        0 => (
            format!("{{\"i\":{i},\"s\":\"é ✓ \\u0000 😀\",\"n\":[1, 2.5e3, null]}}").into_bytes(),
            "application/json",
        ),
        1 => {
            // Every byte value, rotated, then random bytes of random length.
            let mut p: Vec<u8> = (0..=255u8).map(|b| b.wrapping_add(i as u8)).collect();
            let extra = rng.gen_range(0..2048);
            p.extend((0..extra).map(|_| rng.gen::<u8>()));
            (p, "application/octet-stream")
        }
        2 => (Vec::new(), "application/x-protobuf"),
        3 => (format!("not json {{ {i}").into_bytes(), "application/json"),
        _ => (
            format!("<r i=\"{i}\">\r\n\t text </r>").into_bytes(),
            "application/xml; charset=utf-8",
        ),
    };
    let nanos = rng.gen_range(1_500_000_000_000_000_000u64..1_900_000_000_000_000_000u64);
    let mut b = Envelope::builder(topic.clone(), payload)
        .sender_id(format!("sender-ü-{i}"))
        .timestamp(Timestamp::from(
            SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
        ))
        .content_type(ct)
        .priority(match i % 4 {
            0 => Priority::Low,
            1 => Priority::Normal,
            2 => Priority::High,
            _ => Priority::Emergency,
        });
    if i % 3 == 0 {
        b = b.correlation_id(format!("corr-{i}"));
    }
    if i % 2 == 0 {
        b = b.key(format!("key-{}", i % 7));
    }
    if i % 3 == 1 {
        b = b.schema_id("esper.ConformanceTest/1");
    }
    if i % 4 == 3 {
        b = b
            .header("x-empty", "")
            .header("x-unicode", "ключ ✓")
            .header("x-seq", i.to_string());
    }
    let mut env = b.build();
    if i % 6 == 5 {
        env.trace_id = None;
    }
    env
}

async fn round_trip_in(cx: &Cx<'_>) -> CaseResult {
    let n = cx.t.round_trip_messages;
    let topic = cx.topic("compilation")?;
    let client = cx.client().await?;
    let g = group("rt");
    let mut stream = subscribe(&client, sub(&topic, &g).ack_deadline(LONG_DEADLINE)).await?;

    let sent: Vec<Envelope> = {
        let mut rng = rand::thread_rng();
        (0..n).map(|i| varied(&topic, i, &mut rng)).collect()
    };
    // Half in batches, half one by one, several at a time.
    let half = n / 2;
    for chunk in sent[..half].chunks(50) {
        let receipts = client
            .publish_batch(chunk.to_vec())
            .await
            .ctx("publish_batch")?;
        check!(
            receipts.len() == chunk.len(),
            "publish_batch of {} returned {} receipts",
            chunk.len(),
            receipts.len()
        );
    }
    let results: Vec<_> = futures::stream::iter(sent[half..].iter().cloned())
        .map(|e| {
            let c = Arc::clone(&client);
            async move { c.publish(e).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r.ctx("publish")?;
    }

    let got = take_acking(&mut stream, n, cx.t.wait() * 2, "round trip").await?;
    let by_id: HashMap<&str, &Envelope> = sent.iter().map(|e| (e.event_id.as_str(), e)).collect();
    let dups = duplicates(got.iter().map(|(e, _)| e.event_id.as_str()));
    check!(dups.is_empty(), "delivered more than once: {dups:?}");
    for (env, attempt) in &got {
        let Some(expected) = by_id.get(env.event_id.as_str()) else {
            return Err(failed(format!(
                "delivered an event never published: {env:?}"
            )));
        };
        check!(
            *attempt == 1,
            "event {} came with attempt {attempt}, expected 1",
            env.event_id
        );
        same_envelope(expected, env, "round trip")?;
    }
    expect_quiet(
        &mut stream,
        cx.t.quiet_for(),
        "after all round-trip messages",
    )
    .await
}

// ---------------------------------------------------------------- 16

/// Case 16: Trace context and headers: W3C `traceparent` / `tracestate`, a
/// foreign trace id, and many headers (empty, long, unicode, multi-line
/// values) round-trip exactly, through a delivery and through a dead
/// letter.
pub async fn trace_context_and_headers(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, trace_context_and_headers_in)
}

async fn trace_context_and_headers_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("system")?;
    let dlq = topic.dead_letter();
    cx.track(&dlq);
    let client = cx.client().await?;
    let g = group("trace");
    let mut stream = subscribe(&client, sub(&topic, &g).ack_deadline(LONG_DEADLINE)).await?;
    let mut dl_stream = subscribe(&client, sub(&dlq, &group("trace-dlq"))).await?;

    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut b = Envelope::builder(topic.clone(), "{\"traced\":true}")
        .sender_id("tamiyo-controller-1")
        .traceparent(tp)
        .header(
            header::TRACESTATE,
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        )
        .header("x-empty", "")
        .header("x-long", "v".repeat(4096))
        .header("x-unicode", "Grüße ✓ 😀")
        .header("x-multi-line", "line 1\nline 2\r\n\tline 3")
        .header("x-json-ish", "{\"a\": [1, \"b\"]}")
        .correlation_id("req-42");
    for i in 0..20 {
        b = b.header(format!("x-h{i:02}"), format!("value {i}"));
    }
    let traced = b.build();
    check!(
        traced.trace_id.as_deref() == Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        "traceparent did not set the trace id (core bug)"
    );
    let foreign = Envelope::builder(topic.clone(), "{}")
        .sender_id("legacy-producer")
        .trace_id("foreign-trace-id:1234")
        .header("x-origin", "elsewhere")
        .build();

    publish(&client, traced.clone()).await?;
    publish(&client, foreign.clone()).await?;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = expect_delivery(&mut stream, cx.t.wait(), "the traced messages").await?;
        seen.push(d);
    }
    seen.sort_by_key(|d| d.envelope().event_id != traced.event_id);
    let mut it = seen.into_iter();
    let (Some(d1), Some(d2)) = (it.next(), it.next()) else {
        return Err(failed("lost a delivery"));
    };
    same_envelope(&traced, d1.envelope(), "traced message")?;
    same_envelope(&foreign, d2.envelope(), "message with a foreign trace id")?;
    d2.ack().await.ctx("ack")?;
    d1.reject("conformance: check headers survive dead-lettering")
        .await
        .ctx("reject")?;
    let dl = expect_delivery(&mut dl_stream, cx.t.wait(), "the dead letter").await?;
    check_dead_letter(
        dl.envelope(),
        &traced,
        &dlq,
        &g,
        1,
        |r| r == "conformance: check headers survive dead-lettering",
        "the reject reason",
    )?;
    dl.ack().await.ctx("ack dead letter")?;
    Ok(())
}

// ---------------------------------------------------------------- 2

/// Case 2: No ack, consumer dropped: the delivery and its stream are dropped
/// unsettled; another consumer of the same group (its own client) gets the
/// same envelope with attempt 2, not before the ack deadline and within it
/// plus the margin; once acked it does not come back.
pub async fn redeliver_after_ack_deadline(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, redeliver_after_ack_deadline_in)
}

async fn redeliver_after_ack_deadline_in(cx: &Cx<'_>) -> CaseResult {
    let deadline = cx.t.ack_deadline;
    let topic = cx.topic("control")?;
    let g = group("redeliver");
    let a = cx.client().await?;
    let mut sa = subscribe(&a, sub(&topic, &g).ack_deadline(deadline)).await?;
    let e = simple(&topic, 1);
    publish(&a, e.clone()).await?;
    let d1 = expect_delivery(&mut sa, cx.t.wait(), "the first delivery").await?;
    let handed_out = Instant::now();
    check!(
        d1.attempt() == 1,
        "first delivery has attempt {}",
        d1.attempt()
    );
    same_envelope(&e, d1.envelope(), "first delivery")?;
    // The consumer dies: nothing settled.
    drop(d1);
    drop(sa);

    let b = cx.client().await?;
    let mut sb = subscribe(&b, sub(&topic, &g).ack_deadline(deadline)).await?;
    let d2 = expect_delivery(
        &mut sb,
        deadline + cx.t.late(),
        "the redelivery after the ack deadline",
    )
    .await?;
    let after = handed_out.elapsed();
    check!(
        after + cx.t.early >= deadline,
        "redelivered after {after:?}, before the ack deadline of {deadline:?}"
    );
    check!(
        d2.attempt() == 2,
        "redelivery has attempt {}, expected 2",
        d2.attempt()
    );
    same_envelope(&e, d2.envelope(), "redelivery")?;
    d2.ack().await.ctx("ack")?;
    expect_quiet(
        &mut sb,
        deadline + cx.t.quiet_for(),
        "acked message came back",
    )
    .await
}

// ---------------------------------------------------------------- 3

/// Case 3a: Nack without delay redelivers at once (long before the 30 s ack
/// deadline) with attempt + 1 and the same envelope; after the ack, nothing
/// more comes.
pub async fn nack_redelivers(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, nack_redelivers_in)
}

async fn nack_redelivers_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("control")?;
    let g = group("nack");
    let c = cx.client().await?;
    let mut s = subscribe(&c, sub(&topic, &g).ack_deadline(LONG_DEADLINE)).await?;
    let e = simple(&topic, 1);
    publish(&c, e.clone()).await?;
    for attempt in 1..=3u32 {
        let d = expect_delivery(&mut s, cx.t.wait(), &format!("attempt {attempt}")).await?;
        check!(
            d.attempt() == attempt,
            "delivery has attempt {}, expected {attempt}",
            d.attempt()
        );
        same_envelope(&e, d.envelope(), "redelivery after nack")?;
        if attempt < 3 {
            d.nack(None).await.ctx("nack")?;
        } else {
            d.ack().await.ctx("ack")?;
        }
    }
    expect_quiet(&mut s, cx.t.quiet_for(), "acked after two nacks").await
}

/// Case 3b: Nack with a delay: the redelivery (attempt 2) does not come before
/// the delay and comes within it plus the margin. Left out when the
/// transport declares `nack_delay = false`.
pub async fn nack_delay_respected(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, nack_delay_respected_in)
}

async fn nack_delay_respected_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("control")?;
    let g = group("nackdelay");
    let c = cx.client().await?;
    if !c.capabilities().nack_delay {
        return Err(left_out("the transport declares nack_delay = false"));
    }
    let delay = cx.t.nack_delay;
    let mut s = subscribe(&c, sub(&topic, &g).ack_deadline(LONG_DEADLINE)).await?;
    let e = simple(&topic, 1);
    publish(&c, e.clone()).await?;
    let d = expect_delivery(&mut s, cx.t.wait(), "the first delivery").await?;
    check!(
        d.attempt() == 1,
        "first delivery has attempt {}",
        d.attempt()
    );
    let nacked = Instant::now();
    d.nack(Some(delay)).await.ctx("nack with delay")?;
    let d2 = expect_delivery(&mut s, delay + cx.t.late(), "the delayed redelivery").await?;
    let after = nacked.elapsed();
    check!(
        after + cx.t.early >= delay,
        "redelivered {after:?} after a nack with delay {delay:?}"
    );
    check!(
        d2.attempt() == 2,
        "redelivery has attempt {}, expected 2",
        d2.attempt()
    );
    same_envelope(&e, d2.envelope(), "delayed redelivery")?;
    d2.ack().await.ctx("ack")?;
    expect_quiet(&mut s, cx.t.quiet_for(), "acked after a delayed nack").await
}

// ---------------------------------------------------------------- 4

/// Case 4a: Dead letter after max attempts: nacked on attempts 1, 2, 3 of 3, the
/// message lands once on `<topic>.dlq` with reason `max attempts reached
/// (3 of 3); last: nacked`, attempts 3, the group, and the original
/// envelope exactly; it is not delivered again on the topic.
pub async fn dead_letter_after_max_attempts(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, dead_letter_after_max_attempts_in)
}

async fn dead_letter_after_max_attempts_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("control")?;
    let dlq = topic.dead_letter();
    cx.track(&dlq);
    let g = group("dlq");
    let c = cx.client().await?;
    let mut dl_stream = subscribe(&c, sub(&dlq, &group("dlq-reader"))).await?;
    let mut s = subscribe(
        &c,
        sub(&topic, &g).ack_deadline(LONG_DEADLINE).max_attempts(3),
    )
    .await?;
    let e = Envelope::builder(topic.clone(), "{\"poison\":false}")
        .sender_id("oona-conformance")
        .key("k1")
        .header("x-case", "dead_letter_after_max_attempts")
        .build();
    publish(&c, e.clone()).await?;
    for attempt in 1..=3u32 {
        let d = expect_delivery(&mut s, cx.t.wait(), &format!("attempt {attempt}")).await?;
        check!(
            d.attempt() == attempt,
            "delivery has attempt {}, expected {attempt}",
            d.attempt()
        );
        check!(
            d.is_last_attempt() == (attempt == 3),
            "is_last_attempt() wrong on attempt {attempt}"
        );
        same_envelope(&e, d.envelope(), "redelivery")?;
        d.nack(None).await.ctx("nack")?;
    }
    let dl = expect_delivery(&mut dl_stream, cx.t.wait(), "the dead letter").await?;
    check_dead_letter(
        dl.envelope(),
        &e,
        &dlq,
        &g,
        3,
        |r| r == "max attempts reached (3 of 3); last: nacked",
        "\"max attempts reached (3 of 3); last: nacked\"",
    )?;
    dl.ack().await.ctx("ack dead letter")?;
    expect_quiet(
        &mut s,
        cx.t.quiet_for(),
        "dead-lettered message redelivered",
    )
    .await?;
    expect_quiet(&mut dl_stream, cx.t.quiet_for(), "a second dead letter").await
}

/// Case 4b: Dead letter after the ack deadline expires on the last attempt:
/// with max attempts 2, two deliveries left unsettled past the deadline
/// make one dead letter, reason mentioning the expired deadline, attempts
/// 2, and no third delivery.
pub async fn dead_letter_after_deadline_expiry(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, dead_letter_after_deadline_expiry_in)
}

async fn dead_letter_after_deadline_expiry_in(cx: &Cx<'_>) -> CaseResult {
    let deadline = cx.t.ack_deadline;
    let topic = cx.topic("control")?;
    let dlq = topic.dead_letter();
    cx.track(&dlq);
    let g = group("expire");
    let c = cx.client().await?;
    let mut dl_stream = subscribe(&c, sub(&dlq, &group("expire-reader"))).await?;
    let mut s = subscribe(&c, sub(&topic, &g).ack_deadline(deadline).max_attempts(2)).await?;
    let e = simple(&topic, 7);
    publish(&c, e.clone()).await?;
    for attempt in 1..=2u32 {
        let within = if attempt == 1 {
            cx.t.wait()
        } else {
            deadline + cx.t.late()
        };
        let d = expect_delivery(&mut s, within, &format!("attempt {attempt}")).await?;
        check!(
            d.attempt() == attempt,
            "delivery has attempt {}, expected {attempt}",
            d.attempt()
        );
        same_envelope(&e, d.envelope(), "delivery")?;
        drop(d); // left unsettled
    }
    // Keep polling the topic: some transports notice expiry while reading.
    expect_quiet(&mut s, deadline + cx.t.late(), "a third delivery").await?;
    let dl = expect_delivery(&mut dl_stream, cx.t.wait(), "the dead letter").await?;
    check_dead_letter(
        dl.envelope(),
        &e,
        &dlq,
        &g,
        2,
        |r| r.starts_with("max attempts reached (2 of 2)") && r.contains("ack deadline expired"),
        "\"max attempts reached (2 of 2); last: ack deadline expired unsettled\"",
    )?;
    dl.ack().await.ctx("ack dead letter")?;
    expect_quiet(&mut dl_stream, cx.t.quiet_for(), "a second dead letter").await
}

/// Case 4c: Reject dead-letters at once (attempt 1) with the caller's reason and
/// the original envelope, and is never redelivered (checked past the ack
/// deadline).
pub async fn reject_dead_letters_at_once(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, reject_dead_letters_at_once_in)
}

async fn reject_dead_letters_at_once_in(cx: &Cx<'_>) -> CaseResult {
    let deadline = cx.t.ack_deadline;
    let topic = cx.topic("control")?;
    let dlq = topic.dead_letter();
    cx.track(&dlq);
    let g = group("reject");
    let c = cx.client().await?;
    let mut dl_stream = subscribe(&c, sub(&dlq, &group("reject-reader"))).await?;
    let mut s = subscribe(&c, sub(&topic, &g).ack_deadline(deadline).max_attempts(5)).await?;
    let e = simple(&topic, 3);
    publish(&c, e.clone()).await?;
    let d = expect_delivery(&mut s, cx.t.wait(), "the delivery").await?;
    check!(d.attempt() == 1, "delivery has attempt {}", d.attempt());
    let reason = "bad command: blueprint b3d4f5 unknown";
    d.reject(reason).await.ctx("reject")?;
    let dl = expect_delivery(&mut dl_stream, cx.t.wait(), "the dead letter").await?;
    check_dead_letter(dl.envelope(), &e, &dlq, &g, 1, |r| r == reason, reason)?;
    dl.ack().await.ctx("ack dead letter")?;
    expect_quiet(
        &mut s,
        deadline + cx.t.quiet_for(),
        "rejected message redelivered",
    )
    .await
}

/// Case 4d: A subscription's own dead-letter topic is used instead of
/// `<topic>.dlq`, which stays empty.
pub async fn dead_letter_topic_override(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, dead_letter_topic_override_in)
}

async fn dead_letter_topic_override_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("control")?;
    let default_dlq = topic.dead_letter();
    cx.track(&default_dlq);
    let custom = cx.topic("system")?;
    let custom = Topic::new(format!("{custom}.dlq")).ctx("custom dead-letter topic")?;
    cx.track(&custom);
    let g = group("dlqto");
    let c = cx.client().await?;
    let mut custom_stream = subscribe(&c, sub(&custom, &group("custom-reader"))).await?;
    let mut default_stream = subscribe(&c, sub(&default_dlq, &group("default-reader"))).await?;
    let mut s = subscribe(
        &c,
        sub(&topic, &g)
            .ack_deadline(LONG_DEADLINE)
            .dead_letter(custom.clone()),
    )
    .await?;
    let e = simple(&topic, 4);
    publish(&c, e.clone()).await?;
    let d = expect_delivery(&mut s, cx.t.wait(), "the delivery").await?;
    check!(
        d.info().dead_letter == custom,
        "delivery info names dead-letter topic {}, the subscription says {custom}",
        d.info().dead_letter
    );
    d.reject("to the custom topic").await.ctx("reject")?;
    let dl = expect_delivery(
        &mut custom_stream,
        cx.t.wait(),
        "the dead letter on the custom topic",
    )
    .await?;
    check_dead_letter(
        dl.envelope(),
        &e,
        &custom,
        &g,
        1,
        |r| r == "to the custom topic",
        "the reject reason",
    )?;
    dl.ack().await.ctx("ack dead letter")?;
    expect_quiet(
        &mut default_stream,
        cx.t.quiet_for(),
        "dead letter on <topic>.dlq despite a custom dead-letter topic",
    )
    .await
}

// ---------------------------------------------------------------- 5, 6

/// What consumers received, per consumer.
struct Received {
    /// (consumer index, envelope, attempt) in arrival order.
    all: Vec<(usize, Envelope, u32)>,
}

impl Received {
    /// What one consumer received, as (envelope, attempt) pairs.
    fn from_one(got: Vec<(Envelope, u32)>) -> Self {
        Received {
            all: got.into_iter().map(|(e, a)| (0, e, a)).collect(),
        }
    }

    fn ids(&self) -> Vec<&str> {
        self.all
            .iter()
            .map(|(_, e, _)| e.event_id.as_str())
            .collect()
    }
}

/// Drain `streams` concurrently, acking everything, until `expected`
/// deliveries arrived in total and then `quiet` more passed (to catch
/// duplicates), or `within` ran out.
async fn consume_all(
    streams: Vec<DeliveryStream>,
    expected: usize,
    within: Duration,
    quiet: Duration,
) -> Result<Received, CaseError> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let done_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let hard = Instant::now() + within + quiet;
    let mut tasks = Vec::new();
    for (idx, mut s) in streams.into_iter().enumerate() {
        let got = Arc::clone(&got);
        let done_at = Arc::clone(&done_at);
        tasks.push(tokio::spawn(async move {
            let mut transient = 0;
            loop {
                let now = Instant::now();
                if now >= hard {
                    return Ok(());
                }
                if lock(&done_at).is_some_and(|t| now >= t + quiet) {
                    return Ok(());
                }
                let Some(d) =
                    next_within(&mut s, Duration::from_millis(50), &mut transient).await?
                else {
                    continue;
                };
                let env = d.envelope().clone();
                let attempt = d.attempt();
                d.ack().await.ctx("ack")?;
                let mut g = lock(&got);
                g.push((idx, env, attempt));
                if g.len() >= expected {
                    let mut done = lock(&done_at);
                    if done.is_none() {
                        *done = Some(Instant::now());
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| failed(format!("consumer task: {e}")))??;
    }
    let all = std::mem::take(&mut *lock(&got));
    check!(
        all.len() >= expected,
        "got {} of {expected} deliveries within {within:?}",
        all.len()
    );
    Ok(Received { all })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Exactly the `sent` events, each once, attempt 1.
fn exactly_once(sent: &[Envelope], got: &Received, who: &str) -> CaseResult {
    let dups = duplicates(got.ids());
    check!(
        dups.is_empty(),
        "{who}: {} events delivered more than once, e.g. {:?}",
        dups.len(),
        dups.first()
    );
    let want: HashSet<&str> = sent.iter().map(|e| e.event_id.as_str()).collect();
    let have: HashSet<&str> = got.ids().into_iter().collect();
    let missing = want.difference(&have).count();
    let extra = have.difference(&want).count();
    check!(
        missing == 0 && extra == 0,
        "{who}: {missing} published events missing, {extra} unknown events delivered"
    );
    let by_id: HashMap<&str, &Envelope> = sent.iter().map(|e| (e.event_id.as_str(), e)).collect();
    for (_, env, attempt) in &got.all {
        check!(
            *attempt == 1,
            "{who}: event {} has attempt {attempt}, expected 1",
            env.event_id
        );
        if let Some(exp) = by_id.get(env.event_id.as_str()) {
            same_envelope(exp, env, who)?;
        }
    }
    Ok(())
}

/// Case 5: Competing consumers: three consumers (own clients) in one group; 90
/// messages; each message to exactly one member, the union is everything,
/// attempt 1. Left out when the transport declares no competing consumers.
pub async fn competing_consumers(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, competing_consumers_in)
}

async fn competing_consumers_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("telemetry")?;
    let g = group("compete");
    let p = cx.client().await?;
    if !p.capabilities().competing_consumers {
        return Err(left_out(
            "the transport declares competing_consumers = false",
        ));
    }
    let mut streams = Vec::new();
    for _ in 0..3 {
        let c = cx.client().await?;
        streams.push(subscribe(&c, sub(&topic, &g).ack_deadline(LONG_DEADLINE).prefetch(8)).await?);
    }
    let sent: Vec<Envelope> = (0..90).map(|i| simple(&topic, i)).collect();
    p.publish_batch(sent.clone()).await.ctx("publish_batch")?;
    let got = consume_all(streams, sent.len(), cx.t.wait(), cx.t.quiet_for()).await?;
    exactly_once(&sent, &got, "competing group")
}

/// Case 6: Independent groups: three groups (own clients) each see every one of
/// 50 messages exactly once.
pub async fn independent_groups(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, independent_groups_in)
}

async fn independent_groups_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("telemetry")?;
    let p = cx.client().await?;
    let mut streams = Vec::new();
    for i in 0..3 {
        let c = cx.client().await?;
        let g = group(&format!("indep{i}"));
        streams.push(subscribe(&c, sub(&topic, &g).ack_deadline(LONG_DEADLINE)).await?);
    }
    let sent: Vec<Envelope> = (0..50).map(|i| simple(&topic, i)).collect();
    p.publish_batch(sent.clone()).await.ctx("publish_batch")?;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let (w, q) = (cx.t.wait(), cx.t.quiet_for());
            tokio::spawn(async move { consume_all(vec![s], 50, w, q).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t
            .await
            .map_err(|e| failed(format!("consumer task: {e}")))??;
        exactly_once(&sent, &got, &format!("group {i}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- 7

fn keyed(topic: &Topic, key: &str, seq: usize) -> Envelope {
    Envelope::builder(topic.clone(), format!("{key}|{seq}"))
        .sender_id("oona-conformance")
        .content_type("text/plain")
        .key(key)
        .build()
}

fn parse_keyed(env: &Envelope) -> Result<(String, usize), CaseError> {
    let text = std::str::from_utf8(&env.payload)
        .map_err(|_| failed(format!("payload of {} is not the text sent", env.event_id)))?;
    let (k, s) = text
        .split_once('|')
        .ok_or_else(|| failed(format!("payload {text:?} is not the text sent")))?;
    let seq = s
        .parse()
        .map_err(|_| failed(format!("payload {text:?} is not the text sent")))?;
    check!(
        env.key.as_deref() == Some(k),
        "key {:?} does not match payload {text:?}",
        env.key
    );
    Ok((k.to_string(), seq))
}

/// Publish `per_key` messages for each of `keys_per_pub` keys from each of
/// `publishers` concurrent clients; each publisher owns its keys and
/// publishes their sequence numbers in order, in runs of five per key.
async fn publish_keyed(
    cx: &Cx<'_>,
    topic: &Topic,
    publishers: usize,
    keys_per_pub: usize,
    per_key: usize,
) -> Result<usize, CaseError> {
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let c = cx.client().await?;
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            // Runs of up to five per key, the keys taking turns: both
            // neighbours of one key and interleaved keys occur.
            for run in (0..per_key).step_by(5) {
                for k in 0..keys_per_pub {
                    for seq in run..(run + 5).min(per_key) {
                        c.publish(keyed(&topic, &format!("p{p}-k{k}"), seq))
                            .await
                            .ctx("publish")?;
                    }
                }
            }
            Ok::<(), CaseError>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| failed(format!("publisher task: {e}")))??;
    }
    Ok(publishers * keys_per_pub * per_key)
}

/// Case 7: Per-key order under concurrent publishers: four publishers (own
/// clients) publish 25 numbered messages on each of their four keys at the
/// same time; one consumer sees every key's messages exactly once and in
/// order.
pub async fn per_key_order(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, per_key_order_in)
}

async fn per_key_order_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("control")?;
    let c = cx.client().await?;
    let g = group("order");
    let mut s = subscribe(&c, sub(&topic, &g).ack_deadline(LONG_DEADLINE)).await?;
    let n = publish_keyed(cx, &topic, 4, 4, 25).await?;
    let got = take_acking(&mut s, n, cx.t.wait(), "keyed messages").await?;
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    for (env, attempt) in &got {
        let (k, seq) = parse_keyed(env)?;
        check!(
            *attempt == 1,
            "event {} has attempt {attempt}",
            env.event_id
        );
        let want = next.entry(k.clone()).or_insert(0);
        check!(
            seq == *want,
            "key {k}: got message {seq}, expected {want} (order broken or message lost/duplicated)"
        );
        *want += 1;
    }
    check!(
        next.len() == 16 && next.values().all(|&v| v == 25),
        "not every key complete: {next:?}"
    );
    expect_quiet(&mut s, cx.t.quiet_for(), "after all keyed messages").await
}

/// Case 7b: Per-key order across competing consumers (`key_ordered`): three
/// consumers share a group; a key's next message is never handed out
/// before the previous one is settled. Left out when the transport declares
/// `key_ordered_competing = false`.
pub async fn key_ordered_competing(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, key_ordered_competing_in)
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Received(usize),
    Acking(usize),
}

async fn key_ordered_competing_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("control")?;
    let g = group("keyorder");
    let p = cx.client().await?;
    let caps = p.capabilities();
    if !caps.key_ordered_competing || !caps.competing_consumers {
        return Err(left_out(
            "the transport declares key_ordered_competing = false",
        ));
    }
    let log: Arc<Mutex<BTreeMap<String, Vec<Event>>>> = Arc::new(Mutex::new(BTreeMap::new()));
    // Fewer keys than consumers: any three messages in flight at once must
    // share a key unless the transport serializes them.
    let (keys, per_key) = (2usize, 30usize);
    let total = keys * per_key;
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // A backlog, interleaving the keys, is there before the consumers
    // start, so every consumer could take a key's next message at once.
    let backlog: Vec<Envelope> = (0..per_key)
        .flat_map(|seq| (0..keys).map(move |k| (k, seq)))
        .map(|(k, seq)| keyed(&topic, &format!("k{k}"), seq))
        .collect();
    p.publish_batch(backlog).await.ctx("publish_batch")?;
    // Subscribe all three before any consumes, so they compete from the start.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let c = cx.client().await?;
        streams.push(
            subscribe(
                &c,
                sub(&topic, &g)
                    .ack_deadline(LONG_DEADLINE)
                    .key_ordered(true)
                    .prefetch(4),
            )
            .await?,
        );
    }
    let mut tasks = Vec::new();
    for mut s in streams {
        let (log, count) = (Arc::clone(&log), Arc::clone(&count));
        let hard = Instant::now() + cx.t.wait() + cx.t.quiet_for();
        let quiet = cx.t.quiet_for();
        tasks.push(tokio::spawn(async move {
            let mut transient = 0;
            let mut done_at = None;
            loop {
                let now = Instant::now();
                if now >= hard || done_at.is_some_and(|t: Instant| now >= t + quiet) {
                    return Ok::<(), CaseError>(());
                }
                let Some(d) =
                    next_within(&mut s, Duration::from_millis(50), &mut transient).await?
                else {
                    if count.load(std::sync::atomic::Ordering::SeqCst) >= total && done_at.is_none()
                    {
                        done_at = Some(Instant::now());
                    }
                    continue;
                };
                let (k, seq) = parse_keyed(d.envelope())?;
                lock(&log)
                    .entry(k.clone())
                    .or_default()
                    .push(Event::Received(seq));
                // Hold it a little so a broken transport has time to hand
                // the key's next message to another consumer.
                let pause = rand::thread_rng().gen_range(1..8);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                lock(&log).entry(k).or_default().push(Event::Acking(seq));
                d.ack().await.ctx("ack")?;
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| failed(format!("consumer task: {e}")))??;
    }
    let log = std::mem::take(&mut *lock(&log));
    check!(log.len() == keys, "saw {} keys of {keys}", log.len());
    for (k, events) in &log {
        let want: Vec<Event> = (0..per_key)
            .flat_map(|s| [Event::Received(s), Event::Acking(s)])
            .collect();
        check!(
            *events == want,
            "key {k}: deliveries not serialized per key: {events:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- 8

/// Case 8a: A new group starting from `Earliest` replays the retained history
/// (five messages published before it existed), then gets new messages.
/// Left out when the transport declares `replay = false`.
pub async fn earliest_replays_history(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, earliest_replays_history_in)
}

async fn earliest_replays_history_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("innovation")?;
    let c = cx.client().await?;
    if !c.capabilities().replay {
        return Err(left_out("the transport declares replay = false"));
    }
    let history: Vec<Envelope> = (0..5).map(|i| simple(&topic, i)).collect();
    for e in &history {
        publish(&c, e.clone()).await?;
    }
    let reader = cx.client().await?;
    let mut s = subscribe(
        &reader,
        sub(&topic, &group("replay")).ack_deadline(LONG_DEADLINE),
    )
    .await?;
    let got = take_acking(&mut s, 5, cx.t.wait(), "replayed history").await?;
    let got = Received::from_one(got);
    exactly_once(&history, &got, "replay from earliest")?;
    let fresh: Vec<Envelope> = (5..7).map(|i| simple(&topic, i)).collect();
    for e in &fresh {
        publish(&c, e.clone()).await?;
    }
    let got = take_acking(&mut s, 2, cx.t.wait(), "messages after the replay").await?;
    let got = Received::from_one(got);
    exactly_once(&fresh, &got, "after replay")?;
    expect_quiet(&mut s, cx.t.quiet_for(), "after replay").await
}

/// Case 8b: A new group starting from `Latest` does not see history: only the
/// three messages published after it subscribed. The group already reads
/// another topic (one service, two routes), and goes on reading it.
pub async fn latest_skips_history(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, latest_skips_history_in)
}

async fn latest_skips_history_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("innovation")?;
    let other = cx.topic("control")?;
    let c = cx.client().await?;
    for i in 0..5 {
        publish(&c, simple(&topic, i)).await?;
    }
    let reader = cx.client().await?;
    let latest = group("latest");
    let mut on_other = subscribe(
        &reader,
        Subscription::new(other.clone(), latest.clone())
            .start(StartPosition::Latest)
            .ack_deadline(LONG_DEADLINE),
    )
    .await?;
    let mut s = subscribe(
        &reader,
        Subscription::new(topic.clone(), latest)
            .start(StartPosition::Latest)
            .ack_deadline(LONG_DEADLINE),
    )
    .await?;
    let fresh: Vec<Envelope> = (5..8).map(|i| simple(&topic, i)).collect();
    for e in &fresh {
        publish(&c, e.clone()).await?;
    }
    let got = take_acking(&mut s, 3, cx.t.wait(), "messages after subscribing").await?;
    let got = Received::from_one(got);
    exactly_once(&fresh, &got, "latest")?;
    expect_quiet(
        &mut s,
        cx.t.quiet_for(),
        "history replayed to a Latest group",
    )
    .await?;
    let later = simple(&other, 9);
    publish(&c, later.clone()).await?;
    let got = take_acking(&mut on_other, 1, cx.t.wait(), "the group's other topic").await?;
    exactly_once(&[later], &Received::from_one(got), "the other topic")
}

/// Case 8c: A new group starting `At(t)` gets exactly the messages published
/// after `t` (three), none of the three before. Left out when the
/// transport declares `start_at_time = false`.
pub async fn start_at_time(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, start_at_time_in)
}

async fn start_at_time_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("innovation")?;
    let c = cx.client().await?;
    if !c.capabilities().start_at_time {
        return Err(left_out("the transport declares start_at_time = false"));
    }
    for i in 0..3 {
        publish(&c, simple(&topic, i)).await?;
    }
    // Gaps on both sides of the instant, wider than broker clock granularity.
    let gap = cx.t.scaled(Duration::from_millis(150));
    tokio::time::sleep(gap).await;
    let at = Timestamp::now();
    tokio::time::sleep(gap).await;
    let after: Vec<Envelope> = (3..6).map(|i| simple(&topic, i)).collect();
    for e in &after {
        publish(&c, e.clone()).await?;
    }
    let reader = cx.client().await?;
    let mut s = subscribe(
        &reader,
        Subscription::new(topic.clone(), group("at"))
            .start(StartPosition::At(at))
            .ack_deadline(LONG_DEADLINE),
    )
    .await?;
    let got = take_acking(&mut s, 3, cx.t.wait(), "messages after the instant").await?;
    let got = Received::from_one(got);
    exactly_once(&after, &got, "start at time")?;
    expect_quiet(
        &mut s,
        cx.t.quiet_for(),
        "message from before the start instant",
    )
    .await
}

/// Case 8d: The start position applies only when the group is created: a
/// group made with `Latest`, restarted with `Earliest`, does not replay
/// history; a group made with `Earliest`, restarted with `Latest`, still
/// gets what was published while it was away.
pub async fn existing_group_resumes_ignoring_start(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, existing_group_resumes_ignoring_start_in)
}

async fn existing_group_resumes_ignoring_start_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("innovation")?;
    let p = cx.client().await?;
    let history: Vec<Envelope> = (0..3).map(|i| simple(&topic, i)).collect();
    p.publish_batch(history.clone())
        .await
        .ctx("publish_batch")?;
    let (gl, ge) = (group("made-latest"), group("made-earliest"));
    let with = |g: &Name, start| {
        Subscription::new(topic.clone(), g.clone())
            .start(start)
            .ack_deadline(LONG_DEADLINE)
    };

    // Create both groups, settle what they see, and go away.
    let first = cx.client().await?;
    let mut sl = subscribe(&first, with(&gl, StartPosition::Latest)).await?;
    let mut se = subscribe(&first, with(&ge, StartPosition::Earliest)).await?;
    let one = simple(&topic, 3);
    publish(&p, one.clone()).await?;
    let got = take_acking(&mut sl, 1, cx.t.wait(), "Latest group, first run").await?;
    same_envelope(&one, &got[0].0, "Latest group, first run")?;
    let mut all = history.clone();
    all.push(one.clone());
    let got = take_acking(&mut se, 4, cx.t.wait(), "Earliest group, first run").await?;
    exactly_once(&all, &Received::from_one(got), "Earliest group, first run")?;
    drop((sl, se));
    first.close().await.ctx("close")?;

    // While they are away.
    let away: Vec<Envelope> = (4..6).map(|i| simple(&topic, i)).collect();
    p.publish_batch(away.clone()).await.ctx("publish_batch")?;

    // Restart each with the opposite start position.
    let second = cx.client().await?;
    let mut sl = subscribe(&second, with(&gl, StartPosition::Earliest)).await?;
    let mut se = subscribe(&second, with(&ge, StartPosition::Latest)).await?;
    for (s, who) in [
        (&mut sl, "group made Latest, restarted Earliest"),
        (&mut se, "group made Earliest, restarted Latest"),
    ] {
        let got = take_acking(s, 2, cx.t.wait(), who).await?;
        exactly_once(&away, &Received::from_one(got), who)?;
        expect_quiet(s, cx.t.quiet_for(), who).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- 9

/// Case 9: Acked messages are not redelivered after a consumer restart: a
/// consumer acks 10 of 20 and closes; a new consumer (new client) in the
/// group gets exactly the other 10 (those the first held unsettled come
/// back after the ack deadline) and none of the acked ones, even after the
/// deadline.
pub async fn acked_not_redelivered_after_restart(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, acked_not_redelivered_after_restart_in)
}

async fn acked_not_redelivered_after_restart_in(cx: &Cx<'_>) -> CaseResult {
    let deadline = cx.t.ack_deadline;
    let topic = cx.topic("system")?;
    let g = group("restart");
    let p = cx.client().await?;
    let sent: Vec<Envelope> = (0..20).map(|i| simple(&topic, i)).collect();
    let first = cx.client().await?;
    let mut s1 = subscribe(&first, sub(&topic, &g).ack_deadline(deadline).prefetch(4)).await?;
    p.publish_batch(sent.clone()).await.ctx("publish_batch")?;
    let acked = take_acking(&mut s1, 10, cx.t.wait(), "first consumer").await?;
    drop(s1);
    first.close().await.ctx("close the first consumer")?;
    let acked_ids: HashSet<String> = acked.iter().map(|(e, _)| e.event_id.to_string()).collect();

    let second = cx.client().await?;
    let mut s2 = subscribe(&second, sub(&topic, &g).ack_deadline(deadline)).await?;
    let rest = take_acking(
        &mut s2,
        10,
        deadline + cx.t.wait(),
        "second consumer after restart",
    )
    .await?;
    for (env, _) in &rest {
        check!(
            !acked_ids.contains(env.event_id.as_str()),
            "event {} was acked before the restart but delivered again",
            env.event_id
        );
    }
    let want: Vec<Envelope> = sent
        .iter()
        .filter(|e| !acked_ids.contains(e.event_id.as_str()))
        .cloned()
        .collect();
    let ids: Vec<&str> = rest.iter().map(|(e, _)| e.event_id.as_str()).collect();
    let dups = duplicates(ids.iter().copied());
    check!(dups.is_empty(), "delivered twice after restart: {dups:?}");
    let have: HashSet<&str> = ids.into_iter().collect();
    check!(
        want.iter().all(|e| have.contains(e.event_id.as_str())),
        "not every unacked message came back after the restart"
    );
    expect_quiet(
        &mut s2,
        deadline + cx.t.quiet_for(),
        "acked message delivered again after restart",
    )
    .await
}

// ---------------------------------------------------------------- 10

/// Case 10: Concurrent publishers and subscribers: four publishers (own
/// clients) publish 100 messages each at once while a three-member group
/// and a one-member group consume; each group gets all 400 exactly once.
pub async fn concurrent_publishers_and_subscribers(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, concurrent_publishers_and_subscribers_in)
}

async fn concurrent_publishers_and_subscribers_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("telemetry")?;
    let probe = cx.client().await?;
    let members = if probe.capabilities().competing_consumers {
        3
    } else {
        1
    };
    let (ga, gb) = (group("busy-a"), group("busy-b"));
    let mut a_streams = Vec::new();
    for _ in 0..members {
        let c = cx.client().await?;
        a_streams.push(subscribe(&c, sub(&topic, &ga).ack_deadline(LONG_DEADLINE)).await?);
    }
    let cb = cx.client().await?;
    let b_stream = subscribe(&cb, sub(&topic, &gb).ack_deadline(LONG_DEADLINE)).await?;

    let (w, q) = (cx.t.wait(), cx.t.quiet_for());
    let total = 400;
    let consume_a = tokio::spawn(consume_all(a_streams, total, w, q));
    let consume_b = tokio::spawn(consume_all(vec![b_stream], total, w, q));
    let mut pubs = Vec::new();
    for p in 0..4 {
        let c = cx.client().await?;
        let topic = topic.clone();
        pubs.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..100 {
                let e = Envelope::builder(topic.clone(), format!("{{\"p\":{p},\"i\":{i}}}"))
                    .sender_id(format!("publisher-{p}"))
                    .build();
                c.publish(e.clone()).await.ctx("publish")?;
                sent.push(e);
            }
            Ok::<_, CaseError>(sent)
        }));
    }
    let mut sent = Vec::new();
    for t in pubs {
        sent.extend(
            t.await
                .map_err(|e| failed(format!("publisher task: {e}")))??,
        );
    }
    let a = consume_a
        .await
        .map_err(|e| failed(format!("consumers: {e}")))??;
    let b = consume_b
        .await
        .map_err(|e| failed(format!("consumers: {e}")))??;
    exactly_once(&sent, &a, "group with competing members")?;
    exactly_once(&sent, &b, "single-member group")
}

// ---------------------------------------------------------------- 11

/// Case 11: Close: after `close()` every stream of the client ends (`None`),
/// publish and subscribe fail with `Closed`, a second close is fine, and
/// the acks issued just before close are effective: a new client in the
/// same group gets nothing back, even past the ack deadline.
pub async fn close_ends_streams_and_flushes_acks(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, close_ends_streams_and_flushes_acks_in)
}

async fn stream_ends(s: &mut DeliveryStream, within: Duration, what: &str) -> CaseResult {
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, s.next()).await {
            Err(_) => {
                return Err(failed(format!(
                    "{what}: stream still open {within:?} after close"
                )))
            }
            Ok(None) => return Ok(()),
            // A final "closed" error before the end is acceptable.
            Ok(Some(Err(e))) if is_kind(&e, ErrorKind::Closed) => {}
            Ok(Some(Err(e))) => return Err(failed(format!("{what}: error after close: {e}"))),
            Ok(Some(Ok(d))) => {
                return Err(failed(format!(
                    "{what}: delivery of {} after close",
                    d.envelope().event_id
                )))
            }
        }
    }
}

async fn close_ends_streams_and_flushes_acks_in(cx: &Cx<'_>) -> CaseResult {
    let deadline = cx.t.ack_deadline;
    let topic = cx.topic("control")?;
    let idle = cx.topic("control")?;
    let g = group("close");
    let p = cx.client().await?;
    let a = cx.client().await?;
    let mut s = subscribe(&a, sub(&topic, &g).ack_deadline(deadline)).await?;
    let mut s_idle = subscribe(&a, sub(&idle, &group("close-idle"))).await?;
    let sent: Vec<Envelope> = (0..5).map(|i| simple(&topic, i)).collect();
    p.publish_batch(sent.clone()).await.ctx("publish_batch")?;
    take_acking(&mut s, 5, cx.t.wait(), "before close").await?;
    a.close().await.ctx("close")?;
    stream_ends(&mut s, cx.t.wait(), "busy stream").await?;
    stream_ends(&mut s_idle, cx.t.wait(), "idle stream").await?;

    let r = a.publish(simple(&topic, 99)).await;
    check!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Closed),
        "publish after close: expected Err(Closed), got {}",
        kind_of(&r)
    );
    let r = a.subscribe(sub(&topic, &g)).await.map(|_| ());
    check!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Closed),
        "subscribe after close: expected Err(Closed), got {}",
        kind_of(&r)
    );
    a.close().await.ctx("second close (must be idempotent)")?;

    let b = cx.client().await?;
    let mut sb = subscribe(&b, sub(&topic, &g).ack_deadline(deadline)).await?;
    expect_quiet(
        &mut sb,
        deadline + cx.t.late(),
        "a message acked before close came back",
    )
    .await
}

// ---------------------------------------------------------------- 12

/// Case 12: Reconnect: while 200 messages are published (retrying temporary
/// errors) and consumed on the same streams, every connection is cut and
/// restored. Every message whose publish succeeded is delivered
/// (duplicates are allowed and counted); the stream survives. Runs alone.
/// Left out when the fixture cannot cut connections.
pub async fn reconnect_after_cut(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, reconnect_after_cut_in)
}

async fn reconnect_after_cut_in(cx: &Cx<'_>) -> CaseResult {
    let deadline = cx.t.ack_deadline;
    let total = 200usize;
    let cut_after = 60usize;
    let topic = cx.topic("telemetry")?;
    let g = group("reconnect");
    let p = cx.client().await?;
    let c = cx.client().await?;
    let mut s = subscribe(&c, sub(&topic, &g).ack_deadline(deadline)).await?;

    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let publish_budget = cx.t.wait() * 3;
    let per_try = cx.t.wait();
    let topic2 = topic.clone();
    let publisher = tokio::spawn(async move {
        let started = Instant::now();
        let mut ok = Vec::with_capacity(total);
        let mut retries = 0usize;
        for i in 0..total {
            let e = simple(&topic2, i);
            loop {
                match tokio::time::timeout(per_try, p.publish(e.clone())).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(err)) if err.is_temporary() => retries += 1,
                    Ok(Err(err)) => {
                        return Err(failed(format!(
                            "publish {i} failed with a permanent error during the cut: {err}"
                        )))
                    }
                    Err(_) => retries += 1,
                }
                if started.elapsed() > publish_budget {
                    return Err(failed(format!(
                        "publish {i} did not succeed within {publish_budget:?} of retries"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ok.push(e.event_id.to_string());
            let _ = progress_tx.send(i + 1);
            if i < cut_after + 20 {
                // Spread the first part out so the cut lands mid-stream.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok::<_, CaseError>((ok, retries))
    });

    let received: Arc<Mutex<Vec<(String, u32)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (rx, st) = (Arc::clone(&received), Arc::clone(&stop));
    let consumer = tokio::spawn(async move {
        let mut transient = 0usize;
        let mut ack_errors = 0usize;
        while !st.load(std::sync::atomic::Ordering::SeqCst) {
            let Some(d) = next_within(&mut s, Duration::from_millis(50), &mut transient).await?
            else {
                continue;
            };
            lock(&rx).push((d.envelope().event_id.to_string(), d.attempt()));
            // An ack may fail while cut; the message then comes back.
            if d.ack().await.is_err() {
                ack_errors += 1;
            }
        }
        Ok::<_, CaseError>((transient, ack_errors))
    });

    while *progress.borrow() < cut_after {
        if progress.changed().await.is_err() {
            break;
        }
    }
    let cut = hook(cx.fx.cut_connections().await, "cut_connections");
    if cut.is_err() {
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        publisher.abort();
        let _ = consumer.await;
        return cut;
    }
    tokio::time::sleep(cx.t.scaled(Duration::from_millis(500))).await;
    let restored = hook(cx.fx.restore_connections().await, "restore_connections");
    if restored.is_err() {
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = publisher.await;
        let _ = consumer.await;
        return restored.and(Err(failed("restore_connections failed")));
    }

    let published = publisher
        .await
        .map_err(|e| failed(format!("publisher: {e}")));
    let (ok_ids, retries) = match published.and_then(|r| r) {
        Ok(v) => v,
        Err(e) => {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = consumer.await;
            return Err(e);
        }
    };
    let want: HashSet<String> = ok_ids.iter().cloned().collect();
    // Everything must arrive, allowing for the ack deadline of messages
    // whose delivery or ack was lost in the cut.
    let until = Instant::now() + deadline + cx.t.wait();
    loop {
        let have: HashSet<String> = lock(&received).iter().map(|(id, _)| id.clone()).collect();
        if want.is_subset(&have) || Instant::now() >= until || consumer.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let stragglers (redeliveries) show up before counting duplicates.
    tokio::time::sleep(cx.t.quiet_for()).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (transient, ack_errors) = consumer
        .await
        .map_err(|e| failed(format!("consumer: {e}")))??;
    let got = std::mem::take(&mut *lock(&received));
    let have: HashSet<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    let missing = want.iter().filter(|id| !have.contains(id.as_str())).count();
    let dups = got.len() - have.len();
    let unknown = have.iter().filter(|id| !want.contains(**id)).count();
    eprintln!(
        "reconnect_after_cut [{}]: {} published ({retries} publish retries), {} deliveries, \
         {dups} duplicates, {transient} transient stream errors, {ack_errors} failed acks",
        cx.fx.name(),
        ok_ids.len(),
        got.len()
    );
    check!(
        missing == 0,
        "{missing} of {} successfully published messages never delivered after the reconnect",
        want.len()
    );
    check!(unknown == 0, "{unknown} unknown events delivered");
    Ok(())
}

// ---------------------------------------------------------------- 13

/// Case 13a: Invalid topic names are refused with `InvalidTopic` (and group
/// names with `InvalidName`) before anything reaches a transport, and the
/// edges of the grammar (8 segments, 200 bytes, `_` and `-`) work on the
/// broker end to end.
pub async fn invalid_topic_names(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, invalid_topic_names_in)
}

async fn invalid_topic_names_in(cx: &Cx<'_>) -> CaseResult {
    let too_long = format!("telemetry.{}", "x".repeat(191));
    for bad in [
        "",
        "telemetry",
        "Telemetry.seed.health",
        "telemetry..health",
        ".telemetry.seed",
        "telemetry.seed.",
        "telemetry.seed.he alth",
        "telemetry.seed/health",
        "telemetry.9seed.health",
        "telemetry._seed.health",
        "telemetry.seed.heälth",
        "telemetry.seed.health*",
        "a.b.c.d.e.f.g.h.i",
        too_long.as_str(),
    ] {
        match Topic::new(bad) {
            Ok(t) => return Err(failed(format!("invalid topic {bad:?} accepted as {t}"))),
            Err(e) => check!(
                e.kind() == ErrorKind::InvalidTopic && e.to_string().contains("invalid topic"),
                "topic {bad:?}: expected InvalidTopic with a clear message, got {:?}: {e}",
                e.kind()
            ),
        }
    }
    for bad in ["", "a b", "grüppe", &"g".repeat(129)] {
        let r = Name::new(bad);
        check!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::InvalidName),
            "group name {bad:?}: expected InvalidName, got {}",
            kind_of(&r)
        );
    }

    // The grammar's edges must survive the broker's naming.
    let s = random_suffix();
    let mut edge = format!("telemetry.a-b_c.x_y-z.d.e.f.g.conf{s}_");
    while edge.len() < Topic::MAX_LEN {
        edge.push('z');
    }
    let edge = Topic::new(edge).ctx("200-byte, 8-segment topic")?;
    let short = Topic::new(format!("innovation.conf{s}")).ctx("two-segment topic")?;
    let c = cx.client().await?;
    for t in [edge, short] {
        cx.track(&t);
        let mut st = subscribe(&c, sub(&t, &group("edge")).ack_deadline(LONG_DEADLINE)).await?;
        let e = simple(&t, 1);
        publish(&c, e.clone()).await?;
        let d = expect_delivery(&mut st, cx.t.wait(), &format!("a message on {t}")).await?;
        same_envelope(&e, d.envelope(), "edge-of-grammar topic")?;
        d.ack().await.ctx("ack")?;
    }
    Ok(())
}

/// Case 13b: Oversized payloads: one byte over the limit (the smaller of the
/// plane policy and the transport's `max_payload_bytes`) fails at once with
/// `PayloadTooLarge` and stores nothing; exactly at the limit is accepted
/// and round-trips byte for byte.
pub async fn oversized_payload_rejected(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, oversized_payload_rejected_in)
}

async fn oversized_payload_rejected_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("compilation")?;
    let c = cx.client().await?;
    let limit = c
        .capabilities()
        .max_payload_bytes
        .min(PolicySet::default().for_topic(&topic).max_payload_bytes);
    let random_bytes = |n: usize| -> Vec<u8> {
        let mut rng = rand::thread_rng();
        (0..n).map(|_| rng.gen()).collect()
    };
    let over = random_bytes(limit + 1);
    let big = Envelope::builder(topic.clone(), over)
        .content_type("application/octet-stream")
        .build();
    let started = Instant::now();
    let r = c.publish(big).await;
    let took = started.elapsed();
    let Err(e) = r else {
        return Err(failed(format!(
            "publish of {} bytes (limit {limit}) succeeded",
            limit + 1
        )));
    };
    check!(
        e.kind() == ErrorKind::PayloadTooLarge,
        "publish over the limit: expected PayloadTooLarge, got {:?}: {e}",
        e.kind()
    );
    check!(
        !e.is_temporary(),
        "PayloadTooLarge must not be temporary (a retry cannot help)"
    );
    check!(
        e.to_string().contains(&(limit + 1).to_string()),
        "the error should name the size: {e}"
    );
    let _ = took;

    // Nothing was stored: a reader from earliest gets only the next one.
    let mut s = subscribe(&c, sub(&topic, &group("size")).ack_deadline(LONG_DEADLINE)).await?;
    let at = random_bytes(limit);
    let fits = Envelope::builder(topic.clone(), at)
        .content_type("application/octet-stream")
        .build();
    publish(&c, fits.clone()).await?;
    let d = expect_delivery(&mut s, cx.t.wait(), "the payload at the limit").await?;
    same_envelope(&fits, d.envelope(), "payload exactly at the limit")?;
    d.ack().await.ctx("ack")?;
    expect_quiet(&mut s, cx.t.quiet_for(), "the oversized message was stored").await
}

// ---------------------------------------------------------------- 14

/// Case 14: Poison input: raw bytes that are no envelope, written with the
/// broker's own client, are not handed to the consumer; they go to the
/// dead-letter topic once, with a `decode` reason, the group, attempts 1,
/// the topic, and the raw bytes in the payload; the consumer goes on with
/// the next (good) message. Left out when the fixture cannot write raw.
pub async fn poison_goes_to_dead_letter(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, poison_goes_to_dead_letter_in)
}

async fn poison_goes_to_dead_letter_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("control")?;
    let dlq = topic.dead_letter();
    cx.track(&dlq);
    let g = group("poison");
    let reader = group("poison-reader");
    let c = cx.client().await?;
    let mut dl_stream = subscribe(&c, sub(&dlq, &reader)).await?;
    let mut s = subscribe(&c, sub(&topic, &g).ack_deadline(LONG_DEADLINE)).await?;
    let marker = format!("conformance poison {} is not an envelope", random_suffix());
    hook(
        cx.fx.write_raw(&topic, marker.as_bytes()).await,
        "write_raw",
    )?;
    let good = simple(&topic, 1);
    publish(&c, good.clone()).await?;

    let d = expect_delivery(&mut s, cx.t.wait(), "the good message after the poison").await?;
    same_envelope(&good, d.envelope(), "message after poison")?;
    check!(d.attempt() == 1, "good message has attempt {}", d.attempt());
    d.ack().await.ctx("ack")?;

    // Where the poison is when its dead letter is late: still on the
    // topic, or on the dead-letter topic but not delivered.
    let whereabouts = || async {
        format!(
            "depth of {topic} for {g}: {:?}; of {dlq} for {reader}: {:?}",
            c.depth(&topic, &g).await,
            c.depth(&dlq, &reader).await
        )
    };
    // Waited for up to three times the usual wait (a dead letter that is
    // lost still fails); a slow one is reported.
    let started = std::time::Instant::now();
    let dl =
        match expect_delivery(&mut dl_stream, cx.t.wait() * 3, "the poison's dead letter").await {
            Ok(d) => d,
            Err(e) => return Err(failed(format!("{e}; {}", whereabouts().await))),
        };
    if started.elapsed() > cx.t.wait() {
        eprintln!(
            "poison_goes_to_dead_letter [{}]: the dead letter took {:?}, over the usual {:?}; {}",
            cx.fx.name(),
            started.elapsed(),
            cx.t.wait(),
            whereabouts().await
        );
    }
    let env = dl.envelope().clone();
    dl.ack().await.ctx("ack dead letter")?;
    check!(
        env.topic == dlq,
        "dead letter on {}, expected {dlq}",
        env.topic
    );
    let info =
        DeadLetterInfo::parse(&env).ok_or_else(|| failed(format!("not a dead letter: {env:?}")))?;
    check!(
        info.reason.starts_with("decode"),
        "poison dead-letter reason {:?} does not start with \"decode\"",
        info.reason
    );
    check!(
        info.group == g.as_str(),
        "poison dead letter names group {:?}",
        info.group
    );
    check!(
        info.attempts == 1,
        "poison dead letter says {} attempts, expected 1",
        info.attempts
    );
    check!(
        info.original.topic == topic,
        "poison dead letter's original topic {}, expected {topic}",
        info.original.topic
    );
    let raw_kept = info
        .original
        .payload
        .windows(marker.len())
        .any(|w| w == marker.as_bytes());
    check!(
        raw_kept,
        "the dead letter's payload does not contain the raw bytes ({} bytes: {:?})",
        info.original.payload.len(),
        String::from_utf8_lossy(&info.original.payload)
    );
    expect_quiet(&mut s, cx.t.quiet_for(), "poison delivered to the consumer").await?;
    expect_quiet(&mut dl_stream, cx.t.quiet_for(), "a second dead letter").await
}

// ---------------------------------------------------------------- 15

/// Case 15: Retention is applied on the broker, read back with the broker's own
/// client: topics created by publishing on each plane get the default
/// policy of their plane (telemetry 72 h, control and system 30 days,
/// innovation indefinite, others 7 days); `ensure_topic` applies an
/// explicit policy and a changed one. Left out when the transport declares
/// `retention = false` or the fixture cannot read retention.
pub async fn retention_applied(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, retention_applied_in)
}

async fn retention_applied_in(cx: &Cx<'_>) -> CaseResult {
    let c = cx.client().await?;
    if !c.capabilities().retention {
        return Err(left_out("the transport declares retention = false"));
    }
    let policies = PolicySet::default();
    for plane in [
        "telemetry",
        "control",
        "system",
        "innovation",
        "compilation",
    ] {
        let t = cx.topic(plane)?;
        publish(&c, simple(&t, 0)).await?;
        let applied = hook(cx.fx.applied_retention(&t).await, "applied_retention")?;
        let want = policies.for_topic(&t).retention;
        check!(
            applied == want,
            "topic {t}: broker applies {applied:?}, plane policy is {want:?}"
        );
    }
    let t = cx.topic("compilation")?;
    for hours in [2u64, 5] {
        let want = Retention::For(Duration::from_secs(hours * 3600));
        c.ensure_topic(&t, &TopicPolicy::new(want))
            .await
            .ctx("ensure_topic")?;
        let applied = hook(cx.fx.applied_retention(&t).await, "applied_retention")?;
        check!(
            applied == want,
            "ensure_topic({t}, {want:?}): broker applies {applied:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- extras

/// Extra. `publish_batch` returns one receipt per envelope in input order
/// (event id and topic matching) and the batch arrives in order (one key).
pub async fn publish_batch_in_order(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, publish_batch_in_order_in)
}

async fn publish_batch_in_order_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("system")?;
    let c = cx.client().await?;
    let mut s = subscribe(&c, sub(&topic, &group("batch")).ack_deadline(LONG_DEADLINE)).await?;
    let sent: Vec<Envelope> = (0..50).map(|i| keyed(&topic, "batch", i)).collect();
    let one = simple(&topic, 999);
    let r = c.publish(one.clone()).await.ctx("publish")?;
    check!(
        r.event_id == one.event_id && r.topic == topic,
        "receipt of publish is for {} on {}, expected {} on {topic}",
        r.event_id,
        r.topic,
        one.event_id
    );
    let first = expect_delivery(&mut s, cx.t.wait(), "the single message").await?;
    same_envelope(&one, first.envelope(), "single publish")?;
    first.ack().await.ctx("ack")?;
    let receipts = c.publish_batch(sent.clone()).await.ctx("publish_batch")?;
    check!(
        receipts.len() == sent.len(),
        "{} receipts for {} envelopes",
        receipts.len(),
        sent.len()
    );
    for (i, (r, e)) in receipts.iter().zip(&sent).enumerate() {
        check!(
            r.event_id == e.event_id && r.topic == topic,
            "receipt {i} is for {} on {}, expected {} on {topic}",
            r.event_id,
            r.topic,
            e.event_id
        );
    }
    let got = take_acking(&mut s, sent.len(), cx.t.wait(), "the batch").await?;
    for (i, ((env, attempt), want)) in got.iter().zip(&sent).enumerate() {
        let d = diff(want, env);
        check!(
            d.is_empty(),
            "batch message {i}: expected {} in publish order, got {}:{d}",
            want.event_id,
            env.event_id
        );
        check!(*attempt == 1, "batch message {i} has attempt {attempt}");
    }
    expect_quiet(&mut s, cx.t.quiet_for(), "after the batch").await
}

/// Extra. Flow control: with `prefetch(2)`, a consumer holding two
/// unsettled deliveries gets no third until it settles one; then the rest
/// arrive, each exactly once.
pub async fn prefetch_limits_unsettled(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, prefetch_limits_unsettled_in)
}

async fn prefetch_limits_unsettled_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("telemetry")?;
    let c = cx.client().await?;
    let mut s = subscribe(
        &c,
        sub(&topic, &group("prefetch"))
            .ack_deadline(LONG_DEADLINE)
            .prefetch(2),
    )
    .await?;
    let sent: Vec<Envelope> = (0..6).map(|i| simple(&topic, i)).collect();
    c.publish_batch(sent.clone()).await.ctx("publish_batch")?;
    let first = expect_delivery(&mut s, cx.t.wait(), "delivery 1 of 2 in flight").await?;
    let second = expect_delivery(&mut s, cx.t.wait(), "delivery 2 of 2 in flight").await?;
    expect_quiet(
        &mut s,
        cx.t.quiet_for(),
        "a third delivery while two are unsettled with prefetch 2",
    )
    .await?;
    let mut got = vec![
        (0, first.envelope().clone(), first.attempt()),
        (0, second.envelope().clone(), second.attempt()),
    ];
    first.ack().await.ctx("ack")?;
    let third = expect_delivery(&mut s, cx.t.wait(), "the next delivery after an ack").await?;
    got.push((0, third.envelope().clone(), third.attempt()));
    second.ack().await.ctx("ack")?;
    third.ack().await.ctx("ack")?;
    for (e, a) in take_acking(&mut s, 3, cx.t.wait(), "the rest").await? {
        got.push((0, e, a));
    }
    exactly_once(&sent, &Received { all: got }, "prefetch 2")?;
    expect_quiet(&mut s, cx.t.quiet_for(), "after all six").await
}

/// Extra. `health()` of a connected client reports `Up` and names the
/// transport.
pub async fn health_reports_up(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, health_reports_up_in)
}

async fn health_reports_up_in(cx: &Cx<'_>) -> CaseResult {
    let c = cx.client().await?;
    let h = c.health().await;
    check!(
        h.status == HealthStatus::Up,
        "health of a fresh client: {:?} ({})",
        h.status,
        h.detail
    );
    check!(
        h.transport == c.name(),
        "health names transport {:?}, the client is {:?}",
        h.transport,
        c.name()
    );
    Ok(())
}
