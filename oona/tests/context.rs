//! What a handler publishes inherits from the message it handles, without
//! code: the correlation id (or the cause's event id), the causation id,
//! the trace. An explicit id on the builder wins; a spawned task inherits
//! only through `Cause::scope`; outside a handler nothing is added.

use futures::StreamExt as _;
use oona::context::{Cause, CAUSATION_ID};
use oona::{header, Bus, Envelope, Incoming, StartPosition, Topic};
use serde_json::{json, Value};
use std::collections::HashMap;

#[macro_use]
mod common;

async fn publishes_inherit_from_their_cause(url: &str) {
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("ctx-test");
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let input = Topic::new(format!("control.ctx{id}.input")).unwrap();
    let output = Topic::new(format!("control.ctx{id}.output")).unwrap();
    for t in [&input, &output] {
        bus.ensure_topic(t).await.unwrap();
    }
    let mut out = bus
        .subscribe_raw(common::sub(&output, "reader").start(StartPosition::Earliest))
        .await
        .unwrap();
    let worker = bus.clone();
    let out_topic = output.clone();
    let h = bus
        .runner::<Value>(common::sub(&input, "worker").start(StartPosition::Earliest))
        .start(move |m: Incoming<Value>| {
            let (bus, to) = (worker.clone(), out_topic.clone());
            async move {
                let name = m.value()["name"].as_str().unwrap_or_default().to_string();
                // Plain publishes: nothing said about ids.
                bus.publish(&to, &json!({"from": name, "how": "plain"}))
                    .await?;
                bus.message(&to, &json!({"from": name, "how": "explicit"}))
                    .correlation_id("mine")
                    .send()
                    .await?;
                // A spawned task inherits only when the cause is carried.
                let (b, t) = (bus.clone(), to.clone());
                let payload = json!({"from": name, "how": "spawned"});
                tokio::spawn(async move { b.publish(&t, &payload).await })
                    .await
                    .map_err(|e| e.to_string())??;
                let cause = Cause::current().ok_or("no cause inside a handler")?;
                let (b, t) = (bus.clone(), to.clone());
                let payload = json!({"from": name, "how": "scoped"});
                tokio::spawn(cause.scope(async move { b.publish(&t, &payload).await }))
                    .await
                    .map_err(|e| e.to_string())??;
                Ok(())
            }
        })
        .await
        .unwrap();

    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let first = bus
        .message(&input, &json!({"name": "first"}))
        .traceparent(tp)
        .build()
        .unwrap();
    let second = bus
        .message(&input, &json!({"name": "second"}))
        .correlation_id("conversation-7")
        .build()
        .unwrap();
    bus.publish_envelopes(vec![first.clone(), second.clone()])
        .await
        .unwrap();

    let mut got: HashMap<(String, String), Envelope> = HashMap::new();
    while got.len() < 8 {
        let d = tokio::time::timeout(common::GUARD, out.next())
            .await
            .expect("the handler's publishes did not arrive")
            .expect("stream ended")
            .unwrap();
        let v: Value = serde_json::from_slice(&d.envelope().payload).unwrap();
        let k = (
            v["from"].as_str().unwrap().to_string(),
            v["how"].as_str().unwrap().to_string(),
        );
        got.insert(k, d.envelope().clone());
        d.ack().await.unwrap();
    }
    let get = |from: &str, how: &str| &got[&(from.to_string(), how.to_string())];

    // No correlation id on the cause: its event id becomes the conversation's.
    let plain = get("first", "plain");
    assert_eq!(
        plain.correlation_id.as_deref(),
        Some(&*first.event_id.to_string())
    );
    assert_eq!(
        plain.header(CAUSATION_ID),
        Some(&*first.event_id.to_string())
    );
    assert_eq!(
        plain.header(header::TRACEPARENT),
        Some(tp),
        "the trace goes on"
    );
    assert_eq!(plain.trace_id, first.trace_id);
    // A correlation id on the cause flows on; the trace is the cause's.
    let plain2 = get("second", "plain");
    assert_eq!(plain2.correlation_id.as_deref(), Some("conversation-7"));
    assert_eq!(
        plain2.header(CAUSATION_ID),
        Some(&*second.event_id.to_string())
    );
    assert_eq!(plain2.trace_id, second.trace_id);
    // The builder's own id wins; the causation id is still set.
    let explicit = get("second", "explicit");
    assert_eq!(explicit.correlation_id.as_deref(), Some("mine"));
    assert_eq!(
        explicit.header(CAUSATION_ID),
        Some(&*second.event_id.to_string())
    );
    // A spawned task is outside the handler unless the cause is carried.
    let spawned = get("first", "spawned");
    assert_eq!(spawned.correlation_id, None);
    assert_eq!(spawned.header(CAUSATION_ID), None);
    assert_ne!(spawned.trace_id, first.trace_id);
    let scoped = get("second", "scoped");
    assert_eq!(scoped.correlation_id.as_deref(), Some("conversation-7"));
    assert_eq!(
        scoped.header(CAUSATION_ID),
        Some(&*second.event_id.to_string())
    );

    // Outside a handler nothing is inherited.
    let outside = bus.message(&output, &json!({})).build().unwrap();
    assert_eq!(outside.correlation_id, None);
    assert_eq!(outside.header(CAUSATION_ID), None);
    let summary = h.shutdown().await.unwrap();
    assert_eq!(summary.acked, 2, "{summary}");
}

on_every_transport!(publishes_inherit_from_their_cause);
