//! Signed envelopes: HMAC-SHA256 over a canonical form of every field
//! that travels, the key id beside the MAC in the `oona-sig` header.
//!
//! **Canonical form, version 1.** The bytes signed are netstrings
//! (`<length in decimal>:<bytes>,`) of, in this order:
//!
//! 1. the text `oona-sig-v1`;
//! 2. `event_id`, `sender_id`;
//! 3. `timestamp` as Unix milliseconds in decimal (so `…05.123Z` and
//!    `…05.123000+00:00` sign alike);
//! 4. `topic`, `trace_id`, `correlation_id`, `key`, `content_type`,
//!    `schema_id`, `priority` (an absent field is the empty string;
//!    `content_type` defaults to `application/json`, `priority` to
//!    `normal`, as on the wire);
//! 5. the number of headers in decimal, then each header's name and value,
//!    in byte order of the names, without `oona-sig` itself;
//! 6. the payload bytes.
//!
//! The header is `oona-sig: v1:<key id>:<MAC in lower-case hex>`. A service
//! in another language signs and checks with its standard library; the
//! Python version (`hmac`, `hashlib`) is in the crate docs and tested.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use hmac::Mac;

use crate::delivery::{Delivery, Outcome};
use crate::envelope::Envelope;
use crate::error::Result;
use crate::layer::{ConsumeLayer, ConsumeNext, Handled, PublishLayer, PublishNext};
use crate::security::keys::{HmacSha256, KeyId, Keyring, Keys, Secret};
use crate::transport::Receipt;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "oona-sig";

const VERSION: &str = "v1";

fn netstring(mac: &mut HmacSha256, bytes: &[u8]) {
    decimal(mac, bytes.len());
    mac.update(b":");
    mac.update(bytes);
    mac.update(b",");
}

/// `n` in decimal, without allocating (once per field of every message).
fn decimal(mac: &mut HmacSha256, mut n: usize) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    mac.update(&buf[i..]);
}

/// Feed the canonical form of `env` (see the module docs) to `mac`.
fn feed(mac: &mut HmacSha256, env: &Envelope) {
    fn opt(v: &Option<String>) -> &[u8] {
        v.as_deref().unwrap_or("").as_bytes()
    }
    let signed = || {
        env.headers
            .iter()
            .filter(|(k, _)| k.as_str() != SIGNATURE_HEADER)
    };
    netstring(mac, b"oona-sig-v1");
    netstring(mac, env.event_id.as_str().as_bytes());
    netstring(mac, env.sender_id.as_bytes());
    netstring(mac, env.timestamp.unix_millis().to_string().as_bytes());
    netstring(mac, env.topic.as_str().as_bytes());
    netstring(mac, opt(&env.trace_id));
    netstring(mac, opt(&env.correlation_id));
    netstring(mac, opt(&env.key));
    netstring(mac, env.content_type.as_str().as_bytes());
    netstring(mac, opt(&env.schema_id));
    netstring(mac, env.priority.as_str().as_bytes());
    netstring(mac, signed().count().to_string().as_bytes());
    for (k, v) in signed() {
        netstring(mac, k.as_bytes());
        netstring(mac, v.as_bytes());
    }
    netstring(mac, &env.payload);
}

fn mac_of(secret: &Secret, env: &Envelope) -> HmacSha256 {
    let mut mac = secret.mac();
    feed(&mut mac, env);
    mac
}

/// Sign `env` with the current key of `keyring` (replacing any signature).
/// Sign last: a later change of any field (a bus filling an empty
/// `sender_id`, say) makes the signature fail; [`SignLayer`] signs at the
/// end of the publish path for that reason.
pub fn sign(env: &mut Envelope, keyring: &Keyring) {
    let (id, secret) = keyring.current();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let tag = mac_of(secret, env).finalize().into_bytes();
    let mut value = String::with_capacity(VERSION.len() + id.as_str().len() + 66);
    value.push_str(VERSION);
    value.push(':');
    value.push_str(id.as_str());
    value.push(':');
    for b in tag {
        value.push(char::from(HEX[usize::from(b >> 4)]));
        value.push(char::from(HEX[usize::from(b & 15)]));
    }
    env.headers.insert(SIGNATURE_HEADER.to_string(), value);
}

/// Why a signature was refused; its `Display` is the dead letter's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The topic's messages must be signed and this one is not.
    #[error("signature: missing (the topic's plane requires signed messages)")]
    Missing,
    /// The header is not `v1:<key id>:<64 hex digits>`.
    #[error("signature: malformed header ({0})")]
    Malformed(String),
    /// Signed with a key the consumer does not list.
    #[error("signature: unknown key id {0:?}")]
    UnknownKey(String),
    /// The MAC does not match: the message was changed, or signed with
    /// another secret under this id.
    #[error("signature: does not match (key {0})")]
    Mismatch(KeyId),
}

