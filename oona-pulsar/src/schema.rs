//! Pulsar's schema registry: the schema of a contract's producer, the
//! version of a message's schema, and why the registry refused one.

use oona_core::{ContentType, SchemaSpec};
use pulsar::proto;

/// The Pulsar schema of `spec`: the Avro form as its definition (what the
/// broker's AVRO and JSON compatibility checks compare), typed by the
/// payload's encoding; `None` for an encoding Pulsar's registry has no
/// type for.
pub(crate) fn pulsar_schema(spec: &SchemaSpec) -> Option<proto::Schema> {
    use proto::schema::Type;
    let essence = spec
        .content_type
        .as_str()
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    let kind = if spec.content_type.is_json() {
        Type::Json
    } else if essence == ContentType::PROTOBUF {
        Type::Protobuf
    } else if essence == ContentType::AVRO {
        Type::Avro
    } else {
        return None;
    };
    let (name, _) = spec
        .schema_id
        .rsplit_once('/')
        .unwrap_or((&spec.schema_id, ""));
    Some(proto::Schema {
        name: name.to_string(),
        schema_data: spec.avro.as_bytes().to_vec(),
        r#type: kind as i32,
        properties: vec![proto::KeyValue {
            key: "oona.schema_id".into(),
            value: spec.schema_id.clone(),
        }],
    })
}

/// The registry's name of the schema type of `spec` (`JSON`, ...).
pub(crate) fn type_name(spec: &SchemaSpec) -> &'static str {
    pulsar_schema(spec)
        .and_then(|s| proto::schema::Type::try_from(s.r#type).ok())
        .map_or("BYTES", |t| match t {
            proto::schema::Type::Json => "JSON",
            proto::schema::Type::Protobuf => "PROTOBUF",
            proto::schema::Type::Avro => "AVRO",
            _ => "BYTES",
        })
}

/// The latest schema of a topic, as the admin API reads it.
#[derive(Debug, Clone)]
pub(crate) struct Latest {
    pub version: u64,
    /// `AVRO`, `JSON`, ...
    pub kind: String,
    /// The definition (for AVRO and JSON, an Avro schema).
    pub data: String,
}

/// A message's `schema_version` (an 8-byte big-endian number).
pub(crate) fn version_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// What keeps `offered` (an Avro record schema) from being read both ways
/// with `registered`, field by field: the registry's `FULL` compatibility,
/// which Oona's own check (`oona_contracts::compat::avro_full`) also
/// applies.
pub(crate) fn field_diff(registered: &str, offered: &str) -> Vec<String> {
    let fields = |json: &str| -> Vec<(String, serde_json::Value, bool)> {
        let doc: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        doc["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| {
                let name = f.get("name")?.as_str()?.to_string();
                Some((name, f["type"].clone(), f.get("default").is_some()))
            })
            .collect()
    };
    let (old, new) = (fields(registered), fields(offered));
    let mut out = Vec::new();
    for (name, ty, has_default) in &old {
        match new.iter().find(|(n, _, _)| n == name) {
            None if !has_default => out.push(format!(
                "field `{name}` is in the registered schema without a default and missing here (this schema cannot read what was written before)"
            )),
            Some((_, new_ty, _)) if new_ty != ty => out.push(format!(
                "field `{name}` changed type from {ty} to {new_ty}"
            )),
            _ => {}
        }
    }
    for (name, _, has_default) in &new {
        if !has_default && !old.iter().any(|(n, _, _)| n == name) {
            out.push(format!(
                "field `{name}` is new without a default (what was written before has none)"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"type":"record","name":"R","namespace":"t.v1","fields":[{"name":"seed_id","type":"string"},{"name":"score","type":"double","default":0.0}]}"#;

    #[test]
    fn the_fields_that_break_compatibility_are_named() {
        let added_with_default = r#"{"type":"record","name":"R","fields":[{"name":"seed_id","type":"string"},{"name":"score","type":"double","default":0.0},{"name":"epoch","type":"long","default":0}]}"#;
        assert!(field_diff(V1, added_with_default).is_empty());
        let broken = r#"{"type":"record","name":"R","fields":[{"name":"score","type":"string","default":""},{"name":"epoch","type":"long"}]}"#;
        let d = field_diff(V1, broken);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d[0].contains("`seed_id`") && d[0].contains("missing"),
            "{d:?}"
        );
        assert!(d[1].contains("`score`") && d[1].contains("type"), "{d:?}");
        assert!(
            d[2].contains("`epoch`") && d[2].contains("new without a default"),
            "{d:?}"
        );
    }

    #[test]
    fn schemas_and_versions() {
        let spec = SchemaSpec::new("t.v1.R/1", ContentType::new(ContentType::AVRO), V1);
        let s = pulsar_schema(&spec).unwrap();
        assert_eq!(s.name, "t.v1.R");
        assert_eq!(s.r#type, proto::schema::Type::Avro as i32);
        assert_eq!(s.schema_data, V1.as_bytes());
        let json = SchemaSpec::new("t.v1.R/1", ContentType::json(), V1);
        assert_eq!(
            pulsar_schema(&json).unwrap().r#type,
            proto::schema::Type::Json as i32
        );
        let other = SchemaSpec::new("t.v1.R/1", ContentType::new("text/csv"), V1);
        assert!(pulsar_schema(&other).is_none());
        assert_eq!(version_of(&[0, 0, 0, 0, 0, 0, 0, 3]), Some(3));
        assert_eq!(version_of(&[1, 2]), None);
    }
}
