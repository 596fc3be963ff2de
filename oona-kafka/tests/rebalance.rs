//! A second consumer joins a group mid-stream: nothing is lost; the
//! duplicates a rebalance may cause (deliveries unsettled when their
//! partition moved) are counted and reported.
//!
//! Needs `OONA_TEST_KAFKA_URL` (`scripts/brokers.sh up kafka`); without it
//! the test fails when `OONA_TEST_REQUIRE=1` and says it did nothing
//! otherwise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use oona_core::{Envelope, Name, StartPosition, Subscription, Topic, Transport};

const TOTAL: usize = 600;
const JOIN_AFTER: usize = 150;

fn url() -> Option<String> {
    match std::env::var("OONA_TEST_KAFKA_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                std::env::var("OONA_TEST_REQUIRE").as_deref() != Ok("1"),
                "OONA_TEST_KAFKA_URL is not set and OONA_TEST_REQUIRE=1"
            );
            eprintln!("rebalance: OONA_TEST_KAFKA_URL not set; nothing tested");
            None
        }
    }
}

async fn client(url: &str) -> oona_kafka::KafkaTransport {
    let sep = if url.contains('?') { '&' } else { '?' };
    oona_kafka::connect(&format!("{url}{sep}partitions=4"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_consumer_joins_mid_stream() {
    let Some(url) = url() else { return };
    let suffix = Name::unique("r")
        .as_str()
        .replace(['-', '_'], "")
        .to_lowercase();
    let topic = Topic::new(format!("telemetry.rebalance{suffix}.t")).unwrap();
    let group = Name::unique("rebalance");
    let sub = || {
        Subscription::new(topic.clone(), group.clone())
            .start(StartPosition::Earliest)
            .ack_deadline(Duration::from_secs(30))
            .prefetch(32)
    };
    let publisher = client(&url).await;
    let first = client(&url).await;
    let second = client(&url).await;

    // (consumer, event id) of every delivery.
    let got: Arc<Mutex<Vec<(usize, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let consume = |idx: usize, mut s: oona_core::DeliveryStream| {
        let got = Arc::clone(&got);
        tokio::spawn(async move {
            while let Some(d) = s.next().await {
                let d = d.unwrap();
                got.lock()
                    .unwrap()
                    .push((idx, d.envelope().event_id.to_string()));
                // A little work per message, so deliveries are in flight
                // when the partitions move.
                tokio::time::sleep(Duration::from_millis(2)).await;
                d.ack().await.unwrap();
            }
        })
    };
    let a = consume(0, first.subscribe(sub()).await.unwrap());

    let t = topic.clone();
    let got_p = Arc::clone(&got);
    let producing = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(TOTAL);
        // At least TOTAL, and on until the second member has its share:
        // other members learn of a join at their next heartbeat (classic)
        // or at the broker's heartbeat interval (KIP-848, 5 s by default).
        let started = Instant::now();
        let second_has_some = || got_p.lock().unwrap().iter().any(|(idx, _)| *idx == 1);
        let mut i = 0;
        while i < TOTAL || (!second_has_some() && started.elapsed() < Duration::from_secs(30)) {
            i += 1;
            let e = Envelope::builder(t.clone(), format!("{{\"i\":{i}}}"))
                .key(format!("k{}", i % 16))
                .build();
            ids.push(e.event_id.to_string());
            publisher.publish(e).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        publisher.close().await.unwrap();
        ids
    });

    let start_by = Instant::now() + Duration::from_secs(60);
    while got.lock().unwrap().len() < JOIN_AFTER {
        assert!(
            Instant::now() < start_by,
            "the first member got fewer than {JOIN_AFTER} deliveries in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let joined_at = got.lock().unwrap().len();
    let b = consume(1, second.subscribe(sub()).await.unwrap());
    let sent = producing.await.unwrap();

    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let have: std::collections::HashSet<String> = got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, id)| id.clone())
            .collect();
        if sent.iter().all(|id| have.contains(id)) || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let late redeliveries arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.close().await.unwrap();
    second.close().await.unwrap();
    a.await.unwrap();
    b.await.unwrap();

    let all = std::mem::take(&mut *got.lock().unwrap());
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut per_consumer = [0usize; 2];
    for (idx, id) in &all {
        *count.entry(id.as_str()).or_default() += 1;
        per_consumer[*idx] += 1;
    }
    let missing = sent
        .iter()
        .filter(|id| !count.contains_key(id.as_str()))
        .count();
    let duplicates: usize = count.values().map(|n| n - 1).sum();
    eprintln!(
        "rebalance: {} published, second consumer joined after {joined_at} deliveries; \
         {} deliveries (first {}, second {}), {missing} missing, {duplicates} duplicates",
        sent.len(),
        all.len(),
        per_consumer[0],
        per_consumer[1]
    );
    assert_eq!(missing, 0, "messages lost across the rebalance");
    assert!(
        per_consumer[1] > 0,
        "the second consumer got no partition after joining"
    );
    assert!(
        count.keys().all(|id| sent.iter().any(|s| s == id)),
        "unknown events delivered"
    );
}
