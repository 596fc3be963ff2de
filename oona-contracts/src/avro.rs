//! Avro on the wire: single-object encoding and a registry of writer schemas.
//!
//! **Payload format.** Every Avro payload is an Avro *single-object
//! encoding* (Avro specification, "Single object encoding"):
//!
//! | bytes | content |
//! |---|---|
//! | 2 | marker `C3 01` |
//! | 8 | CRC-64-AVRO (Rabin) fingerprint of the writer schema's Parsing Canonical Form, little-endian |
//! | rest | the Avro binary encoding of the datum |
//!
//! The envelope carries `content_type: application/avro` and
//! `schema_id: <schema>/<version>` (e.g. `esper.v1.FieldReport/1`), which
//! names the contract; the fingerprint names the exact writer schema, so a
//! reader resolves data written by any registered version of the contract
//! against its own (reader) schema. A Python producer writes the same bytes
//! with `fastavro.schemaless_writer` after the 10-byte header.
//!
//! **Determinism.** Map entries are written in key order, so equal values
//! give equal bytes (the golden files depend on it).
//!
//! **Renames.** Resolution matches a reader field to a writer field by name,
//! then by the reader field's aliases (the Avro rule), then by the writer
//! field's aliases (an Oona extension: a new schema that keeps the old name as
//! an alias is then readable by old readers too, so a rename works in both
//! directions). apache-avro's own resolution ignores aliases; the fields are
//! renamed before it runs.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::schema::{Name, RecordSchema, ResolvedSchema, Schema};
use apache_avro::types::Value;
use oona_core::{Error, ErrorKind, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The two marker bytes that start a single-object encoded payload.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
/// Length of the single-object header: marker and fingerprint.
pub const HEADER_LEN: usize = 10;

/// A CRC-64-AVRO schema fingerprint, in wire (little-endian) byte order.
pub type Fingerprint = [u8; 8];

const EMPTY: u64 = 0xc15d_213a_a4d7_a795;

const fn rabin_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut fp = i as u64;
        let mut j = 0;
        while j < 8 {
            fp = (fp >> 1) ^ (EMPTY & (0u64.wrapping_sub(fp & 1)));
            j += 1;
        }
        table[i] = fp;
        i += 1;
    }
    table
}

static RABIN: [u64; 256] = rabin_table();

/// The 64-bit Rabin fingerprint (CRC-64-AVRO) of `data`.
pub fn rabin64(data: &[u8]) -> u64 {
    let mut fp = EMPTY;
    for b in data {
        fp = (fp >> 8) ^ RABIN[((fp ^ u64::from(*b)) & 0xff) as usize];
    }
    fp
}

/// The fingerprint of a schema's Parsing Canonical Form, little-endian.
pub fn fingerprint(schema: &Schema) -> Fingerprint {
    rabin64(schema.canonical_form().as_bytes()).to_le_bytes()
}

fn fp_hex(fp: &Fingerprint) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Decode, msg)
}

fn encode_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Encode, msg)
}

/// Parse an Avro schema from JSON.
pub fn parse_schema(json: &str) -> Result<Schema> {
    Schema::parse_str(json).map_err(|e| {
        Error::new(
            ErrorKind::ConfigInvalid,
            format!("invalid Avro schema: {e}"),
        )
        .with_source(e)
    })
}

/// Writer schemas by fingerprint, and reader schemas by name.
///
/// The codec registers the current schema of each contract on first use;
/// register other versions (older or newer writers) with [`register`].
///
/// [`register`]: AvroRegistry::register
#[derive(Debug, Default)]
pub struct AvroRegistry {
    writers: RwLock<HashMap<Fingerprint, Arc<Schema>>>,
    readers: RwLock<HashMap<String, (Arc<Schema>, Fingerprint)>>,
}

