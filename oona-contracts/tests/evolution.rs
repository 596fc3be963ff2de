//! Schema evolution between writer and reader versions of FieldReport, in
//! both directions, for protobuf and Avro: a field added, a field removed, a
//! field renamed (with its old name kept as an alias); and the compatibility
//! checks, which must pass those and flag an incompatible change.
//!
//! Version 1 is the real contract (generated Rust type); each version 2 is a
//! .proto under tests/evolution/<case>/, compiled here with protox and
//! handled through reflection (protobuf) or its generated Avro schema.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use oona_contracts::avro::{self, AvroRegistry};
use oona_contracts::compat;
use oona_contracts::*;
use oona_core::{Codec, ContentType, Envelope};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value as PbValue};

fn v2_pool(case: &str) -> DescriptorPool {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut c = protox::Compiler::new([
        root.join("tests").join("evolution").join(case),
        root.join("..").join("proto"),
    ])
    .unwrap();
    c.include_imports(true).include_source_info(true);
    c.open_file("field_report.proto").unwrap();
    c.descriptor_pool()
}

fn v2(case: &str) -> MessageDescriptor {
    v2_pool(case)
        .get_message_by_name("esper.v1.FieldReport")
        .unwrap()
}

fn v1() -> MessageDescriptor {
    descriptors::descriptor_pool()
        .unwrap()
        .get_message_by_name("esper.v1.FieldReport")
        .unwrap()
}

fn v1_avro() -> Schema {
    avro::parse_schema(FieldReport::AVRO_SCHEMA).unwrap()
}

fn v2_avro(case: &str) -> Schema {
    let json = avro_schema::avro_schema(&v2(case)).unwrap();
    avro::parse_schema(&json.to_string()).unwrap()
}

fn sample_bytes() -> Vec<u8> {
    common::field_report().encode_to_vec()
}

/// A version-2 message decoded from version-1 bytes.
fn pb_v1_to_v2(case: &str) -> DynamicMessage {
    DynamicMessage::decode(v2(case), &sample_bytes()[..]).unwrap()
}

fn f64_of(m: &DynamicMessage, name: &str) -> f64 {
    m.get_field_by_name(name).unwrap().as_f64().unwrap()
}

fn str_of(m: &DynamicMessage, name: &str) -> String {
    m.get_field_by_name(name)
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// Version-1 data, written with the v1 Avro schema, read with `reader`.
fn avro_v1_to(reader: &Schema) -> Vec<(String, AvroValue)> {
    let codec = Avro::new();
    let bytes = Codec::<FieldReport>::encode(&codec, &common::field_report()).unwrap();
    match avro::decode_single_object(codec.registry(), &bytes, reader).unwrap() {
        AvroValue::Record(fields) => fields,
        other => panic!("not a record: {other:?}"),
    }
}

fn field<'a>(rec: &'a [(String, AvroValue)], name: &str) -> &'a AvroValue {
    &rec.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no field {name}"))
        .1
}

