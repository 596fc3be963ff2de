//! The canonical JSON form of an envelope.
//!
//! ```json
//! {"envelope": {"event_id": "…", "sender_id": "…", "timestamp": "2025-07-07T09:55:13Z",
//!               "trace_id": "…", "topic": "compilation.blueprint.submitted",
//!               "content_type": "application/json", "priority": "normal",
//!               "correlation_id": "…", "key": "…", "schema_id": "…",
//!               "headers": {"traceparent": "…"}},
//!  "payload": {"blueprint_id": "b3d4f5"}}
//! ```
//!
//! **Payload rule.** When the content type is JSON (`application/json` or
//! `*+json`) and the payload bytes are one JSON value with no surrounding
//! whitespace, `payload` is that JSON value, embedded byte for byte.
//! Otherwise (protobuf, Avro, opaque bytes, a JSON-typed payload that is not
//! valid JSON or has leading/trailing whitespace) `payload` is a string holding
//! the bytes in standard padded base64 and the envelope carries
//! `"payload_encoding": "base64"`. Decoding reverses this exactly, so
//! `decode(encode(e)) == e` for every envelope.
//!
//! **Accepted input.** Optional fields may be absent or `null`;
//! `content_type` defaults to `application/json` and `priority` to `normal`.
//! The prototype's flat form, with the envelope fields at the top level beside
//! `payload`, is accepted too. A document without `topic` takes the topic it
//! was read from ([`decode_on`]).

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::envelope::{ContentType, Envelope, EventId, Headers, Priority, Timestamp};
use crate::error::{Error, ErrorKind, Result};
use crate::topic::Topic;

const BASE64: &str = "base64";

#[derive(Serialize)]
struct OutDoc<'a> {
    envelope: OutMeta<'a>,
    payload: &'a RawValue,
}

#[derive(Serialize)]
struct OutMeta<'a> {
    event_id: &'a EventId,
    sender_id: &'a str,
    timestamp: &'a Timestamp,
    trace_id: &'a Option<String>,
    topic: &'a Topic,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: &'a Option<String>,
    content_type: &'a ContentType,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_id: &'a Option<String>,
    priority: Priority,
    #[serde(skip_serializing_if = "Headers::is_empty")]
    headers: &'a Headers,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_encoding: Option<&'static str>,
}

#[derive(Deserialize)]
struct InMeta {
    event_id: EventId,
    sender_id: String,
    timestamp: Timestamp,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    topic: Option<Topic>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    content_type: Option<ContentType>,
    #[serde(default)]
    schema_id: Option<String>,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    headers: Option<Headers>,
    #[serde(default)]
    payload_encoding: Option<String>,
}

#[derive(Deserialize)]
struct InDoc<'a> {
    #[serde(default)]
    envelope: Option<InMeta>,
    #[serde(borrow, default, deserialize_with = "present_raw")]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct InFlat<'a> {
    #[serde(flatten)]
    meta: InMeta,
    #[serde(borrow, default, deserialize_with = "present_raw")]
    payload: Option<&'a RawValue>,
}

/// `Some` whenever the field is present, `null` included (plain `Option`
/// would read a `null` payload as absent and lose it).
fn present_raw<'de, D>(d: D) -> std::result::Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&'de RawValue as Deserialize<'de>>::deserialize(d).map(Some)
}

/// Whether the payload can be inlined byte for byte: JSON content type and
/// a JSON document with no surrounding whitespace (which the inline form
/// would not keep).
fn inline_payload(env: &Envelope) -> Option<&RawValue> {
    if !env.content_type.is_json() {
        return None;
    }
    serde_json::from_slice::<&RawValue>(&env.payload)
        .ok()
        .filter(|raw| raw.get().len() == env.payload.len())
}