impl AvroRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a writer schema; returns its fingerprint.
    pub fn register(&self, schema: Schema) -> Fingerprint {
        let fp = fingerprint(&schema);
        self.writers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fp, Arc::new(schema));
        fp
    }

    /// Parse and register a writer schema.
    pub fn register_json(&self, json: &str) -> Result<Fingerprint> {
        Ok(self.register(parse_schema(json)?))
    }

    /// The writer schema with this fingerprint.
    pub fn get(&self, fp: &Fingerprint) -> Option<Arc<Schema>> {
        self.writers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(fp)
            .cloned()
    }

    /// The reader schema of `name`, parsed from `json` on first use (and
    /// registered as a writer schema too).
    pub fn reader(&self, name: &str, json: &str) -> Result<Arc<Schema>> {
        self.reader_with_fingerprint(name, json).map(|(s, _)| s)
    }

    /// [`reader`](Self::reader) with the schema's fingerprint (computed
    /// once, not per message).
    pub fn reader_with_fingerprint(
        &self,
        name: &str,
        json: &str,
    ) -> Result<(Arc<Schema>, Fingerprint)> {
        if let Some(s) = self
            .readers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(s.clone());
        }
        let schema = Arc::new(parse_schema(json)?);
        let fp = fingerprint(&schema);
        self.writers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fp, schema.clone());
        self.readers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (schema.clone(), fp));
        Ok((schema, fp))
    }

    /// Number of writer schemas known.
    pub fn len(&self) -> usize {
        self.writers.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no writer schema is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Encode a serde value with `schema` as a single object.
pub fn to_single_object<T: Serialize>(schema: &Schema, value: &T) -> Result<Vec<u8>> {
    to_single_object_with(schema, &fingerprint(schema), value)
}

/// [`to_single_object`] with the schema's fingerprint already known.
pub fn to_single_object_with<T: Serialize>(
    schema: &Schema,
    fp: &Fingerprint,
    value: &T,
) -> Result<Vec<u8>> {
    let v = apache_avro::to_value(value)
        .map_err(|e| encode_err(format!("Avro encode: {e}")).with_source(e))?;
    value_with(schema, fp, v)
}

/// Encode an Avro value with `schema` as a single object (the value is
/// resolved against the schema first, so `String` becomes an enum symbol,
/// `Null` a union branch, and so on).
pub fn value_to_single_object(schema: &Schema, value: Value) -> Result<Vec<u8>> {
    value_with(schema, &fingerprint(schema), value)
}

fn value_with(schema: &Schema, fp: &Fingerprint, value: Value) -> Result<Vec<u8>> {
    let resolved = value.resolve(schema).map_err(|e| {
        encode_err(format!("value does not fit the Avro schema: {e}")).with_source(e)
    })?;
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(fp);
    encode_value(&resolved, &mut out)?;
    Ok(out)
}

/// Split a single-object payload into its writer fingerprint and datum.
pub fn split_header(bytes: &[u8]) -> Result<(Fingerprint, &[u8])> {
    if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
        return Err(decode_err(format!(
            "not an Avro single-object payload: expected marker C3 01 and an 8-byte fingerprint, got {} bytes starting {:02x?}",
            bytes.len(),
            &bytes[..bytes.len().min(2)]
        )));
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&bytes[2..HEADER_LEN]);
    Ok((fp, &bytes[HEADER_LEN..]))
}

/// Decode a single-object payload: look the writer schema up by its
/// fingerprint and resolve the datum to `reader`.
pub fn decode_single_object(
    registry: &AvroRegistry,
    bytes: &[u8],
    reader: &Schema,
) -> Result<Value> {
    let (fp, datum) = split_header(bytes)?;
    let writer = registry.get(&fp).ok_or_else(|| {
        decode_err(format!(
            "unknown Avro writer schema (fingerprint {}); register it with AvroRegistry::register",
            fp_hex(&fp)
        ))
    })?;
    if std::ptr::eq(&*writer, reader) {
        // Written with the reader's own schema (the common case, and the
        // same allocation when the reader came from this registry): no
        // resolution needed.
        return decode_raw(&writer, datum);
    }
    decode_datum(&writer, datum, reader)
}

fn decode_raw(writer: &Schema, datum: &[u8]) -> Result<Value> {
    let mut cursor = datum;
    let value = apache_avro::from_avro_datum(writer, &mut cursor, None)
        .map_err(|e| decode_err(format!("Avro datum does not decode: {e}")).with_source(e))?;
    if !cursor.is_empty() {
        return Err(decode_err(format!(
            "Avro datum has {} trailing bytes",
            cursor.len()
        )));
    }
    Ok(value)
}

/// Decode a raw Avro datum written with `writer`, resolved to `reader`.
pub fn decode_datum(writer: &Schema, datum: &[u8], reader: &Schema) -> Result<Value> {
    let value = decode_raw(writer, datum)?;
    resolve(value, writer, reader)
}

