//! Codecs for contract types: protobuf, Avro, and one that decodes by the
//! envelope's content type.
//!
//! | codec | content type | payload | schema id |
//! |---|---|---|---|
//! | [`oona_core::Json`] / [`AnyCodec::json`] | `application/json` | serde JSON of the generated type (enum fields as names) | `<schema>/<version>` (AnyCodec) |
//! | [`Protobuf`] | `application/x-protobuf` | protobuf binary | `<schema>/<version>` |
//! | [`Avro`] | `application/avro` | Avro single-object encoding ([`crate::avro`]) | `<schema>/<version>` |
//!
//! Decoding checks the content type and, when the envelope names a schema,
//! that its name is the expected type's (any version: versions of one schema
//! are compatible by construction). A mismatch or a payload that does not
//! decode is an [`ErrorKind::Decode`] error, which the handler runner
//! dead-letters with the reason.

use std::sync::Arc;

use bytes::Bytes;
use oona_core::codec::expect_content_type;
use oona_core::{Codec, ContentType, Envelope, Error, ErrorKind, Json, Result};

use crate::avro::{self, AvroRegistry};
use crate::message::{parse_schema_id, Message};

/// Content types read as protobuf (`application/x-protobuf` is written).
pub const PROTOBUF_CONTENT_TYPES: &[&str] = &["application/x-protobuf", "application/protobuf"];

/// Fail unless the envelope's schema id (when present) names `T`'s schema.
pub fn check_schema<T: Message>(envelope: &Envelope) -> Result<()> {
    if let Some(id) = &envelope.schema_id {
        let (name, _) = parse_schema_id(id);
        if name != T::SCHEMA {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "schema mismatch on {} (event {}): envelope carries {id}, expected {}",
                    envelope.topic,
                    envelope.event_id,
                    T::SCHEMA
                ),
            ));
        }
    }
    Ok(())
}

fn essence(ct: &ContentType) -> String {
    ct.as_str()
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The protobuf codec (prost).
#[derive(Debug, Clone, Copy, Default)]
pub struct Protobuf;

impl<T: Message> Codec<T> for Protobuf {
    fn content_type(&self) -> ContentType {
        ContentType::new(ContentType::PROTOBUF)
    }

    fn schema_id(&self) -> Option<String> {
        Some(T::schema_id())
    }

    fn encode(&self, value: &T) -> Result<Bytes> {
        Ok(Bytes::from(prost::Message::encode_to_vec(value)))
    }

    fn decode(&self, envelope: &Envelope) -> Result<T> {
        if !PROTOBUF_CONTENT_TYPES.contains(&essence(&envelope.content_type).as_str()) {
            expect_content_type(envelope, ContentType::PROTOBUF)?;
        }
        check_schema::<T>(envelope)?;
        <T as prost::Message>::decode(&envelope.payload[..]).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "protobuf decode of {} payload as {} (event {}): {e}",
                    envelope.topic,
                    T::SCHEMA,
                    envelope.event_id
                ),
            )
            .with_source(e)
        })
    }
}

/// The Avro codec: single-object encoding, writer schema looked up by
/// fingerprint in its [`AvroRegistry`] (see [`crate::avro`]).
#[derive(Debug, Clone, Default)]
pub struct Avro {
    registry: Arc<AvroRegistry>,
}

impl Avro {
    /// A codec with its own registry, which learns each contract's current
    /// schema on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// A codec sharing `registry` (register older or newer writer schemas
    /// there).
    pub fn with_registry(registry: Arc<AvroRegistry>) -> Self {
        Avro { registry }
    }

    /// The registry of writer schemas.
    pub fn registry(&self) -> &Arc<AvroRegistry> {
        &self.registry
    }

    fn schema_of<T: Message>(&self) -> Result<(Arc<apache_avro::Schema>, avro::Fingerprint)> {
        self.registry
            .reader_with_fingerprint(T::SCHEMA, T::AVRO_SCHEMA)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!("Avro schema of {}: {e}", T::SCHEMA),
                )
            })
    }
}

impl<T: Message> Codec<T> for Avro {
    fn content_type(&self) -> ContentType {
        ContentType::new(ContentType::AVRO)
    }

    fn schema_id(&self) -> Option<String> {
        Some(T::schema_id())
    }

