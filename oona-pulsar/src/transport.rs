//! [`PulsarTransport`]: the [`Transport`] on Pulsar.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pulsar::{Producer, Pulsar, TokioExecutor};
use tokio::sync::{watch, OnceCell};

use oona_core::{
    rules, Capabilities, DeliveryStream, Depth, Envelope, Error, ErrorKind, Health, HealthStatus,
    Name, Receipt, Result, SchemaSpec, StartPosition, Subscription, Topic, TopicInfo, TopicPolicy,
    Transport,
};

use crate::admin::Admin;
use crate::config::PulsarConfig;
use crate::conn::Connector;
use crate::{consumer, mapping, schema, NAME};

/// Largest payload: Pulsar's default `maxMessageSize` is 5 MiB including
/// metadata; 64 KiB are left for the envelope's properties.
pub const MAX_PAYLOAD_BYTES: usize = 5 * 1024 * 1024 - 64 * 1024;

type SharedProducer = Arc<tokio::sync::Mutex<Producer<TokioExecutor>>>;

/// A topic's producers: one without a schema, and one per schema id
/// registered on it (`Transport::register_schema`), so each message goes
/// out under its own schema whatever else the topic carries.
type ProducerKey = (Topic, Option<Arc<str>>);

/// The Pulsar transport. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct PulsarTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PulsarTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PulsarTransport")
            .field("service_url", &self.inner.config.service_url)
            .field("tenant", &self.inner.config.tenant)
            .field("namespace", &self.inner.config.namespace)
            .field("admin", &self.inner.admin.is_some())
            .field("closed", &self.inner.closed.load(Ordering::SeqCst))
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) config: Arc<PulsarConfig>,
    pub(crate) client: Pulsar<TokioExecutor>,
    pub(crate) connector: Connector,
    admin: Option<Admin>,
    producers: Mutex<HashMap<ProducerKey, Arc<OnceCell<SharedProducer>>>>,
    /// With a namespace per plane: the tenant made sure of, and each plane
    /// whose namespace is.
    tenant_ready: OnceCell<()>,
    planes: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
    /// The registry schemas of each topic, by schema id
    /// (`Transport::register_schema`).
    schemas: Mutex<HashMap<Topic, HashMap<Arc<str>, pulsar::proto::Schema>>>,
    /// One registration at a time: callers racing on a new schema (the
    /// workers of a service) find it registered after the first, instead of
    /// each replacing the producer another is sending on.
    registering: tokio::sync::Mutex<()>,
    closed: AtomicBool,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    subscriptions: Mutex<Vec<std::sync::Weak<crate::consumer::Shared>>>,
}

static NEXT_CONSUMER: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps behind these locks stay consistent if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Map a `pulsar` client error to an Oona error.
pub(crate) fn pulsar_err(what: &str, e: pulsar::Error) -> Error {
    use pulsar::error::ServiceDiscoveryError;
    use pulsar::message::proto::ServerError;
    if let pulsar::Error::ServiceDiscovery(ServiceDiscoveryError::Query(
        Some(ServerError::TopicNotFound),
        Some(detail),
    )) = &e
    {
        // A lookup in a tenant or namespace that does not exist: a permanent
        // configuration error, not a connection problem to retry.
        let lower = detail.to_ascii_lowercase();
        if lower.contains("namespace") || lower.contains("tenant") {
            return Error::new(
                ErrorKind::ConfigInvalid,
                format!(
                    "{what}: {detail}: the tenant and namespace of the URL must exist on the \
                     broker (create them with the admin API, or fix `tenant` / `namespace`)"
                ),
            )
            .with_transport(NAME)
            .set_temporary(false);
        }
    }
    let kind = match server_code(&e) {
        Some(code) if crate::conn::server_error_kind(code) != ErrorKind::Broker => {
            crate::conn::server_error_kind(code)
        }
        _ => client_error_kind(&e),
    };
    let msg = format!("{what}: {e}");
    // The broker being busy or a topic being moved is worth a retry too.
    let temporary = kind.default_temporary()
        || msg.contains("ServiceNotReady")
        || msg.contains("TooManyRequests")
        || msg.contains("Disconnected");
    Error::new(kind, msg)
        .with_transport(NAME)
        .set_temporary(temporary)
}

