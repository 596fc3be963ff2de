//! De-duplication by event id end to end through the facade, on memory://
//! and on each genuine broker whose URL is set (`OONA_TEST_REDIS_URL`,
//! `OONA_TEST_KAFKA_URL`, `OONA_TEST_PULSAR_URL`; with `OONA_TEST_REQUIRE=1`
//! a missing one fails): copies published again reach the handler once, a
//! failed handling runs again, and on Redis two consumers of a group share
//! the record.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{sub, url_of};
use oona::dedup::DedupLayer;
use oona::{Bus, Envelope, HandlerError, Incoming, RunHandle, Topic};

const KEEP: Duration = Duration::from_secs(600);

fn fresh_topic() -> Topic {
    Topic::new(format!(
        "telemetry.dedup{}.events",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap()
}

fn message(t: &Topic, body: &str) -> Envelope {
    Envelope::builder(t.clone(), format!("\"{body}\""))
        .sender_id("tamiyo")
        .build()
}

type Seen = Arc<Mutex<Vec<String>>>;

/// A runner of group `nissa` on `t` behind `layer`; each handling goes to
/// `seen`; a message `flaky` fails its first handling.
async fn consumer(bus: &Bus, t: &Topic, layer: &DedupLayer, seen: Seen) -> RunHandle {
    bus.clone()
        .with_consume_layer(layer.clone())
        .runner::<String>(sub(t, "nissa"))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .start(move |msg: Incoming<String>| {
            let seen = seen.clone();
            async move {
                let body = msg.value().clone();
                let first = {
                    let mut s = seen.lock().unwrap();
                    s.push(body.clone());
                    s.iter().filter(|b| **b == body).count() == 1
                };
                if body == "flaky" && first {
                    return Err(HandlerError::temporary("the first try fails"));
                }
                Ok(())
            }
        })
        .await
        .unwrap()
}

fn counts(seen: &Seen) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for b in seen.lock().unwrap().iter() {
        *out.entry(b.clone()).or_default() += 1;
    }
    out
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let ok = tokio::time::timeout(common::GUARD, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "never: {what}");
}

async fn dedup_end_to_end(url: &str) {
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("oona-dedup-test");
    let t = fresh_topic();
    let layer = DedupLayer::for_transport(KEEP, bus.transport().as_ref());
    let seen = Seen::default();
    let handle = consumer(&bus, &t, &layer, seen.clone()).await;
    let unique: Vec<Envelope> = ["a", "b", "flaky"].iter().map(|b| message(&t, b)).collect();
    bus.publish_envelopes(unique.clone()).await.unwrap();
    wait_for("the first three handled", || layer.counts().handled >= 4).await;
    // The same events again (as a spool flushing after a crash would).
    bus.publish_envelopes(unique.clone()).await.unwrap();
    bus.publish_envelopes(unique).await.unwrap();
    wait_for("six duplicates", || layer.counts().duplicates >= 6).await;
    let summary = handle.shutdown().await.unwrap();
    let c = layer.counts();
    println!("[{url}] dedup: {c:?}; runner: {summary}");
    let got = counts(&seen);
    assert_eq!(got.get("a"), Some(&1), "{got:?}");
    assert_eq!(got.get("b"), Some(&1), "{got:?}");
    assert_eq!(
        got.get("flaky"),
        Some(&2),
        "failed once, then handled: {got:?}"
    );
    assert_eq!(c.duplicates, 6, "{c:?}");
    assert_eq!(c.handled, 4, "{c:?}");
    bus.transport().delete_topic(&t).await.ok();
    bus.close().await.unwrap();
}

on_every_transport!(dedup_end_to_end);

/// Two consumers of one group, each its own client and layer: on Redis the
/// record is the broker's, so a copy is skipped whichever consumer it
/// reaches.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_consumers_of_a_group_share_the_record() {
    let Some(url) = url_of("OONA_TEST_REDIS_URL") else {
        return;
    };
    let a = Bus::new(oona::connect(&url).await.unwrap()).with_sender_id("a");
    let b = Bus::new(oona::connect(&url).await.unwrap()).with_sender_id("b");
    let t = fresh_topic();
    let seen = Seen::default();
    let la = DedupLayer::for_transport(KEEP, a.transport().as_ref());
    let lb = DedupLayer::for_transport(KEEP, b.transport().as_ref());
    let ha = consumer(&a, &t, &la, seen.clone()).await;
    let hb = consumer(&b, &t, &lb, seen.clone()).await;
    let fresh: Vec<Envelope> = (0..200).map(|i| message(&t, &format!("m{i}"))).collect();
    a.publish_envelopes(fresh.clone()).await.unwrap();
    wait_for("200 handled", || {
        la.counts().handled + lb.counts().handled >= 200
    })
    .await;
    a.publish_envelopes(fresh).await.unwrap();
    wait_for("200 duplicates", || {
        la.counts().duplicates + lb.counts().duplicates >= 200
    })
    .await;
    let (sa, sb) = (ha.shutdown().await.unwrap(), hb.shutdown().await.unwrap());
    let (ca, cb) = (la.counts(), lb.counts());
    println!("a: {ca:?} {sa}; b: {cb:?} {sb}");
    assert!(sa.acked > 0 && sb.acked > 0, "both took work: {sa} / {sb}");
    assert_eq!(
        seen.lock().unwrap().len(),
        200,
        "each once: {ca:?} / {cb:?}"
    );
    assert_eq!(ca.duplicates + cb.duplicates, 200, "{ca:?} / {cb:?}");
    a.transport().delete_topic(&t).await.ok();
}

/// A claim left for another copy of the event (by a consumer that crashed
/// mid-handler, say) holds this one
/// back (the delivery is given back, counted) only until the claim
/// expires; then the event is handled, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_held_for_another_copy_holds_the_event_until_it_expires() {
    use oona::security::{MemoryNonces, NonceStore};
    let bus = Bus::new(oona::connect("memory://").await.unwrap()).with_sender_id("dedup-claim");
    let t = fresh_topic();
    let store = Arc::new(MemoryNonces::default());
    let layer = DedupLayer::new(KEEP).with_store(store.clone());
    let e = message(&t, "held");
    // What the crashed consumer left: a claim for one second.
    let scope = oona::Name::new("nissa.dedup").unwrap();
    store
        .check_in(&scope, &e.event_id, "claim", Duration::from_secs(1))
        .await
        .unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    let handle = bus
        .clone()
        .with_consume_layer(layer.clone())
        .runner::<String>(sub(&t, "nissa").ack_deadline(Duration::from_secs(2)))
        .start(move |msg: Incoming<String>| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(msg.value().clone());
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.publish_envelopes(vec![e]).await.unwrap();
    wait_for("handled after the claim expired", || {
        layer.counts().handled == 1
    })
    .await;
    let summary = handle.shutdown().await.unwrap();
    let c = layer.counts();
    assert!(c.held_elsewhere >= 1, "given back while claimed: {c:?}");
    assert_eq!(seen.lock().unwrap().as_slice(), ["held"], "{summary}");
}
