//! Priority lanes end to end through the facade, on memory:// and on each
//! genuine broker whose URL is set (`OONA_TEST_REDIS_URL`,
//! `OONA_TEST_KAFKA_URL`, `OONA_TEST_PULSAR_URL`; with `OONA_TEST_REQUIRE=1`
//! a missing one fails): emergency and high messages published after a
//! backlog of normal ones reach a busy handler before the backlog does.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::sub;
use oona::{Bus, Incoming, PolicySet, Priority, Retention, StartPosition, Topic, TopicPolicy};

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
