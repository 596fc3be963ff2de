//! Publishing and consuming the typed contracts (feature `contracts`) on the
//! memory transport: the topic and schema come from the type, and consumers
//! decode JSON, protobuf and Avro by content type.
#![cfg(all(feature = "memory", feature = "contracts"))]

mod common;

use common::{bus, read_dead_letters, wait_stats, GUARD};
use oona::oona_contracts::{
    AnyCodec, BlueprintOutcome, BlueprintSubmitted, FieldReport, HealthSignal, LayerHealthReport,
    Message, Protobuf,
};
use oona::{
    contract_subscription, Codec, ContentType, Envelope, ErrorKind, HandlerError, Incoming, Name,
    Subscription,
};
use std::sync::{Arc, Mutex};

fn report(n: u64) -> FieldReport {
    FieldReport {
        report_id: format!("r-{n}"),
        blueprint_id: "b3d4f5".into(),
        outcome: BlueprintOutcome::Fossilized as i32,
        observed_improvement: 0.125 * n as f64,
        pre_metrics: [("val_loss".to_string(), 0.5)].into(),
        epoch: n,
        ..Default::default()
    }
}

fn dlq_of<T: Message>() -> Subscription {
    Subscription::new(T::topic().dead_letter(), Name::new("audit").unwrap())
}

