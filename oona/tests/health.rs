//! Health snapshots and the periodic health event, on memory:// and each
//! genuine broker whose URL is set (with `OONA_TEST_REQUIRE=1` a missing
//! one fails): a service's snapshot names its runners and latencies, and
//! the event on `system.oona.health` is that snapshot as JSON.

#[macro_use]
mod common;

use std::time::Duration;

use common::sub;
use futures::StreamExt as _;
use oona::health::{HealthSnapshot, HEALTH_SCHEMA, HEALTH_TOPIC};
use oona::metrics::Metrics;
use oona::{Bus, Incoming, Shutdown, StartPosition, Topic};

async fn the_health_event_is_the_snapshot(url: &str) {
    let service = format!("tamiyo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bus = Bus::new(oona::connect(url).await.unwrap())
        .with_sender_id(service.clone())
        .with_metrics(Metrics::new());
    let t = Topic::new(format!(
        "telemetry.health{}.seed",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    let health = Topic::new(HEALTH_TOPIC).unwrap();
    bus.ensure_topic(&t).await.unwrap();
    bus.ensure_topic(&health).await.unwrap();
    let handle = bus
        .runner::<String>(sub(&t, "tamiyo").start(StartPosition::Earliest))
        .start(|_: Incoming<String>| async { Ok(()) })
        .await
        .unwrap();
    for i in 0..10 {
        bus.publish(&t, &format!("r{i}")).await.unwrap();
    }
    common::wait_stats(&handle, |s| s.acked >= 10).await;
    let snap = bus.health_snapshot().await;
    assert_eq!(
        (snap.service.as_str(), snap.status.as_str()),
        (service.as_str(), "up")
    );
    assert_eq!(snap.runners.len(), 1);
    assert_eq!(
        (
            snap.runners[0].topic.as_str(),
            snap.runners[0].group.as_str(),
            snap.runners[0].running
        ),
        (t.as_str(), "tamiyo", true)
    );
    let published = snap.publish.iter().find(|l| l.topic == t.as_str()).unwrap();
    assert_eq!(published.count, 10);
    assert!(published.p50_ms <= published.p99_ms, "{published:?}");
    let delivered = snap
        .delivery
        .iter()
        .find(|l| l.topic == t.as_str())
        .unwrap();
    assert_eq!(delivered.group.as_deref(), Some("tamiyo"));
    assert!(delivered.count >= 10);

    let mut events = bus
        .subscribe_raw(sub(&health, "nissa-health").start(StartPosition::Latest))
        .await
        .unwrap();
    let stop = Shutdown::new();
    let reporter = bus.report_health(Duration::from_millis(200), stop.clone());
    let got = tokio::time::timeout(common::GUARD, async {
        loop {
            let d = events.next().await.unwrap().unwrap();
            let e = d.envelope().clone();
            d.ack().await.unwrap();
            // Other services (earlier runs on a shared broker) report too.
            if e.key.as_deref() == Some(service.as_str()) {
                return e;
            }
        }
    })
    .await
    .expect("no health event from this service");
    assert_eq!(got.schema_id.as_deref(), Some(HEALTH_SCHEMA));
    let event: HealthSnapshot = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(event.service, service);
    assert_eq!(event.runners, snap.runners);
    let raw: serde_json::Value = serde_json::from_slice(&got.payload).unwrap();
    assert!(raw["publish"][0]["p95_ms"].is_number(), "{raw}");
    stop.trigger();
    reporter.await.unwrap();
    handle.shutdown().await.unwrap();
    events.close().await;
    bus.close().await.unwrap();
}

on_every_transport!(the_health_event_is_the_snapshot);
