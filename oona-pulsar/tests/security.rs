//! TLS, token authentication and topic permissions on the genuine broker.
//! `scripts/brokers.sh up pulsar` starts the standalone with TLS ports (a
//! CA made with openssl at start), token authentication (an HS256 secret
//! made at start) and the authorizer; clients without a token are the
//! anonymous role, a super user. It writes
//! - `OONA_TEST_PULSAR_TLS_URL`: `pulsar+ssl://` and an `https` admin URL,
//!   with `tls_ca_file` naming the CA;
//! - `OONA_TEST_PULSAR_TOKEN_URL`: a token of the role `oona-telemetry`,
//!   which has no permission until a test grants one;
//! - `OONA_TEST_PULSAR_ADMIN_URL`: the admin API, used here as the super
//!   user to grant that role a topic.
//!
//! With `OONA_TEST_REQUIRE=1` a missing one fails.

use std::time::{Duration, Instant};

use oona_conformance::access::{telemetry_user_refused_on, PlaneTopics};
use oona_core::{Envelope, ErrorKind, Topic, Transport};
use oona_pulsar::PulsarTransport;

const WAIT: Duration = Duration::from_secs(30);

fn topic(plane: &str) -> Topic {
    Topic::new(format!(
        "{plane}.security{}.t",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap()
}

/// `url` with its query parameter `key` removed (or replaced by `value`).
fn with_param(url: &str, key: &str, value: Option<&str>) -> String {
    let mut u = url::Url::parse(url).unwrap();
    let kept: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| k != key)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut q = u.query_pairs_mut();
    q.clear().extend_pairs(kept);
    if let Some(v) = value {
        q.append_pair(key, v);
    }
    drop(q);
    u.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_with_tls_ca_file_and_only_then() {
    let Some(url) = oona_conformance::url_of("OONA_TEST_PULSAR_TLS_URL") else {
        return;
    };
    let t = PulsarTransport::connect_url(&url).await.unwrap();
    let topic = topic("telemetry");
    // Retention goes through the https admin API, the messages through
    // pulsar+ssl.
    let policy = oona_core::TopicPolicy::new(oona_core::Retention::For(Duration::from_secs(3600)));
    t.ensure_topic(&topic, &policy).await.unwrap();
    assert!(t.applied_retention(&topic).await.unwrap().is_some());
    oona_conformance::one_round_trip(&t, &topic, WAIT).await;
    t.delete_topic(&topic).await.unwrap();
    t.close().await.unwrap();

    // Without the CA: the web roots do not know it, refused at once.
    let plain = with_param(&url, "tls_ca_file", None);
    let started = Instant::now();
    let r = tokio::time::timeout(WAIT, PulsarTransport::connect_url(&plain))
        .await
        .expect("a refused certificate is an error, not a hang");
    let err = r.expect_err("an unknown CA was trusted");
    println!("without tls_ca_file, after {:?}: {err}", started.elapsed());
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(!err.is_temporary(), "{err}");

    let missing = with_param(&url, "tls_ca_file", Some("/nonexistent/ca.pem"));
    let err = PulsarTransport::connect_url(&missing)
        .await
        .expect_err("a missing CA file");
    println!("a missing CA file: {err}");
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.to_string().contains("tls_ca_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_refused_at_once() {
    let Some(url) = oona_conformance::url_of("OONA_TEST_PULSAR_TOKEN_URL") else {
        return;
    };
    let token = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .expect("the URL has a token");
    // The same claims under a signature the broker's key did not make.
    let (signed, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{signed}.bm90LXRoZS1zaWduYXR1cmUtb2YtdGhlLWtleQ");
    let started = Instant::now();
    let r = tokio::time::timeout(
        WAIT,
        PulsarTransport::connect_url(&with_param(&url, "token", Some(&forged))),
    )
    .await
    .expect("a refused token is an error, not a retry loop");
    let err = r.expect_err("a forged token connects");
    println!("a forged token, after {:?}: {err}", started.elapsed());
    assert_eq!(err.kind(), ErrorKind::Unauthenticated, "{err}");
    assert!(!err.is_temporary(), "{err}");
    assert!(!format!("{err} {err:?}").contains(&forged), "{err:?}");
}

/// Grant `role` `actions` on `topic` as the super user, through the admin
/// API (what `pulsar-admin topics grant-permission` does).
async fn grant(topic: &Topic, role: &str, actions: &[&str]) {
    let admin = oona_conformance::url_of("OONA_TEST_PULSAR_ADMIN_URL").unwrap();
    let url = format!("{admin}/admin/v2/persistent/esper/dev/{topic}/permissions/{role}");
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&actions)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "POST {url}: {}", resp.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_telemetry_role_is_refused_the_other_planes_by_topic() {
    let Some(url) = oona_conformance::url_of("OONA_TEST_PULSAR_TOKEN_URL") else {
        return;
    };
    let topics = PlaneTopics::random();
    // The super user (no token) makes the topic; its permission is then
    // granted to the role.
    let admin = oona_conformance::url_of("OONA_TEST_PULSAR_URL").unwrap();
    let su = PulsarTransport::connect_url(&admin).await.unwrap();
    su.publish(
        Envelope::builder(topics.allowed.clone(), "{}")
            .sender_id("su")
            .build(),
    )
    .await
    .unwrap();
    grant(&topics.allowed, "oona-telemetry", &["produce", "consume"]).await;
    let t = PulsarTransport::connect_url(&url).await.unwrap();
    telemetry_user_refused_on(&t, &topics).await;
    t.close().await.unwrap();
    su.delete_topic(&topics.allowed).await.unwrap();
    su.close().await.unwrap();
}