/// The broker's error code inside a client error, where it carries one.
fn server_code(e: &pulsar::Error) -> Option<pulsar::message::proto::ServerError> {
    use pulsar::error::{ConnectionError, ProducerError, ServiceDiscoveryError};
    let conn = |c: &ConnectionError| match c {
        ConnectionError::PulsarError(code, _) => *code,
        _ => None,
    };
    match e {
        pulsar::Error::Connection(c)
        | pulsar::Error::ServiceDiscovery(ServiceDiscoveryError::Connection(c))
        | pulsar::Error::Producer(ProducerError::Connection(c)) => conn(c),
        pulsar::Error::ServiceDiscovery(ServiceDiscoveryError::Query(code, _)) => *code,
        pulsar::Error::Producer(ProducerError::Batch(inner)) => server_code(inner),
        _ => None,
    }
}

/// The kind of a client error that carries no broker error code.
fn client_error_kind(e: &pulsar::Error) -> ErrorKind {
    use pulsar::error::{ConnectionError, ProducerError};
    match e {
        pulsar::Error::Connection(ConnectionError::Unexpected(_))
        | pulsar::Error::Connection(ConnectionError::Decoding(_))
        | pulsar::Error::Connection(ConnectionError::Encoding(_)) => ErrorKind::Broker,
        pulsar::Error::Connection(ConnectionError::Authentication(_)) => ErrorKind::Unauthenticated,
        pulsar::Error::Connection(ConnectionError::Tls(_))
        | pulsar::Error::Connection(ConnectionError::NotFound) => ErrorKind::ConfigInvalid,
        pulsar::Error::Connection(_) | pulsar::Error::ServiceDiscovery(_) => ErrorKind::Connection,
        pulsar::Error::Producer(ProducerError::Connection(_)) => ErrorKind::Connection,
        pulsar::Error::Producer(ProducerError::Closed) => ErrorKind::Closed,
        pulsar::Error::Consumer(_) => ErrorKind::Connection,
        _ => ErrorKind::Broker,
    }
}

