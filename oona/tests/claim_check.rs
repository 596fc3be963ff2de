//! Claim-check end to end against a genuine S3-compatible server
//! (SeaweedFS, `scripts/brokers.sh up s3` writes `OONA_TEST_S3_URL`), on
//! memory:// and on each genuine broker whose URL is set: a 50 MB payload
//! travels through the store and reaches the handler whole; an object that
//! expired is dead-lettered as missing, one overwritten as corrupt, both
//! with the reason and the reference kept. With `OONA_TEST_REQUIRE=1` a
//! missing server or broker fails.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{read_dead_letters, sub, url_of};
use futures::StreamExt as _;
use object_store::ObjectStore as _;
use oona::claim::{self, ClaimCheck};
use oona::{Bus, Incoming, PolicySet, Raw, Retention, StartPosition, Topic, TopicPolicy};
use sha2::{Digest, Sha256};

/// How long a 50 MB round trip may take on a loaded two-core machine.
const LARGE_GUARD: Duration = Duration::from_secs(120);

/// The S3 URL of the test server with a prefix of this test's own.
fn s3_url(prefix: &str) -> Option<String> {
    let url = url_of("OONA_TEST_S3_URL")?;
    let mut url = url::Url::parse(&url).expect("OONA_TEST_S3_URL is a URL");
    url.set_path(prefix);
    Some(url.to_string())
}

fn payload(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn digest(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

type Seen = Arc<Mutex<Vec<Vec<u8>>>>;

/// A runner of group `karn` on `t` that notes the digest of each payload
/// it is handed.
async fn digests(bus: &Bus, t: &Topic, seen: Seen) -> oona::RunHandle {
    bus.runner(sub(t, "karn").start(StartPosition::Earliest))
        .codec(Raw)
        .start(move |msg: Incoming<Bytes>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(digest(msg.value()));
                Ok(())
            }
        })
        .await
        .unwrap()
}

async fn round_trip_and_dead_letters(url: &str) {
    let prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    let Some(s3) = s3_url(&prefix) else { return };
    // Telemetry objects expire at once: expire() stands in for time.
    let policies = PolicySet::default().with_plane(
        "telemetry",
        TopicPolicy::new(Retention::For(Duration::from_millis(1))),
    );
    let claims = ClaimCheck::from_url(&s3).unwrap().with_policies(policies);
    let transport = oona::connect(url).await.unwrap();
    let bus = Bus::new(transport)
        .with_sender_id("tezzeret")
        .with_publish_layer(claims.clone())
        .with_consume_layer(claims.clone());
    let t = Topic::new(format!(
        "innovation.claim{}.blob",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    bus.ensure_topic(&t).await.unwrap();

    // A 50 MB payload and a small one, through one runner.
    let large = payload(50 * 1024 * 1024, 1);
    let small = payload(1000, 2);
    let seen: Seen = Arc::default();
    let handle = digests(&bus, &t, seen.clone()).await;
    bus.message(&t, &large).codec(&Raw).send().await.unwrap();
    bus.message(&t, &small).codec(&Raw).send().await.unwrap();
    let both = tokio::time::timeout(LARGE_GUARD, async {
        while seen.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(both.is_ok(), "never handled both; stats {}", handle.stats());
    assert_eq!(*seen.lock().unwrap(), vec![digest(&large), digest(&small)]);
    let summary = handle.shutdown().await.unwrap();
    assert_eq!((summary.acked, summary.rejected), (2, 0), "{summary}");
    assert_eq!((claims.counts().stored, claims.counts().fetched), (1, 1));
    // Innovation is kept forever: expire() leaves it.
    assert_eq!(claims.expire().await.unwrap(), 0);

    dead_letters(&bus, &claims).await;
    bus.close().await.unwrap();
}

/// An expired object and an overwritten one: each delivery is
/// dead-lettered with the reason, the handler never runs.
async fn dead_letters(bus: &Bus, claims: &ClaimCheck) {
    let t = Topic::new(format!(
        "telemetry.claim{}.blob",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    bus.ensure_topic(&t).await.unwrap();
    bus.ensure_topic(t.dead_letter()).await.unwrap();
    let mut dlq = bus
        .subscribe_raw(sub(&t.dead_letter(), "auditor").start(StartPosition::Earliest))
        .await
        .unwrap();
    for seed in [3, 4] {
        bus.message(&t, &payload(300_000, seed))
            .codec(&Raw)
            .send()
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Both objects are telemetry: past their (1 ms) retention.
    assert_eq!(claims.expire().await.unwrap(), 2);
    let (store, prefix) = (claims.store(), claims.prefix());
    let here = prefix.child(t.as_str());
    let mut listing = store.list(Some(&here));
    assert!(
        listing.next().await.is_none(),
        "expire() left objects behind"
    );
    drop(listing);

    // Put the second one back with other bytes: corrupt.
    let seen: Seen = Arc::default();
    let mut second_key = None;
    let mut probe = bus
        .subscribe_raw(sub(&t, "probe").start(StartPosition::Earliest))
        .await
        .unwrap();
    for _ in 0..2 {
        let d = tokio::time::timeout(common::GUARD, probe.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        second_key = d.envelope().header(claim::KEY).map(str::to_string);
        d.ack().await.unwrap();
    }
    let key = object_store::path::Path::parse(second_key.expect("a reference")).unwrap();
    store
        .put(&key, Bytes::from_static(b"not the payload").into())
        .await
        .unwrap();

    let handle = digests(bus, &t, seen.clone()).await;
    let dead = read_dead_letters(&mut dlq, 2).await;
    let mut reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    reasons.sort_by_key(|r| r.contains("is missing"));
    assert!(reasons[0].contains("is corrupt"), "{reasons:?}");
    assert!(reasons[1].contains("is missing"), "{reasons:?}");
    for d in &dead {
        assert!(
            d.original.payload.is_empty(),
            "a dead letter keeps the reference"
        );
        assert!(d.original.header(claim::SHA256).is_some());
    }
    assert!(seen.lock().unwrap().is_empty(), "the handler ran");
    handle.shutdown().await.unwrap();
    let c = claims.counts();
    assert_eq!((c.missing, c.corrupt), (1, 1), "{c:?}");
    // Leave the server as it was.
    let left: Vec<_> = store.list(Some(prefix)).collect().await;
    for meta in left {
        store.delete(&meta.unwrap().location).await.unwrap();
    }
}

on_every_transport!(round_trip_and_dead_letters);
