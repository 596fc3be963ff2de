//! Replay protection end to end through the facade, on memory:// and on
//! each genuine broker whose URL is set (`OONA_TEST_REDIS_URL`,
//! `OONA_TEST_KAFKA_URL`, `OONA_TEST_PULSAR_URL`; with `OONA_TEST_REQUIRE=1`
//! a missing one fails): stale and replayed messages are dead-lettered
//! with their reason, under load too; on Redis two consumers of a group
//! share the record of seen ids.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{read_dead_letters, sub, url_of, wait_stats};
use oona::security::ReplayLayer;
use oona::{Bus, Envelope, Incoming, Name, RunHandle, Subscription, Timestamp, Topic};

const WINDOW: Duration = Duration::from_secs(30);

fn fresh_topic() -> Topic {
    Topic::new(format!(
        "control.replay{}.commands",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap()
}

/// A runner of group `kasmina` on `t` behind a replay layer; what it
/// handled goes to `seen`.
async fn consumer(bus: &Bus, t: &Topic, seen: Arc<Mutex<Vec<String>>>) -> (RunHandle, ReplayLayer) {
    let layer = ReplayLayer::for_transport(WINDOW, bus.transport().as_ref());
    let handle = bus
        .clone()
        .with_consume_layer(layer.clone())
        .runner::<String>(sub(t, "kasmina"))
        .start(move |msg: Incoming<String>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(msg.value().clone());
                Ok(())
            }
        })
        .await
        .unwrap();
    (handle, layer)
}

fn message(t: &Topic, body: &str) -> Envelope {
    Envelope::builder(t.clone(), format!("\"{body}\""))
        .sender_id("tamiyo")
        .build()
}

async fn replay_end_to_end(url: &str) {
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("oona-replay-test");
    let t = fresh_topic();
    let mut dlq = bus
        .subscribe_raw(Subscription::new(
            t.dead_letter(),
            Name::new("audit").unwrap(),
        ))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (handle, layer) = consumer(&bus, &t, seen.clone()).await;
    // 300 fresh messages, each of the first 30 published again (the same
    // envelope: a copy replayed), then one an hour old and one from the
    // future.
    let fresh: Vec<Envelope> = (0..300).map(|i| message(&t, &format!("m{i}"))).collect();
    for chunk in fresh.chunks(50) {
        bus.publish_envelopes(chunk.to_vec()).await.unwrap();
    }
    bus.publish_envelopes(fresh[..30].to_vec()).await.unwrap();
    let now = Timestamp::now().unix_millis();
    let mut old = message(&t, "an hour old");
    old.timestamp = Timestamp::from_unix_millis(now - 3_600_000);
    let mut ahead = message(&t, "a minute ahead");
    ahead.timestamp = Timestamp::from_unix_millis(now + 60_000);
    bus.publish_envelopes(vec![old, ahead]).await.unwrap();

    wait_stats(&handle, |s| s.settled() == 332).await;
    let summary = handle.shutdown().await.unwrap();
    let got: Vec<String> = seen.lock().unwrap().clone();
    let distinct: HashSet<&String> = got.iter().collect();
    assert_eq!((got.len(), distinct.len()), (300, 300), "{url}: {summary}");
    let dead = read_dead_letters(&mut dlq, 32).await;
    let stale: Vec<&str> = dead
        .iter()
        .filter(|d| d.reason.starts_with("replay: stale: "))
        .map(|d| d.reason.as_str())
        .collect();
    let replayed = dead
        .iter()
        .filter(|d| d.reason.starts_with("replay: event id "))
        .count();
    assert_eq!((stale.len(), replayed), (2, 30), "{url}: {dead:?}");
    assert!(
        stale
            .iter()
            .any(|r| r.contains("ms before this consumer's clock"))
            && stale
                .iter()
                .any(|r| r.contains("ms after this consumer's clock")),
        "{stale:?}"
    );
    let c = layer.counts();
    assert_eq!((c.fresh, c.stale, c.replayed), (300, 2, 30), "{url}: {c:?}");
    bus.transport().delete_topic(&t).await.ok();
    bus.transport().delete_topic(&t.dead_letter()).await.ok();
    bus.transport().close().await.unwrap();
}

on_every_transport!(replay_end_to_end);

/// Two consumers of one group, each its own client and layer: on Redis the
/// record of seen ids is the broker's, so a copy is refused whichever
/// consumer it reaches. The first consumer handles the originals and stops;
/// the second, which never saw them, is handed every copy (no scheduling
/// can give both halves to one consumer and prove nothing).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_consumers_of_a_group_share_the_record() {
    let Some(url) = url_of("OONA_TEST_REDIS_URL") else {
        return;
    };
    let a = Bus::new(oona::connect(&url).await.unwrap()).with_sender_id("a");
    let b = Bus::new(oona::connect(&url).await.unwrap()).with_sender_id("b");
    let t = fresh_topic();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (ha, la) = consumer(&a, &t, seen.clone()).await;
    let fresh: Vec<Envelope> = (0..200).map(|i| message(&t, &format!("m{i}"))).collect();
    a.publish_envelopes(fresh.clone()).await.unwrap();
    wait_stats(&ha, |s| s.settled() == 200).await;
    let sa = ha.shutdown().await.unwrap();
    let (hb, lb) = consumer(&b, &t, seen.clone()).await;
    a.publish_envelopes(fresh).await.unwrap();
    wait_stats(&hb, |s| s.settled() == 200).await;
    let sb = hb.shutdown().await.unwrap();
    let (ca, cb) = (la.counts(), lb.counts());
    assert_eq!((ca.fresh, ca.replayed), (200, 0), "first: {ca:?} ({sa})");
    assert_eq!((cb.fresh, cb.replayed), (0, 200), "second: {cb:?} ({sb})");
    assert_eq!(seen.lock().unwrap().len(), 200, "{sa} / {sb}");
    a.transport().delete_topic(&t).await.ok();
    a.transport().delete_topic(&t.dead_letter()).await.ok();
    a.transport().close().await.unwrap();
    b.transport().close().await.unwrap();
}