impl PulsarTransport {
    /// Connect with `config`.
    pub async fn connect(config: PulsarConfig) -> Result<Self> {
        let config = Arc::new(config);
        let mut b = Pulsar::builder(config.service_url.clone(), TokioExecutor)
            .with_outbound_channel_size(config.producer_queue)
            .with_operation_retry_options(pulsar::OperationRetryOptions {
                operation_timeout: config.operation_timeout,
                ..Default::default()
            })
            .with_connection_retry_options(pulsar::ConnectionRetryOptions {
                // Give up connecting after a few tries: a dead broker is
                // the caller's (temporary) error, not a hang.
                max_retries: 3,
                connection_timeout: config.operation_timeout.min(Duration::from_secs(10)),
                ..Default::default()
            });
        if let Some(t) = &config.token {
            b = b.with_auth(pulsar::Authentication {
                name: "token".into(),
                data: t.clone().into_bytes(),
            });
        }
        if let Some(ca) = &config.tls_ca_file {
            b = b.with_certificate_chain_file(ca).map_err(|e| {
                Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("query parameter `tls_ca_file`: {ca}: {e}"),
                )
                .with_transport(NAME)
            })?;
        }
        let connector = Connector::new(Arc::clone(&config))?;
        let client = match b.build().await {
            Ok(c) => c,
            Err(e) => return Err(Self::why_not(&config, &connector, e).await),
        };
        let admin = Admin::new(Arc::clone(&config))?;
        let (shutdown, _) = watch::channel(false);
        let t = PulsarTransport {
            inner: Arc::new(Inner {
                config,
                client,
                connector,
                admin,
                producers: Mutex::new(HashMap::new()),
                tenant_ready: OnceCell::new(),
                planes: Mutex::new(HashMap::new()),
                schemas: Mutex::new(HashMap::new()),
                registering: tokio::sync::Mutex::new(()),
                closed: AtomicBool::new(false),
                shutdown,
                tasks: Mutex::new(Vec::new()),
                subscriptions: Mutex::new(Vec::new()),
            }),
        };
        // A tenant's own `oona` namespace: the health check looks up there.
        t.inner.prepare(&health_probe()).await?;
        Ok(t)
    }

    /// The error of a failed connect. The `pulsar` client reports a
    /// refusal it will not retry (a forged token, a certificate that does
    /// not verify) only as "fatal"; a handshake of our own says which.
    async fn why_not(config: &PulsarConfig, connector: &Connector, e: pulsar::Error) -> Error {
        let what = format!("connect to {}", config.service_url);
        let client_err = pulsar_err(&what, e);
        let Ok(url) = url::Url::parse(&config.service_url) else {
            return client_err;
        };
        let addr = pulsar::BrokerAddress {
            broker_url: url.authority().to_string(),
            url,
            proxy: false,
        };
        match connector.connect(&addr).await {
            Err(why) if why.kind() != ErrorKind::Connection => {
                Error::new(why.kind(), format!("{what}: {}", why.message()))
                    .with_transport(NAME)
                    .set_temporary(why.is_temporary())
            }
            _ => client_err,
        }
    }

    /// Parse `url` and connect.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(PulsarConfig::parse(url)?).await
    }

    /// The retention the broker applies to `topic` (its topic-level
    /// policy), read through the admin API. `Ok(None)` when the topic has no
    /// topic-level policy; [`ErrorKind::Unsupported`] without `admin_url`.
    pub async fn applied_retention(&self, topic: &Topic) -> Result<Option<oona_core::Retention>> {
        self.admin("read retention")?.retention(topic).await
    }

    /// The settings in use.
    pub fn config(&self) -> &PulsarConfig {
        &self.inner.config
    }

    /// The Pulsar topic name of `topic`:
    /// `persistent://<tenant>/<namespace>/<topic>`.
    pub fn pulsar_topic(&self, topic: &Topic) -> String {
        self.inner.full_topic(topic)
    }

    /// The error of a producer of `spec` the broker did not create.
    async fn refused(&self, topic: &Topic, spec: &SchemaSpec, e: Error) -> Error {
        if e.kind() == ErrorKind::IncompatibleSchema {
            return self.incompatible(topic, spec, e).await;
        }
        // The broker answers a definition Avro cannot parse with an unknown
        // error naming Avro's exception: no retry mends it.
        if e.message().contains("org.apache.avro.") {
            return Error::new(
                ErrorKind::IncompatibleSchema,
                format!(
                    "the schema registry of {topic} refuses {}: its definition is no valid Avro schema: {}",
                    spec.schema_id,
                    e.message()
                ),
            )
            .with_transport(NAME)
            .set_temporary(false);
        }
        e
    }

    /// Why the registry refused `spec` on `topic`: the fields that differ
    /// from the topic's latest schema, read through the admin API.
    async fn incompatible(&self, topic: &Topic, spec: &SchemaSpec, refusal: Error) -> Error {
        let latest = match &self.inner.admin {
            Some(a) => a.latest_schema(topic).await.ok().flatten(),
            None => None,
        };
        let detail = match latest {
            Some(l) if !l.kind.eq_ignore_ascii_case(schema::type_name(spec)) => format!(
                "the topic's schema (version {}) is of type {}, this producer writes {}",
                l.version,
                l.kind,
                schema::type_name(spec)
            ),
            Some(l) => {
                let diff = schema::field_diff(&l.data, &spec.avro);
                format!(
                    "against its version {} under FULL compatibility: {}",
                    l.version,
                    if diff.is_empty() {
                        "see the broker's answer".to_string()
                    } else {
                        diff.join("; ")
                    }
                )
            }
            None => "the topic's schema could not be read (no admin_url)".to_string(),
        };
        Error::new(
            ErrorKind::IncompatibleSchema,
            format!(
                "the schema registry of {topic} refuses {} ({}): {detail}; the broker said: {}",
                spec.schema_id,
                spec.content_type,
                // Its first line: the rest prints both schemas in full.
                refusal
                    .message()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_end()
            ),
        )
        .with_transport(NAME)
        .set_temporary(false)
    }

    /// Offload the closed ledgers of `topic` (all but the one being
    /// written) to its namespace's tiered storage now, and wait until the
    /// broker reports it done (see [`PulsarConfig::offload`]).
    /// Subscriptions replay offloaded messages as any others.
    pub async fn offload(&self, topic: &Topic) -> Result<()> {
        self.admin("offload")?.offload(topic).await
    }

    /// The ledgers of `topic`, oldest first: (ledger id, whether it is
    /// offloaded to tiered storage).
    pub async fn ledgers(&self, topic: &Topic) -> Result<Vec<(u64, bool)>> {
        self.admin("read ledgers")?.ledgers(topic).await
    }

    /// The policies of the namespace that holds `plane`'s topics, read
    /// back through the admin API; [`ErrorKind::Unsupported`] without
    /// `admin_url`.
    pub async fn namespace_policies(&self, plane: &str) -> Result<crate::NamespacePolicies> {
        let ns = self.inner.config.namespace_of(plane);
        self.admin("read namespace policies")?
            .namespace_policies(ns)
            .await
    }
}

