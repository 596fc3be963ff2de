//! Claim-check: payloads over a size travel through an object store, and
//! the envelope carries the reference and a checksum.
//!
//! [`ClaimCheck`] is a publish layer and a consume layer (feature
//! `claim-check`). On publish, a payload larger than the threshold
//! (256 KiB unless set) is stored through the
//! [`object_store`](https://docs.rs/object_store) crate, on the local
//! filesystem or an S3-compatible server (feature `claim-check-s3`), and
//! the envelope goes to the broker with an empty payload and three headers.
//! On consume, the layer fetches the object, checks its size and SHA-256,
//! and hands the handler the original envelope (payload back, the three
//! headers gone). A missing or corrupt object is dead-lettered with the
//! reason; a store that cannot be reached gives the delivery back (a nack
//! with a delay), so it is retried.
//!
//! ## Wire format
//!
//! | header | value |
//! |---|---|
//! | `oona-claim-key` | the object's key in the store: `<prefix>/<topic>/<32 hex digits, fresh per object>` |
//! | `oona-claim-store` | the store's URL without credentials or options (`s3://oona-claims`, `file:///var/lib/oona/claims`), for readers outside Oona |
//! | `oona-claim-sha256` | the payload's SHA-256, 64 lower-case hex digits |
//! | `oona-claim-size` | the payload's length in bytes |
//!
//! The content type, schema id and every other field are the original's. A
//! Python service reads the object with its own S3 client: bucket from
//! `oona-claim-store`, key from `oona-claim-key`.
//!
//! ## Order among layers
//!
//! The layers nearest the wire are the last added on publish and the first
//! added on consume. Signatures must cover what travels, so add the
//! claim-check before the signing layer on publish and after the verifying
//! layer on consume: the signature then covers the reference and the
//! checksum, and the checksum covers the payload.
//!
//! ## Expiry
//!
//! An object lives as long as its topic's retention
//! ([`ClaimCheck::with_policies`]; the default [`PolicySet`]: telemetry
//! 72 h, control and system 30 days, innovation forever).
//! [`ClaimCheck::expire`] deletes the objects past it; run it periodically
//! (or give the bucket a lifecycle rule per `<prefix>/<plane>.` prefix).
//! Dead letters keep the reference, not the object: an object expires with
//! its topic's retention even while a dead letter names it.
//!
//! ```
//! # async fn demo() -> oona_core::Result<()> {
//! use oona_core::claim::ClaimCheck;
//! let claims = ClaimCheck::from_url("file:///tmp/oona-claims")?.with_threshold(64 * 1024);
//! // bus.with_publish_layer(claims.clone()).with_consume_layer(claims)
//! # let _ = claims; Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use sha2::{Digest, Sha256};

use crate::delivery::{Delivery, Outcome};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::layer::{ConsumeLayer, ConsumeNext, Handled, PublishLayer, PublishNext};
use crate::topic::{PolicySet, Retention, Topic};
use crate::transport::Receipt;

/// The object's key in the store.
pub const KEY: &str = "oona-claim-key";
/// The store's URL, for readers outside Oona.
pub const STORE: &str = "oona-claim-store";
/// The payload's SHA-256 (hex).
pub const SHA256: &str = "oona-claim-sha256";
/// The payload's length in bytes.
pub const SIZE: &str = "oona-claim-size";

/// How long a delivery waits when the store cannot be reached.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// Counts of what a [`ClaimCheck`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimCounts {
    /// Payloads stored on publish.
    pub stored: u64,
    /// Payloads fetched on consume.
    pub fetched: u64,
    /// Deliveries dead-lettered because their object was missing.
    pub missing: u64,
    /// Deliveries dead-lettered because their object did not match its
    /// size or checksum.
    pub corrupt: u64,
    /// Deliveries given back because the store failed.
    pub store_errors: u64,
    /// Objects deleted by [`ClaimCheck::expire`].
    pub expired: u64,
}

#[derive(Debug, Default)]
struct Counters {
    stored: AtomicU64,
    fetched: AtomicU64,
    missing: AtomicU64,
    corrupt: AtomicU64,
    store_errors: AtomicU64,
    expired: AtomicU64,
}