/// Resolve a value written with `writer` to `reader`, honouring field
/// aliases (see the module docs).
pub fn resolve(value: Value, writer: &Schema, reader: &Schema) -> Result<Value> {
    let wnames = names_of(writer)?;
    let rnames = names_of(reader)?;
    let renamed = rename(value, writer, reader, &wnames, &rnames);
    renamed
        .resolve(reader)
        .map_err(|e| decode_err(format!("Avro schema resolution failed: {e}")).with_source(e))
}

/// Turn a resolved value into `T`.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T> {
    apache_avro::from_value(value)
        .map_err(|e| decode_err(format!("Avro value does not fit the type: {e}")).with_source(e))
}

fn names_of(schema: &Schema) -> Result<HashMap<Name, Schema>> {
    let rs = ResolvedSchema::try_from(schema)
        .map_err(|e| decode_err(format!("Avro schema does not resolve: {e}")).with_source(e))?;
    Ok(rs
        .get_names()
        .iter()
        .map(|(n, s)| (n.clone(), (*s).clone()))
        .collect())
}

fn deref<'a>(s: &'a Schema, names: &'a HashMap<Name, Schema>) -> &'a Schema {
    match s {
        Schema::Ref { name } => names.get(name).unwrap_or(s),
        other => other,
    }
}

fn reader_field_for<'r>(
    r: &'r RecordSchema,
    wname: &str,
    waliases: &[String],
) -> Option<&'r apache_avro::schema::RecordField> {
    r.fields
        .iter()
        .find(|f| f.name == wname)
        .or_else(|| {
            r.fields.iter().find(|f| {
                f.aliases
                    .as_ref()
                    .is_some_and(|a| a.iter().any(|x| x == wname))
            })
        })
        .or_else(|| r.fields.iter().find(|f| waliases.contains(&f.name)))
}

fn rename(
    value: Value,
    writer: &Schema,
    reader: &Schema,
    wn: &HashMap<Name, Schema>,
    rn: &HashMap<Name, Schema>,
) -> Value {
    let (w, r) = (deref(writer, wn), deref(reader, rn));
    match (value, w, r) {
        (Value::Record(fields), Schema::Record(ws), Schema::Record(rs)) => {
            let wnames: Vec<&str> = ws.fields.iter().map(|f| f.name.as_str()).collect();
            Value::Record(
                fields
                    .into_iter()
                    .map(|(name, v)| {
                        let Some(wf) = ws.fields.iter().find(|f| f.name == name) else {
                            return (name, v);
                        };
                        let waliases = wf.aliases.clone().unwrap_or_default();
                        match reader_field_for(rs, &name, &waliases) {
                            // An alias must not steal a reader field the
                            // writer also has under its own name.
                            Some(rf) if rf.name == name || !wnames.contains(&rf.name.as_str()) => {
                                let v = rename(v, &wf.schema, &rf.schema, wn, rn);
                                (rf.name.clone(), v)
                            }
                            _ => (name, v),
                        }
                    })
                    .collect(),
            )
        }
        (Value::Array(items), Schema::Array(wa), Schema::Array(ra)) => Value::Array(
            items
                .into_iter()
                .map(|v| rename(v, &wa.items, &ra.items, wn, rn))
                .collect(),
        ),
        (Value::Map(items), Schema::Map(wm), Schema::Map(rm)) => Value::Map(
            items
                .into_iter()
                .map(|(k, v)| (k, rename(v, &wm.types, &rm.types, wn, rn)))
                .collect(),
        ),
        (Value::Union(i, inner), Schema::Union(wu), r) => {
            let Some(wv) = wu.variants().get(i as usize) else {
                return Value::Union(i, inner);
            };
            let target = match r {
                Schema::Union(ru) => ru
                    .variants()
                    .iter()
                    .find(|rv| same_named(deref(wv, wn), deref(rv, rn)))
                    .unwrap_or(wv),
                other => other,
            };
            Value::Union(i, Box::new(rename(*inner, wv, target, wn, rn)))
        }
        (v, _, _) => v,
    }
}

fn same_named(a: &Schema, b: &Schema) -> bool {
    match (a, b) {
        (Schema::Record(x), Schema::Record(y)) => x.name == y.name,
        _ => false,
    }
}