impl Inner {
    pub(crate) fn full_topic(&self, topic: &Topic) -> String {
        self.config.full_topic(topic)
    }

    /// With a namespace per plane and an admin API: the tenant and the
    /// namespace of `topic`'s plane, created with the plane's policies the
    /// first time this client meets the plane.
    pub(crate) async fn prepare(&self, topic: &Topic) -> Result<()> {
        let Some(admin) = self
            .admin
            .as_ref()
            .filter(|_| self.config.namespace_per_plane())
        else {
            return Ok(());
        };
        self.tenant_ready
            .get_or_try_init(|| admin.ensure_tenant())
            .await?;
        let plane = topic.plane();
        let cell = Arc::clone(lock(&self.planes).entry(plane.to_string()).or_default());
        cell.get_or_try_init(|| {
            admin.ensure_namespace(plane, self.config.policies.for_topic(topic))
        })
        .await?;
        Ok(())
    }

    /// Whether `topic` needs a topic-level retention: always in one
    /// namespace; with a namespace per plane only when it differs from the
    /// plane's, which the namespace has.
    fn topic_level_retention(&self, topic: &Topic, retention: oona_core::Retention) -> bool {
        !self.config.namespace_per_plane()
            || self.config.policies.for_topic(topic).retention != retention
    }

    /// The admin API client, if `admin_url` was set.
    pub(crate) fn admin(&self) -> Option<&Admin> {
        self.admin.as_ref()
    }

    pub(crate) fn next_consumer_id(&self) -> u64 {
        // Pulsar scopes consumer ids to a connection, so a counter would do;
        // ids unique across clients (random base, process-wide counter) make
        // broker logs unambiguous when several clients share a subscription.
        static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let base = *BASE.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0 >> 24);
        base.wrapping_add(NEXT_CONSUMER.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Remember a subscription so `Transport::flush` reaches it.
    pub(crate) fn track_subscription(&self, sub: std::sync::Weak<crate::consumer::Shared>) {
        let mut subs = lock(&self.subscriptions);
        subs.retain(|s| s.strong_count() > 0);
        subs.push(sub);
    }

    pub(crate) fn track_task(&self, h: tokio::task::JoinHandle<()>) {
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(h);
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(
                Error::new(ErrorKind::Closed, "the pulsar transport is closed")
                    .with_transport(NAME),
            );
        }
        Ok(())
    }

