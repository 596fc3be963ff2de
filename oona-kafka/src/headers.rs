//! The envelope as Kafka record headers, after the CloudEvents Kafka
//! protocol binding (binary content mode). The table is in the crate README.

use bytes::Bytes;
use oona_core::envelope::header;
use oona_core::{ContentType, Envelope, Error, ErrorKind, EventId, Headers, Priority, Result};
use oona_core::{Timestamp, Topic};
use rdkafka::message::{Header, OwnedHeaders};

/// CloudEvents spec version written in `ce_specversion`.
pub const SPEC_VERSION: &str = "1.0";

/// Header names.
pub mod name {
    /// `ce_specversion`: always `1.0`.
    pub const SPECVERSION: &str = "ce_specversion";
    /// `ce_id`: the event id.
    pub const ID: &str = "ce_id";
    /// `ce_source`: the sender id.
    pub const SOURCE: &str = "ce_source";
    /// `ce_type`: the topic the event was published to.
    pub const TYPE: &str = "ce_type";
    /// `ce_time`: the publish time, RFC 3339.
    pub const TIME: &str = "ce_time";
    /// `ce_dataschema`: the schema id.
    pub const DATASCHEMA: &str = "ce_dataschema";
    /// `content-type`: the payload's MIME type.
    pub const CONTENT_TYPE: &str = "content-type";
    /// `ce_traceparent`: W3C trace context (distributed tracing extension).
    pub const TRACEPARENT: &str = "ce_traceparent";
    /// `ce_tracestate`: W3C trace state (distributed tracing extension).
    pub const TRACESTATE: &str = "ce_tracestate";
    /// `ce_traceid`: the envelope's trace id (Oona extension).
    pub const TRACEID: &str = "ce_traceid";
    /// `ce_correlationid`: the correlation id (Oona extension).
    pub const CORRELATIONID: &str = "ce_correlationid";
    /// `ce_partitionkey`: the ordering key, also the record key
    /// (CloudEvents partitioning extension).
    pub const PARTITIONKEY: &str = "ce_partitionkey";
    /// `ce_priority`: `low`, `normal`, `high`, `emergency` (Oona extension).
    pub const PRIORITY: &str = "ce_priority";
    /// Prefix that escapes user headers whose names would collide with the
    /// names above (`ce_*`, `content-type`) or with the escape itself.
    pub const ESCAPE: &str = "oona-h-";
    /// Internal: the attempt number of a redelivery on a retry topic.
    pub const ATTEMPT: &str = "oona-attempt";
    /// Internal: a redelivery is not handed out before this instant (Unix
    /// milliseconds).
    pub const NOT_BEFORE: &str = "oona-not-before";
}

fn needs_escape(h: &str) -> bool {
    h.starts_with("ce_") || h == name::CONTENT_TYPE || h.starts_with(name::ESCAPE)
}

/// Record headers of `env`; `extra` (internal headers) are appended.
pub fn encode(env: &Envelope, extra: &[(&str, String)]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(12 + env.headers.len() + extra.len());
    let mut put = |k: &str, v: &str| {
        out = std::mem::take(&mut out).insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    };
    put(name::SPECVERSION, SPEC_VERSION);
    put(name::ID, env.event_id.as_str());
    put(name::SOURCE, &env.sender_id);
    put(name::TYPE, env.topic.as_str());
    put(name::TIME, &env.timestamp.to_rfc3339());
    put(name::CONTENT_TYPE, env.content_type.as_str());
    if let Some(v) = &env.schema_id {
        put(name::DATASCHEMA, v);
    }
    if let Some(v) = &env.trace_id {
        put(name::TRACEID, v);
    }
    if let Some(v) = &env.correlation_id {
        put(name::CORRELATIONID, v);
    }
    if let Some(v) = &env.key {
        put(name::PARTITIONKEY, v);
    }
    if env.priority != Priority::Normal {
        put(name::PRIORITY, env.priority.as_str());
    }
    for (k, v) in &env.headers {
        match k.as_str() {
            header::TRACEPARENT => put(name::TRACEPARENT, v),
            header::TRACESTATE => put(name::TRACESTATE, v),
            k if needs_escape(k) => put(&format!("{}{k}", name::ESCAPE), v),
            k => put(k, v),
        }
    }
    for (k, v) in extra {
        put(k, v);
    }
    out
}

