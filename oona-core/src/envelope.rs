//! The fat envelope: every message is a payload wrapped in metadata.
//!
//! See [`Envelope`] for the fields and [`crate::wire::json`] for the
//! canonical JSON form.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{Error, ErrorKind, Result};
use crate::topic::Topic;

/// The idempotency key of an event.
///
/// Oona generates UUID v4 ids; ids from other producers are accepted as any
/// non-empty string of at most [`EventId::MAX_LEN`] bytes (the design notes'
/// own examples use placeholders like `"uuid-v4-string"`), so a foreign id is
/// never a reason to drop a message.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventId(Arc<str>);

impl EventId {
    /// Longest accepted id.
    pub const MAX_LEN: usize = 256;

    /// A fresh UUID v4 id.
    pub fn new() -> Self {
        EventId(uuid::Uuid::new_v4().to_string().into())
    }

    /// Accept an id from elsewhere.
    pub fn parse(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        if id.is_empty() || id.len() > Self::MAX_LEN {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "event_id must be 1 to {} bytes, got {}",
                    Self::MAX_LEN,
                    id.len()
                ),
            ));
        }
        Ok(EventId(id.into()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a UUID, when it is one.
    pub fn as_uuid(&self) -> Option<uuid::Uuid> {
        uuid::Uuid::parse_str(&self.0).ok()
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({})", self.0)
    }
}

impl TryFrom<String> for EventId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        EventId::parse(s)
    }
}

impl From<EventId> for String {
    fn from(e: EventId) -> String {
        e.0.to_string()
    }
}

impl From<uuid::Uuid> for EventId {
    fn from(u: uuid::Uuid) -> Self {
        EventId(u.to_string().into())
    }
}

/// A UTC instant with nanosecond precision, written as RFC 3339
/// (`2025-07-07T09:55:13.123456789Z`). Offsets other than `Z` are accepted on
/// input and converted to UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(SystemTime);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Timestamp(SystemTime::now())
    }

    /// From milliseconds since the Unix epoch (Redis ids, Kafka timestamps).
    pub fn from_unix_millis(ms: u64) -> Self {
        Timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Milliseconds since the Unix epoch (0 for instants before it).
    pub fn unix_millis(self) -> u64 {
        self.0
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    /// Nanoseconds since the Unix epoch (0 for instants before it).
    pub fn unix_nanos(self) -> u128 {
        self.0
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }

    /// As a `SystemTime`.
    pub fn system_time(self) -> SystemTime {
        self.0
    }

    /// Time elapsed since this instant (zero if it is in the future).
    pub fn elapsed(self) -> Duration {
        SystemTime::now().duration_since(self.0).unwrap_or_default()
    }

    /// Parse RFC 3339.
    pub fn parse_rfc3339(s: &str) -> Result<Self> {
        let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!("timestamp {s:?} is not RFC 3339"),
            )
            .with_source(e)
        })?;
        Ok(Timestamp(t.into()))
    }

    /// Format as RFC 3339 in UTC.
    pub fn to_rfc3339(self) -> String {
        let t: OffsetDateTime = self.0.into();
        // Formatting a UTC OffsetDateTime within years 0..=9999 cannot fail;
        // fall back to the epoch form for the impossible case.
        t.format(&Rfc3339)
            .unwrap_or_else(|_| format!("{}ms-since-epoch", self.unix_millis()))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Timestamp(t)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// Message priority. The prototype routes `Normal` traffic as `Emergency`
/// when queue depth passes a threshold; transports may use it for routing.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Background traffic.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Important traffic.
    High,
    /// Must go first.
    Emergency,
}

impl Priority {
    /// The wire name (`low`, `normal`, `high`, `emergency`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Emergency => "emergency",
        }
    }

    /// Parse a wire name (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            "emergency" => Ok(Priority::Emergency),
            _ => Err(Error::new(
                ErrorKind::Decode,
                format!("unknown priority {s:?} (expected low, normal, high or emergency)"),
            )),
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A MIME content type of the payload.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct ContentType(Arc<str>);

impl ContentType {
    /// `application/json`, the default.
    pub const JSON: &'static str = "application/json";
    /// `application/x-protobuf`.
    pub const PROTOBUF: &'static str = "application/x-protobuf";
    /// `application/avro` (Avro binary, single object).
    pub const AVRO: &'static str = "application/avro";
    /// `application/octet-stream`, opaque bytes.
    pub const OCTET_STREAM: &'static str = "application/octet-stream";

