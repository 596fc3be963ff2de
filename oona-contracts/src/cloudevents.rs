//! CloudEvents 1.0 in JSON structured mode (`application/cloudevents+json`).
//!
//! | envelope | CloudEvents attribute |
//! |---|---|
//! | `event_id` | `id` |
//! | `sender_id` | `source` (must be non-empty: a URI-reference such as `tamiyo-controller-1`) |
//! | `topic` | `type` (Oona topics are the platform's event types; see below) |
//! | `timestamp` | `time` (RFC 3339; an event without `time` reads as the time it was decoded) |
//! | `content_type` | `datacontenttype` (always written) |
//! | `schema_id` | `dataschema`: `urn:oona:schema:<schema_id>` (e.g. `urn:oona:schema:esper.v1.FieldReport/1`); an absolute URI is carried as is |
//! | `payload` | `data` when the content type is JSON and the bytes are valid JSON (embedded byte for byte); otherwise `data_base64`; absent when empty |
//! | `trace_id` | extension `traceid` |
//! | `key` | extension `partitionkey` (CloudEvents Partitioning extension) |
//! | `correlation_id` | extension `correlationid` |
//! | `priority` | extension `priority` (`low`, `high`, `emergency`; omitted when `normal`) |
//! | header `traceparent`, `tracestate` | extensions `traceparent`, `tracestate` (Distributed Tracing extension) |
//! | header `ce-subject` | `subject` |
//! | header `ce-type` | `type`, with the topic then in extension `oonatopic` |
//! | other headers whose name is a valid extension name (`[a-z0-9]{1,20}`) and not taken above | extension of the same name |
//! | remaining headers (e.g. `oona-dlq-reason`) | extension `oonaheaders`: a JSON object of them, as a string |
//!
//! **Reading a CloudEvent.** `specversion` must be `1.0`; `id`, `source` and
//! `type` are required strings; attributes with a `null` value count as
//! absent; having both `data` and `data_base64` is an error. The topic is
//! `oonatopic` when present, else `type` when it is a valid Oona topic name,
//! else the topic it was read from (argument of [`decode`]); when `type` is
//! not the topic it is kept in header `ce-type`. `data` with a non-JSON
//! content type that is a JSON string becomes that string's UTF-8 bytes
//! (the spec's `text/xml` example); with a JSON content type (or none:
//! JSON is implied) it is the JSON text as written. Unknown extensions
//! become headers (numbers and booleans as their JSON text). So
//! `decode(encode(e)) == e` for every envelope with a non-empty sender.

use std::collections::BTreeMap;

use base64::Engine as _;
use oona_core::{
    ContentType, Envelope, Error, ErrorKind, EventId, Headers, Priority, Result, Timestamp, Topic,
};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Content type of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// The CloudEvents version written and accepted.
pub const SPEC_VERSION: &str = "1.0";
/// Prefix of `dataschema` for schema ids that are not URIs.
pub const SCHEMA_URN_PREFIX: &str = "urn:oona:schema:";
/// Header carrying the CloudEvents `subject`.
pub const SUBJECT_HEADER: &str = "ce-subject";
/// Header carrying a CloudEvents `type` that is not the topic.
pub const TYPE_HEADER: &str = "ce-type";

const TRACE_ID: &str = "traceid";
const PARTITION_KEY: &str = "partitionkey";
const CORRELATION_ID: &str = "correlationid";
const PRIORITY: &str = "priority";
const TOPIC: &str = "oonatopic";
const HEADERS: &str = "oonaheaders";

/// Attribute names that headers cannot take as extensions.
const RESERVED: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
    TRACE_ID,
    PARTITION_KEY,
    CORRELATION_ID,
    PRIORITY,
    TOPIC,
    HEADERS,
];

fn is_extension_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !RESERVED.contains(&name)
}

fn dec(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Decode, msg)
}

fn schema_to_uri(id: &str) -> String {
    if !id.starts_with(SCHEMA_URN_PREFIX) && url::Url::parse(id).is_ok() {
        id.to_string()
    } else {
        format!("{SCHEMA_URN_PREFIX}{id}")
    }
}