/// Check the signature of `env` against `keyring`; the key that signed it.
pub fn verify(env: &Envelope, keyring: &Keyring) -> std::result::Result<KeyId, SignatureError> {
    let Some(header) = env.headers.get(SIGNATURE_HEADER) else {
        return Err(SignatureError::Missing);
    };
    let mut parts = header.splitn(3, ':');
    let (Some(version), Some(id), Some(hex)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SignatureError::Malformed(
            "expected v1:<key id>:<mac>".into(),
        ));
    };
    if version != VERSION {
        return Err(SignatureError::Malformed(format!(
            "version {version:?}, this consumer reads {VERSION}"
        )));
    }
    let tag = decode_hex(hex)
        .ok_or_else(|| SignatureError::Malformed("the MAC is not 64 hex digits".into()))?;
    let Some(secret) = keyring.get(id) else {
        return Err(SignatureError::UnknownKey(id.chars().take(64).collect()));
    };
    let id = keyring
        .ids()
        .find(|k| k.as_str() == id)
        .cloned()
        .ok_or_else(|| SignatureError::UnknownKey(id.to_string()))?;
    // Constant time.
    mac_of(secret, env)
        .verify_slice(&tag)
        .map_err(|_| SignatureError::Mismatch(id.clone()))?;
    Ok(id)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..32)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// The publish layer that signs every envelope whose topic has a keyring.
/// Add it last (innermost), so no later layer changes a signed envelope.
#[derive(Debug, Clone)]
pub struct SignLayer {
    keys: Keys,
}

impl SignLayer {
    /// Sign with `keys`.
    pub fn new(keys: Keys) -> Self {
        SignLayer { keys }
    }
}

#[async_trait]
impl PublishLayer for SignLayer {
    async fn publish(
        &self,
        mut envelopes: Vec<Envelope>,
        next: PublishNext<'_>,
    ) -> Result<Vec<Receipt>> {
        for e in &mut envelopes {
            if let Some(k) = self.keys.for_topic(&e.topic) {
                sign(e, k);
            }
        }
        next.run(envelopes).await
    }
}

/// Counts of what the verifier saw.
#[derive(Debug, Default)]
pub struct SignatureStats {
    verified: AtomicU64,
    missing: AtomicU64,
    malformed: AtomicU64,
    unknown_key: AtomicU64,
    mismatch: AtomicU64,
}

/// A snapshot of [`SignatureStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SignatureCounts {
    /// Handed on with a good signature.
    pub verified: u64,
    /// Dead-lettered: no signature where one is required.
    pub missing: u64,
    /// Dead-lettered: a header that is no signature.
    pub malformed: u64,
    /// Dead-lettered: a key the consumer does not list.
    pub unknown_key: u64,
    /// Dead-lettered: a signature that does not match.
    pub mismatch: u64,
}

