//! Avro schemas derived from protobuf descriptors.
//!
//! The .proto files are the one source of truth: the Avro schema of a
//! contract is generated from its protobuf descriptor, mirroring the serde
//! form of the generated Rust types (which is what the Avro codec writes).
//! The build script uses this module to generate each contract's schema; it
//! is public so a new revision of a .proto can be turned into its Avro schema
//! for compatibility checks ([`crate::compat`]).
//!
//! | protobuf | Avro | default |
//! |---|---|---|
//! | `string` | `string` | `""` |
//! | `bytes` | `bytes` | `""` |
//! | `bool` | `boolean` | `false` |
//! | `int32`, `sint32`, `sfixed32` | `int` | `0` |
//! | `int64`, `sint64`, `sfixed64`, `uint32`, `fixed32`, `uint64`, `fixed64` | `long` (a `uint64` above 2^63-1 does not encode) | `0` |
//! | `float` / `double` | `float` / `double` | `0.0` |
//! | enum | `enum` (symbols are the value names; its `default` is the zero value, so unknown symbols read as it) | the zero value |
//! | message field | `["null", record]` | `null` |
//! | `optional` scalar | `["null", scalar]` | `null` |
//! | `repeated T` | `{"type": "array", "items": T}` | `[]` |
//! | `map<string, V>` | `{"type": "map", "values": V}` | `{}` |
//!
//! Records and enums are named by their protobuf full name (namespace = the
//! package), every field has a default (so fields can be added and removed
//! compatibly), the `(oona.v1.former_names)` option of a field becomes its
//! `aliases`, and .proto comments become `doc`. Not supported (an error
//! names the field): oneofs, maps with non-string keys, maps of enums and
//! nested type declarations (declare types at the top level of the file).

// Shared with build.rs through `#[path]`; there some items are unused.
#![allow(dead_code)]

use std::collections::HashSet;

