//! SASL/SCRAM credentials and ACLs on the genuine broker
//! (`OONA_TEST_KAFKA_SASL_URL`: the SASL listener and the SCRAM user
//! `oona-telemetry` that `scripts/brokers.sh` sets up, with ACLs giving it
//! `telemetry.*` and keeping `control.*` and `innovation.*` from it; with
//! `OONA_TEST_REQUIRE=1` a missing one fails).

use std::time::Duration;

use oona_core::{ErrorKind, Transport};
use oona_kafka::KafkaTransport;

fn url() -> Option<String> {
    oona_conformance::url_of("OONA_TEST_KAFKA_SASL_URL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_at_once() {
    let Some(url) = url() else { return };
    let mut u = url::Url::parse(&url).unwrap();
    u.set_password(Some("not-the-password-5")).unwrap();
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), oona_kafka::connect(u.as_str()))
        .await
        .expect("a refused password is an error, not a retry loop");
    let e = r.expect_err("a wrong password connects");
    println!("wrong password, after {:?}: {e}", started.elapsed());
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    assert!(!e.is_temporary(), "{e}");
    assert!(
        !format!("{e} {e:?}").contains("not-the-password-5"),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_telemetry_user_is_refused_the_other_planes_by_topic() {
    let Some(url) = url() else { return };
    let t: KafkaTransport = oona_kafka::connect(&url).await.unwrap();
    oona_conformance::access::telemetry_user_refused_other_planes(&t).await;
    t.close().await.unwrap();
}
