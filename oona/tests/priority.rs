//! Priority lanes end to end through the facade, on memory:// and on each
//! genuine broker whose URL is set (`OONA_TEST_REDIS_URL`,
//! `OONA_TEST_KAFKA_URL`, `OONA_TEST_PULSAR_URL`; with `OONA_TEST_REQUIRE=1`
//! a missing one fails): emergency and high messages published after a
//! backlog of normal ones reach a busy handler before the backlog does,
//! and a deep backlog reroutes normal messages to the emergency lane.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::sub;
use futures::StreamExt as _;
use oona::priority::{Reroute, REROUTED_HEADER};
use oona::{
    Bus, Incoming, Name, PolicySet, Priority, Retention, StartPosition, Topic, TopicPattern,
    TopicPolicy,
};

const NORMAL: usize = 40;
const URGENT: usize = 4;

async fn urgent_messages_overtake_the_backlog(url: &str) {
    let policies = PolicySet::default().with_plane(
        "control",
        TopicPolicy::new(Retention::For(Duration::from_secs(3600))).with_priority_lanes(true),
    );
    let bus = Bus::new(oona::connect(url).await.unwrap())
        .with_sender_id("tamiyo")
        .with_policies(policies);
    let t = Topic::new(format!(
        "control.lanes{}.cmd",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    bus.ensure_topic(&t).await.unwrap();
    for i in 0..NORMAL {
        // One key: order is kept per key (Kafka spreads unkeyed messages
        // over partitions).
        bus.message(&t, &format!("normal-{i}"))
            .key("layer-1")
            .send()
            .await
            .unwrap();
    }
    for i in 0..URGENT {
        bus.message(&t, &format!("high-{i}"))
            .priority(Priority::High)
            .send()
            .await
            .unwrap();
        bus.message(&t, &format!("emergency-{i}"))
            .priority(Priority::Emergency)
            .send()
            .await
            .unwrap();
    }
    // One message at a time, slowly: the backlog waits in the broker and
    // in the prefetch buffers while the lanes fill.
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let handle = {
        let seen = seen.clone();
        bus.runner::<String>(sub(&t, "kasmina").start(StartPosition::Earliest))
            .concurrency(1)
            .start(move |msg: Incoming<String>| {
                let seen = seen.clone();
                async move {
                    let topic = msg.envelope().topic.to_string();
                    seen.lock().unwrap().push((msg.value().clone(), topic));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(())
                }
            })
            .await
            .unwrap()
    };
    let all = NORMAL + 2 * URGENT;
    let done = tokio::time::timeout(Duration::from_secs(60), async {
        while seen.lock().unwrap().len() < all {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(done.is_ok(), "not all handled: {}", handle.stats());
    handle.shutdown().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|(_, topic)| *topic == t.as_str()),
        "handlers see the named topic"
    );
    let at = |prefix: &str| -> Vec<usize> {
        (0..seen.len())
            .filter(|&i| seen[i].0.starts_with(prefix))
            .collect()
    };
    let (emergency, high, normal) = (at("emergency"), at("high"), at("normal"));
    assert_eq!(
        (emergency.len(), high.len(), normal.len()),
        (URGENT, URGENT, NORMAL)
    );
    // The first reads of the lanes may land after a few normal deliveries
    // started; after that, every urgent one goes first.
    let slack = 6;
    assert!(
        emergency.iter().all(|&i| i < URGENT + slack),
        "emergencies at {emergency:?} (normal at {normal:?})"
    );
    assert!(
        high.iter().all(|&i| i < 2 * URGENT + slack),
        "highs at {high:?} (normal at {normal:?})"
    );
    // Normal ones (one key) keep their order among themselves.
    let order: Vec<&str> = normal.iter().map(|&i| seen[i].0.as_str()).collect();
    let expected: Vec<String> = (0..NORMAL).map(|i| format!("normal-{i}")).collect();
    assert_eq!(order, expected);
    bus.close().await.unwrap();
}

on_every_transport!(urgent_messages_overtake_the_backlog);

/// A typed subscription reads the lanes too, and a rejected urgent message
/// is dead-lettered under the topic it was published to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_subscriptions_read_the_lanes_and_dead_letters_keep_the_topic() {
    let policies = PolicySet::default().with_plane(
        "control",
        TopicPolicy::new(Retention::For(Duration::from_secs(3600))).with_priority_lanes(true),
    );
    let bus = common::bus().await.with_policies(policies);
    let t = Topic::new("control.lanes.typed").unwrap();
    bus.ensure_topic(&t).await.unwrap();
    let mut dlq = bus
        .subscribe_raw(sub(&t.dead_letter(), "audit").start(StartPosition::Earliest))
        .await
        .unwrap();
    let mut typed = bus
        .subscribe::<String>(sub(&t, "karn").start(StartPosition::Earliest))
        .await
        .unwrap();
    bus.message(&t, &"now".to_string())
        .priority(Priority::Emergency)
        .send()
        .await
        .unwrap();
    let d = tokio::time::timeout(common::GUARD, typed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.value(), "now");
    assert_eq!(d.envelope().topic, t);
    d.reject("refused").await.unwrap();
    let dead = common::read_dead_letters(&mut dlq, 1).await;
    assert_eq!(
        dead[0].original.topic, t,
        "the dead letter names the published topic"
    );
    assert_eq!(dead[0].original.priority, Priority::Emergency);
}

/// Rerouting by depth: while the group is more than 20 messages behind, a
/// normal message is raised to the emergency lane, counted and announced,
/// and reaches the group ahead of the backlog; a low one is not.
async fn deep_backlog_reroutes_normal_messages(url: &str) {
    let policies = PolicySet::default().with_plane(
        "control",
        TopicPolicy::new(Retention::For(Duration::from_secs(3600))).with_priority_lanes(true),
    );
    let transport = oona::connect(url).await.unwrap();
    let reroute = Reroute::new(transport.clone()).when_deeper(
        TopicPattern::new("control.*").unwrap(),
        Name::new("kasmina").unwrap(),
        20,
    );
    let mut events = reroute.events();
    let bus = Bus::new(transport)
        .with_sender_id("tamiyo")
        .with_policies(policies)
        .with_publish_layer(reroute.clone());
    let t = Topic::new(format!(
        "control.reroute{}.cmd",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    bus.ensure_topic(&t).await.unwrap();
    let mut s = bus
        .subscribe_raw(
            sub(&t, "kasmina")
                .start(StartPosition::Earliest)
                .prefetch(1),
        )
        .await
        .unwrap();
    // The backlog goes around the layer: on a slow broker its own depth
    // would be sampled past the threshold half-way and reroute its tail.
    let plain = Bus::new(bus.transport().clone())
        .with_sender_id("tamiyo")
        .with_policies(bus.policies().clone());
    for i in 0..30 {
        plain
            .message(&t, &format!("normal-{i}"))
            .key("layer-1")
            .send()
            .await
            .unwrap();
    }
    let deep = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match reroute.sample(&t).await.unwrap() {
                Some(d) if d > 20 => return d,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("the group's depth never passed 20");
    let r = bus
        .message(&t, &"fresh".to_string())
        .key("layer-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.topic.as_str(), format!("{t}.lane-emergency"));
    let low = bus
        .message(&t, &"low".to_string())
        .priority(Priority::Low)
        .send()
        .await
        .unwrap();
    assert_eq!(low.topic, t, "low messages keep their priority");
    assert_eq!(reroute.rerouted(), 1);
    assert_eq!(reroute.rerouted_by_topic().get(&t), Some(&1));
    let ev = events.try_recv().unwrap();
    assert_eq!(ev.topic, t);
    assert!(ev.depth > 20 && deep > 20, "{ev:?}");
    // The group gets the fresh message ahead of the backlog (after at
    // most the deliveries its consumer had prefetched).
    let mut before = Vec::new();
    loop {
        let d = tokio::time::timeout(common::GUARD, s.next())
            .await
            .expect("no delivery")
            .unwrap()
            .unwrap();
        let body: String = serde_json::from_slice(&d.envelope().payload).unwrap();
        if body == "fresh" {
            assert_eq!(d.envelope().priority, Priority::Emergency);
            assert_eq!(d.envelope().topic, t, "handlers see the named topic");
            assert_eq!(
                d.envelope().headers.get(REROUTED_HEADER).cloned(),
                Some(ev.depth.to_string())
            );
            d.ack().await.unwrap();
            break;
        }
        before.push(body);
        d.ack().await.unwrap();
    }
    assert!(before.len() <= 3, "fresh came after {before:?}");
    s.close().await;
    bus.close().await.unwrap();
}

mod reroute {
    use super::*;
    on_every_transport!(deep_backlog_reroutes_normal_messages);
}
