//! [`KafkaTransport`]: publish, topics, health and close.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use oona_core::{
    rules, Capabilities, DeliveryStream, Depth, Envelope, Error, ErrorKind, Health, HealthStatus,
    Name, Receipt, Result, Retention, Subscription, Topic, TopicInfo, TopicPolicy, Transport,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::headers;
use crate::options::KafkaOptions;

pub(crate) const NAME: &str = "kafka";

/// Largest payload accepted: the default 1 MiB policy limit; the producer's
/// `message.max.bytes` leaves room for headers above it.
const MAX_PAYLOAD: usize = TopicPolicy::DEFAULT_MAX_PAYLOAD;

/// Largest record batch, in the producer (`message.max.bytes`) and in the
/// topics Oona creates (`max.message.bytes`): the payload limit plus room for
/// the headers. Kafka's broker default (1 MiB + 12 bytes) would refuse a
/// payload at the limit once its headers are added.
const MAX_RECORD_BYTES: usize = MAX_PAYLOAD + 256 * 1024;

/// The Kafka transport. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct KafkaTransport {
    pub(crate) inner: Arc<Inner>,
}

/// The producer's client context: librdkafka reports a refused login
/// through this callback, not on the request that failed, so it is kept
/// for `connect` to say.
pub(crate) struct Watch {
    refused: Arc<Mutex<Option<(ErrorKind, String)>>>,
}

impl Watch {
    /// The kind and message of the permanent error a connect reports at
    /// once for a librdkafka error that no retry mends: refused
    /// credentials or a failed TLS handshake. `None` for the rest (a
    /// broker down is retried).
    fn refusal(code: Option<RDKafkaErrorCode>, reason: &str) -> Option<(ErrorKind, String)> {
        let (kind, why) = match code? {
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
                (ErrorKind::Unauthenticated, "refused the credentials")
            }
            RDKafkaErrorCode::SSL if reason.contains("certificate verify failed") => (
                ErrorKind::ConfigInvalid,
                "sent a TLS certificate that does not verify (a private CA is trusted with `tls_ca`)",
            ),
            RDKafkaErrorCode::SSL => (ErrorKind::ConfigInvalid, "failed the TLS handshake"),
            _ => return None,
        };
        Some((kind, format!("{why}: {reason}")))
    }
}

impl rdkafka::ClientContext for Watch {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(e) = Self::refusal(error.rdkafka_error_code(), reason) {
            if let Ok(mut r) = self.refused.lock() {
                r.get_or_insert(e);
            }
        }
        tracing::warn!(error = %error, reason, "librdkafka");
    }
}

pub(crate) struct Inner {
    pub(crate) opts: KafkaOptions,
    /// Also the client of metadata, watermarks and the group list.
    pub(crate) producer: FutureProducer<Watch>,
    admin: AdminClient<DefaultClientContext>,
    ensured: Mutex<HashSet<String>>,
    closed: AtomicBool,
    pub(crate) shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    subscriptions: Mutex<Vec<std::sync::Weak<crate::consumer::Shared>>>,
    pub(crate) depth_readers: crate::depth::Readers,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("brokers", &self.inner.opts.brokers)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// Map a librdkafka error to an Oona error.
pub(crate) fn kafka_error(what: &str, e: KafkaError) -> Error {
    let code = e.rdkafka_error_code();
    let kind = match code {
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
        | Some(RDKafkaErrorCode::InvalidMessageSize) => ErrorKind::PayloadTooLarge,
        Some(RDKafkaErrorCode::MessageTimedOut)
        | Some(RDKafkaErrorCode::OperationTimedOut)
        | Some(RDKafkaErrorCode::RequestTimedOut) => ErrorKind::Timeout,
        Some(RDKafkaErrorCode::BrokerTransportFailure)
        | Some(RDKafkaErrorCode::AllBrokersDown)
        | Some(RDKafkaErrorCode::Resolve)
        | Some(RDKafkaErrorCode::NetworkException) => ErrorKind::Connection,
        Some(RDKafkaErrorCode::SaslAuthenticationFailed)
        | Some(RDKafkaErrorCode::Authentication) => ErrorKind::Unauthenticated,
        Some(RDKafkaErrorCode::TopicAuthorizationFailed)
        | Some(RDKafkaErrorCode::GroupAuthorizationFailed)
        | Some(RDKafkaErrorCode::ClusterAuthorizationFailed)
        | Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed) => ErrorKind::Unauthorized,
        Some(RDKafkaErrorCode::QueueFull) => ErrorKind::ResourceExhausted,
        // librdkafka refuses a setting (a CA file that does not exist, ...).
        _ if matches!(
            e,
            KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..)
        ) =>
        {
            ErrorKind::ConfigInvalid
        }
        _ => ErrorKind::Broker,
    };
    let temporary = !matches!(
        kind,
        ErrorKind::PayloadTooLarge
            | ErrorKind::Unauthenticated
            | ErrorKind::Unauthorized
            | ErrorKind::ConfigInvalid
    );
    // The message carries librdkafka's text (dead-letter reasons are
    // messages); as a source too it would be printed twice.
    Error::new(kind, format!("{what}: {e}"))
        .with_transport(NAME)
        .set_temporary(temporary)
}

