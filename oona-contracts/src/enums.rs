//! The serde form of protobuf enum fields: the value's name
//! (`"BLUEPRINT_OUTCOME_FOSSILIZED"`), not its number.
//!
//! Reading accepts a name or a number. A name this version does not know
//! (written by a newer schema) reads as the zero value (`*_UNSPECIFIED`),
//! as proto3 and the Avro enum default do; writing a number this version
//! does not know writes the number.

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::Deserialize;

/// Names and numbers of a generated protobuf enum.
pub trait ProtoEnum {
    /// The name of a number, if known.
    fn name_of(value: i32) -> Option<&'static str>;
    /// The number of a name, if known.
    fn value_of(name: &str) -> Option<i32>;
}

/// Serialize an enum field.
pub fn ser<E: ProtoEnum, S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    match E::name_of(*v) {
        Some(name) => s.serialize_str(name),
        None => s.serialize_i32(*v),
    }
}

/// Deserialize an enum field.
pub fn de<'de, E: ProtoEnum, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    d.deserialize_any(EnumVisitor::<E>(std::marker::PhantomData))
}

/// Serialize an `optional` enum field.
pub fn ser_opt<E: ProtoEnum, S: Serializer>(v: &Option<i32>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&Named::<E>(*v, std::marker::PhantomData)),
        None => s.serialize_none(),
    }
}

/// Deserialize an `optional` enum field.
pub fn de_opt<'de, E: ProtoEnum, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    let v: Option<Parsed<E>> = Option::deserialize(d)?;
    Ok(v.map(|p| p.0))
}

/// Serialize a `repeated` enum field.
pub fn ser_vec<E: ProtoEnum, S: Serializer>(v: &[i32], s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for x in v {
        seq.serialize_element(&Named::<E>(*x, std::marker::PhantomData))?;
    }
    seq.end()
}

/// Deserialize a `repeated` enum field.
pub fn de_vec<'de, E: ProtoEnum, D: Deserializer<'de>>(d: D) -> Result<Vec<i32>, D::Error> {
    let v: Vec<Parsed<E>> = Vec::deserialize(d)?;
    Ok(v.into_iter().map(|p| p.0).collect())
}

struct Named<E>(i32, std::marker::PhantomData<E>);

impl<E: ProtoEnum> serde::Serialize for Named<E> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ser::<E, S>(&self.0, s)
    }
}

struct Parsed<E>(i32, std::marker::PhantomData<E>);

impl<'de, E: ProtoEnum> Deserialize<'de> for Parsed<E> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::<E, D>(d).map(|v| Parsed(v, std::marker::PhantomData))
    }
}

struct EnumVisitor<E>(std::marker::PhantomData<E>);

impl<E: ProtoEnum> Visitor<'_> for EnumVisitor<E> {
    type Value = i32;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an enum value name or number")
    }

    fn visit_str<Err: de::Error>(self, v: &str) -> Result<i32, Err> {
        // Unknown names come from newer writers: read them as the zero value.
        Ok(E::value_of(v).unwrap_or(0))
    }

    fn visit_i64<Err: de::Error>(self, v: i64) -> Result<i32, Err> {
        i32::try_from(v).map_err(|_| Err::custom(format!("enum number {v} out of range")))
    }

    fn visit_u64<Err: de::Error>(self, v: u64) -> Result<i32, Err> {
        i32::try_from(v).map_err(|_| Err::custom(format!("enum number {v} out of range")))
    }
}