/// Encode an envelope to its canonical JSON document.
pub fn encode(env: &Envelope) -> Result<Vec<u8>> {
    let inlined = inline_payload(env);
    let inline = inlined.is_some();
    let b64;
    let payload: &RawValue = if let Some(raw) = inlined {
        raw
    } else {
        b64 = serde_json::value::to_raw_value(
            &base64::engine::general_purpose::STANDARD.encode(&env.payload),
        )
        .map_err(|e| Error::new(ErrorKind::Encode, "base64 payload").with_source(e))?;
        &b64
    };
    let doc = OutDoc {
        envelope: OutMeta {
            event_id: &env.event_id,
            sender_id: &env.sender_id,
            timestamp: &env.timestamp,
            trace_id: &env.trace_id,
            topic: &env.topic,
            correlation_id: &env.correlation_id,
            key: &env.key,
            content_type: &env.content_type,
            schema_id: &env.schema_id,
            priority: env.priority,
            headers: &env.headers,
            payload_encoding: (!inline).then_some(BASE64),
        },
        payload,
    };
    serde_json::to_vec(&doc)
        .map_err(|e| Error::new(ErrorKind::Encode, "envelope JSON").with_source(e))
}

/// Decode a canonical (or flat prototype) JSON document that names its topic.
pub fn decode(bytes: &[u8]) -> Result<Envelope> {
    decode_inner(bytes, None)
}

/// Decode a document read from `topic`; the document's own `topic` wins when
/// present.
pub fn decode_on(topic: &Topic, bytes: &[u8]) -> Result<Envelope> {
    decode_inner(bytes, Some(topic))
}

fn decode_err(why: impl Into<String>) -> Error {
    Error::new(ErrorKind::Decode, why)
}