    fn encode(&self, value: &T) -> Result<Bytes> {
        let (schema, fp) = self.schema_of::<T>()?;
        avro::to_single_object_with(&schema, &fp, value).map(Bytes::from)
    }

    fn decode(&self, envelope: &Envelope) -> Result<T> {
        expect_content_type(envelope, ContentType::AVRO)?;
        check_schema::<T>(envelope)?;
        let (reader, _) = self.schema_of::<T>()?;
        let ctx = |e: Error| {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "Avro decode of {} payload as {} (event {}): {}",
                    envelope.topic,
                    T::SCHEMA,
                    envelope.event_id,
                    e.message()
                ),
            )
            .with_source(e)
        };
        let value =
            avro::decode_single_object(&self.registry, &envelope.payload, &reader).map_err(ctx)?;
        avro::from_value(&value).map_err(ctx)
    }
}

/// A payload format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Format {
    /// `application/json` (and any `+json` type).
    #[default]
    Json,
    /// `application/x-protobuf`.
    Protobuf,
    /// `application/avro`.
    Avro,
}

impl Format {
    /// The content type written for this format.
    pub fn content_type(self) -> ContentType {
        ContentType::new(match self {
            Format::Json => ContentType::JSON,
            Format::Protobuf => ContentType::PROTOBUF,
            Format::Avro => ContentType::AVRO,
        })
    }

    /// The format of a content type, if it is one of the three.
    pub fn of(ct: &ContentType) -> Option<Format> {
        if ct.is_json() {
            return Some(Format::Json);
        }
        let e = essence(ct);
        if PROTOBUF_CONTENT_TYPES.contains(&e.as_str()) {
            Some(Format::Protobuf)
        } else if e == ContentType::AVRO {
            Some(Format::Avro)
        } else {
            None
        }
    }
}

/// Writes one format and reads all three, choosing by the envelope's content
/// type: the codec for consumers of topics with mixed producers.
#[derive(Debug, Clone, Default)]
pub struct AnyCodec {
    write: Format,
    avro: Avro,
}

/// The same codec under the name of what it does on the reading side.
pub type DecodeByContentType = AnyCodec;

impl AnyCodec {
    /// A codec that writes `format`.
    pub fn new(write: Format) -> Self {
        AnyCodec {
            write,
            avro: Avro::new(),
        }
    }

    /// Writes JSON.
    pub fn json() -> Self {
        Self::new(Format::Json)
    }

    /// Writes protobuf.
    pub fn protobuf() -> Self {
        Self::new(Format::Protobuf)
    }

    /// Writes Avro.
    pub fn avro() -> Self {
        Self::new(Format::Avro)
    }

    /// Use this Avro codec (and its registry) for Avro.
    pub fn with_avro(mut self, avro: Avro) -> Self {
        self.avro = avro;
        self
    }

    /// The format written.
    pub fn format(&self) -> Format {
        self.write
    }
}

impl<T: Message> Codec<T> for AnyCodec {
    fn content_type(&self) -> ContentType {
        self.write.content_type()
    }

    fn schema_id(&self) -> Option<String> {
        Some(T::schema_id())
    }

    fn encode(&self, value: &T) -> Result<Bytes> {
        match self.write {
            Format::Json => Codec::<T>::encode(&Json, value),
            Format::Protobuf => Codec::<T>::encode(&Protobuf, value),
            Format::Avro => Codec::<T>::encode(&self.avro, value),
        }
    }

    fn decode(&self, envelope: &Envelope) -> Result<T> {
        match Format::of(&envelope.content_type) {
            Some(Format::Json) => {
                check_schema::<T>(envelope)?;
                // Any JSON content type (`+json` too), unlike `Json`, which
                // insists on `application/json`.
                serde_json::from_slice(&envelope.payload).map_err(|e| {
                    Error::new(
                        ErrorKind::Decode,
                        format!(
                            "JSON decode of {} payload as {} (event {}): {e}",
                            envelope.topic,
                            T::SCHEMA,
                            envelope.event_id
                        ),
                    )
                    .with_source(e)
                })
            }
            Some(Format::Protobuf) => Codec::<T>::decode(&Protobuf, envelope),
            Some(Format::Avro) => Codec::<T>::decode(&self.avro, envelope),
            None => Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "unsupported content type {} on {} (event {}): expected application/json, application/x-protobuf or application/avro",
                    envelope.content_type, envelope.topic, envelope.event_id
                ),
            )),
        }
    }
}