/// `headers` of a record read back, without its internal headers, plus
/// `oona-attempt` and `oona-not-before`: the headers of its redelivery.
pub(crate) fn for_retry(
    headers: Option<&OwnedHeaders>,
    attempt: u32,
    not_before: u64,
) -> OwnedHeaders {
    use rdkafka::message::Headers as _;
    let n = headers.map(|h| h.count()).unwrap_or(0);
    let mut out = OwnedHeaders::new_with_capacity(n + 2);
    if let Some(h) = headers {
        for x in h.iter() {
            if x.key == name::ATTEMPT || x.key == name::NOT_BEFORE {
                continue;
            }
            out = out.insert(Header {
                key: x.key,
                value: x.value,
            });
        }
    }
    let (a, nb) = (attempt.to_string(), not_before.to_string());
    out.insert(Header {
        key: name::ATTEMPT,
        value: Some(a.as_bytes()),
    })
    .insert(Header {
        key: name::NOT_BEFORE,
        value: Some(nb.as_bytes()),
    })
}

/// Internal headers read beside the envelope.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Internal {
    /// `oona-attempt`.
    pub attempt: Option<u32>,
    /// `oona-not-before`, Unix milliseconds.
    pub not_before: Option<u64>,
}

fn utf8<'a>(what: &str, b: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(b).map_err(|e| {
        Error::new(
            ErrorKind::Decode,
            format!("record header {what:?} is not UTF-8"),
        )
        .with_source(e)
    })
}