/// The claim-check layer (see the module docs). Cheap to clone; clones
/// share the store and the counts.
#[derive(Clone)]
pub struct ClaimCheck {
    store: Arc<dyn ObjectStore>,
    store_url: Arc<str>,
    prefix: Path,
    threshold: usize,
    max_object: usize,
    policies: PolicySet,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for ClaimCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimCheck")
            .field("store", &self.store_url)
            .field("prefix", &self.prefix.as_ref())
            .field("threshold", &self.threshold)
            .field("counts", &self.counts())
            .finish()
    }
}

impl ClaimCheck {
    /// Default threshold: payloads over 256 KiB are claim-checked.
    pub const DEFAULT_THRESHOLD: usize = 256 * 1024;
    /// Default largest object a consumer reads: 1 GiB.
    pub const DEFAULT_MAX_OBJECT: usize = 1 << 30;

    /// Objects in `store` under `prefix`; `store_url` names the store in
    /// the `oona-claim-store` header.
    pub fn new(store: Arc<dyn ObjectStore>, store_url: &str, prefix: Path) -> Self {
        ClaimCheck {
            store,
            store_url: store_url.into(),
            prefix,
            threshold: Self::DEFAULT_THRESHOLD,
            max_object: Self::DEFAULT_MAX_OBJECT,
            policies: PolicySet::default(),
            counters: Arc::default(),
        }
    }

    /// A store by URL: `file:///dir` (the directory is created), or with
    /// feature `claim-check-s3` `s3://bucket/prefix`. Query keys are
    /// `object_store`'s options (`endpoint`, `region`, `access_key_id`,
    /// `secret_access_key`, `allow_http`, ...; `AWS_*` variables of the
    /// environment fill the rest) and `threshold=<bytes>`.
    pub fn from_url(url: &str) -> Result<Self> {
        // Not echoed: its query may hold a secret key.
        let parsed = url::Url::parse(url).map_err(|e| {
            Error::new(
                ErrorKind::ConfigInvalid,
                "the claim-check URL does not parse",
            )
            .with_source(e)
        })?;
        let mut options: BTreeMap<String, String> = BTreeMap::new();
        let mut threshold = Self::DEFAULT_THRESHOLD;
        for (k, v) in parsed.query_pairs() {
            if k == "threshold" {
                threshold = v.parse().map_err(|_| {
                    Error::new(
                        ErrorKind::ConfigInvalid,
                        format!("claim-check threshold {v:?} is not a number of bytes"),
                    )
                })?;
            } else {
                options.insert(k.into_owned(), v.into_owned());
            }
        }
        let mut bare = parsed.clone();
        bare.set_query(None);
        let _ = bare.set_password(None);
        let _ = bare.set_username("");
        let (store, prefix) = open_store(&bare, options)?;
        let store_url = match parsed.scheme() {
            "file" => bare.as_str().trim_end_matches('/').to_string(),
            scheme => format!("{scheme}://{}", bare.host_str().unwrap_or_default()),
        };
        Ok(ClaimCheck::new(store, &store_url, prefix).with_threshold(threshold))
    }

    /// Claim-check payloads larger than `bytes`.
    pub fn with_threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// Read no object larger than `bytes` (a larger claim is
    /// dead-lettered before any read).
    pub fn with_max_object_bytes(mut self, bytes: usize) -> Self {
        self.max_object = bytes;
        self
    }

    /// Retention by plane, for [`ClaimCheck::expire`]: give it the bus's
    /// [`PolicySet`] when that is not the default.
    pub fn with_policies(mut self, policies: PolicySet) -> Self {
        self.policies = policies;
        self
    }

    /// The store the objects are in (to inspect or clean up).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The prefix of the objects' keys in the store.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// What it did so far.
    pub fn counts(&self) -> ClaimCounts {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClaimCounts {
            stored: g(&c.stored),
            fetched: g(&c.fetched),
            missing: g(&c.missing),
            corrupt: g(&c.corrupt),
            store_errors: g(&c.store_errors),
            expired: g(&c.expired),
        }
    }