/// Version-2 data (the sample as JSON, edited by `edit`) written with the v2
/// Avro schema and read as the version-1 Rust type.
fn avro_v2_to_v1(
    case: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> FieldReport {
    let schema = v2_avro(case);
    let mut json = serde_json::to_value(common::field_report()).unwrap();
    edit(json.as_object_mut().unwrap());
    let payload = avro::value_to_single_object(&schema, AvroValue::from(json)).unwrap();
    let registry = Arc::new(AvroRegistry::new());
    registry.register(schema);
    let env = Envelope::builder(FieldReport::topic(), payload)
        .content_type(ContentType::AVRO)
        .schema_id("esper.v1.FieldReport/2")
        .build();
    AnyCodec::default()
        .with_avro(Avro::with_registry(registry))
        .decode(&env)
        .unwrap()
}

#[test]
fn protobuf_field_added() {
    // Old writer, new reader: the new fields read as their defaults.
    let m = pb_v1_to_v2("added");
    assert_eq!(str_of(&m, "report_id"), common::field_report().report_id);
    assert_eq!(f64_of(&m, "confidence"), 0.0);
    assert!(!m.has_field_by_name("tags"));
    // New writer, old reader: the new fields are skipped, the rest intact.
    let mut m = m;
    m.set_field_by_name("confidence", PbValue::F64(0.9));
    m.set_field_by_name("tags", PbValue::List(vec![PbValue::String("x".into())]));
    let old = FieldReport::decode(&m.encode_to_vec()[..]).unwrap();
    assert_eq!(old, common::field_report());
}

#[test]
fn protobuf_field_removed() {
    // Old writer, new reader: `notes` is an unknown field, the rest reads.
    let m = pb_v1_to_v2("removed");
    assert!(m.get_field_by_name("notes").is_none());
    assert_eq!(f64_of(&m, "observed_improvement"), 0.125);
    // New writer, old reader: `notes` reads as its default.
    let m = DynamicMessage::decode(v2("removed"), &m.encode_to_vec()[..]).unwrap();
    let mut bytes = Vec::new();
    // Re-encode without the unknown field to be a genuine v2 writer.
    let mut fresh = DynamicMessage::new(v2("removed"));
    for f in v2("removed").fields() {
        if m.has_field(&f) {
            fresh.set_field(&f, m.get_field(&f).into_owned());
        }
    }
    fresh.encode(&mut bytes).unwrap();
    let old = FieldReport::decode(&bytes[..]).unwrap();
    let mut want = common::field_report();
    want.notes.clear();
    assert_eq!(old, want);
}

#[test]
fn protobuf_field_renamed() {
    // Protobuf binary matches by number: a rename is invisible both ways.
    let mut m = pb_v1_to_v2("renamed");
    assert_eq!(f64_of(&m, "accuracy_delta"), 0.125);
    m.set_field_by_name("accuracy_delta", PbValue::F64(0.5));
    let old = FieldReport::decode(&m.encode_to_vec()[..]).unwrap();
    assert_eq!(old.observed_improvement, 0.5);
}

#[test]
fn avro_field_added() {
    let rec = avro_v1_to(&v2_avro("added"));
    assert_eq!(field(&rec, "confidence"), &AvroValue::Double(0.0));
    assert_eq!(field(&rec, "tags"), &AvroValue::Array(vec![]));
    assert_eq!(
        field(&rec, "notes"),
        &AvroValue::String("stable after grafting".into())
    );
    let old = avro_v2_to_v1("added", |j| {
        j.insert("confidence".into(), 0.9.into());
        j.insert("tags".into(), serde_json::json!(["x"]));
    });
    assert_eq!(old, common::field_report());
}

#[test]
fn avro_field_removed() {
    let rec = avro_v1_to(&v2_avro("removed"));
    assert!(rec.iter().all(|(n, _)| n != "notes"));
    assert_eq!(field(&rec, "epoch"), &AvroValue::Long(50));
    let old = avro_v2_to_v1("removed", |j| {
        j.remove("notes");
    });
    let mut want = common::field_report();
    want.notes.clear();
    assert_eq!(old, want);
}

#[test]
fn avro_field_renamed_with_alias() {
    let new = v2_avro("renamed");
    // Old writer, new reader: the reader's alias finds the old field.
    let rec = avro_v1_to(&new);
    assert_eq!(field(&rec, "accuracy_delta"), &AvroValue::Double(0.125));
    // New writer, old reader: the writer's alias names the old field (the
    // Oona extension of Avro resolution, see oona_contracts::avro).
    let old = avro_v2_to_v1("renamed", |j| {
        let v = j.remove("observed_improvement").unwrap();
        assert_eq!(v, 0.125);
        j.insert("accuracy_delta".into(), 0.5.into());
    });
    let mut want = common::field_report();
    want.observed_improvement = 0.5;
    assert_eq!(old, want);

    // Without the alias-aware step, apache-avro alone would lose the value:
    // that is why the codec renames first.
    let codec = Avro::new();
    let bytes = Codec::<FieldReport>::encode(&codec, &common::field_report()).unwrap();
    let (_, datum) = avro::split_header(&bytes).unwrap();
    let raw = apache_avro::from_avro_datum(&v1_avro(), &mut &datum[..], Some(&new)).unwrap();
    let AvroValue::Record(fields) = raw else {
        panic!()
    };
    assert_eq!(field(&fields, "accuracy_delta"), &AvroValue::Double(0.0));
}

#[test]
fn former_names_reach_json_and_avro() {
    // HealthSignal.execution_latency_ms was the prototype's execution_latency.
    let s: HealthSignal =
        serde_json::from_str(r#"{"execution_latency": 2.5, "seed_id": 3}"#).unwrap();
    assert_eq!(s.execution_latency_ms, 2.5);
    assert_eq!(s.seed_id, 3);
    let schema: serde_json::Value = serde_json::from_str(LayerHealthReport::AVRO_SCHEMA).unwrap();
    let text = schema.to_string();
    assert!(
        text.contains(r#""aliases":["execution_latency"]"#),
        "{text}"
    );
}

#[test]
fn compatible_changes_pass_the_checks() {
    let old_avro = v1_avro();
    for case in ["added", "removed", "renamed"] {
        let pb = compat::protobuf_message(&v1(), &v2(case));
        assert!(pb.is_compatible(), "{case}: {pb}");
        assert_eq!(pb.issues, vec![], "{case}: {pb}");
        let av = compat::avro_full(&old_avro, &v2_avro(case));
        assert!(av.is_compatible(), "{case}: {av}");
    }
    // The whole current tree is compatible with itself.
    let pool = descriptors::descriptor_pool().unwrap();
    assert_eq!(
        compat::protobuf_pools(pool, pool, &["esper.v1", "oona.v1"]).issues,
        vec![]
    );
}

#[test]
fn a_rename_without_alias_is_a_warning() {
    let r = compat::protobuf_message(&v1(), &v2("renamed_without_alias"));
    assert!(r.is_compatible(), "{r}");
    let w: Vec<_> = r.warnings().collect();
    assert_eq!(w.len(), 1, "{r}");
    assert!(w[0].message.contains("renamed to accuracy_delta"), "{r}");
}

#[test]
fn an_incompatible_change_is_flagged() {
    let r = compat::protobuf_message(&v1(), &v2("incompatible"));
    assert!(!r.is_compatible());
    let msgs: Vec<String> = r.breaking().map(|i| i.message.clone()).collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("layer_id (4) changed type from uint32 to string")),
        "{r}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("notes (12) changed type from string to int64")),
        "{r}"
    );
    assert!(r
        .issues
        .iter()
        .all(|i| i.path.starts_with("esper.v1.FieldReport")));

    let av = compat::avro_full(&v1_avro(), &v2_avro("incompatible"));
    assert!(!av.is_compatible(), "{av}");
    assert_eq!(av.breaking().count(), 2, "both directions fail: {av}");

    // And the Avro codec refuses such data instead of misreading it.
    let schema = v2_avro("incompatible");
    let mut json = serde_json::to_value(common::field_report()).unwrap();
    json["layer_id"] = "twelve".into();
    json.as_object_mut().unwrap().remove("notes");
    json["review_epoch"] = 3.into();
    let payload = avro::value_to_single_object(&schema, AvroValue::from(json)).unwrap();
    let registry = Arc::new(AvroRegistry::new());
    registry.register(schema);
    let env = Envelope::builder(FieldReport::topic(), payload)
        .content_type(ContentType::AVRO)
        .build();
    let e = Codec::<FieldReport>::decode(&Avro::with_registry(registry), &env).unwrap_err();
    assert_eq!(e.kind(), oona_core::ErrorKind::Decode, "{e}");
}

#[test]
fn reserved_numbers_and_names_protect_removed_fields() {
    // v2 "removed" reserves 12 and "notes"; a v3 that reuses them breaks.
    let removed = v2("removed");
    let reuse = v2("incompatible");
    let r = compat::protobuf_message(&removed, &reuse);
    assert!(
        r.breaking()
            .any(|i| i.message.contains("reuses reserved number 12")),
        "{r}"
    );
    // Removing without reserving is breaking on its own.
    let r = compat::protobuf_message(&v2("added"), &v1());
    let msgs: Vec<_> = r.breaking().map(|i| i.message.clone()).collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("confidence (13) removed without `reserved 13`")),
        "{r}"
    );
}

