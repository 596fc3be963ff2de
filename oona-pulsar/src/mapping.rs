//! How an envelope maps onto a Pulsar message (see the crate README).

use std::collections::HashMap;

use bytes::Bytes;
use oona_core::wire::fields;
use oona_core::{Envelope, Result, Topic};

/// The Pulsar message of an envelope: metadata as properties, the payload
/// as payload, the key as the message key, the timestamp as event time.
pub(crate) fn to_message(env: &Envelope) -> pulsar::producer::Message {
    let properties: HashMap<String, String> = fields::encode(env).into_iter().collect();
    pulsar::producer::Message {
        payload: env.payload.to_vec(),
        properties,
        partition_key: env.key.clone(),
        event_time: Some(env.timestamp.unix_millis()),
        ..Default::default()
    }
}

/// The envelope of a received message, or a decode error.
pub(crate) fn from_message(
    metadata: &pulsar::proto::MessageMetadata,
    payload: Bytes,
    read_from: &Topic,
) -> Result<Envelope> {
    let mut env = fields::decode(
        metadata
            .properties
            .iter()
            .map(|kv| (kv.key.as_bytes(), kv.value.as_bytes())),
        payload,
        read_from,
    )?;
    // A foreign producer may set only the Pulsar message key.
    if env.key.is_none() {
        env.key = metadata.partition_key.clone().filter(|k| !k.is_empty());
    }
    Ok(env)
}

/// The raw entry of a message that is no envelope, kept for its dead
/// letter: properties, key and payload as one JSON object (the payload as
/// UTF-8 text when it is, base64 otherwise).
pub(crate) fn raw_entry(metadata: &pulsar::proto::MessageMetadata, payload: &[u8]) -> Bytes {
    use base64::Engine as _;
    let props: serde_json::Map<String, serde_json::Value> = metadata
        .properties
        .iter()
        .map(|kv| (kv.key.clone(), serde_json::Value::String(kv.value.clone())))
        .collect();
    let mut doc = serde_json::Map::new();
    doc.insert("properties".into(), serde_json::Value::Object(props));
    if let Some(k) = &metadata.partition_key {
        doc.insert("key".into(), serde_json::Value::String(k.clone()));
    }
    match std::str::from_utf8(payload) {
        Ok(s) => doc.insert("payload".into(), serde_json::Value::String(s.to_string())),
        Err(_) => doc.insert(
            "payload_base64".into(),
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(payload)),
        ),
    };
    // Serializing a map of strings cannot fail; keep the bytes if it did.
    serde_json::to_vec(&serde_json::Value::Object(doc))
        .map(Bytes::from)
        .unwrap_or_else(|_| Bytes::copy_from_slice(payload))
}

/// `ledger:entry[:batch]` of a message id.
pub(crate) fn position(id: &pulsar::proto::MessageIdData) -> String {
    match id.batch_index {
        Some(b) if b >= 0 => format!("{}:{}:{b}", id.ledger_id, id.entry_id),
        _ => format!("{}:{}", id.ledger_id, id.entry_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oona_core::{ContentType, ErrorKind, Priority};

    #[test]
    fn every_field_survives_the_mapping() {
        let t = Topic::new("control.kasmina.commands").unwrap();
        let env = Envelope::builder(t.clone(), vec![0u8, 1, 2, 255])
            .sender_id("tamiyo")
            .key("layer-3")
            .correlation_id("c-1")
            .schema_id("esper.Cmd/1")
            .content_type(ContentType::PROTOBUF)
            .priority(Priority::High)
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .build();
        let m = to_message(&env);
        assert_eq!(m.partition_key.as_deref(), Some("layer-3"));
        assert_eq!(m.event_time, Some(env.timestamp.unix_millis()));
        assert_eq!(m.properties.get("h.traceparent").map(String::len), Some(55));
        let metadata = pulsar::proto::MessageMetadata {
            properties: m
                .properties
                .iter()
                .map(|(k, v)| pulsar::proto::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            partition_key: m.partition_key.clone(),
            ..Default::default()
        };
        let back = from_message(&metadata, Bytes::from(m.payload), &t).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn foreign_message_key_and_poison() {
        let t = Topic::new("a.b").unwrap();
        let kv = |k: &str, v: &str| pulsar::proto::KeyValue {
            key: k.into(),
            value: v.into(),
        };
        let metadata = pulsar::proto::MessageMetadata {
            properties: vec![
                kv("event_id", "1"),
                kv("sender_id", "py"),
                kv("timestamp", "2025-01-01T00:00:00Z"),
            ],
            partition_key: Some("k".into()),
            ..Default::default()
        };
        let env = from_message(&metadata, Bytes::from_static(b"{}"), &t).unwrap();
        assert_eq!(env.key.as_deref(), Some("k"));
        let bad = pulsar::proto::MessageMetadata::default();
        assert_eq!(
            from_message(&bad, Bytes::new(), &t).unwrap_err().kind(),
            ErrorKind::Decode
        );
        let raw = raw_entry(&bad, b"\xff\x00");
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(v["payload_base64"], "/wA=");
    }
}