    /// Delete the objects older than their topic's retention (by the
    /// store's last-modified time); returns how many went.
    pub async fn expire(&self) -> Result<u64> {
        let now = SystemTime::now();
        let mut listing = self.store.list(Some(&self.prefix));
        let mut doomed = Vec::new();
        while let Some(meta) = listing.try_next().await.map_err(store_error)? {
            let Some(retention) = self.retention_of(&meta.location) else {
                continue;
            };
            let modified: SystemTime = meta.last_modified.into();
            if now.duration_since(modified).unwrap_or_default() > retention {
                doomed.push(meta.location);
            }
        }
        let mut gone = 0;
        let mut failed = None;
        for location in doomed {
            match self.store.delete(&location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => gone += 1,
                Err(e) => {
                    failed = Some(store_error(e));
                    break;
                }
            }
        }
        self.counters.expired.fetch_add(gone, Ordering::Relaxed);
        failed.map_or(Ok(gone), Err)
    }

    /// An object's retention, from the topic in its key; `None` to keep it
    /// (indefinite, or not an object of ours).
    fn retention_of(&self, location: &Path) -> Option<Duration> {
        let topic = location.parts().nth(self.prefix.parts().count())?;
        let topic = Topic::new(topic.as_ref()).ok()?;
        match self.policies.for_topic(&topic).retention {
            Retention::For(d) => Some(d),
            Retention::Indefinite => None,
        }
    }

    /// A fresh key under the topic: event ids need not be unique, and
    /// every object is written once.
    fn key_of(&self, envelope: &Envelope) -> Path {
        self.prefix
            .child(envelope.topic.as_str())
            .child(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Store a large payload and leave the reference in its place; the
    /// object's key, if it stored one.
    async fn check_in(&self, envelope: &mut Envelope) -> Result<Option<Path>> {
        if envelope.payload.len() <= self.threshold {
            return Ok(None);
        }
        let key = self.key_of(envelope);
        let payload = std::mem::take(&mut envelope.payload);
        let digest = sha256_hex(&payload);
        let size = payload.len();
        self.store
            .put(&key, PutPayload::from_bytes(payload))
            .await
            .map_err(store_error)?;
        let h = &mut envelope.headers;
        h.insert(KEY.into(), key.to_string());
        h.insert(STORE.into(), self.store_url.to_string());
        h.insert(SHA256.into(), digest);
        h.insert(SIZE.into(), size.to_string());
        self.counters.stored.fetch_add(1, Ordering::Relaxed);
        Ok(Some(key))
    }

    /// The claimed payload of `envelope`, fetched and checked; `Ok(None)`
    /// when it has no claim; `Err` is the outcome the delivery gets instead.
    async fn check_out(&self, envelope: &Envelope) -> std::result::Result<Option<Bytes>, Outcome> {
        let Some(key) = envelope.headers.get(KEY) else {
            return Ok(None);
        };
        let c = &self.counters;
        let corrupt = |why: String| {
            c.corrupt.fetch_add(1, Ordering::Relaxed);
            Outcome::Reject {
                reason: format!("claim-check: object {key} {why}"),
            }
        };
        let h = &envelope.headers;
        let (Some(sha), Some(size)) = (h.get(SHA256), h.get(SIZE).and_then(|s| s.parse().ok()))
        else {
            return Err(corrupt(format!(
                "is unusable: the envelope lacks {SHA256} or a numeric {SIZE}"
            )));
        };
        if let Some(other) = h.get(STORE).filter(|s| **s != *self.store_url) {
            return Err(corrupt(format!(
                "is in the store {other}, and this consumer reads {}",
                self.store_url
            )));
        }
        let path = match Path::parse(key) {
            Ok(p) if p.prefix_matches(&self.prefix) => p,
            _ => return Err(corrupt(format!("is not a key under {}", self.prefix))),
        };
        if size > self.max_object {
            return Err(corrupt(format!(
                "is unusable: {size} bytes, over this consumer's limit of {}",
                self.max_object
            )));
        }
        let bytes = match self.fetch(&path, size).await {
            Ok(Some(b)) => b,
            Ok(None) => return Err(corrupt(format!("is corrupt: not {size} bytes long"))),
            Err(object_store::Error::NotFound { .. }) => {
                c.missing.fetch_add(1, Ordering::Relaxed);
                return Err(Outcome::Reject {
                    reason: format!("claim-check: object {key} is missing"),
                });
            }
            Err(e) => {
                c.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, key, "claim-check: the store failed; retrying the delivery");
                return Err(Outcome::Nack {
                    delay: Some(STORE_RETRY),
                    reason: Some(format!("claim-check: fetching object {key} failed: {e}")),
                });
            }
        };
        let got = sha256_hex(&bytes);
        if got != *sha {
            return Err(corrupt(format!("is corrupt: sha256 {got}, expected {sha}")));
        }
        c.fetched.fetch_add(1, Ordering::Relaxed);
        Ok(Some(bytes))
    }

    /// The object at `path` if it is `size` bytes long (`None` if not),
    /// read only once its length is known.
    async fn fetch(&self, path: &Path, size: usize) -> object_store::Result<Option<Bytes>> {
        let got = self.store.get(path).await?;
        if got.meta.size != size as u64 {
            return Ok(None);
        }
        got.bytes().await.map(Some)
    }

    /// Delete objects no message will name (best effort).
    async fn forget(&self, keys: &[Path]) {
        for key in keys {
            let _ = self.store.delete(key).await;
        }
    }
}

/// Whether a publish refused with `e` surely never reached the broker.
fn refused_before_the_broker(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::PayloadTooLarge
            | ErrorKind::ResourceExhausted
            | ErrorKind::Dropped
            | ErrorKind::InvalidTopic
    )
}