    /// A content type from a MIME string.
    pub fn new(mime: impl Into<String>) -> Self {
        ContentType(mime.into().into())
    }

    /// `application/json`.
    pub fn json() -> Self {
        ContentType(Self::JSON.into())
    }

    /// The MIME string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the payload is JSON (`application/json` or any `+json` type),
    /// ignoring parameters such as `; charset=utf-8`.
    pub fn is_json(&self) -> bool {
        let essence = self
            .0
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        essence == Self::JSON || essence.ends_with("+json")
    }
}

impl Default for ContentType {
    fn default() -> Self {
        Self::json()
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentType({})", self.0)
    }
}

impl From<&str> for ContentType {
    fn from(s: &str) -> Self {
        ContentType(s.into())
    }
}

impl From<String> for ContentType {
    fn from(s: String) -> Self {
        ContentType(s.into())
    }
}

impl From<ContentType> for String {
    fn from(c: ContentType) -> String {
        c.0.to_string()
    }
}

/// Free-form string headers, in a deterministic (sorted) order.
pub type Headers = BTreeMap<String, String>;

/// Header names Oona itself sets. Users may read them; user headers must not
/// start with `oona-`.
pub mod header {
    /// W3C trace context `traceparent`, carried verbatim.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace context `tracestate`, carried verbatim.
    pub const TRACESTATE: &str = "tracestate";
    /// Dead letters: why the message was dead-lettered.
    pub const DLQ_REASON: &str = "oona-dlq-reason";
    /// Dead letters: the topic the message was dead-lettered from.
    pub const DLQ_ORIGINAL_TOPIC: &str = "oona-dlq-original-topic";
    /// Dead letters: the consumer group that gave up on it.
    pub const DLQ_GROUP: &str = "oona-dlq-group";
    /// Dead letters: the delivery attempts made.
    pub const DLQ_ATTEMPTS: &str = "oona-dlq-attempts";
    /// Dead letters: when it was dead-lettered (RFC 3339).
    pub const DLQ_AT: &str = "oona-dlq-at";
    /// Dead letters: the broker's position of the original (stream id,
    /// offset, message id), when known.
    pub const DLQ_ORIGINAL_POSITION: &str = "oona-dlq-original-position";
    /// Prefix reserved for Oona's own headers.
    pub const RESERVED_PREFIX: &str = "oona-";
}

/// A message: a payload wrapped in metadata.
///
/// Build one with [`Envelope::builder`], which fills `event_id`, `timestamp`
/// and a fresh W3C trace id. Every field survives every transport unchanged
/// (conformance case `round_trip`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Envelope {
    /// Unique per event; the idempotency key.
    pub event_id: EventId,
    /// Who published (`tamiyo-controller-1`).
    pub sender_id: String,
    /// Publish time, UTC.
    pub timestamp: Timestamp,
    /// Distributed trace id (32 lower-case hex digits when Oona made it; any
    /// string from elsewhere).
    pub trace_id: Option<String>,
    /// The topic the message is published to.
    pub topic: Topic,
    /// Correlates a reply with its request.
    pub correlation_id: Option<String>,
    /// Partition / ordering key: messages with the same key keep their order.
    pub key: Option<String>,
    /// MIME type of the payload.
    pub content_type: ContentType,
    /// Schema id and version of the payload (e.g. `esper.FieldReport/1`).
    pub schema_id: Option<String>,
    /// Priority.
    pub priority: Priority,
    /// Free-form string headers (W3C `traceparent`/`tracestate` among them).
    pub headers: Headers,
    /// The event body.
    pub payload: Bytes,
}

