//! Signed envelopes end to end through the facade, on memory:// and on
//! each genuine broker whose URL is set (`OONA_TEST_REDIS_URL`,
//! `OONA_TEST_KAFKA_URL`, `OONA_TEST_PULSAR_URL`; with `OONA_TEST_REQUIRE=1`
//! a missing one fails): what each bad input gets, and that a rotated key
//! still verifies.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::{read_dead_letters, sub, wait_stats};
use oona::security::{sign, Keyring, Keys, SignLayer, VerifyLayer};
use oona::{Bus, Envelope, Incoming, Name, Subscription, Topic};

const K1: &str = "k1:YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=";
const K2: &str = "k2:YmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmI=";
const K9: &str = "k9:enp6enp6enp6enp6enp6enp6enp6enp6enp6enp6eno=";

async fn signed_end_to_end(url: &str) {
    let transport = oona::connect(url).await.unwrap();
    let plain = Bus::new(transport).with_sender_id("oona-signing-test");
    // Publishers sign with k2 (just rotated in); consumers list k2 and k1.
    let publishers = Keys::new().with_plane("control", Keyring::parse(K2).unwrap());
    let consumers =
        Keys::new().with_plane("control", Keyring::parse(&format!("{K2},{K1}")).unwrap());
    let verify = VerifyLayer::new(consumers);
    let stats = verify.stats();
    let signing = plain.clone().with_publish_layer(SignLayer::new(publishers));
    let consuming = plain.clone().with_consume_layer(verify);
    let t = Topic::new(format!(
        "control.signing{}.commands",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    let mut dlq = plain
        .subscribe_raw(Subscription::new(
            t.dead_letter(),
            Name::new("audit").unwrap(),
        ))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handled = seen.clone();
    let handle = consuming
        .runner::<String>(sub(&t, "kasmina"))
        .start(move |msg: Incoming<String>| {
            let seen = handled.clone();
            async move {
                seen.lock().unwrap().push(msg.value().clone());
                Ok(())
            }
        })
        .await
        .unwrap();
    // Good: signed by the layer with k2, and by hand with the old k1 (the
    // sender set first: a bus fills an empty one, after which the
    // signature would no longer match).
    signing
        .publish(&t, &"current key".to_string())
        .await
        .unwrap();
    let mut old = Envelope::builder(t.clone(), "\"old key\"")
        .sender_id("by-hand")
        .build();
    sign(&mut old, &Keyring::parse(K1).unwrap());
    plain.publish_envelope(old).await.unwrap();
    // Bad: unsigned, an unknown key, a payload changed after signing.
    plain.publish(&t, &"unsigned".to_string()).await.unwrap();
    let mut unknown = Envelope::builder(t.clone(), "\"unknown key\"")
        .sender_id("by-hand")
        .build();
    sign(&mut unknown, &Keyring::parse(K9).unwrap());
    plain.publish_envelope(unknown).await.unwrap();
    let mut tampered = Envelope::builder(t.clone(), "\"tampered\"")
        .sender_id("by-hand")
        .build();
    sign(&mut tampered, &Keyring::parse(K2).unwrap());
    tampered.payload = "\"tampered!\"".into();
    plain.publish_envelope(tampered).await.unwrap();

    wait_stats(&handle, |s| s.settled() == 5).await;
    let summary = handle.shutdown().await.unwrap();
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, vec!["current key", "old key"], "{url}: {summary}");
    let reasons: BTreeMap<String, String> = read_dead_letters(&mut dlq, 3)
        .await
        .into_iter()
        .map(|d| {
            (
                String::from_utf8_lossy(&d.original.payload).into_owned(),
                d.reason,
            )
        })
        .collect();
    assert_eq!(
        reasons,
        BTreeMap::from([
            (
                "\"unsigned\"".to_string(),
                "signature: missing (the topic's plane requires signed messages)".to_string()
            ),
            (
                "\"unknown key\"".to_string(),
                "signature: unknown key id \"k9\"".to_string()
            ),
            (
                "\"tampered!\"".to_string(),
                "signature: does not match (key k2)".to_string()
            ),
        ]),
        "{url}"
    );
    let c = stats.counts();
    assert_eq!(
        (
            c.verified,
            c.missing,
            c.unknown_key,
            c.mismatch,
            c.malformed
        ),
        (2, 1, 1, 1, 0),
        "{url}: {c:?}"
    );
    plain.transport().delete_topic(&t).await.ok();
    plain.transport().delete_topic(&t.dead_letter()).await.ok();
    plain.transport().close().await.unwrap();
}

on_every_transport!(signed_end_to_end);
