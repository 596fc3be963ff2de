//! The envelope as protobuf (`oona.v1.Envelope`, `proto/oona/v1/envelope.proto`).
//!
//! The binary counterpart of [`oona_core::wire::json`]: one blob holding
//! every envelope field and the payload bytes, for brokers that carry one
//! opaque value per message and for non-Rust producers with generated
//! protobuf classes. `decode(encode(e)) == e` for every envelope.
//!
//! Reading rules: an empty `event_id`, a missing `timestamp` or one out of
//! range, an invalid topic and an unknown priority number are decode errors
//! (a newer writer's priority must not be silently downgraded); an empty
//! `content_type` reads as `application/json`; an empty `topic` takes the
//! topic it was read from ([`decode_on`]).

use std::time::{Duration, SystemTime};

use oona_core::{
    ContentType, Envelope, Error, ErrorKind, EventId, Priority, Result, Timestamp, Topic,
};
use prost::Message as _;

use crate::proto::oona::v1 as pb;

/// Content type of an encoded envelope.
pub const CONTENT_TYPE: &str = "application/x-protobuf; messageType=oona.v1.Envelope";

fn err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Decode, msg)
}

fn priority_to_pb(p: Priority) -> pb::Priority {
    match p {
        Priority::Low => pb::Priority::Low,
        Priority::Normal => pb::Priority::Normal,
        Priority::High => pb::Priority::High,
        Priority::Emergency => pb::Priority::Emergency,
    }
}

fn priority_from_pb(n: i32) -> Result<Priority> {
    match pb::Priority::try_from(n) {
        Ok(pb::Priority::Unspecified | pb::Priority::Normal) => Ok(Priority::Normal),
        Ok(pb::Priority::Low) => Ok(Priority::Low),
        Ok(pb::Priority::High) => Ok(Priority::High),
        Ok(pb::Priority::Emergency) => Ok(Priority::Emergency),
        Err(_) => Err(err(format!("unknown envelope priority number {n}"))),
    }
}

/// A timestamp as `google.protobuf.Timestamp` (nanoseconds kept; instants
/// before 1970 have negative seconds and non-negative nanos).
pub fn timestamp_to_pb(t: Timestamp) -> prost_types::Timestamp {
    match t.system_time().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => prost_types::Timestamp {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos() as i32,
        },
        Err(e) => {
            let d = e.duration();
            let mut seconds = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            let mut nanos = d.subsec_nanos() as i32;
            if nanos > 0 {
                seconds -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            prost_types::Timestamp { seconds, nanos }
        }
    }
}

/// A `google.protobuf.Timestamp` as a timestamp.
pub fn timestamp_from_pb(t: &prost_types::Timestamp) -> Result<Timestamp> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(err(format!("timestamp nanos {} out of range", t.nanos)));
    }
    let out_of_range = || err(format!("timestamp {}s is out of range", t.seconds));
    let nanos = Duration::from_nanos(t.nanos as u64);
    let st = if t.seconds >= 0 {
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(t.seconds as u64))
            .and_then(|s| s.checked_add(nanos))
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.seconds.unsigned_abs()))
            .and_then(|s| s.checked_add(nanos))
    };
    st.map(Timestamp::from).ok_or_else(out_of_range)
}

/// The protobuf form of an envelope.
pub fn to_pb(env: &Envelope) -> pb::Envelope {
    pb::Envelope {
        event_id: env.event_id.as_str().to_string(),
        sender_id: env.sender_id.clone(),
        timestamp: Some(timestamp_to_pb(env.timestamp)),
        trace_id: env.trace_id.clone(),
        topic: env.topic.as_str().to_string(),
        correlation_id: env.correlation_id.clone(),
        key: env.key.clone(),
        content_type: env.content_type.as_str().to_string(),
        schema_id: env.schema_id.clone(),
        priority: priority_to_pb(env.priority) as i32,
        headers: env.headers.clone(),
        payload: env.payload.to_vec(),
    }
}