#[async_trait]
impl PublishLayer for ClaimCheck {
    async fn publish(
        &self,
        mut envelopes: Vec<Envelope>,
        next: PublishNext<'_>,
    ) -> Result<Vec<Receipt>> {
        // The large payloads of one batch are stored side by side.
        let stores: Vec<_> = envelopes.iter_mut().map(|e| self.check_in(e)).collect();
        let (mut keys, mut failed) = (Vec::new(), None);
        for stored in futures::future::join_all(stores).await {
            match stored {
                Ok(key) => keys.extend(key),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            self.forget(&keys).await;
            return Err(e);
        }
        match next.run(envelopes).await {
            // Objects of a publish the broker may have taken stay (until
            // their topic's retention).
            Err(e) if refused_before_the_broker(&e) => {
                self.forget(&keys).await;
                Err(e)
            }
            other => other,
        }
    }
}

#[async_trait]
impl ConsumeLayer for ClaimCheck {
    async fn handle(&self, mut delivery: Delivery, next: ConsumeNext<'_>) -> Handled {
        // A large fetch may outlast the ack deadline: the lease is kept.
        let fetched = delivery
            .while_leased(self.check_out(delivery.envelope()), None)
            .await;
        match fetched {
            Some(Ok(None)) => next.run(delivery).await,
            Some(Ok(Some(payload))) => {
                let envelope = delivery.envelope_mut();
                for h in [KEY, STORE, SHA256, SIZE] {
                    envelope.headers.remove(h);
                }
                envelope.payload = payload;
                next.run(delivery).await
            }
            Some(Err(outcome)) => {
                tracing::warn!(event_id = %delivery.envelope().event_id, ?outcome, "claim-check: the payload could not be fetched");
                Handled::settle(delivery, outcome).await
            }
            // No time limit was set: only a cancelled fetch ends here.
            None => {
                let outcome = Outcome::Nack {
                    delay: Some(STORE_RETRY),
                    reason: Some("claim-check: the fetch was cut short".into()),
                };
                Handled::settle(delivery, outcome).await
            }
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The store and the prefix inside it that `url` names.
fn open_store(
    url: &url::Url,
    options: BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let config = |e: object_store::Error| {
        Error::new(ErrorKind::ConfigInvalid, format!("claim-check store {url}")).with_source(e)
    };
    if url.scheme() == "file" {
        let dir = url.to_file_path().map_err(|()| {
            Error::new(
                ErrorKind::ConfigInvalid,
                format!("claim-check store {url} is not a local path"),
            )
        })?;
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::new(
                ErrorKind::ConfigInvalid,
                format!("claim-check directory {}", dir.display()),
            )
            .with_source(e)
        })?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(config)?;
        return Ok((Arc::new(store), Path::default()));
    }
    open_remote(url, options).map_err(config)
}

#[cfg(feature = "claim-check-s3")]
fn open_remote(
    url: &url::Url,
    options: BTreeMap<String, String>,
) -> object_store::Result<(Arc<dyn ObjectStore>, Path)> {
    use object_store::aws::AmazonS3Builder;
    if url.scheme() != "s3" {
        let (store, prefix) = object_store::parse_url_opts(url, options)?;
        return Ok((Arc::from(store), prefix));
    }
    let mut builder = AmazonS3Builder::from_env().with_url(url.as_str());
    for (k, v) in options {
        builder = builder.with_config(k.parse()?, v);
    }
    let prefix = Path::from_url_path(url.path())?;
    Ok((Arc::new(builder.build()?), prefix))
}

#[cfg(not(feature = "claim-check-s3"))]
fn open_remote(
    url: &url::Url,
    _options: BTreeMap<String, String>,
) -> object_store::Result<(Arc<dyn ObjectStore>, Path)> {
    Err(object_store::Error::NotSupported {
        source: format!(
            "{}:// stores need the feature claim-check-s3 (file:// works without it)",
            url.scheme()
        )
        .into(),
    })
}

/// The crate's error for a store's.
fn store_error(e: object_store::Error) -> Error {
    use object_store::Error as E;
    let kind = match &e {
        E::PermissionDenied { .. } => ErrorKind::Unauthorized,
        E::Unauthenticated { .. } => ErrorKind::Unauthenticated,
        E::NotSupported { .. } | E::NotImplemented => ErrorKind::Unsupported,
        _ => ErrorKind::Connection,
    };
    Error::new(kind, "claim-check store").with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryTransport;
    use crate::transport::Transport;
    use crate::{StartPosition, Subscription};
    use futures::StreamExt;

    fn claims(dir: &tempfile::TempDir) -> ClaimCheck {
        let url = url::Url::from_directory_path(dir.path()).unwrap();
        ClaimCheck::from_url(&format!("{url}?threshold=1024")).unwrap()
    }

    fn big(topic: &str, len: usize) -> Envelope {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        Envelope::builder(Topic::new(topic).unwrap(), payload).build()
    }

    async fn publish(cc: &ClaimCheck, t: &MemoryTransport, e: Envelope) {
        let layers: Vec<Arc<dyn PublishLayer>> = vec![Arc::new(cc.clone())];
        PublishNext::new(&layers, t).run(vec![e]).await.unwrap();
    }

    async fn first(t: &MemoryTransport, topic: &Topic, group: &str) -> Delivery {
        let sub = Subscription::new(topic.clone(), crate::Name::new(group).unwrap())
            .start(StartPosition::Earliest);
        let mut stream = t.subscribe(sub).await.unwrap();
        stream.next().await.unwrap().unwrap()
    }

    /// What the broker holds: the first message of `topic`, read raw.
    async fn held(t: &MemoryTransport, topic: &Topic) -> Envelope {
        let d = first(t, topic, "peek").await;
        let e = d.envelope().clone();
        d.ack().await.unwrap();
        e
    }

    /// Receive one delivery through the layer; what the handler saw and how
    /// the delivery was settled.
    async fn consume(
        cc: &ClaimCheck,
        t: &MemoryTransport,
        topic: &str,
    ) -> (Option<Envelope>, Handled) {
        consume_then(cc, t, topic, Outcome::Ack).await
    }

    async fn consume_then(
        cc: &ClaimCheck,
        t: &MemoryTransport,
        topic: &str,
        outcome: Outcome,
    ) -> (Option<Envelope>, Handled) {
        let delivery = first(t, &Topic::new(topic).unwrap(), "g").await;
        let seen = std::sync::Mutex::new(None);
        let terminal = |d: Delivery| -> futures::future::BoxFuture<'_, Handled> {
            *seen.lock().unwrap() = Some(d.envelope().clone());
            Box::pin(Handled::settle(d, outcome.clone()))
        };
        let layers: Vec<Arc<dyn ConsumeLayer>> = vec![Arc::new(cc.clone())];
        let handled = ConsumeNext::new(&layers, &terminal).run(delivery).await;
        (seen.into_inner().unwrap(), handled)
    }