use prost_reflect::{EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{json, Map, Value};

/// Full name of the field option holding a field's former names.
pub const FORMER_NAMES_OPTION: &str = "oona.v1.former_names";

/// The Avro schema (as JSON) of a protobuf message.
pub fn avro_schema(message: &MessageDescriptor) -> Result<Value, String> {
    let mut defined = HashSet::new();
    record(message, &mut defined)
}

/// The former names of a field, from its `(oona.v1.former_names)` option.
pub fn former_names(field: &FieldDescriptor) -> Vec<String> {
    let Some(ext) = field
        .parent_pool()
        .get_extension_by_name(FORMER_NAMES_OPTION)
    else {
        return Vec::new();
    };
    let options = field.options();
    if !options.has_extension(&ext) {
        return Vec::new();
    }
    options
        .get_extension(&ext)
        .as_list()
        .map(|l| {
            l.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The leading comment of the element at `path` of its file, trimmed.
pub fn comment(file: &prost_types::FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let loc = info.location.iter().find(|l| l.path == path)?;
    let text = loc.leading_comments.as_deref()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let joined = lines.join(" ").trim().to_string();
    (!joined.is_empty()).then_some(joined)
}

fn check_top_level(full_name: &str, parent: Option<MessageDescriptor>) -> Result<(), String> {
    match parent {
        Some(p) => Err(format!(
            "{full_name} is declared inside {}: declare contract types at the top level of the file",
            p.full_name()
        )),
        None => Ok(()),
    }
}

fn record(message: &MessageDescriptor, defined: &mut HashSet<String>) -> Result<Value, String> {
    let full = message.full_name().to_string();
    if defined.contains(&full) {
        return Ok(Value::String(full));
    }
    check_top_level(&full, message.parent_message())?;
    defined.insert(full.clone());
    let file = message.parent_file();
    let mut fields = Vec::new();
    for field in message.fields() {
        if let Some(oneof) = field.containing_oneof() {
            if !oneof.is_synthetic() {
                return Err(format!(
                    "{}: oneof {} is not supported in contracts",
                    field.full_name(),
                    oneof.name()
                ));
            }
        }
        let (ty, default) = field_type(&field, defined)?;
        let mut f = Map::new();
        f.insert("name".into(), json!(field.name()));
        if let Some(doc) = comment(file.file_descriptor_proto(), field.path()) {
            f.insert("doc".into(), json!(doc));
        }
        let aliases = former_names(&field);
        if !aliases.is_empty() {
            f.insert("aliases".into(), json!(aliases));
        }
        f.insert("type".into(), ty);
        f.insert("default".into(), default);
        fields.push(Value::Object(f));
    }
    let mut r = Map::new();
    r.insert("type".into(), json!("record"));
    r.insert("name".into(), json!(message.name()));
    r.insert("namespace".into(), json!(message.package_name()));
    if let Some(doc) = comment(file.file_descriptor_proto(), message.path()) {
        r.insert("doc".into(), json!(doc));
    }
    r.insert("fields".into(), Value::Array(fields));
    Ok(Value::Object(r))
}

fn enumeration(e: &EnumDescriptor, defined: &mut HashSet<String>) -> Result<Value, String> {
    let full = e.full_name().to_string();
    if defined.contains(&full) {
        return Ok(Value::String(full));
    }
    check_top_level(&full, e.parent_message())?;
    defined.insert(full);
    let symbols: Vec<String> = e.values().map(|v| v.name().to_string()).collect();
    let mut m = Map::new();
    m.insert("type".into(), json!("enum"));
    m.insert("name".into(), json!(e.name()));
    m.insert("namespace".into(), json!(e.package_name()));
    if let Some(doc) = comment(e.parent_file().file_descriptor_proto(), e.path()) {
        m.insert("doc".into(), json!(doc));
    }
    m.insert("symbols".into(), json!(symbols));
    m.insert("default".into(), json!(e.default_value().name()));
    Ok(Value::Object(m))
}

/// The Avro type of one value of `kind` and its proto3 default.
fn single(kind: &Kind, defined: &mut HashSet<String>) -> Result<(Value, Value), String> {
    Ok(match kind {
        Kind::Double => (json!("double"), json!(0.0)),
        Kind::Float => (json!("float"), json!(0.0)),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => (json!("int"), json!(0)),
        Kind::Int64
        | Kind::Sint64
        | Kind::Sfixed64
        | Kind::Uint32
        | Kind::Fixed32
        | Kind::Uint64
        | Kind::Fixed64 => (json!("long"), json!(0)),
        Kind::Bool => (json!("boolean"), json!(false)),
        Kind::String => (json!("string"), json!("")),
        Kind::Bytes => (json!("bytes"), json!("")),
        Kind::Enum(e) => {
            let default = json!(e.default_value().name());
            (enumeration(e, defined)?, default)
        }
        Kind::Message(m) => (record(m, defined)?, Value::Null),
    })
}

fn field_type(
    field: &FieldDescriptor,
    defined: &mut HashSet<String>,
) -> Result<(Value, Value), String> {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return Err(format!("{}: map without an entry type", field.full_name()));
        };
        let key = entry.map_entry_key_field();
        if key.kind() != Kind::String {
            return Err(format!(
                "{}: map keys must be strings (Avro maps have string keys)",
                field.full_name()
            ));
        }
        let value = entry.map_entry_value_field();
        if matches!(value.kind(), Kind::Enum(_)) {
            return Err(format!(
                "{}: maps of enums are not supported",
                field.full_name()
            ));
        }
        let (v, _) = single(&value.kind(), defined)?;
        return Ok((json!({"type": "map", "values": v}), json!({})));
    }
    let (ty, default) = single(&field.kind(), defined)?;
    if field.is_list() {
        return Ok((json!({"type": "array", "items": ty}), json!([])));
    }
    if matches!(field.kind(), Kind::Message(_)) || field.supports_presence() {
        return Ok((json!(["null", ty]), Value::Null));
    }
    Ok((ty, default))
}