/// An envelope from its protobuf form; `topic` is used when the message has
/// none.
pub fn from_pb(p: pb::Envelope, topic: Option<&Topic>) -> Result<Envelope> {
    let event_id = EventId::parse(p.event_id)?;
    let ts = p
        .timestamp
        .as_ref()
        .ok_or_else(|| err("envelope has no timestamp"))
        .and_then(timestamp_from_pb)?;
    let topic = if p.topic.is_empty() {
        topic.cloned().ok_or_else(|| err("envelope has no topic"))?
    } else {
        Topic::new(p.topic).map_err(|e| err(format!("envelope topic: {}", e.message())))?
    };
    let content_type = if p.content_type.is_empty() {
        ContentType::json()
    } else {
        ContentType::new(p.content_type)
    };
    let mut env = Envelope::builder(topic, p.payload)
        .event_id(event_id)
        .sender_id(p.sender_id)
        .timestamp(ts)
        .content_type(content_type)
        .priority(priority_from_pb(p.priority)?)
        .build();
    env.trace_id = p.trace_id;
    env.correlation_id = p.correlation_id;
    env.key = p.key;
    env.schema_id = p.schema_id;
    env.headers = p.headers;
    Ok(env)
}

/// Encode an envelope as `oona.v1.Envelope` bytes.
pub fn encode(env: &Envelope) -> Vec<u8> {
    to_pb(env).encode_to_vec()
}

/// Decode `oona.v1.Envelope` bytes that name their topic.
pub fn decode(bytes: &[u8]) -> Result<Envelope> {
    decode_inner(bytes, None)
}

/// Decode bytes read from `topic` (the message's own topic wins when set).
pub fn decode_on(topic: &Topic, bytes: &[u8]) -> Result<Envelope> {
    decode_inner(bytes, Some(topic))
}

fn decode_inner(bytes: &[u8], topic: Option<&Topic>) -> Result<Envelope> {
    let p = pb::Envelope::decode(bytes)
        .map_err(|e| err("message is not a protobuf oona.v1.Envelope").with_source(e))?;
    from_pb(p, topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let t = Topic::new("system.events.epoch").unwrap();
        let mut e = Envelope::builder(t.clone(), vec![0u8, 1, 2, 255])
            .sender_id("tolaria")
            .timestamp(Timestamp::parse_rfc3339("2025-07-07T09:55:13.123456789Z").unwrap())
            .correlation_id("c")
            .key("k")
            .content_type(ContentType::PROTOBUF)
            .schema_id("esper.v1.EpochEvent/1")
            .priority(Priority::Emergency)
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .build();
        assert_eq!(decode(&encode(&e)).unwrap(), e);
        e.trace_id = None;
        e.priority = Priority::Normal;
        assert_eq!(decode(&encode(&e)).unwrap(), e);

        let mut p = to_pb(&e);
        p.topic.clear();
        let bytes = p.encode_to_vec();
        assert!(decode(&bytes).unwrap_err().to_string().contains("no topic"));
        assert_eq!(decode_on(&t, &bytes).unwrap(), e);
    }

    #[test]
    fn timestamps_before_1970_and_bad_input() {
        for s in [
            "1969-12-31T23:59:59.5Z",
            "1970-01-01T00:00:00Z",
            "2262-01-01T00:00:00.000000001Z",
        ] {
            let t = Timestamp::parse_rfc3339(s).unwrap();
            assert_eq!(timestamp_from_pb(&timestamp_to_pb(t)).unwrap(), t, "{s}");
        }
        assert_eq!(
            timestamp_to_pb(Timestamp::parse_rfc3339("1969-12-31T23:59:59.5Z").unwrap()).seconds,
            -1
        );
        let bad = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(
            timestamp_from_pb(&bad).unwrap_err().kind(),
            ErrorKind::Decode
        );

        let e = Envelope::builder(Topic::new("a.b").unwrap(), "{}").build();
        let mut p = to_pb(&e);
        p.priority = 9;
        assert!(from_pb(p, None)
            .unwrap_err()
            .to_string()
            .contains("priority number 9"));
        let mut p = to_pb(&e);
        p.event_id.clear();
        assert_eq!(from_pb(p, None).unwrap_err().kind(), ErrorKind::Decode);
        let mut p = to_pb(&e);
        p.timestamp = None;
        assert!(from_pb(p, None)
            .unwrap_err()
            .to_string()
            .contains("no timestamp"));
        let mut p = to_pb(&e);
        p.topic = "Bad Topic".into();
        assert_eq!(from_pb(p, None).unwrap_err().kind(), ErrorKind::Decode);
        assert_eq!(
            decode(b"\xff\xff\xff").unwrap_err().kind(),
            ErrorKind::Decode
        );
    }
}