impl Envelope {
    /// Start an envelope for `topic` with `payload`.
    pub fn builder(topic: Topic, payload: impl Into<Bytes>) -> EnvelopeBuilder {
        EnvelopeBuilder {
            env: Envelope {
                event_id: EventId::new(),
                sender_id: String::new(),
                timestamp: Timestamp::now(),
                trace_id: Some(new_trace_id()),
                topic,
                correlation_id: None,
                key: None,
                content_type: ContentType::json(),
                schema_id: None,
                priority: Priority::Normal,
                headers: Headers::new(),
                payload: payload.into(),
            },
        }
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// An approximate size in bytes (payload plus metadata), used for limits.
    pub fn approx_size(&self) -> usize {
        self.payload.len()
            + self.sender_id.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 128
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("event_id", &self.event_id)
            .field("sender_id", &self.sender_id)
            .field("timestamp", &self.timestamp)
            .field("trace_id", &self.trace_id)
            .field("topic", &self.topic)
            .field("correlation_id", &self.correlation_id)
            .field("key", &self.key)
            .field("content_type", &self.content_type)
            .field("schema_id", &self.schema_id)
            .field("priority", &self.priority)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A fresh W3C trace id: 16 random bytes as 32 lower-case hex digits.
pub fn new_trace_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Builds an [`Envelope`]; see [`Envelope::builder`].
#[derive(Debug, Clone)]
pub struct EnvelopeBuilder {
    env: Envelope,
}

impl EnvelopeBuilder {
    /// Set the event id (default: a fresh UUID v4).
    pub fn event_id(mut self, id: EventId) -> Self {
        self.env.event_id = id;
        self
    }
    /// Set the sender.
    pub fn sender_id(mut self, sender: impl Into<String>) -> Self {
        self.env.sender_id = sender.into();
        self
    }
    /// Set the timestamp (default: now).
    pub fn timestamp(mut self, t: Timestamp) -> Self {
        self.env.timestamp = t;
        self
    }
    /// Set the trace id (default: a fresh W3C trace id).
    pub fn trace_id(mut self, id: impl Into<String>) -> Self {
        self.env.trace_id = Some(id.into());
        self
    }
    /// Carry a W3C `traceparent` (and its trace id).
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        let tp = traceparent.into();
        // traceparent = version "-" trace-id "-" parent-id "-" flags
        if let Some(trace) = tp.split('-').nth(1) {
            self.env.trace_id = Some(trace.to_string());
        }
        self.env.headers.insert(header::TRACEPARENT.into(), tp);
        self
    }
    /// Set the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.env.correlation_id = Some(id.into());
        self
    }
    /// Set the partition / ordering key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.env.key = Some(key.into());
        self
    }
    /// Set the content type (default `application/json`).
    pub fn content_type(mut self, ct: impl Into<ContentType>) -> Self {
        self.env.content_type = ct.into();
        self
    }
    /// Set the schema id.
    pub fn schema_id(mut self, id: impl Into<String>) -> Self {
        self.env.schema_id = Some(id.into());
        self
    }
    /// Set the priority.
    pub fn priority(mut self, p: Priority) -> Self {
        self.env.priority = p;
        self
    }
    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.headers.insert(name.into(), value.into());
        self
    }
    /// Finish.
    pub fn build(self) -> Envelope {
        self.env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_fills_id_time_and_trace() {
        let t = Topic::new("system.events.epoch").unwrap();
        let e = Envelope::builder(t.clone(), "{}")
            .sender_id("tolaria")
            .build();
        assert!(e
            .event_id
            .as_uuid()
            .is_some_and(|u| u.get_version_num() == 4));
        assert_eq!(e.trace_id.as_deref().map(str::len), Some(32));
        assert!(e.timestamp.elapsed() < Duration::from_secs(5));
        assert_eq!(e.topic, t);
        assert!(e.content_type.is_json());
    }

    #[test]
    fn traceparent_sets_trace_id() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let e = Envelope::builder(Topic::new("a.b").unwrap(), "")
            .traceparent(tp)
            .build();
        assert_eq!(
            e.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(e.header(header::TRACEPARENT), Some(tp));
    }

    #[test]
    fn timestamps_round_trip_and_accept_offsets() {
        let t = Timestamp::parse_rfc3339("2025-07-07T09:55:13Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2025-07-07T09:55:13Z");
        let t2 = Timestamp::parse_rfc3339("2025-07-07T11:55:13+02:00").unwrap();
        assert_eq!(t, t2);
        let now = Timestamp::now();
        assert_eq!(Timestamp::parse_rfc3339(&now.to_rfc3339()).unwrap(), now);
        assert_eq!(Timestamp::from_unix_millis(1500).unix_millis(), 1500);
        assert_eq!(
            Timestamp::parse_rfc3339("yesterday").unwrap_err().kind(),
            ErrorKind::Decode
        );
    }

    #[test]
    fn content_type_json_detection() {
        assert!(ContentType::new("application/json; charset=utf-8").is_json());
        assert!(ContentType::new("application/cloudevents+json").is_json());
        assert!(!ContentType::new(ContentType::PROTOBUF).is_json());
    }

    #[test]
    fn priority_names() {
        for p in [
            Priority::Low,
            Priority::Normal,
            Priority::High,
            Priority::Emergency,
        ] {
            assert_eq!(Priority::parse(p.as_str()).unwrap(), p);
        }
        assert!(Priority::parse("urgent").is_err());
    }
}
