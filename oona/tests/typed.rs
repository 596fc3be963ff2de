//! The typed publish / subscribe layer on the memory transport.
#![cfg(feature = "memory")]

mod common;

use common::{bus, read_dead_letters, sub, topic, GUARD};
use oona::{header, Bus, ErrorKind, Json, Subscription};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Health {
    seed: u32,
    loss: f64,
}

#[tokio::test]
async fn invalid_topic_is_an_error_before_any_io() {
    let bus = bus().await;
    // Closed: any I/O would fail with `Closed`, so `InvalidTopic` proves the
    // name was checked first.
    bus.close().await.unwrap();
    let v = Health { seed: 1, loss: 0.5 };
    for bad in [
        "Telemetry.seed.health",
        "telemetry",
        "telemetry..health",
        "a.b c",
    ] {
        let e = bus.publish(bad, &v).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad}: {e}");
        let e = bus.message(bad, &v).key("k").send().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad}: {e}");
    }
    let e = bus.publish("telemetry.seed.health", &v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
}

#[tokio::test]
async fn connects_to_one_name_share_a_broker() {
    let name = format!("memory://shared{}", uuid::Uuid::new_v4().simple());
    let a = Bus::new(oona::connect(&name).await.unwrap());
    let b = Bus::new(oona::connect(&name).await.unwrap());
    let other = Bus::new(oona::connect(&format!("{name}x")).await.unwrap());
    let t = topic("telemetry.seed.health");
    let mut on_b = b.subscribe::<Health>(sub(&t, "tamiyo")).await.unwrap();
    let mut on_other = other.subscribe::<Health>(sub(&t, "tamiyo")).await.unwrap();
    a.publish(
        &t,
        &Health {
            seed: 7,
            loss: 0.25,
        },
    )
    .await
    .unwrap();
    let d = tokio::time::timeout(GUARD, on_b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        d.value(),
        &Health {
            seed: 7,
            loss: 0.25
        }
    );
    d.ack().await.unwrap();
    // The other broker saw nothing: publish there and it is the first.
    other
        .publish(&t, &Health { seed: 8, loss: 0.0 })
        .await
        .unwrap();
    let d = tokio::time::timeout(GUARD, on_other.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.value().seed, 8);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn typed_round_trip_with_builder_options() {
    let bus = bus().await.with_sender_id("kasmina-layer-3");
    let t = topic("telemetry.seed.health");
    let mut s = bus.subscribe::<Health>(sub(&t, "nissa")).await.unwrap();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let receipt = bus
        .message(&t, &Health { seed: 3, loss: 1.5 })
        .key("seed-3")
        .correlation_id("req-9")
        .traceparent(tp)
        .header("epoch", "12")
        .send()
        .await
        .unwrap();
    bus.message("telemetry.seed.health", &Health { seed: 4, loss: 2.0 })
        .codec(&Json)
        .send()
        .await
        .unwrap();
    let d = tokio::time::timeout(GUARD, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let env = d.envelope();
    assert_eq!(env.event_id, receipt.event_id);
    assert_eq!(env.sender_id, "kasmina-layer-3");
    assert_eq!(env.key.as_deref(), Some("seed-3"));
    assert_eq!(env.correlation_id.as_deref(), Some("req-9"));
    assert_eq!(
        env.trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(env.header(header::TRACEPARENT), Some(tp));
    assert_eq!(env.header("epoch"), Some("12"));
    assert!(env.content_type.is_json());
    assert_eq!(d.attempt(), 1);
    assert_eq!(d.value(), &Health { seed: 3, loss: 1.5 });
    d.ack().await.unwrap();
    let d = tokio::time::timeout(GUARD, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.value().seed, 4);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn reserved_header_names_are_refused() {
    let bus = bus().await;
    let e = bus
        .message("telemetry.seed.health", &Health { seed: 1, loss: 0.0 })
        .header("oona-dlq-reason", "forged")
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    assert!(e.to_string().contains("oona-dlq-reason"), "{e}");
}

#[tokio::test]
async fn payload_over_the_policy_limit_is_refused() {
    let bus = bus()
        .await
        .with_policies(oona::PolicySet::default().with_max_payload_bytes(16));
    let e = bus
        .publish("telemetry.seed.health", &"x".repeat(64))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
}

#[tokio::test]
async fn undecodable_payload_is_dead_lettered_not_dropped() {
    let bus = bus().await;
    let t = topic("telemetry.seed.health");
    let mut s = bus.subscribe::<Health>(sub(&t, "tamiyo")).await.unwrap();
    let mut dlq = bus
        .subscribe_raw(Subscription::new(
            t.dead_letter(),
            oona::Name::new("audit").unwrap(),
        ))
        .await
        .unwrap();
    let bad = oona::Envelope::builder(t.clone(), r#"{"seed":"three"}"#).build();
    let bad_id = bad.event_id.clone();
    bus.publish_envelope(bad).await.unwrap();
    bus.publish(&t, &Health { seed: 5, loss: 0.1 })
        .await
        .unwrap();
    // The bad one is skipped (rejected); the good one comes next.
    let d = tokio::time::timeout(GUARD, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.value().seed, 5);
    d.ack().await.unwrap();
    let dl = read_dead_letters(&mut dlq, 1).await;
    assert_eq!(dl[0].original.event_id, bad_id);
    assert!(dl[0].reason.starts_with("decode: "), "{}", dl[0].reason);
    assert!(dl[0].reason.contains("JSON decode"), "{}", dl[0].reason);
    assert_eq!(&dl[0].original.payload[..], br#"{"seed":"three"}"#);
    // Empty sender ids are filled by the bus.
    assert_eq!(dl[0].original.sender_id, "oona-test");
}