    #[tokio::test]
    async fn large_payloads_travel_by_reference_and_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cc = claims(&dir);
        let t = MemoryTransport::new();
        let original = big("telemetry.seed.blob", 100_000);
        publish(&cc, &t, original.clone()).await;
        // What the broker holds: the reference, no payload.
        let held = held(&t, &original.topic).await;
        assert!(held.payload.is_empty());
        assert_eq!(held.headers[SIZE], "100000");
        assert_eq!(held.headers[SHA256], sha256_hex(&original.payload));
        let (seen, handled) = consume(&cc, &t, "telemetry.seed.blob").await;
        assert_eq!(seen.unwrap(), original);
        assert!(matches!(handled.outcome, Outcome::Ack));
        assert_eq!((cc.counts().stored, cc.counts().fetched), (1, 1));
    }

    #[tokio::test]
    async fn a_dead_letter_keeps_the_reference_not_the_payload() {
        let dir = tempfile::tempdir().unwrap();
        let cc = claims(&dir);
        let t = MemoryTransport::new();
        let original = big("telemetry.seed.refused", 100_000);
        publish(&cc, &t, original.clone()).await;
        let refuse = Outcome::Reject {
            reason: "no".into(),
        };
        let (seen, handled) = consume_then(&cc, &t, "telemetry.seed.refused", refuse).await;
        assert_eq!(
            seen.unwrap().payload,
            original.payload,
            "the handler saw the payload"
        );
        assert!(handled.dead_lettered);
        let dead = held(&t, &original.topic.dead_letter()).await;
        assert!(dead.payload.is_empty());
        assert_eq!(dead.headers[SHA256], sha256_hex(&original.payload));
        assert_eq!(dead.event_id, original.event_id);
    }

