//! Every contract through every codec, decoding by content type, and the
//! errors a consumer must get (which dead-letter in the runner).

mod common;

use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};

use oona_contracts::*;
use oona_core::{Codec, ContentType, Envelope, ErrorKind, Json};

static VISITED: AtomicUsize = AtomicUsize::new(0);

fn envelope<T: Message, C: Codec<T>>(codec: &C, value: &T) -> Envelope {
    let mut b = Envelope::builder(T::topic(), codec.encode(value).unwrap())
        .sender_id("test")
        .content_type(codec.content_type());
    if let Some(id) = codec.schema_id() {
        b = b.schema_id(id);
    }
    b.build()
}

fn round_trip<T: Message + Debug>(value: T) {
    VISITED.fetch_add(1, Ordering::SeqCst);
    let reader = DecodeByContentType::default();
    for (codec, ct) in [
        (AnyCodec::json(), "application/json"),
        (AnyCodec::protobuf(), "application/x-protobuf"),
        (AnyCodec::avro(), "application/avro"),
    ] {
        let env = envelope(&codec, &value);
        assert_eq!(env.content_type.as_str(), ct);
        assert_eq!(env.schema_id.as_deref(), Some(T::schema_id().as_str()));
        assert_eq!(env.topic.as_str(), T::TOPIC.as_str());
        // The reader decodes whatever was written, by content type.
        let back: T = reader.decode(&env).unwrap();
        assert_eq!(back, value, "{} via {ct}", T::SCHEMA);
    }
    // The specific codecs agree with AnyCodec.
    let env = envelope(&Protobuf, &value);
    assert_eq!(Codec::<T>::decode(&Protobuf, &env).unwrap(), value);
    let avro = Avro::new();
    let env = envelope(&avro, &value);
    assert_eq!(Codec::<T>::decode(&avro, &env).unwrap(), value);
    // oona-core's plain JSON codec reads the same JSON.
    let env = envelope(&Json, &value);
    assert_eq!(Codec::<T>::decode(&Json, &env).unwrap(), value);
    assert_eq!(reader.decode(&env).map(|v: T| v == value).ok(), Some(true));
}

#[test]
fn every_contract_round_trips_through_every_codec() {
    each_sample!(round_trip);
    assert_eq!(VISITED.load(Ordering::SeqCst), common::SAMPLES);
    assert_eq!(contracts().len(), common::SAMPLES);
}

#[test]
fn json_uses_enum_names_and_snake_case_fields() {
    let v: serde_json::Value = serde_json::to_value(common::field_report()).unwrap();
    assert_eq!(v["outcome"], "BLUEPRINT_OUTCOME_FOSSILIZED");
    assert_eq!(v["pre_metrics"]["val_loss"], 0.5);
    let v: serde_json::Value = serde_json::to_value(common::epoch_event()).unwrap();
    assert_eq!(v["val_accuracy"], serde_json::Value::Null);
    assert_eq!(v["phase"], "EPOCH_PHASE_COMPLETED");

    // Readers accept numbers, default missing fields, and read enum names
    // from newer writers as the zero value.
    let r: FieldReport =
        serde_json::from_str(r#"{"blueprint_id":"b","outcome":2,"extra":1}"#).unwrap();
    assert_eq!(r.outcome(), BlueprintOutcome::Culled);
    assert_eq!(r.layer_id, 0);
    let r: FieldReport =
        serde_json::from_str(r#"{"outcome":"BLUEPRINT_OUTCOME_QUARANTINED"}"#).unwrap();
    assert_eq!(r.outcome(), BlueprintOutcome::Unspecified);
    // A number this version does not know is kept (and written back) as is.
    let r: FieldReport = serde_json::from_str(r#"{"outcome":9}"#).unwrap();
    assert_eq!(r.outcome, 9);
    assert_eq!(serde_json::to_value(&r).unwrap()["outcome"], 9);
}

#[test]
fn mismatches_and_garbage_are_decode_errors() {
    let reader = AnyCodec::default();
    let report = common::field_report();

    // A payload of another schema.
    let env = envelope(&AnyCodec::protobuf(), &common::epoch_event());
    let e = Codec::<FieldReport>::decode(&reader, &env).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode);
    assert!(
        e.to_string().contains("expected esper.v1.FieldReport"),
        "{e}"
    );

    // A content type no codec reads.
    let mut env = envelope(&AnyCodec::json(), &report);
    env.content_type = ContentType::new("text/csv");
    let e = Codec::<FieldReport>::decode(&reader, &env).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode);
    assert!(
        e.to_string().contains("unsupported content type text/csv"),
        "{e}"
    );

    // Protobuf bytes labelled Avro, and JSON labelled protobuf.
    let mut env = envelope(&AnyCodec::protobuf(), &report);
    env.content_type = ContentType::new(ContentType::AVRO);
    let e = Codec::<FieldReport>::decode(&reader, &env).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode);
    assert!(e.to_string().contains("single-object"), "{e}");
    let mut env = envelope(&AnyCodec::json(), &report);
    env.content_type = ContentType::new(ContentType::PROTOBUF);
    let e = Codec::<FieldReport>::decode(&reader, &env).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode);
    assert!(e.to_string().contains("protobuf decode"), "{e}");

    // Truncated Avro, and Avro from a writer schema nobody registered.
    let mut env = envelope(&AnyCodec::avro(), &report);
    env.payload = env.payload.slice(..env.payload.len() - 3);
    let e = Codec::<FieldReport>::decode(&reader, &env).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode);
    let mut env = envelope(&AnyCodec::avro(), &report);
    let mut bytes = env.payload.to_vec();
    bytes[5] ^= 0xff;
    env.payload = bytes.into();
    let e = Codec::<FieldReport>::decode(&reader, &env).unwrap_err();
    assert!(e.to_string().contains("unknown Avro writer schema"), "{e}");

    // Bad JSON; and the specific codecs refuse other content types.
    let mut env = envelope(&AnyCodec::json(), &report);
    env.payload = "{\"layer_id\": \"twelve\"}".into();
    let e = Codec::<FieldReport>::decode(&reader, &env).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode);
    assert!(!e.is_temporary());
    let env = envelope(&AnyCodec::json(), &report);
    assert_eq!(
        Codec::<FieldReport>::decode(&Protobuf, &env)
            .unwrap_err()
            .kind(),
        ErrorKind::Decode
    );
    assert_eq!(
        Codec::<FieldReport>::decode(&Avro::new(), &env)
            .unwrap_err()
            .kind(),
        ErrorKind::Decode
    );

    // No schema id at all is accepted (foreign producers), by content type.
    let mut env = envelope(&AnyCodec::json(), &report);
    env.schema_id = None;
    env.content_type = ContentType::new("application/json; charset=utf-8");
    assert_eq!(Codec::<FieldReport>::decode(&reader, &env).unwrap(), report);
}

