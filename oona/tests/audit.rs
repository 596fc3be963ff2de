//! The dead-letter auditor, on memory:// and each genuine broker whose URL
//! is set (with `OONA_TEST_REQUIRE=1` a missing one fails): dead letters of
//! two kinds are counted by type and reason, sampled, shown on the metrics
//! page and reported on `telemetry.oona.dead_letters`; the topic's other
//! dead-letter readers still get every dead letter.

#[macro_use]
mod common;

use std::time::Duration;

use common::sub;
use futures::StreamExt as _;
use oona::audit::{AuditReport, DeadLetterAuditor, AUDIT_SCHEMA, AUDIT_TOPIC};
use oona::metrics::Metrics;
use oona::{Bus, HandlerError, Incoming, Shutdown, StartPosition, Topic};

async fn dead_letters_are_counted_by_type_and_reason(url: &str) {
    let metrics = Metrics::new();
    let auditor_id = format!("nissa-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bus = Bus::new(oona::connect(url).await.unwrap())
        .with_sender_id(auditor_id.clone())
        .with_metrics(metrics.clone());
    let t = Topic::new(format!(
        "compilation.audit{}.submitted",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    let dlq = t.dead_letter();
    let reports = Topic::new(AUDIT_TOPIC).unwrap();
    for topic in [&t, &dlq, &reports] {
        bus.ensure_topic(topic).await.unwrap();
    }
    assert!(
        DeadLetterAuditor::new(&bus).unwrap().watch(&t).is_err(),
        "not a dlq"
    );
    let mut report_events = bus
        .subscribe_raw(sub(&reports, "audit-reader").start(StartPosition::Latest))
        .await
        .unwrap();
    let mut other_reader = bus
        .subscribe_raw(sub(&dlq, "operators").start(StartPosition::Earliest))
        .await
        .unwrap();
    let stop = Shutdown::new();
    let audit = DeadLetterAuditor::new(&bus)
        .unwrap()
        .watch(&dlq)
        .unwrap()
        .report_every(Duration::from_millis(300))
        .samples(3)
        .start(stop.clone())
        .await
        .unwrap();
    let handle = bus
        .runner::<String>(sub(&t, "tezzeret").start(StartPosition::Earliest))
        .start(|m: Incoming<String>| async move {
            Err(HandlerError::permanent(if m.value().starts_with("op") {
                "unsupported op 'quantum_conv'"
            } else {
                "schema: missing field"
            }))
        })
        .await
        .unwrap();
    for i in 0..3 {
        bus.message(&t, &format!("op-{i}"))
            .schema_id("esper.v1.BlueprintSubmitted")
            .send()
            .await
            .unwrap();
    }
    for i in 0..2 {
        bus.publish(&t, &format!("bad-{i}")).await.unwrap();
    }
    common::wait_stats(&handle, |s| s.dead_lettered >= 5).await;
    let counted = tokio::time::timeout(common::GUARD, async {
        loop {
            let r = audit.report();
            if r.counts.iter().map(|c| c.count).sum::<u64>() >= 5 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the auditor never counted five dead letters");
    let count = |ty: &str, reason: &str| {
        counted
            .counts
            .iter()
            .find(|c| c.message_type == ty && c.reason == reason)
            .map(|c| (c.topic.clone(), c.count))
    };
    assert_eq!(
        count("esper.v1.BlueprintSubmitted", "unsupported"),
        Some((dlq.to_string(), 3)),
        "{counted:?}"
    );
    assert_eq!(
        count("application/json", "schema"),
        Some((dlq.to_string(), 2)),
        "{counted:?}"
    );
    assert_eq!(counted.samples.len(), 3, "the last three kept");
    assert_eq!(counted.samples[0].group, "tezzeret");
    let page = metrics.render();
    let line = format!(
        "oona_dlq_audited_total{{topic=\"{dlq}\",type=\"esper.v1.BlueprintSubmitted\",reason=\"unsupported\"}} 3"
    );
    assert!(page.contains(&line), "{page}");
    // The auditor's group took nothing from the operators' group.
    let dead = common::read_dead_letters(&mut other_reader, 5).await;
    assert_eq!(dead.len(), 5);
    let event = tokio::time::timeout(common::GUARD, async {
        loop {
            let d = report_events.next().await.unwrap().unwrap();
            let e = d.envelope().clone();
            d.ack().await.unwrap();
            if e.key.as_deref() != Some(auditor_id.as_str()) {
                continue;
            }
            let r: AuditReport = serde_json::from_slice(&e.payload).unwrap();
            if r.counts.iter().map(|c| c.count).sum::<u64>() >= 5 {
                return (e.schema_id.clone(), r);
            }
        }
    })
    .await
    .expect("no audit report with the five dead letters");
    assert_eq!(event.0.as_deref(), Some(AUDIT_SCHEMA));
    assert_eq!(event.1.counts, counted.counts);
    stop.trigger();
    audit.join().await;
    handle.shutdown().await.unwrap();
    report_events.close().await;
    other_reader.close().await;
    bus.close().await.unwrap();
}

on_every_transport!(dead_letters_are_counted_by_type_and_reason);