    #[tokio::test]
    async fn small_payloads_go_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let cc = claims(&dir);
        let t = MemoryTransport::new();
        let e = big("telemetry.seed.small", 1024);
        publish(&cc, &t, e.clone()).await;
        assert_eq!(held(&t, &e.topic).await, e);
        assert_eq!(cc.counts().stored, 0);
    }

    #[tokio::test]
    async fn a_missing_object_is_dead_lettered_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let cc = claims(&dir);
        let t = MemoryTransport::new();
        let e = big("telemetry.seed.gone", 5000);
        publish(&cc, &t, e.clone()).await;
        let key = held(&t, &e.topic).await.headers[KEY].clone();
        std::fs::remove_file(dir.path().join(key)).unwrap();
        let (seen, handled) = consume(&cc, &t, "telemetry.seed.gone").await;
        assert!(seen.is_none(), "the handler must not run");
        assert!(handled.dead_lettered);
        match handled.outcome {
            Outcome::Reject { reason } => assert!(reason.contains("is missing"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let dead = held(&t, &e.topic.dead_letter()).await;
        assert!(dead.headers[crate::header::DLQ_REASON].contains("is missing"));
        assert_eq!(cc.counts().missing, 1);
    }

    #[tokio::test]
    async fn a_corrupt_object_is_dead_lettered_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let cc = claims(&dir);
        let t = MemoryTransport::new();
        let e = big("telemetry.seed.bad", 5000);
        publish(&cc, &t, e.clone()).await;
        let file = dir.path().join(&held(&t, &e.topic).await.headers[KEY]);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[17] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let (seen, handled) = consume(&cc, &t, "telemetry.seed.bad").await;
        assert!(seen.is_none());
        match handled.outcome {
            Outcome::Reject { reason } => assert!(reason.contains("is corrupt"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(cc.counts().corrupt, 1);
    }

    #[tokio::test]
    async fn expire_deletes_objects_past_their_planes_retention() {
        let dir = tempfile::tempdir().unwrap();
        let short = PolicySet::default().with_plane(
            "telemetry",
            crate::TopicPolicy::new(Retention::For(Duration::from_millis(1))),
        );
        let cc = claims(&dir).with_policies(short);
        let t = MemoryTransport::new();
        publish(&cc, &t, big("telemetry.seed.old", 5000)).await;
        publish(&cc, &t, big("innovation.seed.kept", 5000)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(cc.expire().await.unwrap(), 1);
        assert!(!dir
            .path()
            .join("telemetry.seed.old")
            .read_dir()
            .unwrap()
            .any(|_| true));
        assert_eq!(
            dir.path()
                .join("innovation.seed.kept")
                .read_dir()
                .unwrap()
                .count(),
            1
        );
    }

    #[test]
    fn bad_urls_are_refused_clearly() {
        let e = ClaimCheck::from_url("file:///tmp/x?threshold=lots").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains("threshold"), "{e}");
        assert!(ClaimCheck::from_url("not a url").is_err());
    }
}
