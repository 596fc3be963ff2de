//! The envelope as flat string fields beside the raw payload bytes.
//!
//! | field | value | required |
//! |---|---|---|
//! | `event_id` | the event id (UUID v4 when Oona made it) | yes |
//! | `sender_id` | the publisher | yes |
//! | `timestamp` | RFC 3339 UTC | yes |
//! | `topic` | the topic name | no: the topic it was read from |
//! | `trace_id` | trace id | no |
//! | `correlation_id` | correlation id | no |
//! | `key` | partition / ordering key | no |
//! | `content_type` | MIME type | no: `application/json` |
//! | `schema_id` | schema id and version | no |
//! | `priority` | `low`, `normal`, `high`, `emergency` | no: `normal` |
//! | `h.<name>` | header `<name>` | no |
//!
//! Absent optional fields are omitted, never written empty. The payload
//! travels beside these fields as raw bytes (Redis: field `payload`; Pulsar:
//! the message payload). Unknown fields are ignored so newer writers can add
//! fields; a missing required field or a non-UTF-8 value is a decode error.

use bytes::Bytes;

use crate::envelope::{ContentType, Envelope, EventId, Headers, Priority, Timestamp};
use crate::error::{Error, ErrorKind, Result};
use crate::topic::Topic;

/// Prefix of header fields.
pub const HEADER_PREFIX: &str = "h.";

/// Field names.
pub mod name {
    /// `event_id`
    pub const EVENT_ID: &str = "event_id";
    /// `sender_id`
    pub const SENDER_ID: &str = "sender_id";
    /// `timestamp`
    pub const TIMESTAMP: &str = "timestamp";
    /// `topic`
    pub const TOPIC: &str = "topic";
    /// `trace_id`
    pub const TRACE_ID: &str = "trace_id";
    /// `correlation_id`
    pub const CORRELATION_ID: &str = "correlation_id";
    /// `key`
    pub const KEY: &str = "key";
    /// `content_type`
    pub const CONTENT_TYPE: &str = "content_type";
    /// `schema_id`
    pub const SCHEMA_ID: &str = "schema_id";
    /// `priority`
    pub const PRIORITY: &str = "priority";
}

/// The metadata fields of `env`, in a stable order (payload not included).
pub fn encode(env: &Envelope) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(8 + env.headers.len());
    encode_with(env, |k, v| out.push((k.to_string(), v.to_string())));
    out
}

/// [`encode`] without building the list: calls `put(name, value)` for each
/// field in the same order, so a transport can write the fields straight
/// into its own buffer (allocating only the timestamp and one reused
/// buffer for header names).
pub fn encode_with(env: &Envelope, mut put: impl FnMut(&str, &str)) {
    put(name::EVENT_ID, env.event_id.as_str());
    put(name::SENDER_ID, &env.sender_id);
    put(name::TIMESTAMP, &env.timestamp.to_rfc3339());
    put(name::TOPIC, env.topic.as_str());
    if let Some(v) = &env.trace_id {
        put(name::TRACE_ID, v);
    }
    if let Some(v) = &env.correlation_id {
        put(name::CORRELATION_ID, v);
    }
    if let Some(v) = &env.key {
        put(name::KEY, v);
    }
    put(name::CONTENT_TYPE, env.content_type.as_str());
    if let Some(v) = &env.schema_id {
        put(name::SCHEMA_ID, v);
    }
    put(name::PRIORITY, env.priority.as_str());
    let mut key = String::new();
    for (k, v) in &env.headers {
        key.clear();
        key.push_str(HEADER_PREFIX);
        key.push_str(k);
        put(&key, v);
    }
}

fn utf8<'a>(what: &str, b: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(b).map_err(|e| {
        Error::new(ErrorKind::Decode, format!("field {what:?} is not UTF-8")).with_source(e)
    })
}