/// Compile a one-file proto given as text (package `t`).
fn pool_of(tag: &str, src: &str) -> DescriptorPool {
    let dir = std::env::temp_dir().join(format!("oona-contracts-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("t.proto"), src).unwrap();
    let mut c = protox::Compiler::new([&dir]).unwrap();
    c.open_file("t.proto").unwrap();
    let pool = c.descriptor_pool();
    std::fs::remove_dir_all(&dir).unwrap();
    pool
}

#[test]
fn protobuf_checks_cover_moves_enums_and_required() {
    let old = pool_of(
        "old",
        r#"syntax = "proto2"; package t;
           enum E { E_A = 0; E_B = 1; E_C = 2; }
           message M { optional string a = 1; optional E e = 2; repeated int32 r = 3; }"#,
    );
    let new = pool_of(
        "new",
        r#"syntax = "proto2"; package t;
           enum E { E_A = 0; E_BEE = 1; E_C = 3; }
           message M { optional string a = 4; optional E e = 2; optional int32 r = 3; required int64 q = 5; }"#,
    );
    let r = compat::protobuf_pools(&old, &new, &["t"]);
    let text = r.to_string();
    for want in [
        "field a moved from number 1 to 4",
        "field r (3) changed from repeated to singular",
        "new field q is required",
        "enum value E_B (1) renamed to E_BEE",
        "enum value E_C renumbered from 2 to 3",
    ] {
        assert!(
            r.breaking().any(|i| i.message.contains(want)),
            "missing {want:?} in:\n{text}"
        );
    }
    assert!(!r.is_compatible());
    // A message the new version dropped is breaking too.
    let gone = pool_of(
        "gone",
        r#"syntax = "proto3"; package t; enum E { E_A = 0; }"#,
    );
    let r = compat::protobuf_pools(&old, &gone, &["t"]);
    assert!(
        r.breaking()
            .any(|i| i.path == "t.M" && i.message == "message removed"),
        "{r}"
    );
}