/// Run librdkafka's blocking call `f` off the runtime; `what` names it
/// if the task is lost.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("{what} task: {e}")))
}

pub(crate) fn closed_error() -> Error {
    Error::new(ErrorKind::Closed, "kafka transport is closed").with_transport(NAME)
}

impl KafkaTransport {
    /// Connect with the given options: creates the producer and admin
    /// clients and checks the brokers answer.
    pub async fn connect(opts: KafkaOptions) -> Result<Self> {
        let mut pc = opts.client_config();
        pc.set("acks", "all")
            .set("enable.idempotence", opts.idempotence.to_string())
            .set("linger.ms", opts.linger.as_millis().to_string())
            .set("batch.num.messages", opts.batch_messages.to_string())
            .set("queue.buffering.max.messages", "1000000")
            .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
            .set("message.timeout.ms", opts.timeout.as_millis().to_string());
        let refused = Arc::new(Mutex::new(None));
        let watch = Watch {
            refused: Arc::clone(&refused),
        };
        let producer: FutureProducer<Watch> = pc
            .create_with_context(watch)
            .map_err(|e| kafka_error("create producer", e))?;
        let admin: AdminClient<DefaultClientContext> = opts
            .client_config()
            .create()
            .map_err(|e| kafka_error("create admin client", e))?;
        let (shutdown, _) = watch::channel(false);
        let t = KafkaTransport {
            inner: Arc::new(Inner {
                opts,
                producer,
                admin,
                ensured: Mutex::new(HashSet::new()),
                closed: AtomicBool::new(false),
                shutdown,
                tasks: Mutex::new(Vec::new()),
                subscriptions: Mutex::new(Vec::new()),
                depth_readers: Default::default(),
            }),
        };
        let wait = t.inner.opts.timeout.min(Duration::from_secs(10));
        let brokers = t.inner.opts.brokers.join(",");
        let refusal = |(kind, why): (ErrorKind, String)| {
            Error::new(kind, format!("kafka brokers {brokers} {why}"))
                .with_transport(NAME)
                .set_temporary(false)
        };
        let refused_now = || refused.lock().ok().and_then(|r| r.clone());
        // A refused login or a failed handshake is reported through the
        // callback as soon as it happens; the metadata request would only
        // time out.
        let watch = async {
            loop {
                if let Some(e) = refused_now() {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let answered = tokio::select! {
            r = t.inner.metadata(None, wait) => r,
            e = watch => return Err(refusal(e)),
        };
        answered.map_err(|e| {
            if matches!(
                e.kind(),
                ErrorKind::Unauthenticated | ErrorKind::Unauthorized
            ) {
                return e; // credentials, not reachability
            }
            if let Some(e) = refused_now() {
                return refusal(e);
            }
            Error::new(
                ErrorKind::Connection,
                format!("kafka brokers {brokers} did not answer: {e}"),
            )
            .with_transport(NAME)
        })?;
        Ok(t)
    }

    /// The options in force.
    pub fn options(&self) -> &KafkaOptions {
        &self.inner.opts
    }

    /// The `retention.ms` the broker applies to a topic, read with the
    /// admin client (`DescribeConfigs`).
    pub async fn applied_retention(&self, topic: &str) -> Result<Retention> {
        let ms = self.inner.retention_ms(topic).await?;
        match ms {
            Some(ms) if ms < 0 => Ok(Retention::Indefinite),
            Some(ms) => Ok(Retention::For(Duration::from_millis(ms as u64))),
            None => Err(Error::new(
                ErrorKind::Broker,
                format!("topic {topic} has no retention.ms in its config"),
            )
            .with_transport(NAME)),
        }
    }
}

impl Inner {
    /// Remember a subscription so `Transport::flush` reaches it.
    pub(crate) fn track_subscription(&self, sub: std::sync::Weak<crate::consumer::Shared>) {
        if let Ok(mut subs) = self.subscriptions.lock() {
            subs.retain(|s| s.strong_count() > 0);
            subs.push(sub);
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn admin_opts(&self) -> AdminOptions {
        AdminOptions::new().operation_timeout(Some(Timeout::After(self.opts.timeout)))
    }

    /// Topic metadata, fetched off the async runtime (librdkafka blocks).
    pub(crate) async fn metadata(
        &self,
        topic: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<(String, usize, usize)>> {
        let producer = self.producer.clone();
        let topic = topic.map(str::to_string);
        blocking("metadata", move || {
            let md = producer
                .client()
                .fetch_metadata(topic.as_deref(), Timeout::After(timeout))
                .map_err(|e| kafka_error("fetch metadata", e))?;
            let denied = md.topics().iter().find(|t| {
                t.error().map(RDKafkaErrorCode::from)
                    == Some(RDKafkaErrorCode::TopicAuthorizationFailed)
            });
            if let Some(t) = denied {
                return Err(Error::new(
                    ErrorKind::Unauthorized,
                    format!(
                        "topic {}: the credentials do not allow it (TOPIC_AUTHORIZATION_FAILED)",
                        t.name()
                    ),
                )
                .with_transport(NAME)
                .set_temporary(false));
            }
            Ok(md
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| {
                    let ready = t
                        .partitions()
                        .iter()
                        .filter(|p| p.error().is_none() && p.leader() >= 0)
                        .count();
                    (t.name().to_string(), t.partitions().len(), ready)
                })
                .collect())
        })
        .await?
    }

    /// Delete `group` and its retry topic on `topic` (after
    /// [`crate::admin::check_deletable`]).
    pub(crate) async fn delete_group(
        &self,
        topic: &Topic,
        group: &Name,
        topics: &[String],
    ) -> Result<()> {
        let res = self
            .admin
            .delete_groups(&[&self.opts.group_id(group)], &self.admin_opts())
            .await
            .map_err(|e| kafka_error("delete group", e))?;
        for r in res {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::NonEmptyGroup)) => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        format!("group {group} still has members: close them first"),
                    )
                    .with_transport(NAME)
                    .set_temporary(true))
                }
                Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {
                    return Err(oona_core::admin::group_not_found(topic, group).with_transport(NAME))
                }
                Err((_, code)) => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        format!("deleting group {group} failed: {code}"),
                    )
                    .with_transport(NAME))
                }
            }
        }
        let retry = crate::consumer::retry_topic(&self.opts.kafka_topic(topic), group);
        if topics.contains(&retry) {
            self.admin
                .delete_topics(&[retry.as_str()], &self.admin_opts())
                .await
                .map_err(|e| kafka_error("delete the group's retry topic", e))?;
            if let Ok(mut s) = self.ensured.lock() {
                s.remove(&retry);
            }
        }
        Ok(())
    }

    pub(crate) async fn retention_ms(&self, topic: &str) -> Result<Option<i64>> {
        let res = self
            .admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &self.admin_opts())
            .await
            .map_err(|e| kafka_error("describe topic config", e))?;
        for r in res {
            let r = r.map_err(|e| {
                Error::new(ErrorKind::Broker, format!("describe {topic}: {e:?}"))
                    .with_transport(NAME)
            })?;
            if let Some(v) = r.get("retention.ms").and_then(|e| e.value.clone()) {
                return v.parse().map(Some).map_err(|_| {
                    Error::new(
                        ErrorKind::Broker,
                        format!("topic {topic}: retention.ms {v:?} is not a number"),
                    )
                    .with_transport(NAME)
                });
            }
        }
        Ok(None)
    }

    /// Create a Kafka topic (any legal Kafka name) with `policy` unless this
    /// client already did; an existing topic gets its retention set.
    pub(crate) async fn ensure_kafka_topic(
        self: &Arc<Self>,
        name: &str,
        policy: &TopicPolicy,
    ) -> Result<()> {
        if self
            .ensured
            .lock()
            .map(|s| s.contains(name))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let retention = policy.retention.as_millis_or_minus_one().to_string();
        let max_record = MAX_RECORD_BYTES.to_string();
        let nt = NewTopic::new(
            name,
            self.opts.partitions,
            TopicReplication::Fixed(self.opts.replication),
        )
        .set("retention.ms", &retention)
        .set("max.message.bytes", &max_record);
        let res = self
            .admin
            .create_topics([&nt], &self.admin_opts())
            .await
            .map_err(|e| kafka_error("create topic", e))?;
        for r in res {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    // Someone else made it: make its retention the policy's.
                    if self.retention_ms(name).await?.map(|v| v.to_string())
                        != Some(retention.clone())
                    {
                        self.set_topic_config(name, "retention.ms", &retention)
                            .await?;
                        self.await_retention(name, &retention).await?;
                    }
                }
                Err((t, code)) => {
                    return Err(
                        Error::new(ErrorKind::Broker, format!("create topic {t}: {code}"))
                            .with_transport(NAME),
                    )
                }
            }
        }
        // Wait until the producer's own metadata shows the topic with a
        // leader for every partition, so the first produce or subscribe does
        // not race its creation. Records produced while a fresh partition's
        // leader is still being elected were seen to land after later
        // records of the same key (Kafka 4.4, librdkafka 2.12, idempotent
        // producer): a key's first messages out of order.
        let deadline = Instant::now() + self.opts.timeout;
        let partitions = loop {
            let md = self.metadata(Some(name), Duration::from_secs(5)).await?;
            if let Some((_, all, _)) = md
                .iter()
                .find(|(n, all, ready)| n == name && *all > 0 && ready == all)
            {
                break *all;
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("topic {name} has no leader for every partition after creation"),
                )
                .with_transport(NAME));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.await_leaders_serving(name, partitions, deadline)
            .await?;
        if let Ok(mut s) = self.ensured.lock() {
            s.insert(name.to_string());
        }
        Ok(())
    }

    /// Wait until every partition's leader answers a ListOffsets request:
    /// metadata can name a leader a moment before that broker serves the
    /// new partition.
    async fn await_leaders_serving(
        self: &Arc<Self>,
        name: &str,
        partitions: usize,
        deadline: Instant,
    ) -> Result<()> {
        let producer = self.producer.clone();
        let topic = name.to_string();
        blocking("leader check", move || {
            for p in 0..partitions as i32 {
                let client = producer.client();
                while let Err(e) =
                    client.fetch_watermarks(&topic, p, Timeout::After(Duration::from_secs(5)))
                {
                    if Instant::now() > deadline {
                        return Err(kafka_error(
                            &format!("partition {p} of new topic {topic} not served"),
                            e,
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(())
        })
        .await?
    }

    /// Wait until the broker describes `retention.ms` of `topic` as
    /// `want`: a config change travels through the KRaft metadata log, so
    /// a DescribeConfigs right after the change can still answer the old
    /// value. `ensure_topic` returns once the policy reads back.
    async fn await_retention(self: &Arc<Self>, topic: &str, want: &str) -> Result<()> {
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            let now = self.retention_ms(topic).await?.map(|v| v.to_string());
            if now.as_deref() == Some(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "topic {topic}: retention.ms still {now:?}, not {want}, after the change"
                    ),
                )
                .with_transport(NAME));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Set one topic config key (`IncrementalAlterConfigs`).
    async fn set_topic_config(self: &Arc<Self>, topic: &str, key: &str, value: &str) -> Result<()> {
        let this = Arc::clone(self);
        let (t, k, v) = (topic.to_string(), key.to_string(), value.to_string());
        blocking("alter config", move || {
            // `this` keeps the admin client (and its native handle) alive.
            let rk = this.admin.inner().native_ptr();
            crate::incremental::set_topic_config(rk, &t, &k, &v, this.opts.timeout)
        })
        .await?
        .map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("set {key} of topic {topic}: {e}"),
            )
            .with_transport(NAME)
        })
    }

    pub(crate) async fn ensure(self: &Arc<Self>, topic: &Topic) -> Result<()> {
        let policy = self.opts.policies.for_topic(topic).clone();
        self.ensure_kafka_topic(&self.opts.kafka_topic(topic), &policy)
            .await
    }

    /// Send one record and wait for the broker's acknowledgement.
    pub(crate) async fn send(
        &self,
        kafka_topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(i32, i64)> {
        let mut rec = FutureRecord::<[u8], [u8]>::to(kafka_topic)
            .payload(payload)
            .headers(headers);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        self.producer
            .send(rec, Timeout::After(self.opts.timeout))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| kafka_error(&format!("publish to {kafka_topic}"), e))
    }

    /// Publish an envelope (to its own topic), with internal headers.
    pub(crate) async fn publish_envelope(
        &self,
        kafka_topic: &str,
        env: &Envelope,
        extra: &[(&str, String)],
    ) -> Result<(i32, i64)> {
        let hs = headers::encode(env, extra);
        self.send(
            kafka_topic,
            env.key.as_deref().map(str::as_bytes),
            &env.payload,
            hs,
        )
        .await
    }

    /// Publish a dead letter to its topic, creating the topic if needed.
    pub(crate) async fn publish_dead_letter(self: &Arc<Self>, dl: &Envelope) -> Result<()> {
        self.ensure(&dl.topic).await?;
        self.publish_envelope(&self.opts.kafka_topic(&dl.topic), dl, &[])
            .await?;
        Ok(())
    }

    fn check(&self, env: &Envelope) -> Result<()> {
        if self.is_closed() {
            return Err(closed_error());
        }
        rules::check_publish(env, &self.opts.policies, MAX_PAYLOAD)
            .map_err(|e| e.with_transport(NAME))
    }
}