/// Rebuild the envelope of a record read from `read_from` (the topic the
/// envelope belongs to; for retry topics, the original topic).
///
/// The key is `ce_partitionkey`, else the record key when it is UTF-8: a
/// producer that sets only the record key (as Kafka clients naturally do)
/// keeps its key.
pub fn decode<H: rdkafka::message::Headers>(
    headers: Option<&H>,
    record_key: Option<&[u8]>,
    payload: Bytes,
    read_from: &Topic,
) -> Result<(Envelope, Internal)> {
    let mut event_id = None;
    let mut sender_id = None;
    let mut timestamp = None;
    let mut trace_id = None;
    let mut correlation_id = None;
    let mut key = None;
    let mut content_type = None;
    let mut schema_id = None;
    let mut priority = None;
    let mut user = Headers::new();
    let mut internal = Internal::default();
    if let Some(hs) = headers {
        for h in hs.iter() {
            let k = h.key;
            let v = utf8(k, h.value.unwrap_or_default())?;
            match k {
                name::SPECVERSION | name::TYPE => {}
                name::ID => event_id = Some(EventId::parse(v)?),
                name::SOURCE => sender_id = Some(v.to_string()),
                name::TIME => timestamp = Some(Timestamp::parse_rfc3339(v)?),
                name::CONTENT_TYPE => content_type = Some(ContentType::new(v)),
                name::DATASCHEMA => schema_id = Some(v.to_string()),
                name::TRACEID => trace_id = Some(v.to_string()),
                name::CORRELATIONID => correlation_id = Some(v.to_string()),
                name::PARTITIONKEY => key = Some(v.to_string()),
                name::PRIORITY => priority = Some(Priority::parse(v)?),
                name::TRACEPARENT => {
                    user.insert(header::TRACEPARENT.into(), v.to_string());
                }
                name::TRACESTATE => {
                    user.insert(header::TRACESTATE.into(), v.to_string());
                }
                name::ATTEMPT => {
                    internal.attempt = Some(v.parse().map_err(|_| {
                        Error::new(ErrorKind::Decode, format!("header oona-attempt {v:?}"))
                    })?)
                }
                name::NOT_BEFORE => {
                    internal.not_before = Some(v.parse().map_err(|_| {
                        Error::new(ErrorKind::Decode, format!("header oona-not-before {v:?}"))
                    })?)
                }
                k => {
                    // Other CloudEvents attributes (ce_subject, ...) from
                    // foreign producers are kept as user headers.
                    let k = k.strip_prefix(name::ESCAPE).unwrap_or(k);
                    user.insert(k.to_string(), v.to_string());
                }
            }
        }
    }
    if key.is_none() {
        // A binary record key (a Java producer's Avro key, say) cannot be an
        // envelope key; the record is still a valid envelope, without one.
        key = record_key
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_string);
    }
    let missing = |h: &str| {
        Error::new(
            ErrorKind::Decode,
            format!("record has no {h:?} header: not an Oona envelope"),
        )
    };
    let mut envelope = Envelope::builder(read_from.clone(), payload)
        .event_id(event_id.ok_or_else(|| missing(name::ID))?)
        .sender_id(sender_id.ok_or_else(|| missing(name::SOURCE))?)
        .timestamp(timestamp.ok_or_else(|| missing(name::TIME))?)
        .content_type(content_type.unwrap_or_default())
        .priority(priority.unwrap_or_default())
        .build();
    // The builder fills defaults (a fresh trace id); absent stays absent.
    envelope.trace_id = trace_id;
    envelope.correlation_id = correlation_id;
    envelope.key = key;
    envelope.schema_id = schema_id;
    envelope.headers = user;
    Ok((envelope, internal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;

    #[test]
    fn every_field_round_trips_including_colliding_header_names() {
        let t = Topic::new("control.kasmina.commands").unwrap();
        let e = Envelope::builder(t.clone(), vec![0u8, 1, 2, 255])
            .sender_id("tamiyo")
            .key("layer-7")
            .correlation_id("c-1")
            .schema_id("esper.KasminaControlCommand/1")
            .content_type(ContentType::PROTOBUF)
            .priority(Priority::Emergency)
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .header("tracestate", "x=1")
            .header("ce_id", "user-value")
            .header("content-type", "text/plain")
            .header("oona-h-x", "escaped twice")
            .header("empty", "")
            .build();
        let hs = encode(&e, &[(name::ATTEMPT, "3".into())]);
        assert!(hs.iter().any(|h| h.key == "ce_traceparent"));
        assert!(hs.iter().any(|h| h.key == "oona-h-ce_id"));
        let (back, internal) = decode(Some(&hs), None, e.payload.clone(), &t).unwrap();
        assert_eq!(back, e);
        assert_eq!(internal.attempt, Some(3));
    }

    #[test]
    fn a_record_without_envelope_headers_is_a_decode_error() {
        let t = Topic::new("a.b").unwrap();
        let err = decode::<OwnedHeaders>(None, None, Bytes::from_static(b"{}"), &t).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.to_string().contains("ce_id"), "{err}");
        let hs = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(&b"\xff"[..]),
        });
        let err = decode(Some(&hs), None, Bytes::new(), &t).unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn the_record_key_is_the_key_when_no_partitionkey_header_says_otherwise() {
        let t = Topic::new("telemetry.seed.health").unwrap();
        let e = Envelope::builder(t.clone(), "{}").sender_id("py").build();
        let only_required: OwnedHeaders = encode(&e, &[])
            .iter()
            .filter(|h| h.key != name::PARTITIONKEY)
            .fold(OwnedHeaders::new(), |acc, h| acc.insert(h));
        let (back, _) = decode(Some(&only_required), Some(b"seed-7"), Bytes::new(), &t).unwrap();
        assert_eq!(back.key.as_deref(), Some("seed-7"));
        // The header wins over the record key.
        let keyed = Envelope::builder(t.clone(), "{}")
            .key("from-header")
            .build();
        let hs = encode(&keyed, &[]);
        let (back, _) = decode(Some(&hs), Some(b"from-record"), Bytes::new(), &t).unwrap();
        assert_eq!(back.key.as_deref(), Some("from-header"));
        // A binary record key leaves the envelope without a key.
        let (back, _) = decode(Some(&only_required), Some(b"\xff\x00"), Bytes::new(), &t).unwrap();
        assert_eq!(back.key, None);
    }
}