/// Rebuild an envelope from its fields and payload. `read_from` is the topic
/// the entry was read from, used when the fields carry no `topic`.
pub fn decode<K, V>(
    fields: impl IntoIterator<Item = (K, V)>,
    payload: Bytes,
    read_from: &Topic,
) -> Result<Envelope>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut event_id = None;
    let mut sender_id = None;
    let mut timestamp = None;
    let mut topic = None;
    let mut trace_id = None;
    let mut correlation_id = None;
    let mut key = None;
    let mut content_type = None;
    let mut schema_id = None;
    let mut priority = None;
    let mut headers = Headers::new();
    for (k, v) in fields {
        let k = utf8("name", k.as_ref())?;
        let v = utf8(k, v.as_ref())?;
        match k {
            name::EVENT_ID => event_id = Some(EventId::parse(v)?),
            name::SENDER_ID => sender_id = Some(v.to_string()),
            name::TIMESTAMP => timestamp = Some(Timestamp::parse_rfc3339(v)?),
            name::TOPIC => {
                topic = Some(Topic::new(v).map_err(|e| {
                    Error::new(ErrorKind::Decode, "field \"topic\" is not a valid topic")
                        .with_source(e)
                })?)
            }
            name::TRACE_ID => trace_id = Some(v.to_string()),
            name::CORRELATION_ID => correlation_id = Some(v.to_string()),
            name::KEY => key = Some(v.to_string()),
            name::CONTENT_TYPE => content_type = Some(ContentType::new(v)),
            name::SCHEMA_ID => schema_id = Some(v.to_string()),
            name::PRIORITY => priority = Some(Priority::parse(v)?),
            other => {
                if let Some(h) = other.strip_prefix(HEADER_PREFIX) {
                    headers.insert(h.to_string(), v.to_string());
                }
            }
        }
    }
    let missing = |f: &str| {
        Error::new(
            ErrorKind::Decode,
            format!("entry has no {f:?} field: not an Oona envelope"),
        )
    };
    Ok(Envelope {
        event_id: event_id.ok_or_else(|| missing(name::EVENT_ID))?,
        sender_id: sender_id.ok_or_else(|| missing(name::SENDER_ID))?,
        timestamp: timestamp.ok_or_else(|| missing(name::TIMESTAMP))?,
        trace_id,
        topic: topic.unwrap_or_else(|| read_from.clone()),
        correlation_id,
        key,
        content_type: content_type.unwrap_or_default(),
        schema_id,
        priority: priority.unwrap_or_default(),
        headers,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_field() {
        let t = Topic::new("control.kasmina.commands").unwrap();
        let e = Envelope::builder(t.clone(), vec![1u8, 2, 3])
            .sender_id("tamiyo")
            .key("layer-7")
            .correlation_id("c")
            .schema_id("esper.KasminaControlCommand/1")
            .content_type(ContentType::PROTOBUF)
            .priority(Priority::Emergency)
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("x", "")
            .build();
        let f = encode(&e);
        assert!(f.iter().any(|(k, v)| k == "h.x" && v.is_empty()));
        let back = decode(
            f.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
            e.payload.clone(),
            &t,
        )
        .unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn not_an_envelope() {
        let t = Topic::new("a.b").unwrap();
        let err = decode([("foo", "bar")], Bytes::new(), &t).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.to_string().contains("event_id"));
        let err = decode([("event_id", &b"\xff"[..])], Bytes::new(), &t).unwrap_err();
        assert!(err.to_string().contains("UTF-8"));
    }

    #[test]
    fn minimal_entry_from_a_foreign_producer() {
        let t = Topic::new("a.b").unwrap();
        let e = decode(
            [
                ("event_id", "1"),
                ("sender_id", "py"),
                ("timestamp", "2025-01-01T00:00:00+00:00"),
            ],
            Bytes::from_static(b"{}"),
            &t,
        )
        .unwrap();
        assert_eq!(e.topic, t);
        assert!(e.content_type.is_json());
        assert_eq!(e.priority, Priority::Normal);
    }
}
