//! An [AsyncAPI 3](https://www.asyncapi.com/docs/reference/specification/v3.0.0)
//! document of the platform's topics and contracts: [`document`].
//!
//! One channel per topic (its address is the topic name), one message per
//! contract with its Avro schema as the payload (the structure every codec
//! encodes: JSON, protobuf and Avro carry the same fields), the envelope's
//! fields as message headers, and one `send` operation per publishing
//! service and one `receive` per consuming service, from the topic table.
//! `oona asyncapi` prints it.

use serde_json::{json, Map, Value};

use crate::{ContractInfo, TopicName};

/// The AsyncAPI version written.
pub const ASYNCAPI_VERSION: &str = "3.0.0";

/// The document, as JSON (AsyncAPI accepts JSON as well as YAML).
pub fn document() -> Value {
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    for &topic in TopicName::ALL {
        let id = channel_id(topic);
        let mut channel_messages = Map::new();
        if let Some(c) = topic.contract() {
            let name = c.rust_type;
            messages.insert(name.to_string(), message(c));
            channel_messages.insert(
                name.to_string(),
                json!({"$ref": format!("#/components/messages/{name}")}),
            );
        }
        let refs: Vec<Value> = channel_messages
            .keys()
            .map(|m| json!({"$ref": format!("#/channels/{id}/messages/{m}")}))
            .collect();
        channels.insert(
            id.clone(),
            json!({
                "address": topic.as_str(),
                "title": topic.as_str(),
                "description": format!("Plane `{}`, retention {}.", topic.plane(), retention_text(topic.retention())),
                "messages": channel_messages,
            }),
        );
        let sides = [("send", topic.publishers()), ("receive", topic.consumers())];
        for (action, services) in sides {
            for service in services {
                let op = format!("{}_{action}s_{id}", slug(service));
                operations.insert(
                    op,
                    json!({
                        "action": action,
                        "channel": {"$ref": format!("#/channels/{id}")},
                        "summary": format!("{service} {action}s {topic}"),
                        "messages": refs,
                    }),
                );
            }
        }
    }
    json!({
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Esper platform topics on Oona",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every topic of the platform with its contract. Messages travel in Oona's envelope; its fields are the message headers. Consumers decode by the envelope's content type: application/json, application/x-protobuf or application/avro.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": {"OonaEnvelope": envelope_schema()},
        },
    })
}

/// A channel id: the topic name (dots, letters, digits, `_` and `-` are
/// all legal in AsyncAPI keys, so names never collide).
fn channel_id(topic: TopicName) -> String {
    topic.as_str().to_string()
}

fn retention_text(r: oona_core::Retention) -> String {
    match r.duration() {
        None => "forever".into(),
        Some(d) if d.as_secs() % 86_400 == 0 => format!("{} days", d.as_secs() / 86_400),
        Some(d) => format!("{} hours", d.as_secs() / 3_600),
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn message(c: &ContractInfo) -> Value {
    // The schemas are generated and checked at build time; a test parses
    // every one, so this is never null.
    let schema: Value = serde_json::from_str(c.avro_schema).unwrap_or(Value::Null);
    json!({
        "name": c.rust_type,
        "title": c.schema,
        "contentType": "application/json",
        "headers": {"$ref": "#/components/schemas/OonaEnvelope"},
        "correlationId": {"location": "$message.header#/correlation_id"},
        "payload": {
            "schemaFormat": "application/vnd.apache.avro+json;version=1.9.0",
            "schema": schema,
        },
        "x-oona-schema-id": c.schema_id(),
        "x-oona-content-types": ["application/json", "application/x-protobuf", "application/avro"],
    })
}

/// The envelope's fields (see `oona_core::wire::json`).
fn envelope_schema() -> Value {
    let text = json!({"type": "string"});
    json!({
        "type": "object",
        "required": ["event_id", "sender_id", "timestamp", "topic", "content_type", "priority"],
        "properties": {
            "event_id": {"type": "string", "format": "uuid"},
            "sender_id": text,
            "timestamp": {"type": "string", "format": "date-time"},
            "trace_id": text,
            "topic": text,
            "content_type": text,
            "priority": {"type": "string", "enum": ["low", "normal", "high", "emergency"]},
            "correlation_id": text,
            "key": text,
            "schema_id": {"type": "string", "description": "<schema>/<version>"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts;

    #[test]
    fn every_topic_and_contract_is_in_the_document() {
        let doc = document();
        assert_eq!(doc["asyncapi"], ASYNCAPI_VERSION);
        for &t in TopicName::ALL {
            let ch = &doc["channels"][channel_id(t)];
            assert_eq!(ch["address"], t.as_str(), "{t}");
            for p in t.publishers() {
                let op = &doc["operations"][format!("{}_sends_{}", slug(p), channel_id(t))];
                assert_eq!(op["action"], "send", "{p} on {t}");
                assert_eq!(
                    op["channel"]["$ref"],
                    format!("#/channels/{}", channel_id(t))
                );
            }
        }
        for c in contracts() {
            let m = &doc["components"]["messages"][c.rust_type];
            assert_eq!(m["x-oona-schema-id"], c.schema_id());
            assert_eq!(m["payload"]["schema"]["type"], "record", "{}", c.schema);
            serde_json::from_str::<Value>(c.avro_schema).expect("every Avro schema is JSON");
            let ch = &doc["channels"][channel_id(c.topic)]["messages"][c.rust_type];
            assert_eq!(ch["$ref"], format!("#/components/messages/{}", c.rust_type));
        }
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(refs.len() > 20, "{} refs", refs.len());
        for r in refs {
            let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("{r}"));
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }

    fn collect_refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(s)) => out.push(s.clone()),
                        _ => collect_refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }
}
