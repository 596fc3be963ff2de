//! CloudEvents 1.0 structured mode: spec-conformant sample events (written
//! after the examples of the CloudEvents JSON format specification, in
//! tests/golden/cloudevents/spec/, plus two written by the Python SDK),
//! round trips and errors.

use std::path::PathBuf;

use oona_contracts::cloudevents;
use oona_core::{ContentType, Envelope, ErrorKind, EventId, Priority, Timestamp, Topic};

fn sample(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/cloudevents/spec")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Decoding, encoding and decoding again gives the same envelope.
fn stable(env: &Envelope) {
    let again = cloudevents::decode(&cloudevents::encode(env).unwrap(), None).unwrap();
    assert_eq!(&again, env);
}

#[test]
fn spec_json_data_example() {
    let e = cloudevents::decode(&sample("json_data.json"), None).unwrap();
    assert_eq!(e.event_id.as_str(), "C234-1234-1234");
    assert_eq!(e.sender_id, "/mycontext");
    // The type is a valid topic name, so it is the topic.
    assert_eq!(e.topic.as_str(), "com.example.someevent");
    assert_eq!(e.timestamp.to_rfc3339(), "2018-04-05T17:31:00Z");
    assert_eq!(e.content_type.as_str(), "application/json");
    // `data` is kept as written.
    assert!(
        e.payload.starts_with(b"{\n        \"appinfoA\" : \"abc\""),
        "{:?}",
        e.payload
    );
    let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
    assert_eq!(v["appinfoB"], 123);
    // Extensions become headers; null `subject` counts as absent.
    assert_eq!(e.header("comexampleextension1"), Some("value"));
    assert_eq!(e.header("comexampleothervalue"), Some("5"));
    assert_eq!(e.header("ce-subject"), None);
    assert_eq!(e.trace_id, None);
    assert_eq!(e.priority, Priority::Normal);
    stable(&e);
}

#[test]
fn spec_binary_and_text_examples() {
    let e = cloudevents::decode(&sample("binary_data.json"), None).unwrap();
    assert_eq!(&e.payload[..], &[0u8, 1, 2, 3, 254, 255][..]);
    assert_eq!(
        e.content_type.as_str(),
        "application/vnd.apache.thrift.binary"
    );
    stable(&e);

    let e = cloudevents::decode(&sample("text_data.json"), None).unwrap();
    assert_eq!(&e.payload[..], br#"<much wow="xml"/>"#);
    assert_eq!(e.content_type.as_str(), "text/xml");
    assert_eq!(e.header("unsetextension"), None);
    stable(&e);
}

#[test]
fn spec_minimal_and_extension_examples() {
    // Only the required attributes: no time (reads as now), no data.
    let before = Timestamp::now();
    let e = cloudevents::decode(&sample("minimal.json"), None).unwrap();
    assert!(e.timestamp >= before);
    assert!(e.payload.is_empty());
    assert_eq!(e.topic.as_str(), "com.github.pull_request.opened");
    stable(&e);

    let e = cloudevents::decode(&sample("extensions.json"), None).unwrap();
    assert_eq!(e.header("ce-subject"), Some("mynewfile.jpg"));
    assert_eq!(
        e.schema_id.as_deref(),
        Some("https://example.com/schemas/object-deleted.json")
    );
    assert_eq!(e.key.as_deref(), Some("container-7"));
    assert_eq!(
        e.header("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(e.header("tracestate"), Some("rojo=00f067aa0ba902b7"));
    assert_eq!(e.timestamp.to_rfc3339(), "2018-04-05T17:31:00.123Z");
    stable(&e);
    // Encoding writes the same attributes back.
    let v: serde_json::Value = serde_json::from_slice(&cloudevents::encode(&e).unwrap()).unwrap();
    assert_eq!(v["subject"], "mynewfile.jpg");
    assert_eq!(
        v["dataschema"],
        "https://example.com/schemas/object-deleted.json"
    );
    assert_eq!(v["partitionkey"], "container-7");
    assert_eq!(v["type"], "com.example.object.deleted.v2");
    assert_eq!(v["data"]["size"], 1024);
}

#[test]
fn a_type_that_is_not_a_topic_needs_one() {
    let doc =
        br#"{"specversion":"1.0","type":"com.Example.Thing","source":"s","id":"1","data":{"a":1}}"#;
    let e = cloudevents::decode(doc, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode);
    assert!(e.to_string().contains("not an Oona topic"), "{e}");
    let t = Topic::new("innovation.field_reports").unwrap();
    let e = cloudevents::decode(doc, Some(&t)).unwrap();
    assert_eq!(e.topic, t);
    assert_eq!(e.header("ce-type"), Some("com.Example.Thing"));
    // Re-encoding restores the type and names the topic in `oonatopic`.
    let v: serde_json::Value = serde_json::from_slice(&cloudevents::encode(&e).unwrap()).unwrap();
    assert_eq!(v["type"], "com.Example.Thing");
    assert_eq!(v["oonatopic"], "innovation.field_reports");
    stable(&e);
}

#[test]
fn every_envelope_field_round_trips() {
    let t = Topic::new("system.events.rollback").unwrap();
    let mut e = Envelope::builder(t, vec![0u8, 159, 146, 150])
        .event_id(EventId::parse("e-1").unwrap())
        .sender_id("tolaria-1")
        .timestamp(Timestamp::parse_rfc3339("2025-07-07T09:55:13.000000001Z").unwrap())
        .correlation_id("c-1")
        .key("run-1")
        .content_type(ContentType::AVRO)
        .schema_id("urn:oona:schema:odd")
        .priority(Priority::Emergency)
        .header("ce-subject", "run-1/epoch-44")
        .header("id", "a header named like an attribute")
        .header("oona-dlq-reason", "decode: bad")
        .header("Tenant-X", "t")
        .header("tenant", "esper")
        .build();
    stable(&e);
    let v: serde_json::Value = serde_json::from_slice(&cloudevents::encode(&e).unwrap()).unwrap();
    assert_eq!(v["priority"], "emergency");
    assert_eq!(v["tenant"], "esper");
    assert_eq!(v["subject"], "run-1/epoch-44");
    assert!(v.get("data").is_none() && v["data_base64"] == "AJ+Slg==");
    assert_eq!(v["dataschema"], "urn:oona:schema:urn:oona:schema:odd");
    let hidden: serde_json::Value =
        serde_json::from_str(v["oonaheaders"].as_str().unwrap()).unwrap();
    assert_eq!(hidden["Tenant-X"], "t");
    assert_eq!(hidden["id"], "a header named like an attribute");

    e.payload = bytes::Bytes::new();
    e.trace_id = None;
    e.schema_id = Some("https://example.com/s.json".into());
    stable(&e);
    e.content_type = ContentType::json();
    e.payload = "not json {".into();
    stable(&e);
    // JSON payloads are embedded, not base64.
    let env = Envelope::builder(Topic::new("a.b").unwrap(), r#"{"x": [1, 2]}"#)
        .sender_id("s")
        .build();
    let text = String::from_utf8(cloudevents::encode(&env).unwrap()).unwrap();
    assert!(text.ends_with(r#","data":{"x": [1, 2]}}"#), "{text}");
    stable(&env);
}

#[test]
fn non_conformant_events_are_decode_errors() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"specversion":"1.0","type":"a.b","source":"s"}"#,
            "no \"id\"",
        ),
        (
            r#"{"specversion":"1.0","type":"a.b","id":"1"}"#,
            "no \"source\"",
        ),
        (
            r#"{"specversion":"1.0","source":"s","id":"1"}"#,
            "no \"type\"",
        ),
        (
            r#"{"type":"a.b","source":"s","id":"1"}"#,
            "no \"specversion\"",
        ),
        (
            r#"{"specversion":"0.3","type":"a.b","source":"s","id":"1"}"#,
            "unsupported CloudEvents specversion",
        ),
        (
            r#"{"specversion":"1.0","type":"a.b","source":"s","id":"1","data":1,"data_base64":"AA=="}"#,
            "both data and data_base64",
        ),
        (
            r#"{"specversion":"1.0","type":"a.b","source":"s","id":"1","time":"yesterday"}"#,
            "RFC 3339",
        ),
        (
            r#"{"specversion":"1.0","type":"a.b","source":"s","id":"1","ext":{"a":1}}"#,
            "must be a string, number or boolean",
        ),
        (
            r#"{"specversion":"1.0","type":"a.b","source":"s","id":"1","priority":"urgent"}"#,
            "unknown priority",
        ),
        (
            r#"{"specversion":"1.0","type":"a.b","source":"s","id":"1","data_base64":"!!"}"#,
            "not valid base64",
        ),
        (
            r#"{"specversion":"1.0","type":"a.b","source":"s","id":7}"#,
            "must be a string",
        ),
        (r#"[1,2]"#, "not a JSON CloudEvent object"),
    ];
    for (doc, why) in cases {
        let e = cloudevents::decode(doc.as_bytes(), None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode, "{doc}");
        assert!(e.to_string().contains(why), "{doc}: {e}");
    }
    let no_sender = Envelope::builder(Topic::new("a.b").unwrap(), "{}").build();
    assert_eq!(
        cloudevents::encode(&no_sender).unwrap_err().kind(),
        ErrorKind::Encode
    );
}

/// Events written by the CloudEvents Python SDK (2.2, `to_structured`),
/// stored as produced.
#[test]
fn python_sdk_events() {
    let e = cloudevents::decode(&sample("python_sdk_json.json"), None).unwrap();
    assert_eq!(e.topic.as_str(), "innovation.field_reports");
    assert_eq!(e.sender_id, "py-producer");
    assert_eq!(e.key.as_deref(), Some("k1"));
    assert_eq!(e.trace_id, None);
    assert_eq!(
        e.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert!(e.content_type.is_json());
    let r: oona_contracts::FieldReport = serde_json::from_slice(&e.payload).unwrap();
    assert_eq!(r.blueprint_id, "b1");
    assert_eq!(r.outcome(), oona_contracts::BlueprintOutcome::Culled);
    stable(&e);

    let e = cloudevents::decode(&sample("python_sdk_binary.json"), None).unwrap();
    assert_eq!(&e.payload[..], &[0u8, 1, 255][..]);
    assert_eq!(e.content_type.as_str(), "application/x-protobuf");
    stable(&e);
}
