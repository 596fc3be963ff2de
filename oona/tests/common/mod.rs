//! Helpers shared by the facade's tests (memory transport, one private
//! broker per test so tests running in parallel never see each other).
#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt as _;
use oona::rules::DeadLetterInfo;
use oona::{Bus, Name, RunHandle, RunSummary, Subscription, Topic};

/// A bus on a fresh, uniquely named memory broker.
pub async fn bus() -> Bus {
    let url = format!("memory://t{}", uuid::Uuid::new_v4().simple());
    Bus::new(oona::connect(&url).await.unwrap()).with_sender_id("oona-test")
}

/// `url` with tenant `tenant` instead of its own tenant and namespace.
pub fn with_tenant(url: &str, tenant: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    let kept: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| k != "tenant" && k != "namespace")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    u.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("tenant", tenant);
    u.to_string()
}

pub fn topic(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

pub fn sub(t: &Topic, group: &str) -> Subscription {
    Subscription::new(t.clone(), Name::new(group).unwrap())
}

/// Guard against a hang: the waits below poll counters, and a broken
/// runner would otherwise block the test forever.
pub const GUARD: Duration = Duration::from_secs(20);

/// Wait until `f` holds for the runner's counters.
pub async fn wait_stats(h: &RunHandle, f: impl Fn(&RunSummary) -> bool) {
    wait_stats_of(|| h.stats(), f).await
}

/// Wait until `f` holds for the counters `stats` gives (a runner's, a
/// router's).
pub async fn wait_stats_of(stats: impl Fn() -> RunSummary, f: impl Fn(&RunSummary) -> bool) {
    let ok = tokio::time::timeout(GUARD, async {
        while !f(&stats()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "condition never held; stats: {}", stats());
}

/// Read `n` dead letters from `dlq` (a stream subscribed before they were
/// produced).
pub async fn read_dead_letters(stream: &mut oona::DeliveryStream, n: usize) -> Vec<DeadLetterInfo> {
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(GUARD, stream.next())
            .await
            .expect("dead letter did not arrive")
            .expect("stream ended")
            .unwrap();
        out.push(DeadLetterInfo::parse(d.envelope()).expect("not a dead letter"));
        d.ack().await.unwrap();
    }
    out
}

#[allow(unused_imports)] // not every test file uses it
pub use oona_conformance::url_of;

/// One test per transport running `$run(url)`: memory:// always, each
/// genuine broker whose URL is set (see [`url_of`]). Not every test file
/// uses it.
#[allow(unused_macros)]
macro_rules! on_every_transport {
    ($run:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn memory() {
            $run(&format!("memory://m{}", uuid::Uuid::new_v4().simple())).await;
        }

        #[cfg(feature = "redis")]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn redis() {
            if let Some(url) = common::url_of("OONA_TEST_REDIS_URL") {
                $run(&url).await;
            }
        }

        #[cfg(feature = "kafka")]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn kafka() {
            if let Some(url) = common::url_of("OONA_TEST_KAFKA_URL") {
                $run(&url).await;
            }
        }

        #[cfg(feature = "pulsar")]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn pulsar() {
            if let Some(url) = common::url_of("OONA_TEST_PULSAR_URL") {
                $run(&url).await;
            }
        }
    };
}
