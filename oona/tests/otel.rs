//! OpenTelemetry traces (feature `otel`), checked with the SDK's in-memory
//! exporter: publish → consume → handler → publish → consume forms one
//! trace, each span the child of the one before, on memory:// and each
//! genuine broker whose URL is set, and across Redis, Kafka and Pulsar in
//! one chain when all three are (with `OONA_TEST_REQUIRE=1` a missing one
//! fails).

#[macro_use]
mod common;

use std::time::Duration;

use common::sub;
use oona::otel::TraceLayer;
use oona::{Bus, Incoming, StartPosition, Topic};
use opentelemetry::trace::{SpanId, SpanKind, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::sync::mpsc;

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// The one span named `name`.
fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "spans named {name}: {:?}", names(spans));
    found[0]
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| s.name.to_string()).collect()
}

/// A message through one hop per URL: the handler of hop `i` publishes to
/// hop `i + 1`; returns the finished spans and the hops' topics.
async fn chain(urls: &[String]) -> (Vec<SpanData>, Vec<Topic>, Vec<&'static str>) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let tracer = provider.tracer("oona-test");
    let mut buses = Vec::new();
    let mut topics = Vec::new();
    let mut systems = Vec::new();
    for url in urls {
        let t = oona::connect(url).await.unwrap();
        let system = t.name();
        let layer = TraceLayer::new(tracer.clone(), system);
        let bus = Bus::new(t)
            .with_sender_id("otel-test")
            .with_publish_layer(layer.clone())
            .with_consume_layer(layer);
        let topic = Topic::new(format!(
            "telemetry.otel{}.hop",
            uuid::Uuid::new_v4().simple()
        ))
        .unwrap();
        bus.ensure_topic(&topic).await.unwrap();
        buses.push(bus);
        topics.push(topic);
        systems.push(system);
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut handles = Vec::new();
    for i in 0..buses.len() {
        let next = buses.get(i + 1).cloned().zip(topics.get(i + 1).cloned());
        let done = done_tx.clone();
        let h = buses[i]
            .runner::<String>(sub(&topics[i], &format!("hop{i}")).start(StartPosition::Earliest))
            .start(move |m: Incoming<String>| {
                let (next, done) = (next.clone(), done.clone());
                async move {
                    match next {
                        // No trace context is passed by hand: the process
                        // span's is the task's current one.
                        Some((bus, topic)) => {
                            bus.publish(&topic, m.value()).await?;
                        }
                        None => {
                            let _ = done.send(m.value().clone());
                        }
                    }
                    Ok(())
                }
            })
            .await
            .unwrap();
        handles.push(h);
    }
    buses[0]
        .publish(&topics[0], &"blueprint".to_string())
        .await
        .unwrap();
    let got = tokio::time::timeout(common::GUARD, done_rx.recv()).await;
    assert_eq!(got.ok().flatten().as_deref(), Some("blueprint"));
    // The last process span ends once its settlement is written.
    // send, receive, process and ack of each hop.
    let want = 4 * urls.len();
    let spans = tokio::time::timeout(common::GUARD, async {
        loop {
            let spans = exporter.get_finished_spans().unwrap();
            if spans.len() >= want {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("not every span ended");
    for h in handles {
        h.shutdown().await.unwrap();
    }
    for b in &buses {
        b.close().await.unwrap();
    }
    (spans, topics, systems)
}

/// Each span the child of the one before, in one trace.
fn check_tree(spans: &[SpanData], topics: &[Topic], systems: &[&str]) {
    let trace = span(spans, &format!("send {}", topics[0]))
        .span_context
        .trace_id();
    assert!(
        spans.iter().all(|s| s.span_context.trace_id() == trace),
        "one trace: {:?}",
        names(spans)
    );
    let mut parent = SpanId::INVALID;
    for (i, t) in topics.iter().enumerate() {
        let send = span(spans, &format!("send {t}"));
        let process = span(spans, &format!("process {t}"));
        assert_eq!(send.span_kind, SpanKind::Producer);
        assert_eq!(process.span_kind, SpanKind::Consumer);
        assert_eq!(
            send.parent_span_id, parent,
            "send {t} is the child of the hop before"
        );
        assert_eq!(
            process.parent_span_id,
            send.span_context.span_id(),
            "process {t} is the child of its send"
        );
        for s in [send, process] {
            assert_eq!(
                attr(s, "messaging.system"),
                Some(&Value::from(systems[i].to_string()))
            );
            assert_eq!(
                attr(s, "messaging.destination.name"),
                Some(&Value::from(t.to_string()))
            );
        }
        assert_eq!(
            attr(process, "messaging.consumer.group.name"),
            Some(&Value::from(format!("hop{i}")))
        );
        assert_eq!(attr(process, "oona.outcome"), Some(&Value::from("ack")));
        assert_eq!(
            attr(process, "oona.delivery.attempt"),
            Some(&Value::from(1i64))
        );
        assert_eq!(
            attr(send, "messaging.message.id"),
            attr(process, "messaging.message.id")
        );
        let receive = span(spans, &format!("receive {t}"));
        assert_eq!(receive.span_kind, SpanKind::Consumer);
        assert_eq!(
            receive.parent_span_id,
            send.span_context.span_id(),
            "receive {t} is the child of its send"
        );
        assert!(receive.end_time <= process.start_time + Duration::from_millis(5));
        let ack = span(spans, &format!("ack {t}"));
        assert_eq!(ack.span_kind, SpanKind::Client);
        assert_eq!(
            ack.parent_span_id,
            process.span_context.span_id(),
            "ack {t} is the child of its process"
        );
        assert_eq!(
            attr(ack, "messaging.operation.type"),
            Some(&Value::from("settle"))
        );
        assert!(ack.start_time >= process.start_time && ack.end_time <= process.end_time);
        parent = process.span_context.span_id();
    }
}

async fn two_hops_make_one_trace(url: &str) {
    let urls = vec![url.to_string(), url.to_string()];
    let (spans, topics, systems) = chain(&urls).await;
    check_tree(&spans, &topics, &systems);
}

on_every_transport!(two_hops_make_one_trace);

/// Redis → Kafka → Pulsar: one trace across three brokers.
#[cfg(all(feature = "redis", feature = "kafka", feature = "pulsar"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_redis_kafka_and_pulsar() {
    let urls: Option<Vec<String>> = [
        "OONA_TEST_REDIS_URL",
        "OONA_TEST_KAFKA_URL",
        "OONA_TEST_PULSAR_URL",
    ]
    .iter()
    .map(|v| common::url_of(v))
    .collect();
    let Some(urls) = urls else { return };
    let (spans, topics, systems) = chain(&urls).await;
    assert_eq!(systems, ["redis", "kafka", "pulsar"]);
    check_tree(&spans, &topics, &systems);
    // The tree, for the closing note: `--nocapture` prints it.
    print_tree(&spans, SpanId::INVALID, 0);
}

fn print_tree(spans: &[SpanData], parent: SpanId, depth: usize) {
    let mut children: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.parent_span_id == parent)
        .collect();
    children.sort_by_key(|s| s.start_time);
    for s in children {
        let took = s.end_time.duration_since(s.start_time).unwrap_or_default();
        eprintln!(
            "{}{} [{:?}, {}] span {} ({:.2} ms)",
            "  ".repeat(depth),
            s.name,
            s.span_kind,
            attr(s, "messaging.system")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            s.span_context.span_id(),
            took.as_secs_f64() * 1e3
        );
        print_tree(spans, s.span_context.span_id(), depth + 1);
    }
}