/// Encode an envelope as a structured-mode CloudEvent (JSON, attributes in
/// name order, `data` last).
pub fn encode(env: &Envelope) -> Result<Vec<u8>> {
    if env.sender_id.is_empty() {
        return Err(Error::new(
            ErrorKind::Encode,
            format!(
                "CloudEvents requires a non-empty source: set sender_id on event {}",
                env.event_id
            ),
        ));
    }
    let mut attrs = Map::new();
    let mut put = |k: &str, v: &str| {
        attrs.insert(k.to_string(), Value::String(v.to_string()));
    };
    put("specversion", SPEC_VERSION);
    put("id", env.event_id.as_str());
    put("source", &env.sender_id);
    put("time", &env.timestamp.to_rfc3339());
    put("datacontenttype", env.content_type.as_str());
    match env.header(TYPE_HEADER) {
        Some(t) => {
            put("type", t);
            put(TOPIC, env.topic.as_str());
        }
        None => put("type", env.topic.as_str()),
    }
    if let Some(s) = env.header(SUBJECT_HEADER) {
        put("subject", s);
    }
    if let Some(id) = &env.schema_id {
        put("dataschema", &schema_to_uri(id));
    }
    if let Some(v) = &env.trace_id {
        put(TRACE_ID, v);
    }
    if let Some(v) = &env.key {
        put(PARTITION_KEY, v);
    }
    if let Some(v) = &env.correlation_id {
        put(CORRELATION_ID, v);
    }
    if env.priority != Priority::Normal {
        put(PRIORITY, env.priority.as_str());
    }
    let mut rest = BTreeMap::new();
    for (k, v) in &env.headers {
        if k == TYPE_HEADER || k == SUBJECT_HEADER {
            continue;
        }
        if is_extension_name(k) {
            put(k, v);
        } else {
            rest.insert(k.clone(), v.clone());
        }
    }
    if !rest.is_empty() {
        let s = serde_json::to_string(&rest)
            .map_err(|e| Error::new(ErrorKind::Encode, "CloudEvents headers").with_source(e))?;
        put(HEADERS, &s);
    }

    let mut out = serde_json::to_vec(&attrs)
        .map_err(|e| Error::new(ErrorKind::Encode, "CloudEvents attributes").with_source(e))?;
    if !env.payload.is_empty() {
        // Splice data in as the last member, so JSON data keeps its bytes.
        out.pop();
        if env.content_type.is_json() && serde_json::from_slice::<&RawValue>(&env.payload).is_ok() {
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(&env.payload);
        } else {
            out.extend_from_slice(b",\"data_base64\":\"");
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&env.payload)
                    .as_bytes(),
            );
            out.push(b'"');
        }
        out.push(b'}');
    }
    Ok(out)
}

fn string_attr(attrs: &BTreeMap<String, &RawValue>, name: &str) -> Result<Option<String>> {
    match attrs.get(name) {
        None => Ok(None),
        Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Null) => Ok(None),
            Ok(Value::String(s)) => Ok(Some(s)),
            Ok(other) => Err(dec(format!(
                "CloudEvents attribute {name:?} must be a string, got {other}"
            ))),
            Err(e) => Err(dec(format!("CloudEvents attribute {name:?}")).with_source(e)),
        },
    }
}

fn required(attrs: &BTreeMap<String, &RawValue>, name: &str) -> Result<String> {
    match string_attr(attrs, name)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(dec(format!(
            "CloudEvent has no {name:?} (required by CloudEvents 1.0)"
        ))),
    }
}