#[tokio::test]
async fn json_protobuf_and_avro_arrive_typed_on_the_contracts_topic() {
    let bus = bus().await;
    let mut sub = bus.subscribe_contract::<FieldReport>("karn").await.unwrap();
    bus.publish_contract(&report(1)).await.unwrap();
    bus.message_contract(&report(2))
        .codec(&AnyCodec::protobuf())
        .send()
        .await
        .unwrap();
    bus.message_contract(&report(3))
        .codec(&AnyCodec::avro())
        .send()
        .await
        .unwrap();
    // A codec that is not an AnyCodec works too (the reader still picks by
    // content type).
    bus.message_contract(&report(4))
        .codec(&Protobuf)
        .send()
        .await
        .unwrap();

    let expected = [
        (1, ContentType::JSON),
        (2, ContentType::PROTOBUF),
        (3, ContentType::AVRO),
        (4, ContentType::PROTOBUF),
    ];
    for (n, ct) in expected {
        let d = tokio::time::timeout(GUARD, sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.value(), &report(n));
        assert_eq!(d.value().outcome(), BlueprintOutcome::Fossilized);
        let env = d.envelope();
        assert_eq!(env.topic.as_str(), "innovation.field_reports");
        assert_eq!(env.content_type.as_str(), ct, "report {n}");
        assert_eq!(env.schema_id.as_deref(), Some("esper.v1.FieldReport/1"));
        assert_eq!(env.sender_id, "oona-test");
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn json_contract_bytes_are_those_anycodec_json_writes() {
    let bus = bus().await;
    let v = report(7);
    let env = bus.message_contract(&v).key("b3d4f5").build().unwrap();
    let any = AnyCodec::json();
    assert_eq!(env.payload, Codec::<FieldReport>::encode(&any, &v).unwrap());
    assert_eq!(env.content_type, Codec::<FieldReport>::content_type(&any));
    assert_eq!(env.schema_id, Codec::<FieldReport>::schema_id(&any));
    assert_eq!(env.key.as_deref(), Some("b3d4f5"));
    // Enum fields travel as their names in JSON.
    let json: serde_json::Value = serde_json::from_slice(&env.payload).unwrap();
    assert_eq!(json["outcome"], "BLUEPRINT_OUTCOME_FOSSILIZED");
    // The schema id can still be overridden (e.g. to announce a newer
    // compatible version).
    let env = bus
        .message_contract(&v)
        .schema_id("esper.v1.FieldReport/2")
        .build()
        .unwrap();
    assert_eq!(env.schema_id.as_deref(), Some("esper.v1.FieldReport/2"));
}

#[tokio::test]
async fn runner_decodes_every_format_and_dead_letters_what_does_not_decode() {
    let bus = bus().await;
    let topic = BlueprintSubmitted::topic();
    let got = Arc::new(Mutex::new(Vec::new()));
    let handle = {
        let got = got.clone();
        bus.runner_contract::<BlueprintSubmitted>("tezzeret")
            .start(move |msg: Incoming<BlueprintSubmitted>| {
                let got = got.clone();
                async move {
                    if msg.value().name == "refuse" {
                        return Err(HandlerError::permanent("refused by handler"));
                    }
                    got.lock().unwrap().push((
                        msg.value().blueprint_id.clone(),
                        msg.envelope().content_type.as_str().to_string(),
                    ));
                    Ok(())
                }
            })
            .await
            .unwrap()
    };
    let mut dlq = bus
        .subscribe_raw(dlq_of::<BlueprintSubmitted>())
        .await
        .unwrap();

    let bp = |id: &str| BlueprintSubmitted {
        blueprint_id: id.into(),
        name: "resnet-block".into(),
        submitted_by: "urza-api".into(),
        metadata: [("ops".to_string(), "conv2d,relu".to_string())].into(),
        ..Default::default()
    };
    bus.publish_contract(&bp("json")).await.unwrap();
    bus.message_contract(&bp("proto"))
        .codec(&AnyCodec::protobuf())
        .send()
        .await
        .unwrap();
    bus.message_contract(&bp("avro"))
        .codec(&AnyCodec::avro())
        .send()
        .await
        .unwrap();

    // 1. A field of the wrong type.
    let wrong_type = Envelope::builder(topic.clone(), r#"{"blueprint_id": 42}"#).build();
    // 2. Another contract's payload, named by its schema id.
    let other = LayerHealthReport {
        layer_id: 3,
        health_metrics_by_seed: [(
            "0".to_string(),
            HealthSignal {
                health_score: 0.9,
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    };
    let wrong_schema = Envelope::builder(
        topic.clone(),
        Codec::<LayerHealthReport>::encode(&Protobuf, &other).unwrap(),
    )
    .content_type(ContentType::PROTOBUF)
    .schema_id(LayerHealthReport::schema_id())
    .build();
    // 3. A content type no codec reads.
    let wrong_ct = Envelope::builder(topic.clone(), "blueprint_id=x")
        .content_type("text/plain")
        .build();
    // 4. Bytes that are not protobuf.
    let garbage = Envelope::builder(topic.clone(), vec![0xffu8, 0xff, 0xff])
        .content_type(ContentType::PROTOBUF)
        .build();
    let bad = [wrong_type, wrong_schema, wrong_ct, garbage];
    let bad_ids: Vec<String> = bad.iter().map(|e| e.event_id.to_string()).collect();
    for e in bad {
        bus.publish_envelope(e).await.unwrap();
    }
    // A permanent handler error still dead-letters with the handler's reason.
    let mut refused = bp("refused");
    refused.name = "refuse".into();
    bus.publish_contract(&refused).await.unwrap();

    wait_stats(&handle, |s| s.settled() == 8).await;
    let summary = handle.shutdown().await.unwrap();
    assert_eq!(summary.acked, 3, "{summary}");
    assert_eq!(summary.decode_failures, 4, "{summary}");
    assert_eq!(summary.rejected, 5, "{summary}");
    assert_eq!(summary.dead_lettered, 5, "{summary}");

    let mut got = got.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("avro".to_string(), ContentType::AVRO.to_string()),
            ("json".to_string(), ContentType::JSON.to_string()),
            ("proto".to_string(), ContentType::PROTOBUF.to_string()),
        ]
    );

    let dead = read_dead_letters(&mut dlq, 5).await;
    let reason_of = |id: &str| {
        dead.iter()
            .find(|d| d.original.event_id.to_string() == id)
            .map(|d| d.reason.clone())
            .unwrap_or_else(|| panic!("no dead letter for {id}"))
    };
    let r = reason_of(&bad_ids[0]);
    assert!(r.starts_with("decode: JSON decode"), "{r}");
    assert!(r.contains("esper.v1.BlueprintSubmitted"), "{r}");
    assert!(r.contains("invalid type"), "{r}");
    let r = reason_of(&bad_ids[1]);
    assert!(r.starts_with("decode: schema mismatch"), "{r}");
    assert!(r.contains("esper.v1.LayerHealthReport/1"), "{r}");
    let r = reason_of(&bad_ids[2]);
    assert!(
        r.starts_with("decode: unsupported content type text/plain"),
        "{r}"
    );
    let r = reason_of(&bad_ids[3]);
    assert!(r.starts_with("decode: protobuf decode"), "{r}");
    assert!(
        dead.iter().any(|d| d.reason == "refused by handler"),
        "{dead:?}"
    );
}

#[tokio::test]
async fn typed_subscription_skips_and_dead_letters_a_wrong_type() {
    let bus = bus().await;
    let mut sub = bus
        .subscribe_contract::<BlueprintSubmitted>(
            contract_subscription::<BlueprintSubmitted>("urza")
                .unwrap()
                .max_attempts(2),
        )
        .await
        .unwrap();
    let mut dlq = bus
        .subscribe_raw(dlq_of::<BlueprintSubmitted>())
        .await
        .unwrap();
    let bad = Envelope::builder(BlueprintSubmitted::topic(), r#"{"name": ["x"]}"#).build();
    let bad_id = bad.event_id.clone();
    bus.publish_envelope(bad).await.unwrap();
    let good = BlueprintSubmitted {
        blueprint_id: "bp-1".into(),
        ..Default::default()
    };
    bus.message_contract(&good)
        .codec(&AnyCodec::avro())
        .send()
        .await
        .unwrap();
    let d = tokio::time::timeout(GUARD, sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.value(), &good);
    assert_eq!(d.info().max_attempts, 2);
    d.ack().await.unwrap();
    let dl = read_dead_letters(&mut dlq, 1).await;
    assert_eq!(dl[0].original.event_id, bad_id);
    assert!(
        dl[0].reason.starts_with("decode: JSON decode"),
        "{}",
        dl[0].reason
    );
}

#[tokio::test]
async fn a_subscription_on_another_topic_or_a_bad_group_is_refused() {
    let bus = bus().await;
    let other = Subscription::new(LayerHealthReport::topic(), Name::new("tamiyo").unwrap());
    let e = bus
        .runner_contract::<FieldReport>(other.clone())
        .start(|_: Incoming<FieldReport>| async { Ok(()) })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(e.to_string().contains("innovation.field_reports"), "{e}");
    let e = bus
        .subscribe_contract::<FieldReport>(other)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    let e = bus
        .runner_contract::<FieldReport>("not a group")
        .start(|_: Incoming<FieldReport>| async { Ok(()) })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName, "{e}");
    // The right topic is accepted, with its options kept.
    let s = contract_subscription::<FieldReport>(Name::new("karn").unwrap())
        .unwrap()
        .max_attempts(7);
    assert_eq!(s.topic, FieldReport::topic());
    let again = contract_subscription::<FieldReport>(s.clone()).unwrap();
    assert_eq!(again.max_attempts, 7);
}