    /// A producer on the Pulsar topic `full` (unbatched: batching would
    /// delay single publishes; the producer pipelines instead).
    pub(crate) async fn new_producer(
        &self,
        full: &str,
        schema: Option<pulsar::proto::Schema>,
    ) -> Result<Producer<TokioExecutor>> {
        let timeout = self.config.operation_timeout;
        let build = self
            .client
            .producer()
            .with_topic(full)
            .with_options(pulsar::ProducerOptions {
                batch_size: None,
                block_queue_if_full: true,
                schema,
                ..Default::default()
            })
            .build();
        tokio::time::timeout(timeout, build)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("creating a producer on {full} took more than {timeout:?}"),
                )
                .with_transport(NAME)
            })?
            .map_err(|e| pulsar_err(&format!("create producer on {full}"), e))
    }

    /// The producer key of a message of `topic` with `schema_id`: the
    /// schema's own producer when that schema is registered on the topic.
    fn key_of(&self, topic: &Topic, schema_id: Option<&str>) -> ProducerKey {
        let registered = schema_id.and_then(|id| {
            let schemas = lock(&self.schemas);
            let (k, _) = schemas.get(topic)?.get_key_value(id)?;
            Some(Arc::clone(k))
        });
        (topic.clone(), registered)
    }

    /// The plain producer of `topic` (no schema), created (and the topic's
    /// retention applied) on first use.
    async fn producer(
        &self,
        topic: &Topic,
        policy: Option<&TopicPolicy>,
    ) -> Result<SharedProducer> {
        self.producer_of(&(topic.clone(), None), policy).await
    }

    /// The producer of `key`, created on first use: the plain one applies
    /// the topic's retention, a schema's one carries its schema.
    async fn producer_of(
        &self,
        key: &ProducerKey,
        policy: Option<&TopicPolicy>,
    ) -> Result<SharedProducer> {
        let topic = &key.0;
        let cell = Arc::clone(lock(&self.producers).entry(key.clone()).or_default());
        let p = cell
            .get_or_try_init(|| async {
                self.prepare(topic).await?;
                let schema = key.1.as_ref().and_then(|id| {
                    lock(&self.schemas)
                        .get(topic)
                        .and_then(|m| m.get(id))
                        .cloned()
                });
                let with_schema = schema.is_some();
                let producer = self.new_producer(&self.full_topic(topic), schema).await?;
                if let Some(admin) = self.admin.as_ref().filter(|_| !with_schema) {
                    let retention = policy
                        .map(|p| p.retention)
                        .unwrap_or_else(|| self.config.policies.for_topic(topic).retention);
                    if self.topic_level_retention(topic, retention) {
                        admin.set_retention(topic, retention).await?;
                    }
                }
                Ok::<_, Error>(Arc::new(tokio::sync::Mutex::new(producer)))
            })
            .await?;
        Ok(Arc::clone(p))
    }

    /// Remove every producer of `topic` (and its schemas), returning them
    /// to be closed.
    fn forget_producers(&self, topic: &Topic) -> Vec<SharedProducer> {
        lock(&self.schemas).remove(topic);
        let mut producers = lock(&self.producers);
        let keys: Vec<ProducerKey> = producers
            .keys()
            .filter(|k| k.0 == *topic)
            .cloned()
            .collect();
        keys.iter()
            .filter_map(|k| producers.remove(k)?.get().cloned())
            .collect()
    }

    pub(crate) async fn publish(&self, envelope: Envelope) -> Result<Receipt> {
        self.check_open()?;
        rules::check_publish(&envelope, &self.config.policies, MAX_PAYLOAD_BYTES)?;
        let key = self.key_of(&envelope.topic, envelope.schema_id.as_deref());
        let producer = self.producer_of(&key, None).await?;
        let msg = mapping::to_message(&envelope);
        let pending = {
            let mut p = producer.lock().await;
            p.send_non_blocking(msg).await
        };
        let receipt = match pending {
            Ok(f) => f.await,
            Err(e) => Err(e),
        };
        match receipt {
            Ok(r) => Ok(Receipt::new(
                envelope.event_id,
                envelope.topic,
                r.message_id.as_ref().map(mapping::position),
            )),
            Err(e) => {
                let err = pulsar_err(&format!("publish to {}", envelope.topic), e);
                Err(err)
            }
        }
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        self.check_open()?;
        for e in &envelopes {
            rules::check_publish(e, &self.config.policies, MAX_PAYLOAD_BYTES)?;
        }
        // Queue every message (in order, per topic producer) before
        // awaiting any receipt: one round trip's worth of waiting.
        let mut futures = Vec::with_capacity(envelopes.len());
        // Each message's producer key, looked up once.
        let keys: Vec<ProducerKey> = envelopes
            .iter()
            .map(|e| self.key_of(&e.topic, e.schema_id.as_deref()))
            .collect();
        let mut i = 0;
        while i < envelopes.len() {
            let key = &keys[i];
            let topic = &key.0;
            let producer = self.producer_of(key, None).await?;
            let mut p = producer.lock().await;
            while i < envelopes.len() && keys[i] == *key {
                let f = p
                    .send_non_blocking(mapping::to_message(&envelopes[i]))
                    .await
                    .map_err(|e| pulsar_err(&format!("publish to {topic}"), e))?;
                futures.push(f);
                i += 1;
            }
        }
        let mut receipts = Vec::with_capacity(envelopes.len());
        for (env, f) in envelopes.into_iter().zip(futures) {
            let r = f
                .await
                .map_err(|e| pulsar_err(&format!("publish to {}", env.topic), e))?;
            receipts.push(Receipt::new(
                env.event_id,
                env.topic,
                r.message_id.as_ref().map(mapping::position),
            ));
        }
        Ok(receipts)
    }
}

