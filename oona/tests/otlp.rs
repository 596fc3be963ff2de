//! OTLP export (feature `otlp`): spans of a publish and its handling reach
//! an OTLP/HTTP receiver on loopback as protobuf `ExportTraceServiceRequest`s,
//! with the service name and the send → process → ack links intact.

use std::time::Duration;

use oona::{Bus, Incoming, StartPosition, Topic};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

mod common;

/// Accept OTLP/HTTP posts; send each decoded request (path, service name,
/// spans) down the channel, and answer 200.
async fn receiver() -> (String, mpsc::UnboundedReceiver<(String, String, Vec<Span>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).await.unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).await.unwrap();
                    let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|a| a.key == "service.name")
                            .and_then(|a| a.value.as_ref())
                            .map(|v| format!("{:?}", v.value))
                            .unwrap_or_default();
                        let spans = rs.scope_spans.into_iter().flat_map(|s| s.spans).collect();
                        let _ = tx.send((path.clone(), service, spans));
                    }
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    r.get_mut().write_all(ok.as_bytes()).await.unwrap();
                }
            });
        }
    });
    (format!("http://{addr}"), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver() {
    let (endpoint, mut rx) = receiver().await;
    // The standard variable, as a deployment sets it.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    let provider = oona::otlp::tracer_provider("otlp-test").unwrap();
    let bus = oona::otlp::traced(common::bus().await, &provider);
    let topic = Topic::new("telemetry.otlp.test").unwrap();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let h = bus
        .runner::<String>(common::sub(&topic, "otlp").start(StartPosition::Earliest))
        .start(move |m: Incoming<String>| {
            let done = done_tx.clone();
            async move {
                let _ = done.send(m.value().clone());
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.publish(&topic, &"traced".to_string()).await.unwrap();
    let got = tokio::time::timeout(common::GUARD, done_rx.recv()).await;
    assert_eq!(got.ok().flatten().as_deref(), Some("traced"));
    h.shutdown().await.unwrap();
    close(bus).await;
    // Shutting down exports what is batched (on a thread: the exporter
    // blocks).
    let p = provider.clone();
    tokio::task::spawn_blocking(move || oona::otlp::shutdown(&p))
        .await
        .unwrap()
        .unwrap();
    let mut spans = Vec::new();
    while spans.len() < 4 {
        let (path, service, got) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("spans did not reach the receiver")
            .unwrap();
        assert_eq!(path, "/v1/traces");
        assert!(service.contains("otlp-test"), "{service}");
        spans.extend(got);
    }
    let by = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == format!("{name} {topic}"))
            .unwrap_or_else(|| {
                panic!(
                    "no {name} span among {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
    };
    let (send, process, ack) = (by("send"), by("process"), by("ack"));
    assert_eq!(process.parent_span_id, send.span_id);
    assert_eq!(ack.parent_span_id, process.span_id);
    assert_eq!(by("receive").parent_span_id, send.span_id);
    assert!(spans.iter().all(|s| s.trace_id == send.trace_id));
}

async fn close(bus: Bus) {
    bus.close().await.unwrap();
}