#[test]
fn avro_reads_a_registered_older_writer() {
    // A writer that only knows two fields of FieldReport (an older
    // version): the reader fills the rest with defaults.
    let old = r#"{"type":"record","name":"FieldReport","namespace":"esper.v1","fields":[
        {"name":"report_id","type":"string","default":""},
        {"name":"outcome","type":{"type":"enum","name":"BlueprintOutcome","symbols":["BLUEPRINT_OUTCOME_UNSPECIFIED","BLUEPRINT_OUTCOME_FOSSILIZED"],"default":"BLUEPRINT_OUTCOME_UNSPECIFIED"},"default":"BLUEPRINT_OUTCOME_UNSPECIFIED"}]}"#;
    let avro = Avro::new();
    avro.registry().register_json(old).unwrap();
    let schema = oona_contracts::avro::parse_schema(old).unwrap();
    let value = apache_avro::types::Value::Record(vec![
        (
            "report_id".into(),
            apache_avro::types::Value::String("r-old".into()),
        ),
        (
            "outcome".into(),
            apache_avro::types::Value::String("BLUEPRINT_OUTCOME_FOSSILIZED".into()),
        ),
    ]);
    let payload = oona_contracts::avro::value_to_single_object(&schema, value).unwrap();
    let env = Envelope::builder(FieldReport::topic(), payload)
        .content_type(ContentType::AVRO)
        .schema_id("esper.v1.FieldReport/0")
        .build();
    let r: FieldReport = AnyCodec::default().with_avro(avro).decode(&env).unwrap();
    assert_eq!(r.report_id, "r-old");
    assert_eq!(r.outcome(), BlueprintOutcome::Fossilized);
    assert!(r.pre_metrics.is_empty());
}

#[test]
fn topics_and_schemas_come_from_the_type() {
    assert_eq!(FieldReport::TOPIC, TopicName::InnovationFieldReports);
    assert_eq!(LayerHealthReport::topic().as_str(), "telemetry.seed.health");
    assert_eq!(
        NodeIntrospectionEvent::schema_id(),
        "oona.v1.NodeIntrospectionEvent/1"
    );
    assert_eq!(KernelError::TOPIC.plane(), Plane::Oona);
    assert_eq!(
        TopicName::SystemEventsRollback.contract().unwrap().schema,
        RollbackEvent::SCHEMA
    );
    for c in contracts() {
        // Every Avro schema parses and is named after the protobuf message.
        let s = oona_contracts::avro::parse_schema(c.avro_schema).unwrap();
        assert_eq!(s.name().unwrap().fullname(None), c.schema);
        assert_eq!(contract_for_schema(&c.schema_id()), Some(c));
    }
}