impl SignatureStats {
    /// The counts so far.
    pub fn counts(&self) -> SignatureCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SignatureCounts {
            verified: get(&self.verified),
            missing: get(&self.missing),
            malformed: get(&self.malformed),
            unknown_key: get(&self.unknown_key),
            mismatch: get(&self.mismatch),
        }
    }

    fn count(&self, r: &std::result::Result<KeyId, SignatureError>) {
        let c = match r {
            Ok(_) => &self.verified,
            Err(SignatureError::Missing) => &self.missing,
            Err(SignatureError::Malformed(_)) => &self.malformed,
            Err(SignatureError::UnknownKey(_)) => &self.unknown_key,
            Err(SignatureError::Mismatch(_)) => &self.mismatch,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The consume layer that checks signatures: on a topic with a keyring a
/// delivery goes to the handler only with a good signature of a listed
/// key; otherwise it is dead-lettered with a `signature: ...` reason and
/// counted. Topics without a keyring pass unchecked.
#[derive(Debug, Clone)]
pub struct VerifyLayer {
    keys: Keys,
    stats: Arc<SignatureStats>,
}

impl VerifyLayer {
    /// Check against `keys`.
    pub fn new(keys: Keys) -> Self {
        VerifyLayer {
            keys,
            stats: Arc::default(),
        }
    }

    /// The counts of this layer (shared by its clones).
    pub fn stats(&self) -> Arc<SignatureStats> {
        Arc::clone(&self.stats)
    }
}

#[async_trait]
impl ConsumeLayer for VerifyLayer {
    async fn handle(&self, delivery: Delivery, next: ConsumeNext<'_>) -> Handled {
        let env = delivery.envelope();
        let Some(keyring) = self.keys.for_topic(&env.topic) else {
            return next.run(delivery).await;
        };
        let checked = verify(env, keyring);
        self.stats.count(&checked);
        match checked {
            Ok(_) => next.run(delivery).await,
            Err(e) => {
                tracing::warn!(topic = %env.topic, event_id = %env.event_id, sender_id = %env.sender_id, reason = %e, "refused: dead-lettered");
                let reason = e.to_string();
                Handled::settle(delivery, Outcome::Reject { reason }).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{ContentType, Priority, Timestamp};
    use crate::topic::Topic;

    fn keyring(spec: &str) -> Keyring {
        Keyring::parse(spec).unwrap()
    }

    const A: &str = "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=";
    const B: &str = "YmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmI=";

    fn envelope() -> Envelope {
        Envelope::builder(
            Topic::new("control.kasmina.commands").unwrap(),
            &b"{\"op\":\"prune\"}"[..],
        )
        .sender_id("tamiyo")
        .timestamp(Timestamp::from_unix_millis(1_767_225_600_123))
        .key("layer-3")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .build()
    }

    #[test]
    fn a_signed_envelope_verifies_and_any_change_breaks_it() {
        let k = keyring(&format!("k1:{A}"));
        let mut e = envelope();
        sign(&mut e, &k);
        assert_eq!(verify(&e, &k).unwrap().as_str(), "k1");
        type Change = Box<dyn Fn(&mut Envelope)>;
        let changes: Vec<Change> = vec![
            Box::new(|e| e.payload = bytes::Bytes::from_static(b"{\"op\":\"grow\"}")),
            Box::new(|e| e.sender_id.push('x')),
            Box::new(|e| e.timestamp = Timestamp::from_unix_millis(1)),
            Box::new(|e| e.topic = Topic::new("control.kasmina.other").unwrap()),
            Box::new(|e| e.key = None),
            Box::new(|e| e.trace_id = Some("other".into())),
            Box::new(|e| e.correlation_id = Some("c".into())),
            Box::new(|e| e.schema_id = Some("s/1".into())),
            Box::new(|e| e.content_type = ContentType::new(ContentType::PROTOBUF)),
            Box::new(|e| e.priority = Priority::Emergency),
            Box::new(|e| {
                e.headers.insert("x".into(), "1".into());
            }),
            Box::new(|e| {
                e.headers.remove("traceparent");
            }),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut c = e.clone();
            change(&mut c);
            assert_eq!(
                verify(&c, &k),
                Err(SignatureError::Mismatch(KeyId::new("k1").unwrap())),
                "change {i}"
            );
        }
    }

    #[test]
    fn rotation_and_refusals() {
        let old = keyring(&format!("k1:{A}"));
        let both = keyring(&format!("k2:{B},k1:{A}"));
        let mut e = envelope();
        sign(&mut e, &old);
        assert_eq!(
            verify(&e, &both).unwrap().as_str(),
            "k1",
            "an old key verifies"
        );
        sign(&mut e, &both);
        assert!(e.headers[SIGNATURE_HEADER].starts_with("v1:k2:"));
        assert_eq!(
            verify(&e, &old),
            Err(SignatureError::UnknownKey("k2".into())),
            "a consumer not yet told of k2"
        );
        let mut unsigned = envelope();
        assert_eq!(verify(&unsigned, &old), Err(SignatureError::Missing));
        for bad in [
            "v1:k1",
            "v2:k1:00",
            "v1:k1:zz",
            &format!("v1:k1:{}", "0".repeat(64)),
        ] {
            unsigned
                .headers
                .insert(SIGNATURE_HEADER.into(), bad.to_string());
            let r = verify(&unsigned, &old);
            assert!(
                matches!(
                    r,
                    Err(SignatureError::Malformed(_)) | Err(SignatureError::Mismatch(_))
                ),
                "{bad}: {r:?}"
            );
        }
        // Same id, another secret: a mismatch, not an unknown key.
        let impostor = keyring(&format!("k1:{B}"));
        sign(&mut e, &impostor);
        assert!(matches!(verify(&e, &old), Err(SignatureError::Mismatch(_))));
    }

    #[test]
    fn the_canonical_form_is_pinned() {
        // Any change to the canonical form breaks every other language's
        // signer: this MAC is also what the Python snippet computes.
        let mut e = envelope();
        e.event_id =
            crate::envelope::EventId::parse("0b0c9a3e-8f5e-4c55-9d43-2a1f0c1d2e3f").unwrap();
        e.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        sign(&mut e, &keyring(&format!("k1:{A}")));
        assert_eq!(
            e.headers[SIGNATURE_HEADER], PINNED,
            "the canonical form changed"
        );
    }

    /// Computed by the README's Python snippet from the same fields.
    const PINNED: &str = "v1:k1:f2e21e69286348480c5f67f4051da52d39380515c76a8b470df0b494bd2e1eb5";
}
