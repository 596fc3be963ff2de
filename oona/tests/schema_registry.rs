//! The broker's schema registry. On Pulsar a typed contract's producer
//! carries its schema: the registry keeps it (namespace compatibility
//! `FULL`, Oona's own evolution check), refuses an incompatible one with an
//! error naming the fields, gives a compatible change a new version, and
//! consumers see the version of each message's schema. Where the broker
//! keeps no registry (memory, Redis, Kafka) registering is a no-op and the
//! envelope's schema id is the contract.
#![cfg(feature = "contracts")]

use std::time::Duration;

use futures::StreamExt as _;
use oona::oona_contracts::{AnyCodec, FieldReport, LayerHealthReport, Message};
use oona::{Bus, ErrorKind, Name, SchemaSpec, StartPosition, Subscription, Transport};

#[macro_use]
mod common;

fn report(n: u64) -> FieldReport {
    FieldReport {
        report_id: format!("r-{n}"),
        blueprint_id: "b3d4f5".into(),
        epoch: n,
        ..Default::default()
    }
}

/// FieldReport's Avro schema with `edit` applied to its fields.
fn edited(edit: impl FnOnce(&mut Vec<serde_json::Value>)) -> String {
    edited_of::<FieldReport>(edit)
}

/// `T`'s Avro schema with `edit` applied to its fields.
fn edited_of<T: Message>(edit: impl FnOnce(&mut Vec<serde_json::Value>)) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(T::AVRO_SCHEMA).unwrap();
    let fields = doc["fields"].as_array_mut().unwrap();
    edit(fields);
    doc.to_string()
}

/// The schema version of the next delivery on `s`, which must be report
/// `n` of schema `id`.
async fn version_of_next(s: &mut oona::DeliveryStream, n: u64, id: &str) -> Option<u64> {
    let d = tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("delivery")
        .expect("stream open")
        .unwrap();
    assert_eq!(d.envelope().schema_id.as_deref(), Some(id));
    let v: serde_json::Value = serde_json::from_slice(&d.envelope().payload).unwrap();
    assert_eq!(v["report_id"], format!("r-{n}"));
    let version = d.info().schema_version;
    d.ack().await.unwrap();
    version
}