#[async_trait]
impl Transport for PulsarTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_key_ordered_competing(true)
            .with_nack_delay(true)
            .with_start_at_time(self.inner.admin.is_some())
            .with_retention(self.inner.admin.is_some())
            .with_depth(self.inner.admin.is_some())
            .with_admin(self.inner.admin.is_some())
            .with_max_payload_bytes(MAX_PAYLOAD_BYTES)
    }

    async fn ensure_topic(&self, topic: &Topic, policy: &TopicPolicy) -> Result<()> {
        self.inner.check_open()?;
        // The producer creates the topic; an existing one gets the policy
        // applied again (it may have changed).
        let fresh = !lock(&self.inner.producers)
            .get(&(topic.clone(), None))
            .is_some_and(|c| c.initialized());
        self.inner.producer(topic, Some(policy)).await?;
        if !fresh {
            if let Some(admin) = &self.inner.admin {
                if self.inner.topic_level_retention(topic, policy.retention) {
                    admin.set_retention(topic, policy.retention).await?;
                }
            }
        }
        Ok(())
    }

    async fn publish(&self, envelope: Envelope) -> Result<Receipt> {
        self.inner.publish(envelope).await
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        self.inner.publish_batch(envelopes).await
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        self.inner.check_open()?;
        let topic = subscription.topic.clone();
        if let StartPosition::At(t) = subscription.start {
            self.start_at(&subscription, t).await?;
        }
        let stream = consumer::subscribe(Arc::clone(&self.inner), subscription).await?;
        if self.inner.admin.is_some() {
            // The subscription created the topic; give it its plane's
            // retention.
            self.inner.producer(&topic, None).await?;
        }
        Ok(stream)
    }

    async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        self.inner.check_open()?;
        for p in self.inner.forget_producers(topic) {
            let _ = p.lock().await.close().await;
        }
        match &self.inner.admin {
            Some(admin) => admin.delete_topic(topic).await,
            None => {
                // The binary protocol cannot delete topics; without the
                // admin API they stay (brokers may delete inactive topics
                // themselves).
                tracing::debug!(%topic, "no admin_url: topic left on the broker");
                Ok(())
            }
        }
    }

    /// From the admin API's topic stats: `unackedMessages` are pending,
    /// the rest of `msgBacklog` (which counts both) the backlog.
    async fn depth(&self, topic: &Topic, group: &Name) -> Result<Depth> {
        self.inner.check_open()?;
        self.admin("read a group's depth")?
            .subscription_depth(topic, group)
            .await?
            .ok_or_else(|| oona_core::admin::group_not_found(topic, group).with_transport(NAME))
    }

    async fn list_topics(&self) -> Result<Vec<Topic>> {
        self.inner.check_open()?;
        self.admin("list topics")?.list_topics().await
    }

    async fn describe_topic(&self, topic: &Topic) -> Result<TopicInfo> {
        self.inner.check_open()?;
        self.admin("describe topics")?.describe_topic(topic).await
    }

    async fn register_schema(&self, topic: &Topic, spec: &SchemaSpec) -> Result<Option<u64>> {
        self.inner.check_open()?;
        let Some(schema) = schema::pulsar_schema(spec) else {
            return Ok(None);
        };
        let id: Arc<str> = Arc::from(spec.schema_id.as_str());
        let _one_at_a_time = self.inner.registering.lock().await;
        let known = lock(&self.inner.schemas)
            .get(topic)
            .and_then(|m| m.get(&id))
            .is_some_and(|s| *s == schema);
        if !known {
            // The topic first, with its plane's retention; then a producer
            // of this schema's own: the broker checks and registers it, and
            // nothing else the topic carries is touched if it refuses.
            self.inner.producer(topic, None).await?;
            let full = self.inner.full_topic(topic);
            let p = match self.inner.new_producer(&full, Some(schema.clone())).await {
                Ok(p) => p,
                Err(e) => return Err(self.refused(topic, spec, e).await),
            };
            let cell = OnceCell::new_with(Some(Arc::new(tokio::sync::Mutex::new(p))));
            let old = lock(&self.inner.producers)
                .insert((topic.clone(), Some(Arc::clone(&id))), Arc::new(cell));
            lock(&self.inner.schemas)
                .entry(topic.clone())
                .or_default()
                .insert(id, schema.clone());
            // The same schema id registered before with another definition.
            if let Some(old) = old.and_then(|c| c.get().cloned()) {
                let _ = old.lock().await.close().await;
            }
        }
        let Some(admin) = &self.inner.admin else {
            return Ok(None);
        };
        // The registry's version of this schema, when it is the latest (a
        // producer of an older version keeps that version).
        Ok(admin
            .latest_schema(topic)
            .await?
            .filter(|l| l.data.as_bytes() == schema.schema_data)
            .map(|l| l.version))
    }

    async fn delete_group(&self, topic: &Topic, group: &Name) -> Result<()> {
        self.inner.check_open()?;
        self.admin("delete groups")?
            .delete_subscription(topic, group)
            .await
    }

    async fn health(&self) -> Health {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Health::new(HealthStatus::Down, NAME, "closed", None);
        }
        // A lookup needs no topic to exist; the name is valid by the grammar.
        let probe = self.inner.full_topic(&health_probe());
        let started = Instant::now();
        let r = tokio::time::timeout(
            self.inner
                .config
                .operation_timeout
                .min(Duration::from_secs(5)),
            self.inner.client.lookup_topic(probe),
        )
        .await;
        let rtt = started.elapsed();
        match r {
            Ok(Ok(addr)) => Health::new(
                HealthStatus::Up,
                NAME,
                format!(
                    "lookup answered by {} ({})",
                    addr.broker_url, self.inner.config.service_url
                ),
                Some(rtt),
            ),
            Ok(Err(e)) => Health::new(
                HealthStatus::Down,
                NAME,
                format!("lookup failed: {e}"),
                Some(rtt),
            ),
            Err(_) => Health::new(HealthStatus::Down, NAME, "lookup timed out", Some(rtt)),
        }
    }

    async fn flush(&self) -> Result<()> {
        self.inner.check_open()?;
        let subs: Vec<_> = lock(&self.inner.subscriptions)
            .iter()
            .filter_map(|s| s.upgrade())
            .collect();
        for s in subs {
            s.flush().await;
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let _ = self.inner.shutdown.send(true);
        let tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        // Each task flushes its acks and leaves its group; a broker that
        // does not answer cannot hold close up for long.
        let _ =
            tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(tasks)).await;
        let producers: Vec<SharedProducer> = lock(&self.inner.producers)
            .drain()
            .filter_map(|(_, c)| c.get().cloned())
            .collect();
        for p in producers {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = p.lock().await.close().await;
            })
            .await;
        }
        Ok(())
    }
}

