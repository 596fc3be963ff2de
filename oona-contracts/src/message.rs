//! The [`Message`] trait: a payload type bound to its topic and schema.

use oona_core::Topic;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::topics::TopicName;

/// A payload type of the platform, bound to its topic and schema.
///
/// Implemented (by the build script, from the `(oona.v1.topic)` and
/// `(oona.v1.schema_version)` options of the .proto files) for every
/// contract, so publishing one needs no topic string:
///
/// ```
/// use oona_contracts::{FieldReport, Message, TopicName};
/// assert_eq!(FieldReport::TOPIC, TopicName::InnovationFieldReports);
/// assert_eq!(FieldReport::topic().as_str(), "innovation.field_reports");
/// assert_eq!(FieldReport::schema_id(), "esper.v1.FieldReport/1");
/// ```
pub trait Message:
    prost::Message + Default + Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The topic it is published to.
    const TOPIC: TopicName;
    /// The schema name: the protobuf full name, which is also the Avro full
    /// name (`esper.v1.FieldReport`).
    const SCHEMA: &'static str;
    /// The schema version within the package's major version (`v1`); bumped
    /// on every compatible change.
    const VERSION: u32;
    /// The Avro schema (JSON), generated from the .proto.
    const AVRO_SCHEMA: &'static str;

    /// The validated topic.
    fn topic() -> Topic {
        Self::TOPIC.topic()
    }

    /// The schema id written into the envelope: `<SCHEMA>/<VERSION>`.
    fn schema_id() -> String {
        schema_id(Self::SCHEMA, Self::VERSION)
    }
}

/// `<schema>/<version>`, the envelope's `schema_id`.
pub fn schema_id(schema: &str, version: u32) -> String {
    format!("{schema}/{version}")
}

/// Split a schema id into name and version (`None` when it has no
/// `/<number>` suffix).
pub fn parse_schema_id(id: &str) -> (&str, Option<u32>) {
    match id.rsplit_once('/') {
        Some((name, v)) => match v.parse() {
            Ok(v) => (name, Some(v)),
            Err(_) => (id, None),
        },
        None => (id, None),
    }
}

/// What is known about one contract, for tooling and registries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContractInfo {
    /// Schema name (`esper.v1.FieldReport`).
    pub schema: &'static str,
    /// Schema version.
    pub version: u32,
    /// The topic it is published to.
    pub topic: TopicName,
    /// The Avro schema (JSON).
    pub avro_schema: &'static str,
    /// The Rust type name (`FieldReport`).
    pub rust_type: &'static str,
}

impl ContractInfo {
    /// `<schema>/<version>`.
    pub fn schema_id(&self) -> String {
        schema_id(self.schema, self.version)
    }
}

/// Every contract of the platform.
pub fn contracts() -> &'static [ContractInfo] {
    crate::CONTRACTS
}

/// The contract with this schema name (`esper.v1.FieldReport`) or schema id
/// (`esper.v1.FieldReport/1`).
pub fn contract_for_schema(schema: &str) -> Option<&'static ContractInfo> {
    let (name, _) = parse_schema_id(schema);
    contracts().iter().find(|c| c.schema == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_ids() {
        assert_eq!(
            parse_schema_id("esper.v1.FieldReport/3"),
            ("esper.v1.FieldReport", Some(3))
        );
        assert_eq!(
            parse_schema_id("esper.v1.FieldReport"),
            ("esper.v1.FieldReport", None)
        );
        assert_eq!(parse_schema_id("a/b"), ("a/b", None));
        assert!(contract_for_schema("esper.v1.FieldReport/9").is_some());
        assert!(contract_for_schema("esper.v1.Nope").is_none());
    }

    #[test]
    fn every_topic_has_exactly_one_contract() {
        for t in TopicName::ALL {
            let n = contracts().iter().filter(|c| c.topic == *t).count();
            assert_eq!(n, 1, "{t}");
        }
        assert_eq!(contracts().len(), TopicName::ALL.len());
    }
}
