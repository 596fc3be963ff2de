//! Tenants on every transport: two tenants of one cluster use the same
//! topic and group names and never see each other's messages, dead letters
//! or topics; one tenant's unread backlog does not hold the other up.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use oona::{Envelope, Name, StartPosition, Subscription, Topic, Transport};

#[macro_use]
mod common;

const WAIT: Duration = Duration::from_secs(60);

fn topic(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

fn sub(t: &Topic) -> Subscription {
    Subscription::new(t.clone(), Name::new("workers").unwrap())
        .start(StartPosition::Earliest)
        .ack_deadline(Duration::from_secs(30))
        .max_attempts(1)
}

fn event(t: &Topic, tenant: &str, i: usize) -> Envelope {
    Envelope::builder(t.clone(), format!("{{\"tenant\":\"{tenant}\",\"i\":{i}}}"))
        .sender_id(tenant)
        .build()
}

/// The tenant and index of a delivered event.
fn origin(env: &Envelope) -> (String, u64) {
    let v: serde_json::Value = serde_json::from_slice(&env.payload).unwrap();
    (
        v["tenant"].as_str().unwrap().to_string(),
        v["i"].as_u64().unwrap(),
    )
}

/// Read `n` deliveries and ack them (`reject` the one of index
/// `reject`); then nothing more within a short while.
async fn drain(s: &mut oona::DeliveryStream, n: usize, reject: Option<u64>) -> Vec<(String, u64)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let d = tokio::time::timeout(WAIT, s.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} arrived", seen.len()))
            .expect("stream ended")
            .unwrap();
        let o = origin(d.envelope());
        if Some(o.1) == reject {
            d.reject("tenancy test: rejected on purpose").await.unwrap();
        } else {
            d.ack().await.unwrap();
        }
        seen.push(o);
    }
    let more = tokio::time::timeout(Duration::from_secs(2), s.next()).await;
    assert!(more.is_err(), "more than {n} arrived: {:?}", more.ok());
    seen
}

async fn isolated(url: &str) {
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (ta, tb) = (format!("ta{run}"), format!("tb{run}"));
    let a: Arc<dyn Transport> = oona::connect(&common::with_tenant(url, &ta)).await.unwrap();
    let b: Arc<dyn Transport> = oona::connect(&common::with_tenant(url, &tb)).await.unwrap();
    let t = topic("telemetry.tenancy.reading");
    let only_a = topic("telemetry.tenancy.only-a");
    let policy = oona::PolicySet::default();
    for x in [&a, &b] {
        x.ensure_topic(&t, policy.for_topic(&t)).await.unwrap();
        x.ensure_topic(&t.dead_letter(), policy.for_topic(&t))
            .await
            .unwrap();
    }
    a.ensure_topic(&only_a, policy.for_topic(&only_a))
        .await
        .unwrap();
    // Tenant a: a backlog of 300 nobody reads yet.
    let batch: Vec<Envelope> = (0..300).map(|i| event(&t, &ta, i)).collect();
    a.publish_batch(batch).await.unwrap();
    // Tenant b, the same topic and group: only its own 5, one of them
    // rejected to its own dead-letter topic, while a's backlog waits.
    let mut sb = b.subscribe(sub(&t)).await.unwrap();
    let mut dlq_b = b.subscribe(sub(&t.dead_letter())).await.unwrap();
    for i in 0..5 {
        b.publish(event(&t, &tb, i)).await.unwrap();
    }
    let got_b = drain(&mut sb, 5, Some(3)).await;
    assert!(got_b.iter().all(|(who, _)| *who == tb), "{got_b:?}");
    let dead = drain(&mut dlq_b, 1, None).await;
    assert_eq!(dead, [(tb.clone(), 3)]);
    // Tenant a: its 300, none of b's, and no dead letter of b's.
    let mut sa = a.subscribe(sub(&t)).await.unwrap();
    let mut dlq_a = a.subscribe(sub(&t.dead_letter())).await.unwrap();
    let got_a = drain(&mut sa, 300, None).await;
    assert!(got_a.iter().all(|(who, _)| *who == ta));
    let mut idx: Vec<u64> = got_a.iter().map(|(_, i)| *i).collect();
    idx.sort_unstable();
    idx.dedup();
    assert_eq!(idx.len(), 300, "each of a's events once");
    let none = tokio::time::timeout(Duration::from_secs(2), dlq_a.next()).await;
    assert!(none.is_err(), "a saw a dead letter of b: {:?}", none.ok());
    // Each lists its own topics only.
    let (la, lb) = (
        a.list_topics().await.unwrap(),
        b.list_topics().await.unwrap(),
    );
    assert!(la.contains(&t) && la.contains(&only_a), "{la:?}");
    assert!(lb.contains(&t) && !lb.contains(&only_a), "{lb:?}");
    drop((sa, sb, dlq_a, dlq_b));
    for (x, topics) in [(&a, vec![&t, &only_a]), (&b, vec![&t])] {
        for tp in topics {
            let _ = x.delete_topic(&tp.dead_letter()).await;
            x.delete_topic(tp).await.unwrap();
        }
        x.close().await.unwrap();
    }
}

on_every_transport!(isolated);
