//! Commands on every transport: a command runs once per event id however
//! often it arrives, and each gets one acknowledgement event (applied,
//! rejected, failed after its last attempt) carrying its correlation and
//! causation; a command topic outside `control.*` is refused at start.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use oona::command::{ack_topic, CommandAck, ACK_SCHEMA};
use oona::context::CAUSATION_ID;
use oona::{Bus, ErrorKind, HandlerError, HandlerResult, Incoming, Router, Topic};
use serde_json::{json, Value};

#[macro_use]
mod common;

#[derive(Default)]
struct Seed {
    applied: AtomicU64,
    runs: AtomicU64,
}

async fn on_command(seed: Arc<Seed>, cmd: Incoming<Value>) -> HandlerResult {
    seed.runs.fetch_add(1, Ordering::Relaxed);
    match cmd.value()["op"].as_str() {
        Some("grow") => {
            seed.applied.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Some("flaky") => Err(HandlerError::temporary("the seed is busy")),
        other => Err(HandlerError::permanent(format!("unknown op {other:?}"))),
    }
}

async fn commands_run_once_and_are_acknowledged(url: &str) {
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("kasmina-1");
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let topic = Topic::new(format!("control.cmd{id}.commands")).unwrap();
    let acks_topic = ack_topic(&topic).unwrap();
    assert_eq!(acks_topic.as_str(), format!("control.cmd{id}.acks"));
    for t in [&topic, &acks_topic, &topic.dead_letter()] {
        bus.ensure_topic(t).await.unwrap();
    }
    let mut acks = bus
        .subscribe_raw((acks_topic.clone(), "tamiyo"))
        .await
        .unwrap();
    let router = Router::new(&bus, "kasmina").with_state(Seed::default());
    let seed = router.state().clone();
    let service = router
        .command(topic.clone(), on_command)
        .start()
        .await
        .unwrap();

    let grow = bus
        .message(&topic, &json!({"op": "grow"}))
        .correlation_id("decision-7")
        .build()
        .unwrap();
    // The same command twice (a retry by the commander, a spool replay).
    bus.publish_envelope(grow.clone()).await.unwrap();
    bus.publish_envelope(grow.clone()).await.unwrap();
    let other = bus.message(&topic, &json!({"op": "grow"})).build().unwrap();
    let bad = bus
        .message(&topic, &json!({"op": "explode"}))
        .build()
        .unwrap();
    let flaky = bus
        .message(&topic, &json!({"op": "flaky"}))
        .build()
        .unwrap();
    for e in [&other, &bad, &flaky] {
        bus.publish_envelope(e.clone()).await.unwrap();
    }

    let mut got: BTreeMap<String, (CommandAck, oona::Envelope)> = BTreeMap::new();
    while got.len() < 4 {
        let d = tokio::time::timeout(common::GUARD, acks.next())
            .await
            .expect("acknowledgements did not arrive")
            .expect("stream ended")
            .unwrap();
        let ack: CommandAck = serde_json::from_slice(&d.envelope().payload).unwrap();
        assert_eq!(d.envelope().schema_id.as_deref(), Some(ACK_SCHEMA));
        let prev = got.insert(ack.command_event_id.clone(), (ack, d.envelope().clone()));
        assert!(prev.is_none(), "a second acknowledgement: {prev:?}");
        d.ack().await.unwrap();
    }
    let ack = |e: &oona::Envelope| got[&e.event_id.to_string()].clone();
    let (a, env) = ack(&grow);
    assert_eq!((a.status.as_str(), a.attempt), ("applied", 1));
    assert_eq!(a.command_topic, topic.as_str());
    assert_eq!(a.handled_by, "kasmina-1");
    assert_eq!(env.correlation_id.as_deref(), Some("decision-7"));
    assert_eq!(env.header(CAUSATION_ID), Some(&*grow.event_id.to_string()));
    let (a, env) = ack(&other);
    assert_eq!(a.status, "applied");
    assert_eq!(
        env.correlation_id.as_deref(),
        Some(&*other.event_id.to_string())
    );
    let (a, _) = ack(&bad);
    assert_eq!(a.status, "rejected");
    assert!(a.detail.contains("unknown op"), "{a:?}");
    let (a, _) = ack(&flaky);
    assert_eq!(a.status, "failed");
    assert_eq!(a.detail, "the seed is busy");
    assert!(
        a.attempt > 1,
        "acknowledged only after its last attempt: {a:?}"
    );

    // The copy of `grow` is settled without the handler and without an ack.
    common::wait_stats_of(|| service.stats(), |s| s.acked >= 3).await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), acks.next()).await;
    assert!(quiet.is_err(), "an acknowledgement too many: {quiet:?}");
    let summary = service.shutdown().await.unwrap();
    let s = &summary[0].1;
    assert_eq!(seed.applied.load(Ordering::Relaxed), 2, "{s}");
    assert_eq!(s.acked, 3, "two applied and the duplicate: {s}");
    assert_eq!(s.dead_lettered, 2, "the rejected and the failed: {s}");
    assert_eq!(
        seed.runs.load(Ordering::Relaxed),
        2 + 1 + u64::from(a.attempt),
        "the duplicate never reached the handler"
    );
}

on_every_transport!(commands_run_once_and_are_acknowledged);

#[tokio::test]
async fn commands_travel_on_control_topics_only() {
    let bus = common::bus().await;
    let e = Router::new(&bus, "kasmina")
        .command("telemetry.seed.health", |_m: Incoming<Value>| async {
            Ok(())
        })
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{e}");
    assert!(e.to_string().contains("control.*"), "{e}");
}