fn position(p: (i32, i64)) -> Option<String> {
    Some(format!("{}/{}", p.0, p.1))
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_key_ordered_competing(true)
            .with_nack_delay(true)
            .with_start_at_time(true)
            .with_retention(true)
            .with_depth(true)
            .with_admin(true)
            .with_max_payload_bytes(MAX_PAYLOAD)
    }

    async fn ensure_topic(&self, topic: &Topic, policy: &TopicPolicy) -> Result<()> {
        if self.inner.is_closed() {
            return Err(closed_error());
        }
        // An explicit call re-applies the policy even if this client made
        // the topic before.
        let name = self.inner.opts.kafka_topic(topic);
        if let Ok(mut s) = self.inner.ensured.lock() {
            s.remove(name.as_ref());
        }
        self.inner.ensure_kafka_topic(&name, policy).await
    }

    async fn depth(&self, topic: &Topic, group: &Name) -> Result<Depth> {
        if self.inner.is_closed() {
            return Err(closed_error());
        }
        let inner = Arc::clone(&self.inner);
        let (topic, group) = (topic.clone(), group.clone());
        blocking("depth", move || {
            crate::depth::group_depth(&inner, &topic, &group)
        })
        .await?
    }

    async fn list_topics(&self) -> Result<Vec<Topic>> {
        if self.inner.is_closed() {
            return Err(closed_error());
        }
        let all = self.inner.metadata(None, self.inner.opts.timeout).await?;
        Ok(crate::admin::list_topics(
            &self.inner.opts,
            all.into_iter().map(|(n, _, _)| n).collect(),
        ))
    }

    async fn describe_topic(&self, topic: &Topic) -> Result<TopicInfo> {
        if self.inner.is_closed() {
            return Err(closed_error());
        }
        let inner = Arc::clone(&self.inner);
        let t = topic.clone();
        let info = blocking("describe", move || crate::admin::describe(&inner, &t)).await??;
        let retention = self
            .inner
            .retention_ms(&self.inner.opts.kafka_topic(topic))
            .await?;
        Ok(info.with_retention(crate::admin::retention(retention)))
    }

    async fn delete_group(&self, topic: &Topic, group: &Name) -> Result<()> {
        if self.inner.is_closed() {
            return Err(closed_error());
        }
        // Names and partition counts, read once for the check and the
        // retry topic.
        let topics: Vec<(String, usize)> =
            (self.inner.metadata(None, self.inner.opts.timeout).await?)
                .into_iter()
                .map(|(n, partitions, _)| (n, partitions))
                .collect();
        let names: Vec<String> = topics.iter().map(|(n, _)| n.clone()).collect();
        let (inner, t, g) = (Arc::clone(&self.inner), topic.clone(), group.clone());
        blocking("delete group", move || {
            crate::admin::check_deletable(&inner, &t, &g, &topics)
        })
        .await??;
        self.inner.delete_group(topic, group, &names).await
    }

    async fn publish(&self, envelope: Envelope) -> Result<Receipt> {
        self.inner.check(&envelope)?;
        self.inner.ensure(&envelope.topic).await?;
        let pos = self
            .inner
            .publish_envelope(
                &self.inner.opts.kafka_topic(&envelope.topic),
                &envelope,
                &[],
            )
            .await?;
        Ok(Receipt::new(
            envelope.event_id,
            envelope.topic,
            position(pos),
        ))
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        for e in &envelopes {
            self.inner.check(e)?;
        }
        let mut topics: Vec<&Topic> = envelopes.iter().map(|e| &e.topic).collect();
        topics.sort();
        topics.dedup();
        for t in topics {
            self.inner.ensure(t).await?;
        }
        // All records are queued before any is awaited, so librdkafka sends
        // them in as few requests as it can; the idempotent producer keeps
        // their order per partition.
        let sends = envelopes
            .iter()
            .map(|e| (self.inner.opts.kafka_topic(&e.topic), e))
            .collect::<Vec<_>>();
        let sends = sends
            .iter()
            .map(|(name, e)| self.inner.publish_envelope(name, e, &[]));
        let results = futures::future::join_all(sends).await;
        let mut receipts = Vec::with_capacity(envelopes.len());
        for (e, r) in envelopes.into_iter().zip(results) {
            let pos = r?;
            receipts.push(Receipt::new(e.event_id, e.topic, position(pos)));
        }
        Ok(receipts)
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        if self.inner.is_closed() {
            return Err(closed_error());
        }
        let (stream, task) = crate::consumer::start(Arc::clone(&self.inner), subscription).await?;
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
        Ok(stream)
    }

    async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        if self.inner.is_closed() {
            return Err(closed_error());
        }
        // The topic, and the retry topics of its groups.
        let name = self.inner.opts.kafka_topic(topic);
        let prefix = format!("{name}.{}", crate::consumer::RETRY_SEGMENT);
        let all = self.inner.metadata(None, self.inner.opts.timeout).await?;
        let mut names: Vec<String> = all
            .into_iter()
            .map(|(n, _, _)| n)
            .filter(|n| *n == name || n.starts_with(&prefix))
            .collect();
        if names.is_empty() {
            names.push(name.into_owned());
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let res = self
            .inner
            .admin
            .delete_topics(&refs, &self.inner.admin_opts())
            .await
            .map_err(|e| kafka_error("delete topic", e))?;
        if let Ok(mut s) = self.inner.ensured.lock() {
            for n in &names {
                s.remove(n);
            }
        }
        for r in res {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((t, code)) => {
                    return Err(
                        Error::new(ErrorKind::Broker, format!("delete topic {t}: {code}"))
                            .with_transport(NAME),
                    )
                }
            }
        }
        Ok(())
    }

    async fn health(&self) -> Health {
        if self.inner.is_closed() {
            return Health::new(HealthStatus::Down, NAME, "closed", None);
        }
        let start = Instant::now();
        match self.inner.metadata(None, Duration::from_secs(5)).await {
            Ok(_) => Health::new(
                HealthStatus::Up,
                NAME,
                format!("brokers {} answer", self.inner.opts.brokers.join(",")),
                Some(start.elapsed()),
            ),
            Err(e) => Health::new(HealthStatus::Down, NAME, e.to_string(), None),
        }
    }

    /// Commits what every subscription has settled (synchronously) and
    /// waits for queued publishes.
    async fn flush(&self) -> Result<()> {
        if self.inner.is_closed() {
            return Err(closed_error());
        }
        let subs: Vec<_> = self
            .inner
            .subscriptions
            .lock()
            .map(|s| s.iter().filter_map(|w| w.upgrade()).collect())
            .unwrap_or_default();
        for s in subs {
            s.flush().await;
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Subscriptions stop, commit what is settled and leave their groups.
        let _ = self.inner.shutdown.send(true);
        let tasks: Vec<JoinHandle<()>> = self
            .inner
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in tasks {
            let _ = t.await;
        }
        let producer = self.inner.producer.clone();
        let timeout = self.inner.opts.timeout;
        blocking("flush", move || producer.flush(Timeout::After(timeout)))
            .await?
            .map_err(|e| kafka_error("flush on close", e))?;
        Ok(())
    }
}