fn decode_inner(bytes: &[u8], topic: Option<&Topic>) -> Result<Envelope> {
    let doc: InDoc<'_> = serde_json::from_slice(bytes)
        .map_err(|e| decode_err("message is not a JSON envelope document").with_source(e))?;
    let (meta, payload) = match doc.envelope {
        Some(meta) => (meta, doc.payload),
        None => {
            let flat: InFlat<'_> = serde_json::from_slice(bytes).map_err(|e| {
                decode_err("JSON has neither an \"envelope\" object nor the flat envelope fields")
                    .with_source(e)
            })?;
            (flat.meta, flat.payload)
        }
    };
    let topic = match (meta.topic, topic) {
        (Some(t), _) => t,
        (None, Some(t)) => t.clone(),
        (None, None) => return Err(decode_err("envelope has no \"topic\"")),
    };
    let content_type = meta.content_type.unwrap_or_default();
    let payload = match (meta.payload_encoding.as_deref(), payload) {
        (_, None) => Bytes::new(),
        (Some(BASE64), Some(raw)) => {
            let s: String = serde_json::from_str(raw.get())
                .map_err(|e| decode_err("base64 payload is not a JSON string").with_source(e))?;
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| decode_err("payload is not valid base64").with_source(e))?,
            )
        }
        (Some(other), Some(_)) => {
            return Err(decode_err(format!(
                "unknown payload_encoding {other:?} (expected \"base64\" or none)"
            )))
        }
        (None, Some(raw)) => Bytes::copy_from_slice(raw.get().as_bytes()),
    };
    Ok(Envelope {
        event_id: meta.event_id,
        sender_id: meta.sender_id,
        timestamp: meta.timestamp,
        trace_id: meta.trace_id,
        topic,
        correlation_id: meta.correlation_id,
        key: meta.key,
        content_type,
        schema_id: meta.schema_id,
        priority: meta.priority.unwrap_or_default(),
        headers: meta.headers.unwrap_or_default(),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payloads_round_trip_byte_for_byte() {
        let t = Topic::new("telemetry.test.bytes").unwrap();
        for p in [
            &b"null"[..],
            b" [1] ",
            b"{\"a\":1}\n",
            b"{\"a\": 1}",
            b"",
            b"\"s\"",
        ] {
            let e = Envelope::builder(t.clone(), p.to_vec()).build();
            let back = decode(&encode(&e).unwrap()).unwrap();
            assert_eq!(back, e, "payload {:?}", String::from_utf8_lossy(p));
        }
    }

    fn topic(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    #[test]
    fn json_payload_is_inline_and_byte_exact() {
        let e = Envelope::builder(
            topic("system.events.epoch"),
            r#"{"epoch": 3,  "loss":0.25}"#,
        )
        .sender_id("tolaria")
        .key("run-1")
        .correlation_id("c-1")
        .schema_id("esper.EpochEvent/1")
        .header("tenant", "a")
        .build();
        let bytes = encode(&e).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["payload"]["epoch"], 3);
        assert_eq!(v["envelope"]["topic"], "system.events.epoch");
        assert_eq!(v["envelope"]["headers"]["tenant"], "a");
        assert!(v["envelope"].get("payload_encoding").is_none());
        assert_eq!(decode(&bytes).unwrap(), e);
    }

    #[test]
    fn binary_payload_is_base64() {
        let e = Envelope::builder(topic("a.b"), vec![0u8, 159, 146, 150, 255])
            .content_type(ContentType::PROTOBUF)
            .build();
        let bytes = encode(&e).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["envelope"]["payload_encoding"], "base64");
        assert_eq!(v["payload"], "AJ+Slv8=");
        assert_eq!(decode(&bytes).unwrap(), e);
        // JSON content type but bytes that are not JSON: still exact.
        let bad = Envelope::builder(topic("a.b"), "not json {").build();
        assert_eq!(decode(&encode(&bad).unwrap()).unwrap(), bad);
    }

    /// The HLD's example (seed 000), verbatim: the prototype's flat form.
    #[test]
    fn design_note_flat_example_parses_as_written() {
        let doc = r#"{
  "event_id": "uuid-v4-string",
  "sender_id": "Urza-API-Service",
  "timestamp": "2025-07-07T09:55:13Z",
  "trace_id": "trace-id-for-a-specific-request",
  "topic": "compilation.blueprint.submitted",
  "payload": {
    "blueprint_id": "b3d4f5...",
    "submitted_by": "human_developer"
  }
}"#;
        let e = decode(doc.as_bytes()).unwrap();
        assert_eq!(e.event_id.as_str(), "uuid-v4-string");
        assert_eq!(e.sender_id, "Urza-API-Service");
        assert_eq!(e.timestamp.to_rfc3339(), "2025-07-07T09:55:13Z");
        assert_eq!(
            e.trace_id.as_deref(),
            Some("trace-id-for-a-specific-request")
        );
        assert_eq!(e.topic.as_str(), "compilation.blueprint.submitted");
        let p: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(p["submitted_by"], "human_developer");
    }

    /// The detailed design's example (seed 001): the nested canonical form,
    /// without a topic (taken from where it was read). The note elides the
    /// payload with a `//` comment and `{ ... }`, which no JSON parser
    /// accepts; those two placeholders are filled with real values and the
    /// envelope is otherwise verbatim.
    #[test]
    fn design_note_nested_example_parses() {
        let doc = r#"{
      "envelope": {
        "event_id": "uuid-v4-string",
        "sender_id": "tamiyo-controller-instance-1",
        "timestamp": "2025-06-29T14:30:00Z",
        "trace_id": "trace-id-for-distributed-tracing"
      },
      "payload": {
        "layer_id": 12,
        "health_metrics_by_seed": { "0": {"chunk_variance": 0.1} }
      }
    }"#;
        assert!(decode(doc.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("no \"topic\""));
        let e = decode_on(&topic("telemetry.seed.health"), doc.as_bytes()).unwrap();
        assert_eq!(e.sender_id, "tamiyo-controller-instance-1");
        assert_eq!(e.topic.as_str(), "telemetry.seed.health");
        let p: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(p["layer_id"], 12);
    }

    #[test]
    fn garbage_is_a_decode_error() {
        for bad in [
            &b"\xff\xfe"[..],
            b"[]",
            b"{\"payload\": 1}",
            b"{\"envelope\": {\"event_id\": \"x\"}}",
        ] {
            assert_eq!(decode(bad).unwrap_err().kind(), ErrorKind::Decode);
        }
    }
}