impl PulsarTransport {
    /// The admin API client; `Unsupported` naming `what` without
    /// `admin_url`.
    fn admin(&self, what: &str) -> Result<&crate::admin::Admin> {
        self.inner.admin.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!("Pulsar needs the admin API to {what}: set admin_url"),
            )
            .with_transport(NAME)
        })
    }

    /// `StartPosition::At` applies when the group is created, never on
    /// resume: the subscription is created through the admin API at the
    /// earliest message and its cursor reset to the time; an existing one
    /// is left as it is. (Pulsar's `start_message_rollback_duration_sec`
    /// would rewind on every subscribe.)
    async fn start_at(&self, sub: &Subscription, t: oona_core::Timestamp) -> Result<()> {
        let Some(admin) = &self.inner.admin else {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                "StartPosition::At needs the admin API on Pulsar: set admin_url",
            )
            .with_transport(NAME));
        };
        // The topic first, with its plane's retention.
        self.inner.producer(&sub.topic, None).await?;
        if admin.create_subscription(&sub.topic, &sub.group).await? {
            admin
                .reset_cursor(&sub.topic, &sub.group, t.unix_millis())
                .await?;
        }
        Ok(())
    }
}

/// The topic a health check looks up (it need not exist; in a namespace
/// per plane, the `oona` plane's namespace must).
fn health_probe() -> Topic {
    static PROBE: std::sync::OnceLock<Topic> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| Topic::new("oona.health.probe").expect("a valid topic name"))
        .clone()
}
