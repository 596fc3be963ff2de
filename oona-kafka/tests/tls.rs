//! TLS on the genuine broker (`OONA_TEST_KAFKA_TLS_URL`: the SSL listener
//! `scripts/brokers.sh` starts with a certificate of a CA it makes with
//! openssl, and `tls_ca` naming that CA; with `OONA_TEST_REQUIRE=1` a
//! missing one fails). Verification is on: without the CA the broker is
//! refused at once.

use std::time::{Duration, Instant};

use oona_core::{ErrorKind, Topic, Transport};
use oona_kafka::KafkaTransport;

fn url() -> Option<String> {
    oona_conformance::url_of("OONA_TEST_KAFKA_TLS_URL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_with_tls_ca_and_only_then() {
    let Some(url) = url() else { return };
    let t: KafkaTransport = oona_kafka::connect(&url).await.unwrap();
    let topic = Topic::new(format!(
        "telemetry.tls{}.check",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    oona_conformance::one_round_trip(&t, &topic, Duration::from_secs(30)).await;
    t.delete_topic(&topic).await.unwrap();
    t.close().await.unwrap();

    // The same listener without the CA: the web roots do not know it.
    let mut plain = url::Url::parse(&url).unwrap();
    plain.set_query(Some("tls=true"));
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), oona_kafka::connect(plain.as_str()))
        .await
        .expect("a refused certificate is an error, not a hang");
    let err = r.expect_err("an unknown CA was trusted");
    println!("without tls_ca, after {:?}: {err}", started.elapsed());
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(!err.is_temporary(), "{err}");
    // From the handshake, not a metadata timeout (that would be a
    // temporary connection error).
    assert!(err.to_string().contains("tls_ca"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ca_file_is_a_configuration_error() {
    let Some(url) = url() else { return };
    let mut u = url::Url::parse(&url).unwrap();
    u.set_query(Some("tls_ca=/nonexistent/ca.pem"));
    let err = oona_kafka::connect(u.as_str())
        .await
        .expect_err("a missing CA file");
    println!("a missing CA file: {err}");
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(!err.is_temporary(), "{err}");
    assert!(
        err.to_string().contains("`tls_ca`: /nonexistent/ca.pem"),
        "{err}"
    );
}
