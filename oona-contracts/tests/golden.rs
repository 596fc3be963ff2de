//! Golden wire samples: encode output must equal the checked-in files byte
//! for byte, and the files must decode to the samples. An intended format
//! change is recorded with `OONA_BLESS=1 cargo test -p oona-contracts --test
//! golden`, which rewrites the files (review the diff before committing).

mod common;

use std::fmt::Debug;
use std::path::PathBuf;

use oona_contracts::*;
use oona_core::{Codec, ContentType, Envelope, EventId, Priority, Timestamp};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

fn blessing() -> bool {
    std::env::var("OONA_BLESS").is_ok_and(|v| v == "1")
}

/// Compare `bytes` with the golden file (or rewrite it when blessing) and
/// return the file's content.
fn golden(rel: &str, bytes: &[u8]) -> Vec<u8> {
    let path = dir().join(rel);
    if blessing() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with OONA_BLESS=1 to create it)",
            path.display()
        )
    });
    assert!(
        want == bytes,
        "{rel}: encoding differs from the golden file; if the change is intended, run OONA_BLESS=1 cargo test -p oona-contracts --test golden\n  got:  {}\n  want: {}",
        String::from_utf8_lossy(bytes),
        String::from_utf8_lossy(&want)
    );
    want
}

fn envelope_of(payload: &[u8], ct: &str, schema: &str, topic: oona_core::Topic) -> Envelope {
    Envelope::builder(topic, payload.to_vec())
        .content_type(ct)
        .schema_id(schema)
        .build()
}

fn contract<T: Message + Debug>(value: T) {
    let name = T::SCHEMA;
    let reader = AnyCodec::default();

    let json = golden(
        &format!("json/{name}.json"),
        &Codec::<T>::encode(&AnyCodec::json(), &value).unwrap(),
    );
    let env = envelope_of(&json, ContentType::JSON, &T::schema_id(), T::topic());
    assert_eq!(Codec::<T>::decode(&reader, &env).unwrap(), value);

    let pb = golden(
        &format!("protobuf/{name}.binpb"),
        &Codec::<T>::encode(&Protobuf, &value).unwrap(),
    );
    let env = envelope_of(&pb, ContentType::PROTOBUF, &T::schema_id(), T::topic());
    assert_eq!(Codec::<T>::decode(&reader, &env).unwrap(), value);

    let avro = golden(
        &format!("avro/{name}.avro"),
        &Codec::<T>::encode(&Avro::new(), &value).unwrap(),
    );
    let env = envelope_of(&avro, ContentType::AVRO, &T::schema_id(), T::topic());
    assert_eq!(Codec::<T>::decode(&reader, &env).unwrap(), value);

    // The Avro schema, pretty-printed, for non-Rust readers (fastavro).
    let schema: serde_json::Value = serde_json::from_str(T::AVRO_SCHEMA).unwrap();
    let mut pretty = serde_json::to_vec_pretty(&schema).unwrap();
    pretty.push(b'\n');
    golden(&format!("avro/{name}.avsc"), &pretty);
}

#[test]
fn contracts_match_golden_files() {
    each_sample!(contract);
}

/// A fixed envelope with every field set.
fn sample_envelope() -> Envelope {
    let payload = Codec::<FieldReport>::encode(&AnyCodec::json(), &common::field_report()).unwrap();
    Envelope::builder(FieldReport::topic(), payload)
        .event_id(EventId::parse("1b4e28ba-2fa1-41d2-883f-0016d3cca427").unwrap())
        .sender_id("tamiyo-controller-1")
        .timestamp(Timestamp::parse_rfc3339("2025-07-07T09:55:13.123456789Z").unwrap())
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .correlation_id("corr-42")
        .key("layer-12")
        .schema_id(FieldReport::schema_id())
        .priority(Priority::High)
        .header("tenant", "esper-dev")
        .header("oona-dlq-reason", "none")
        .build()
}

#[test]
fn envelope_matches_golden_files() {
    let env = sample_envelope();

    let json = golden(
        "envelope/envelope.json",
        &oona_core::wire::json::encode(&env).unwrap(),
    );
    assert_eq!(oona_core::wire::json::decode(&json).unwrap(), env);

    let pb = golden("envelope/envelope.binpb", &envelope_pb::encode(&env));
    assert_eq!(envelope_pb::decode(&pb).unwrap(), env);

    // A protobuf payload inside the JSON envelope travels as base64.
    let mut bin = env.clone();
    bin.payload = Codec::<FieldReport>::encode(&Protobuf, &common::field_report()).unwrap();
    bin.content_type = ContentType::new(ContentType::PROTOBUF);
    let json = golden(
        "envelope/envelope_protobuf_payload.json",
        &oona_core::wire::json::encode(&bin).unwrap(),
    );
    assert_eq!(oona_core::wire::json::decode(&json).unwrap(), bin);

    let ce = golden(
        "cloudevents/envelope.json",
        &cloudevents::encode(&env).unwrap(),
    );
    assert_eq!(cloudevents::decode(&ce, None).unwrap(), env);
    let ce = golden(
        "cloudevents/envelope_protobuf_payload.json",
        &cloudevents::encode(&bin).unwrap(),
    );
    assert_eq!(cloudevents::decode(&ce, None).unwrap(), bin);
}