async fn registry(url: &str) {
    // A tenant of its own: the contract's topic is the same in every run.
    let pulsar = url.starts_with("pulsar");
    let tenant = format!("sr{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let url = common::with_tenant(url, &tenant);
    let transport = oona::connect(&url).await.unwrap();
    let bus = Bus::new(transport.clone());
    let topic = FieldReport::topic();
    let sub =
        Subscription::new(topic.clone(), Name::unique("schema")).start(StartPosition::Earliest);
    let mut s = transport.subscribe(sub).await.unwrap();
    bus.publish_contract(&report(1)).await.unwrap();
    let v1_id = FieldReport::schema_id();
    let first = version_of_next(&mut s, 1, &v1_id).await;
    let json = oona::ContentType::json();
    let v1 = SchemaSpec::new(
        FieldReport::schema_id(),
        json.clone(),
        FieldReport::AVRO_SCHEMA,
    );
    if !pulsar {
        // No registry: nothing registered, no version in deliveries.
        assert_eq!(first, None);
        assert_eq!(transport.register_schema(&topic, &v1).await.unwrap(), None);
        transport.delete_topic(&topic).await.unwrap();
        transport.close().await.unwrap();
        return;
    }
    // The contract's producer registered version 0; its messages carry it.
    assert_eq!(first, Some(0));
    assert_eq!(
        transport.register_schema(&topic, &v1).await.unwrap(),
        Some(0)
    );
    // A producer whose schema changes a field's type and adds one without
    // a default is refused, the fields named.
    let first_field = serde_json::from_str::<serde_json::Value>(FieldReport::AVRO_SCHEMA).unwrap()
        ["fields"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let broken = edited(|f| {
        f[0]["type"] = serde_json::json!("long");
        f[0].as_object_mut().unwrap().remove("default");
        f.push(serde_json::json!({"name": "shard", "type": "string"}));
    });
    let bad = SchemaSpec::new("esper.v1.FieldReport/2", json.clone(), broken);
    let e = transport.register_schema(&topic, &bad).await.unwrap_err();
    // A definition that is no valid Avro is refused as well.
    let invalid = edited(|f| f[0]["type"] = serde_json::json!("long"));
    let not_avro = SchemaSpec::new("esper.v1.FieldReport/2", json.clone(), invalid);
    let e2 = transport
        .register_schema(&topic, &not_avro)
        .await
        .unwrap_err();
    assert_eq!(e2.kind(), ErrorKind::IncompatibleSchema, "{e2}");
    println!("an incompatible producer is refused: {e}");
    assert_eq!(e.kind(), ErrorKind::IncompatibleSchema, "{e}");
    assert!(!e.is_temporary());
    let text = e.to_string();
    assert!(text.contains(&format!("`{first_field}`")), "{text}");
    assert!(text.contains("`shard`"), "{text}");
    // The contract still publishes with version 0.
    bus.publish_contract(&report(2)).await.unwrap();
    assert_eq!(version_of_next(&mut s, 2, &v1_id).await, Some(0));
    // A compatible change (a field with a default) is version 1, and what
    // its producer writes says so.
    let added =
        edited(|f| f.push(serde_json::json!({"name": "shard", "type": "string", "default": ""})));
    let v2 = SchemaSpec::new("esper.v1.FieldReport/2", json, added);
    assert_eq!(
        transport.register_schema(&topic, &v2).await.unwrap(),
        Some(1)
    );
    let mut e3 = bus.message_contract(&report(3)).build().unwrap();
    e3.schema_id = Some(v2.schema_id.clone());
    transport.publish(e3).await.unwrap();
    assert_eq!(version_of_next(&mut s, 3, &v2.schema_id).await, Some(1));
    // Each schema keeps a producer of its own: version 1 on the topic does
    // not change what the contract's version 1 writes.
    bus.publish_contract(&report(4)).await.unwrap();
    assert_eq!(version_of_next(&mut s, 4, &v1_id).await, Some(0));
    // The type follows the codec: a topic first written as protobuf is a
    // PROTOBUF topic, and a JSON producer of the same contract is refused.
    let health = LayerHealthReport::topic();
    let r = LayerHealthReport::default();
    bus.message_contract(&r)
        .codec(&AnyCodec::protobuf())
        .send()
        .await
        .unwrap();
    let e = bus.publish_contract(&r).await.unwrap_err();
    println!("a JSON producer on a protobuf topic is refused: {e}");
    assert_eq!(e.kind(), ErrorKind::IncompatibleSchema, "{e}");
    assert!(
        e.to_string()
            .contains("is of type PROTOBUF, this producer writes JSON"),
        "{e}"
    );
    // PROTOBUF schemas are checked as AVRO ones are (brokers.sh adds the
    // broker's ProtobufSchemaCompatibilityCheck): a new field without a
    // default is refused.
    let more = edited_of::<LayerHealthReport>(|f| {
        f.push(serde_json::json!({"name": "shard", "type": "string"}))
    });
    let protobuf = oona::ContentType::new(oona::ContentType::PROTOBUF);
    let bad = SchemaSpec::new("esper.v1.LayerHealthReport/2", protobuf, more);
    let e = transport.register_schema(&health, &bad).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::IncompatibleSchema, "{e}");
    assert!(e.to_string().contains("`shard`"), "{e}");
    transport.delete_topic(&health).await.unwrap();
    #[cfg(feature = "pulsar")]
    {
        let p = oona_pulsar::PulsarTransport::connect_url(&url)
            .await
            .unwrap();
        let ns = p.namespace_policies(topic.plane()).await.unwrap();
        println!(
            "namespace {tenant}/{} schema_compatibility_strategy as read back: {:?}",
            topic.plane(),
            ns.schema_compatibility
        );
        assert_eq!(ns.schema_compatibility.as_deref(), Some("FULL"));
        p.close().await.unwrap();
    }
    drop(s);
    transport.delete_topic(&topic).await.unwrap();
    transport.close().await.unwrap();
}

on_every_transport!(registry);
