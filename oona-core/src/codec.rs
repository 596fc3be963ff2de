//! Payload codecs: how a typed value becomes envelope payload bytes.
//!
//! A codec names its content type (and schema id, when it has one); both
//! travel in the envelope, and the consumer decodes by the envelope's content
//! type. A payload whose content type the codec does not read, or that does
//! not decode, is an [`ErrorKind::Decode`] error, which the handler runner
//! treats as permanent: the message is dead-lettered with the reason.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::envelope::{ContentType, Envelope};
use crate::error::{Error, ErrorKind, Result};

/// Encodes and decodes values of `T`.
pub trait Codec<T>: Send + Sync + 'static {
    /// The content type written into the envelope.
    fn content_type(&self) -> ContentType;

    /// The schema id written into the envelope, if any.
    fn schema_id(&self) -> Option<String> {
        None
    }

    /// Encode a value.
    fn encode(&self, value: &T) -> Result<Bytes>;

    /// Decode the payload of `envelope`. Implementations check the content
    /// type with [`expect_content_type`] first.
    fn decode(&self, envelope: &Envelope) -> Result<T>;
}

/// Fail with a decode error unless `envelope`'s content type is `expected`
/// (parameters such as `; charset=utf-8` are ignored).
pub fn expect_content_type(envelope: &Envelope, expected: &str) -> Result<()> {
    let got = envelope.content_type.as_str();
    let base = got.split(';').next().unwrap_or("").trim();
    if base.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Decode,
            format!(
                "content type mismatch on {} (event {}): expected {expected}, got {got}",
                envelope.topic, envelope.event_id
            ),
        ))
    }
}

/// The JSON codec (serde_json), the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T> Codec<T> for Json
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn content_type(&self) -> ContentType {
        ContentType::json()
    }

    fn encode(&self, value: &T) -> Result<Bytes> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| Error::new(ErrorKind::Encode, format!("JSON encode: {e}")).with_source(e))
    }

    fn decode(&self, envelope: &Envelope) -> Result<T> {
        // Any JSON media type (`application/json`, `application/*+json`).
        if !envelope.content_type.is_json() {
            expect_content_type(envelope, ContentType::JSON)?;
        }
        serde_json::from_slice(&envelope.payload).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "JSON decode of {} payload (event {}): {e}",
                    envelope.topic, envelope.event_id
                ),
            )
            .with_source(e)
        })
    }
}

/// The payload as it is, for blobs (checkpoints, archives): encodes
/// [`Bytes`] as `application/octet-stream` and decodes any content type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    fn content_type(&self) -> ContentType {
        ContentType::new(ContentType::OCTET_STREAM)
    }

    fn encode(&self, value: &Bytes) -> Result<Bytes> {
        Ok(value.clone())
    }

    fn decode(&self, envelope: &Envelope) -> Result<Bytes> {
        Ok(envelope.payload.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topic;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Report {
        seed: u32,
    }

    #[test]
    fn json_round_trip_and_mismatch() {
        let t = Topic::new("innovation.tezzeret.results").unwrap();
        let bytes = Codec::<Report>::encode(&Json, &Report { seed: 7 }).unwrap();
        let env = Envelope::builder(t.clone(), bytes).build();
        let r: Report = Json.decode(&env).unwrap();
        assert_eq!(r, Report { seed: 7 });

        let bin = Envelope::builder(t.clone(), &b"\x00\x01"[..])
            .content_type(ContentType::OCTET_STREAM)
            .build();
        let e = Codec::<Report>::decode(&Json, &bin).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
        assert_eq!(Raw.decode(&bin).unwrap(), bin.payload);
        assert_eq!(
            Raw.content_type().as_str(),
            ContentType::OCTET_STREAM,
            "raw payloads say they are bytes"
        );
        assert!(e.to_string().contains("expected application/json"), "{e}");

        let ce = Envelope::builder(t.clone(), "{\"seed\":8}")
            .content_type("application/cloudevents+json")
            .build();
        assert_eq!(
            Codec::<Report>::decode(&Json, &ce).unwrap(),
            Report { seed: 8 }
        );

        let bad = Envelope::builder(t, "{\"seed\":\"x\"}").build();
        let e = Codec::<Report>::decode(&Json, &bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
        assert!(!e.is_temporary());
    }
}
