//! Secrets in connection URLs (passwords, tokens) never reach an error,
//! a `Debug` of the transport or its settings, or a log line, whatever
//! the transport and even when connecting fails. Runs without brokers: the
//! URLs point at a closed port.
#![cfg(all(feature = "redis", feature = "kafka", feature = "pulsar"))]

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Everything logged, at every level, from every thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_errors_debug_or_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();
    let cases = [
        (
            "pw-redis-1",
            "redis://svc:pw-redis-1@127.0.0.1:1/0?connect_timeout=1s",
        ),
        (
            "pw-kafka-2",
            "kafka://svc:pw-kafka-2@127.0.0.1:1?sasl_mechanism=SCRAM-SHA-256&timeout=2s",
        ),
        (
            "tk-pulsar-3",
            "pulsar://127.0.0.1:1?token=tk-pulsar-3&operation_timeout=2s",
        ),
    ];
    let mut shown = String::new();
    for (secret, url) in cases {
        let parsed = oona::ConnectUrl::parse(url).unwrap();
        shown.push_str(&format!("{parsed:?} {}\n", parsed.redacted()));
        match oona::connect(url).await {
            Err(e) => shown.push_str(&format!("{e} {e:?}\n")),
            Ok(t) => shown.push_str(&format!("{t:?}\n")),
        }
        assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
    }
    let pulsar = oona_pulsar::PulsarConfig::parse(cases[2].1).unwrap();
    let kafka =
        oona_kafka::KafkaOptions::from_url(oona::ConnectUrl::parse(cases[1].1).unwrap()).unwrap();
    let redis = oona_redis::RedisConfig::from_url(cases[0].1).unwrap();
    shown.push_str(&format!("{pulsar:?} {kafka:?} {redis:?}"));
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    for (secret, _) in cases {
        assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
        assert!(!logged.contains(secret), "{secret} logged:\n{logged}");
    }
    assert!(
        logged.contains("127.0.0.1:1"),
        "the connection attempts were logged: {logged}"
    );
}
