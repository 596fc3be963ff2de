//! Metrics and the built-in endpoints, on memory:// and each genuine broker
//! whose URL is set (with `OONA_TEST_REQUIRE=1` a missing one fails): a
//! bus with metrics publishes and handles, and `/metrics` shows the counts,
//! the latency histograms' buckets, the dead letters by reason and the
//! group's depth; `/healthz` and `/readyz` answer, and `/readyz` turns 503
//! when the broker is gone.

#[macro_use]
mod common;

use std::time::Duration;

use common::sub;
use oona::metrics::Metrics;
use oona::serve::Endpoints;
use oona::{Bus, HandlerError, Incoming, StartPosition, Topic};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `GET path` over plain HTTP/1.1: the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: oona\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The value of the sample line that starts with `series ` on `page`.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn metrics_show_what_the_bus_did(url: &str) {
    let metrics = Metrics::new();
    let bus = Bus::new(oona::connect(url).await.unwrap())
        .with_sender_id("nissa")
        .with_metrics(metrics.clone());
    let endpoints = Endpoints::start("127.0.0.1:0", bus.clone()).await.unwrap();
    let addr = endpoints.local_addr();
    let t = Topic::new(format!(
        "telemetry.metrics{}.health",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    bus.ensure_topic(&t).await.unwrap();
    let handle = bus
        .runner::<String>(sub(&t, "nissa").start(StartPosition::Earliest))
        .start(|msg: Incoming<String>| async move {
            if msg.value() == "bad" {
                return Err(HandlerError::permanent("schema: not a health report"));
            }
            Ok(())
        })
        .await
        .unwrap();
    for i in 0..19 {
        bus.publish(&t, &format!("ok-{i}")).await.unwrap();
    }
    bus.publish(&t, &"bad".to_string()).await.unwrap();
    // At least once: a broker may redeliver, so the handled counts are
    // checked against the runner's own.
    common::wait_stats(&handle, |s| s.acked >= 19 && s.dead_lettered >= 1).await;
    let stats = handle.stats();
    let g = format!("topic=\"{t}\",group=\"nissa\"");
    let (status, page) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let tl = format!("topic=\"{t}\"");
    assert_eq!(
        sample(&page, &format!("oona_published_total{{{tl}}}")),
        Some(20.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            &format!("oona_publish_duration_seconds_bucket{{{tl},le=\"+Inf\"}}")
        ),
        Some(20.0)
    );
    assert_eq!(
        sample(&page, &format!("oona_handled_total{{{g},outcome=\"ack\"}}")),
        Some(stats.acked as f64)
    );
    assert_eq!(
        sample(
            &page,
            &format!("oona_dead_letters_total{{{g},reason=\"schema\"}}")
        ),
        Some(stats.dead_lettered as f64)
    );
    assert_eq!(
        sample(
            &page,
            &format!("oona_delivery_latency_seconds_count{{{g}}}")
        ),
        Some(stats.received as f64)
    );
    assert!(
        page.contains(&format!(
            "oona_handler_duration_seconds_bucket{{{g},le=\"0.001\"}}"
        )),
        "{page}"
    );
    // Everything settled: the group's sampled depth is zero.
    let backlog = format!("oona_group_backlog{{{g}}}");
    let settled = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (_, page) = get(addr, "/metrics").await;
            let pending = sample(&page, &format!("oona_group_pending{{{g}}}"));
            if sample(&page, &backlog) == Some(0.0) && pending == Some(0.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(settled.is_ok(), "the group's depth never read 0");
    // One observation per publish call.
    let q = metrics.publish_latency(&t).unwrap();
    assert_eq!(q.count, 20);
    assert!(q.p50 <= q.p95 && q.p95 <= q.p99, "{q:?}");
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(addr, "/nothing").await.0, 404);
    handle.shutdown().await.unwrap();
    bus.close().await.unwrap();
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "a closed bus is not ready: {body}");
    endpoints.stop();
}

on_every_transport!(metrics_show_what_the_bus_did);

/// A transport whose first subscription ends at once (a stream that gives
/// up), the rest being the memory transport's.
#[derive(Debug)]
struct EndsOnce {
    inner: oona::memory::MemoryTransport,
    ended: std::sync::atomic::AtomicBool,
}

#[oona::async_trait]
impl oona::Transport for EndsOnce {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> oona::Capabilities {
        self.inner.capabilities()
    }
    async fn ensure_topic(&self, t: &Topic, p: &oona::TopicPolicy) -> oona::Result<()> {
        self.inner.ensure_topic(t, p).await
    }
    async fn publish(&self, e: oona::Envelope) -> oona::Result<oona::Receipt> {
        self.inner.publish(e).await
    }
    async fn subscribe(&self, s: oona::Subscription) -> oona::Result<oona::DeliveryStream> {
        if !self.ended.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(oona::DeliveryStream::new(futures::stream::empty()));
        }
        self.inner.subscribe(s).await
    }
    async fn delete_topic(&self, t: &Topic) -> oona::Result<()> {
        self.inner.delete_topic(t).await
    }
    async fn health(&self) -> oona::Health {
        self.inner.health().await
    }
    async fn close(&self) -> oona::Result<()> {
        self.inner.close().await
    }
}

/// A runner whose stream ends by itself makes the bus not ready; a runner
/// of the same topic and group started again makes it ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_stops_by_itself_is_not_ready_until_restarted() {
    let bus = Bus::new(std::sync::Arc::new(EndsOnce {
        inner: oona::memory::MemoryTransport::new(),
        ended: Default::default(),
    }));
    let t = common::topic("telemetry.ready.health");
    let handler = |_: Incoming<String>| async { Ok(()) };
    assert_eq!(bus.readiness().await.status, oona::HealthStatus::Up);
    let first = bus
        .runner::<String>(sub(&t, "nissa"))
        .start(handler)
        .await
        .unwrap();
    let stop = first.join().await.unwrap().stop;
    assert_eq!(stop, oona::StopReason::StreamEnded);
    let h = bus.readiness().await;
    assert_eq!(h.status, oona::HealthStatus::Down, "{}", h.detail);
    assert!(h.detail.contains(&format!("{t}/nissa")), "{}", h.detail);
    let again = bus
        .runner::<String>(sub(&t, "nissa"))
        .start(handler)
        .await
        .unwrap();
    assert_eq!(bus.readiness().await.status, oona::HealthStatus::Up);
    again.shutdown().await.unwrap();
    assert_eq!(
        bus.readiness().await.status,
        oona::HealthStatus::Up,
        "a runner shut down on purpose leaves readiness alone"
    );
}