/// Decode a structured-mode CloudEvent read from `topic` (used when the event
/// does not name an Oona topic; see the module docs).
pub fn decode(bytes: &[u8], topic: Option<&Topic>) -> Result<Envelope> {
    let attrs: BTreeMap<String, &RawValue> = serde_json::from_slice(bytes)
        .map_err(|e| dec("message is not a JSON CloudEvent object").with_source(e))?;
    let spec = required(&attrs, "specversion")?;
    if spec != SPEC_VERSION {
        return Err(dec(format!(
            "unsupported CloudEvents specversion {spec:?} (expected \"1.0\")"
        )));
    }
    let id = EventId::parse(required(&attrs, "id")?)?;
    let source = required(&attrs, "source")?;
    let ty = required(&attrs, "type")?;
    let mut headers = Headers::new();

    let topic = match string_attr(&attrs, TOPIC)? {
        Some(t) => Topic::new(t).map_err(|e| dec(format!("CloudEvents oonatopic: {}", e.message())))?,
        None => match Topic::new(ty.as_str()) {
            Ok(t) => t,
            Err(_) => topic.cloned().ok_or_else(|| {
                dec(format!(
                    "CloudEvent type {ty:?} is not an Oona topic and no topic was given to read it on"
                ))
            })?,
        },
    };
    if ty != topic.as_str() {
        headers.insert(TYPE_HEADER.into(), ty);
    }
    if let Some(s) = string_attr(&attrs, "subject")? {
        headers.insert(SUBJECT_HEADER.into(), s);
    }
    let timestamp = match string_attr(&attrs, "time")? {
        Some(t) => Timestamp::parse_rfc3339(&t)?,
        None => Timestamp::now(),
    };
    let content_type = string_attr(&attrs, "datacontenttype")?
        .map(ContentType::new)
        .unwrap_or_default();
    let schema_id = string_attr(&attrs, "dataschema")?.map(|s| {
        s.strip_prefix(SCHEMA_URN_PREFIX)
            .map(str::to_string)
            .unwrap_or(s)
    });
    let priority = match string_attr(&attrs, PRIORITY)? {
        Some(p) => Priority::parse(&p)?,
        None => Priority::Normal,
    };
    if let Some(h) = string_attr(&attrs, HEADERS)? {
        let more: BTreeMap<String, String> = serde_json::from_str(&h).map_err(|e| {
            dec("CloudEvents oonaheaders is not a JSON object of strings").with_source(e)
        })?;
        headers.extend(more);
    }
    for (name, raw) in &attrs {
        if RESERVED.contains(&name.as_str()) {
            continue;
        }
        let v: Value = serde_json::from_str(raw.get())
            .map_err(|e| dec(format!("CloudEvents extension {name:?}")).with_source(e))?;
        let s = match v {
            Value::Null => continue,
            Value::String(s) => s,
            Value::Bool(_) | Value::Number(_) => v.to_string(),
            other => {
                return Err(dec(format!(
                "CloudEvents extension {name:?} must be a string, number or boolean, got {other}"
            )))
            }
        };
        headers.insert(name.clone(), s);
    }

    let data = attrs.get("data").filter(|r| r.get() != "null");
    let data64 = string_attr(&attrs, "data_base64")?;
    let payload: Vec<u8> = match (data, data64) {
        (Some(_), Some(_)) => return Err(dec("CloudEvent has both data and data_base64")),
        (None, None) => Vec::new(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| dec("CloudEvents data_base64 is not valid base64").with_source(e))?,
        (Some(raw), None) => {
            if !content_type.is_json() {
                match serde_json::from_str::<Value>(raw.get()) {
                    Ok(Value::String(s)) => s.into_bytes(),
                    _ => raw.get().as_bytes().to_vec(),
                }
            } else {
                raw.get().as_bytes().to_vec()
            }
        }
    };

    let mut env = Envelope::builder(topic, payload)
        .event_id(id)
        .sender_id(source)
        .timestamp(timestamp)
        .content_type(content_type)
        .priority(priority)
        .build();
    env.trace_id = string_attr(&attrs, TRACE_ID)?;
    env.key = string_attr(&attrs, PARTITION_KEY)?;
    env.correlation_id = string_attr(&attrs, CORRELATION_ID)?;
    env.schema_id = schema_id;
    env.headers = headers;
    Ok(env)
}
