//! Message security: signing keys and signed envelopes, and replay
//! protection, as layers the facade puts on the publish and consume paths
//! of every transport.
//!
//! ```
//! use oona_core::security::{sign, verify, Keyring, Keys, SignLayer, VerifyLayer};
//! use oona_core::{Envelope, Topic};
//!
//! # fn main() -> oona_core::Result<()> {
//! // `id:base64-secret`, the current key first (OONA_SIGNING_KEYS).
//! let ring = Keyring::parse("k1:YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=")?;
//! let mut e = Envelope::builder(Topic::new("control.kasmina.commands")?, "{}").build();
//! sign(&mut e, &ring);
//! assert_eq!(verify(&e, &ring).map(|k| k.to_string()).as_deref(), Ok("k1"));
//! // On a bus: `with_publish_layer(SignLayer::new(keys.clone()))` (added
//! // last) and `with_consume_layer(VerifyLayer::new(keys))`.
//! let keys = Keys::new().with_plane("control", ring);
//! let (_sign, _verify) = (SignLayer::new(keys.clone()), VerifyLayer::new(keys));
//! # Ok(()) }
//! ```

mod keys;
mod replay;
mod sign;

pub use keys::{KeyId, Keyring, Keys, Secret, KEYS_ENV, MIN_SECRET_BYTES};
pub use replay::{MemoryNonces, NonceStore, ReplayCounts, ReplayError, ReplayLayer};
pub use sign::{
    sign, verify, SignLayer, SignatureCounts, SignatureError, SignatureStats, VerifyLayer,
    SIGNATURE_HEADER,
};