fn put_long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    loop {
        if z & !0x7f == 0 {
            out.push(z as u8);
            return;
        }
        out.push(((z & 0x7f) | 0x80) as u8);
        z >>= 7;
    }
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    put_long(b.len() as i64, out);
    out.extend_from_slice(b);
}

/// Avro binary encoding of a resolved value (record fields in schema order,
/// union and enum indexes set), with map entries in key order.
pub fn encode_value(value: &Value, out: &mut Vec<u8>) -> Result<()> {
    match value {
        Value::Null => {}
        Value::Boolean(b) => out.push(u8::from(*b)),
        Value::Int(i) => put_long(i64::from(*i), out),
        Value::Long(l) => put_long(*l, out),
        Value::Float(f) => out.extend_from_slice(&f.to_le_bytes()),
        Value::Double(d) => out.extend_from_slice(&d.to_le_bytes()),
        Value::Bytes(b) => put_bytes(b, out),
        Value::String(s) => put_bytes(s.as_bytes(), out),
        Value::Fixed(_, b) => out.extend_from_slice(b),
        Value::Enum(i, _) => put_long(i64::from(*i), out),
        Value::Union(i, v) => {
            put_long(i64::from(*i), out);
            encode_value(v, out)?;
        }
        Value::Array(items) => {
            if !items.is_empty() {
                put_long(items.len() as i64, out);
                for v in items {
                    encode_value(v, out)?;
                }
            }
            put_long(0, out);
        }
        Value::Map(items) => {
            if !items.is_empty() {
                put_long(items.len() as i64, out);
                let mut keys: Vec<&String> = items.keys().collect();
                keys.sort();
                for k in keys {
                    put_bytes(k.as_bytes(), out);
                    if let Some(v) = items.get(k) {
                        encode_value(v, out)?;
                    }
                }
            }
            put_long(0, out);
        }
        Value::Record(fields) => {
            for (_, v) in fields {
                encode_value(v, out)?;
            }
        }
        other => {
            return Err(encode_err(format!(
                "Avro value {other:?} uses a logical type contracts do not use"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabin_matches_the_spec_and_apache_avro() {
        // The Avro specification's fingerprint of the schema "null".
        assert_eq!(rabin64(b"\"null\""), 0x63dd_24e7_cc25_8f8a);
        let s = Schema::parse_str(
            r#"{"type":"record","name":"r","fields":[{"name":"a","type":"long"}]}"#,
        )
        .unwrap();
        let ours = fingerprint(&s);
        let theirs = s.fingerprint::<apache_avro::rabin::Rabin>().bytes;
        assert_eq!(ours.to_vec(), theirs);
    }

    #[test]
    fn encoding_matches_apache_avro() {
        let s = Schema::parse_str(
            r#"{"type":"record","name":"r","fields":[
                {"name":"a","type":"long"},{"name":"b","type":["null","string"]},
                {"name":"c","type":{"type":"array","items":"int"}},
                {"name":"d","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
                {"name":"e","type":"double"},{"name":"f","type":"boolean"}]}"#,
        )
        .unwrap();
        let v = Value::Record(vec![
            ("a".into(), Value::Long(-300)),
            (
                "b".into(),
                Value::Union(1, Box::new(Value::String("hé".into()))),
            ),
            (
                "c".into(),
                Value::Array(vec![Value::Int(1), Value::Int(-64)]),
            ),
            ("d".into(), Value::Enum(1, "Y".into())),
            ("e".into(), Value::Double(0.5)),
            ("f".into(), Value::Boolean(true)),
        ]);
        let mut ours = Vec::new();
        encode_value(&v, &mut ours).unwrap();
        assert_eq!(ours, apache_avro::to_avro_datum(&s, v).unwrap());
    }

    #[test]
    fn bad_headers_are_decode_errors() {
        let reg = AvroRegistry::new();
        let s = Schema::parse_str(r#""long""#).unwrap();
        for bad in [
            &b""[..],
            b"\xc3",
            b"\x00\x01aaaaaaaa",
            b"\xc3\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02",
        ] {
            let e = decode_single_object(&reg, bad, &s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Decode, "{e}");
        }
        reg.register(s.clone());
        let mut ok = value_to_single_object(&s, Value::Long(5)).unwrap();
        assert_eq!(decode_single_object(&reg, &ok, &s).unwrap(), Value::Long(5));
        ok.push(0);
        assert!(decode_single_object(&reg, &ok, &s)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
    }
}
