//! Request/reply on every transport: replies find their requests by
//! correlation id, concurrent requests each get their own, a request
//! nobody answers times out, and a reply names its request.

use std::time::Duration;

use oona::request::{reply, Requester, CAUSATION_ID};
use oona::{Bus, ErrorKind, Incoming, StartPosition, Topic};
use serde_json::{json, Value};

#[macro_use]
mod common;

async fn requests_get_their_replies(url: &str) {
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("req-test");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let topic = Topic::new(format!("control.req{}.double", &id[..12])).unwrap();
    bus.ensure_topic(topic.clone()).await.unwrap();
    let responder = bus.clone();
    let h = bus
        .runner::<Value>(common::sub(&topic, "doubler").start(StartPosition::Earliest))
        .concurrency(4)
        .start(move |m: Incoming<Value>| {
            let bus = responder.clone();
            async move {
                let n = m.value()["n"].as_i64().unwrap_or(0);
                reply(&bus, &m, &json!({"n": n * 2})).await?;
                Ok(())
            }
        })
        .await
        .unwrap();
    let requester = Requester::new(&bus).await.unwrap();
    let wait = Duration::from_secs(20);
    let got: Value = requester
        .request(&topic, &json!({"n": 21}), wait)
        .await
        .unwrap();
    assert_eq!(got, json!({"n": 42}));
    // Concurrent requests: each its own reply.
    let answers = futures::future::join_all((1..=5).map(|n| {
        let (r, t) = (&requester, &topic);
        async move {
            r.request::<_, Value>(t, &json!({"n": n}), wait)
                .await
                .unwrap()
        }
    }))
    .await;
    let ns: Vec<i64> = answers.iter().map(|a| a["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, [2, 4, 6, 8, 10]);
    // The reply names its request and keeps the correlation id.
    let env = requester
        .request_envelope(&topic, &json!({"n": 1}), wait)
        .await
        .unwrap();
    assert!(env.header(CAUSATION_ID).is_some(), "{env:?}");
    assert!(env.correlation_id.is_some());
    // Nobody answers on another topic: a timeout.
    let silent = Topic::new(format!("control.req{}.silent", &id[..12])).unwrap();
    bus.ensure_topic(silent.clone()).await.unwrap();
    let r = requester
        .request::<_, Value>(&silent, &json!({}), Duration::from_millis(500))
        .await;
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Timeout),
        "{r:?}"
    );
    h.shutdown().await.unwrap();
    requester.close().await.unwrap();
    for t in [&topic, &silent] {
        let _ = bus.transport().delete_topic(t).await;
    }
    bus.close().await.unwrap();
}

on_every_transport!(requests_get_their_replies);
