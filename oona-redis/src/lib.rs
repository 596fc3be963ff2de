#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::future::BoxFuture;
use oona_core::{
    rules, Capabilities, ConnectUrl, DeliveryStream, Depth, Driver, Envelope, Error, ErrorKind,
    Health, HealthStatus, Name, Receipt, Result, Retention, StartPosition, Subscription, Topic,
    TopicInfo, TopicPolicy, Transport,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use tokio_util::sync::CancellationToken;

mod acker;
mod admin;
mod config;
mod nonces;
mod scripts;
mod sub;
mod wire;

pub use config::RedisConfig;

/// The transport's name.
pub const NAME: &str = "redis";

/// The driver the `oona` facade registers for `redis://` and `rediss://`.
pub const DRIVER: Driver = Driver {
    name: NAME,
    schemes: &["redis", "rediss"],
    connect: connect_driver,
};

fn connect_driver(url: ConnectUrl) -> BoxFuture<'static, Result<Arc<dyn Transport>>> {
    Box::pin(async move {
        let config = RedisConfig::from_connect_url(url)?;
        let t = RedisTransport::connect(config).await?;
        Ok(Arc::new(t) as Arc<dyn Transport>)
    })
}

/// Largest payload the transport accepts (Redis's own bulk string limit is
/// 512 MiB; topic policies usually limit it far lower).
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024 * 1024;

/// Hash fields of a topic's policy record `<prefix><topic>:policy`.
pub mod policy_field {
    /// Retention in milliseconds, `-1` for indefinite.
    pub const RETENTION_MS: &str = "retention_ms";
    /// Largest payload in bytes.
    pub const MAX_PAYLOAD_BYTES: &str = "max_payload_bytes";
}

/// Oona on Redis Streams. Cheap to clone (all clones share connections).
#[derive(Clone)]
pub struct RedisTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("addr", &self.inner.cfg.connection.addr.to_string())
            .field("prefix", &self.inner.cfg.prefix)
            .field("closed", &self.inner.closed.load(Ordering::SeqCst))
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: RedisConfig,
    client: redis::Client,
    pub(crate) conn: ConnectionManager,
    /// Topics whose policy this client has recorded in Redis, with the
    /// retention it applies on XADD.
    recorded: Mutex<HashMap<Topic, Recorded>>,
    /// Policies given to `ensure_topic`, over the plane defaults.
    overrides: Mutex<HashMap<Topic, TopicPolicy>>,
    pub(crate) acker: acker::Acker,
    pub(crate) closed: AtomicBool,
    pub(crate) cancel: CancellationToken,
    pub(crate) claim: redis::Script,
    pub(crate) nack: redis::Script,
    pub(crate) renew: redis::Script,
    pub(crate) release: redis::Script,
    pub(crate) extend: redis::Script,
    pub(crate) kread: redis::Script,
    pub(crate) kheads: redis::Script,
    pub(crate) kdone: redis::Script,
    pub(crate) count_after: redis::Script,
    /// Reader tasks, awaited (briefly) by `close`.
    pub(crate) readers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What this client knows of a topic whose policy it has recorded.
#[derive(Debug, Clone, Copy)]
struct Recorded {
    /// Retention in ms (`None`: indefinite).
    retention: Option<u64>,
    /// When the next XADD to the topic carries `MINID ~` (ms since epoch).
    next_trim: u64,
}

/// XADD carries `MINID ~` at most this often per topic and client:
/// retention windows are hours or days, and trimming on every XADD costs
/// the server measurable time at high rates.
const TRIM_EVERY_MS: u64 = 1000;

pub(crate) fn redis_error(e: redis::RedisError, what: &str) -> Error {
    if e.to_string().contains("invalid peer certificate") {
        // rustls refused the server: no retry fixes that.
        return Error::new(
            ErrorKind::ConfigInvalid,
            format!("{what}: the server's TLS certificate does not verify (a private CA is trusted with `tls_ca_file`)"),
        )
        .with_source(e)
        .with_transport(NAME)
        .set_temporary(false);
    }
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
    {
        ErrorKind::Unauthenticated
    } else if e.code() == Some("NOPERM") {
        ErrorKind::Unauthorized
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::BusyLoadingError | redis::ErrorKind::TryAgain
        )
    {
        ErrorKind::Connection
    } else {
        ErrorKind::Broker
    };
    let temporary = kind.default_temporary()
        || matches!(
            e.kind(),
            redis::ErrorKind::BusyLoadingError | redis::ErrorKind::TryAgain
        );
    Error::new(kind, what.to_string())
        .with_source(e)
        .with_transport(NAME)
        .set_temporary(temporary)
}

fn closed_error() -> Error {
    Error::new(ErrorKind::Closed, "the Redis transport is closed").with_transport(NAME)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn retention_ms(r: Retention) -> Option<u64> {
    r.duration()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1))
}

impl RedisTransport {
    /// Connect from a URL (see [`RedisConfig::from_url`]).
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(RedisConfig::from_url(url)?).await
    }

    /// Connect with `config`. Fails when Redis cannot be reached.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        if matches!(config.connection.addr, redis::ConnectionAddr::TcpTls { .. }) {
            // rustls needs a process-wide crypto provider; an error only
            // means one is installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = match &config.tls_ca_file {
            None => redis::Client::open(config.connection.clone()),
            Some(ca) => {
                let root = std::fs::read(ca).map_err(|e| {
                    Error::new(
                        ErrorKind::ConfigInvalid,
                        format!("query parameter `tls_ca_file`: {ca}: {e}"),
                    )
                    .with_transport(NAME)
                })?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                };
                redis::Client::build_with_tls(config.connection.clone(), certs)
            }
        }
        .map_err(|e| redis_error(e, "invalid Redis connection settings").set_temporary(false))?;
        let conn = manager(&client, &config, config.response_timeout).await?;
        let inner = Arc::new(Inner {
            acker: acker::Acker::start(conn.clone()),
            cfg: config,
            client,
            conn,
            recorded: Mutex::new(HashMap::new()),
            overrides: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            claim: redis::Script::new(scripts::CLAIM),
            nack: redis::Script::new(scripts::NACK),
            renew: redis::Script::new(scripts::RENEW),
            release: redis::Script::new(scripts::RELEASE),
            extend: redis::Script::new(scripts::EXTEND),
            kread: redis::Script::new(scripts::KREAD),
            kheads: redis::Script::new(scripts::KHEADS),
            kdone: redis::Script::new(scripts::KDONE),
            count_after: redis::Script::new(scripts::COUNT_AFTER),
            readers: Mutex::new(Vec::new()),
        });
        if !inner.cfg.housekeeping.is_zero() {
            tokio::spawn(housekeeping(
                Arc::downgrade(&inner),
                inner.cancel.clone(),
                inner.cfg.housekeeping,
            ));
        }
        Ok(RedisTransport { inner })
    }

    /// The settings in use.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.cfg
    }

    /// The stream key of `topic`: `<prefix><topic>`.
    pub fn stream_key(&self, topic: &Topic) -> String {
        self.inner.stream_key(topic)
    }

    /// The key of `topic`'s policy record: `<prefix><topic>:policy`, a hash
    /// with the fields of [`policy_field`].
    pub fn policy_key(&self, topic: &Topic) -> String {
        self.inner.policy_key(topic)
    }

    /// Enforce retention now on every topic recorded under this prefix
    /// (XTRIM MINID, exact); returns the number of entries removed. Runs by
    /// itself every [`RedisConfig::housekeeping`].
    pub async fn housekeep(&self) -> Result<u64> {
        self.inner.check_open()?;
        self.inner.housekeep().await
    }
}

async fn manager(
    client: &redis::Client,
    cfg: &RedisConfig,
    response_timeout: Duration,
) -> Result<ConnectionManager> {
    let mc = ConnectionManagerConfig::new()
        .set_connection_timeout(cfg.connect_timeout)
        .set_response_timeout(response_timeout)
        .set_number_of_retries(2)
        .set_max_delay(500);
    client
        .get_connection_manager_with_config(mc)
        .await
        .map_err(|e| {
            redis_error(
                e,
                &format!("cannot connect to Redis at {}", cfg.connection.addr),
            )
        })
}

async fn housekeeping(inner: Weak<Inner>, cancel: CancellationToken, every: Duration) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.housekeep().await {
            tracing::debug!(error = %e, "housekeeping failed; retrying next round");
        }
    }
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(closed_error())
        } else {
            Ok(())
        }
    }

    pub(crate) fn stream_key(&self, topic: &Topic) -> String {
        format!("{}{}", self.cfg.prefix, topic)
    }

    pub(crate) fn policy_key(&self, topic: &Topic) -> String {
        format!("{}{}:policy", self.cfg.prefix, topic)
    }

    /// The groups of the stream at `key`; none when there is no stream.
    pub(crate) async fn groups(&self, key: &str) -> Result<Vec<sub::GroupInfo>> {
        let mut conn = self.conn.clone();
        match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(key)
            .query_async::<Value>(&mut conn)
            .await
        {
            Ok(v) => Ok(sub::groups(&v)),
            // No such stream: nothing to list.
            Err(e) if e.kind() == redis::ErrorKind::ResponseError => Ok(Vec::new()),
            Err(e) => Err(redis_error(e, "XINFO GROUPS failed")),
        }
    }

    pub(crate) fn delayed_key(&self, topic: &Topic, group: &str) -> String {
        format!("{}{}:delayed:{}", self.cfg.prefix, topic, group)
    }

    /// The key queues of `group` on `topic` (left when a key-ordered
    /// group's entries were still pending).
    pub(crate) async fn key_queues(&self, topic: &Topic, group: &str) -> Result<Vec<String>> {
        let prefix = self.key_queue_prefix(topic, group);
        self.scan(&prefix, None).await
    }

    /// Every key starting with `prefix` (of Redis type `kind`, if given),
    /// by `SCAN`.
    pub(crate) async fn scan(&self, prefix: &str, kind: Option<&str>) -> Result<Vec<String>> {
        let pattern = format!("{}*", glob_escape(prefix));
        let mut conn = self.conn.clone();
        let (mut cursor, mut out) = (0u64, Vec::new());
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            if let Some(k) = kind {
                cmd.arg("TYPE").arg(k);
            }
            let (next, keys): (u64, Vec<String>) = cmd
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(e, &format!("SCAN for {pattern} failed")))?;
            out.extend(keys);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Prefix of the key queues of a key-ordered group (see
    /// [`scripts::KREAD`]): `<prefix><topic>:korder:<group>:`.
    pub(crate) fn key_queue_prefix(&self, topic: &Topic, group: &str) -> String {
        format!("{}{}:korder:{}:", self.cfg.prefix, topic, group)
    }

    pub(crate) fn topics_key(&self) -> String {
        format!("{}_topics", self.cfg.prefix)
    }

    fn policy_for(&self, topic: &Topic) -> TopicPolicy {
        if let Ok(o) = self.overrides.lock() {
            if let Some(p) = o.get(topic) {
                return p.clone();
            }
        }
        self.cfg.policies.for_topic(topic).clone()
    }

    fn check_publish(&self, env: &Envelope) -> Result<()> {
        rules::check_publish(env, &self.cfg.policies, MAX_PAYLOAD_BYTES)
            .and_then(|()| match self.overrides.lock() {
                Ok(o) => match o.get(&env.topic) {
                    Some(p) => p.check_payload(&env.topic, env.payload.len()),
                    None => Ok(()),
                },
                Err(_) => Ok(()),
            })
            .map_err(|e| e.with_transport(NAME))
    }

    /// The MINID for an XADD to `topic`, adding the policy record to `pipe`
    /// when this client has not written it yet. Returns whether it did.
    pub(crate) fn prepare_topic(
        &self,
        pipe: &mut redis::Pipeline,
        topic: &Topic,
    ) -> (Option<u64>, bool) {
        let now = now_ms();
        if let Ok(mut recorded) = self.recorded.lock() {
            if let Some(r) = recorded.get_mut(topic) {
                let min_id = match r.retention {
                    Some(ms) if now >= r.next_trim => {
                        r.next_trim = now + TRIM_EVERY_MS;
                        Some(now.saturating_sub(ms))
                    }
                    _ => None,
                };
                return (min_id, false);
            }
        }
        let policy = self.policy_for(topic);
        self.add_policy_record(pipe, topic, &policy);
        (
            retention_ms(policy.retention).map(|ms| now.saturating_sub(ms)),
            true,
        )
    }

    fn add_policy_record(&self, pipe: &mut redis::Pipeline, topic: &Topic, policy: &TopicPolicy) {
        pipe.cmd("HSET")
            .arg(self.policy_key(topic))
            .arg(policy_field::RETENTION_MS)
            .arg(policy.retention.as_millis_or_minus_one())
            .arg(policy_field::MAX_PAYLOAD_BYTES)
            .arg(policy.max_payload_bytes)
            .ignore();
        pipe.cmd("SADD")
            .arg(self.topics_key())
            .arg(topic.as_str())
            .ignore();
    }

    pub(crate) fn mark_recorded(&self, topic: &Topic) {
        let retention = retention_ms(self.policy_for(topic).retention);
        if let Ok(mut r) = self.recorded.lock() {
            r.insert(
                topic.clone(),
                Recorded {
                    retention,
                    next_trim: now_ms() + TRIM_EVERY_MS,
                },
            );
        }
    }

    /// Publish one or more envelopes in one round trip; receipts in order.
    async fn publish_all(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        self.check_open()?;
        for env in &envelopes {
            self.check_publish(env)?;
        }
        let mut pipe = redis::Pipeline::with_capacity(envelopes.len() + 2);
        let mut new_topics: Vec<Topic> = Vec::new();
        // Per topic of the batch (usually one): its key and MINID, trimming
        // with the first XADD only.
        let mut seen: Vec<(&Topic, String)> = Vec::new();
        for env in &envelopes {
            let min_id = match seen.iter().position(|(t, _)| *t == &env.topic) {
                Some(_) => None,
                None => {
                    let (m, added) = self.prepare_topic(&mut pipe, &env.topic);
                    if added {
                        new_topics.push(env.topic.clone());
                    }
                    seen.push((&env.topic, self.stream_key(&env.topic)));
                    m
                }
            };
            let key = seen
                .iter()
                .find(|(t, _)| *t == &env.topic)
                .map(|(_, k)| k.as_str())
                .unwrap_or_default();
            wire::xadd(&mut pipe, key, min_id, env);
        }
        let mut conn = self.conn.clone();
        let ids: Vec<Value> = pipe.query_async(&mut conn).await.map_err(|e| {
            let topics: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
            redis_error(e, &format!("XADD to {} failed", topics.join(", ")))
        })?;
        for t in &new_topics {
            self.mark_recorded(t);
        }
        if ids.len() != envelopes.len() {
            return Err(Error::new(
                ErrorKind::Broker,
                format!("{} replies to {} XADDs", ids.len(), envelopes.len()),
            )
            .with_transport(NAME));
        }
        Ok(envelopes
            .into_iter()
            .zip(ids)
            .map(|(env, id)| Receipt::new(env.event_id, env.topic, wire::as_string(&id)))
            .collect())
    }

    async fn housekeep(&self) -> Result<u64> {
        let mut conn = self.conn.clone();
        let topics: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.topics_key())
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "SMEMBERS failed"))?;
        let topics: Vec<Topic> = topics
            .into_iter()
            .filter_map(|t| Topic::new(t).ok())
            .collect();
        if topics.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for t in &topics {
            pipe.cmd("HGET")
                .arg(self.policy_key(t))
                .arg(policy_field::RETENTION_MS);
        }
        let retentions: Vec<Option<i64>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "HGET of topic policies failed"))?;
        let now = now_ms();
        let mut trim = redis::pipe();
        let mut n = 0;
        for (t, r) in topics.iter().zip(retentions) {
            if let Some(ms) = r.filter(|ms| *ms > 0) {
                let cutoff = now.saturating_sub(u64::try_from(ms).unwrap_or(0));
                trim.cmd("XTRIM")
                    .arg(self.stream_key(t))
                    .arg("MINID")
                    .arg(cutoff);
                n += 1;
            }
        }
        if n == 0 {
            return Ok(0);
        }
        let removed: Vec<u64> = trim
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "XTRIM failed"))?;
        Ok(removed.into_iter().sum())
    }
}

/// The id after which a new group starts reading.
fn start_id(start: StartPosition) -> String {
    match start {
        StartPosition::Latest => "$".into(),
        StartPosition::Earliest => "0".into(),
        StartPosition::At(ts) => match ts.unix_millis() {
            0 => "0".into(),
            // Stream ids are `<ms>-<seq>`: start after every id of the
            // previous millisecond, so entries at or after `ts` are read.
            ms => format!("{}-{}", ms - 1, u64::MAX),
        },
    }
}

/// Where Redis cannot tell a group's lag, entries are counted up to this.
pub const LAG_COUNT_CAP: u64 = 10_000;

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        // key_ordered_competing: per-group key queues (scripts::KREAD).
        Capabilities::default()
            .with_key_ordered_competing(true)
            .with_depth(true)
            .with_admin(true)
            .with_max_payload_bytes(MAX_PAYLOAD_BYTES)
    }

    async fn ensure_topic(&self, topic: &Topic, policy: &TopicPolicy) -> Result<()> {
        self.inner.check_open()?;
        if let Ok(mut o) = self.inner.overrides.lock() {
            o.insert(topic.clone(), policy.clone());
        }
        let mut pipe = redis::pipe();
        self.inner.add_policy_record(&mut pipe, topic, policy);
        if let Some(ms) = retention_ms(policy.retention) {
            pipe.cmd("XTRIM")
                .arg(self.inner.stream_key(topic))
                .arg("MINID")
                .arg("~")
                .arg(now_ms().saturating_sub(ms))
                .ignore();
        }
        let mut conn = self.inner.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error(e, &format!("recording the policy of {topic} failed")))?;
        self.inner.mark_recorded(topic);
        Ok(())
    }

    async fn publish(&self, envelope: Envelope) -> Result<Receipt> {
        let mut r = self.inner.publish_all(vec![envelope]).await?;
        r.pop().ok_or_else(|| {
            Error::new(ErrorKind::Internal, "no receipt for a publish").with_transport(NAME)
        })
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        if envelopes.is_empty() {
            self.inner.check_open()?;
            return Ok(Vec::new());
        }
        self.inner.publish_all(envelopes).await
    }

    async fn subscribe(&self, mut subscription: Subscription) -> Result<DeliveryStream> {
        self.inner.check_open()?;
        let cfg = &self.inner.cfg;
        if subscription.prefetch == Subscription::DEFAULT_PREFETCH {
            if let Some(p) = cfg.default_prefetch {
                subscription.prefetch = p;
            }
        }
        if subscription.ack_deadline == Subscription::DEFAULT_ACK_DEADLINE {
            if let Some(d) = cfg.default_ack_deadline {
                subscription.ack_deadline = d;
            }
        }
        if subscription.max_attempts == Subscription::DEFAULT_MAX_ATTEMPTS {
            if let Some(n) = cfg.default_max_attempts {
                subscription.max_attempts = n;
            }
        }
        let inner = &self.inner;
        let key = inner.stream_key(&subscription.topic);
        let mut conn = inner.conn.clone();
        // Record the policies so housekeeping trims this topic and its dead
        // letters even if this process never publishes to them.
        let mut pipe = redis::pipe();
        let (_, a) = inner.prepare_topic(&mut pipe, &subscription.topic);
        let (_, b) = inner.prepare_topic(&mut pipe, &subscription.dead_letter);
        if a || b {
            pipe.query_async::<()>(&mut conn).await.map_err(|e| {
                let what = format!("recording the policy of {} failed", subscription.topic);
                redis_error(e, &what)
            })?;
            inner.mark_recorded(&subscription.topic);
            inner.mark_recorded(&subscription.dead_letter);
        }
        sub::create_group(
            &mut conn,
            &key,
            subscription.group.as_str(),
            &start_id(subscription.start),
        )
        .await?;
        let read_conn = manager(&inner.client, cfg, cfg.block + cfg.response_timeout).await?;
        Ok(sub::start(Arc::clone(&self.inner), subscription, read_conn))
    }

    async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let key = inner.stream_key(topic);
        let mut conn = inner.conn.clone();
        let groups: Vec<String> = inner
            .groups(&key)
            .await?
            .into_iter()
            .map(|g| g.name)
            .collect();
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(&key)
            .arg(inner.policy_key(topic))
            .ignore();
        for g in &groups {
            pipe.cmd("DEL").arg(inner.delayed_key(topic, g)).ignore();
            for q in inner.key_queues(topic, g).await? {
                pipe.cmd("DEL").arg(q).ignore();
            }
        }
        pipe.cmd("SREM")
            .arg(inner.topics_key())
            .arg(topic.as_str())
            .ignore();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error(e, "deleting the topic failed"))?;
        if let Ok(mut r) = inner.recorded.lock() {
            r.remove(topic);
        }
        if let Ok(mut o) = inner.overrides.lock() {
            o.remove(topic);
        }
        Ok(())
    }

    /// `XINFO GROUPS`: the group's `lag` is the backlog and its `pending`
    /// (the PEL, parked nacks included) the pending. Where Redis cannot
    /// tell the lag (a group created at a time, entries deleted from the
    /// middle), the entries after the group's last delivered id are
    /// counted, up to [`LAG_COUNT_CAP`].
    async fn depth(&self, topic: &Topic, group: &Name) -> Result<Depth> {
        self.inner.check_open()?;
        let key = self.inner.stream_key(topic);
        let info = self.inner.groups(&key).await?;
        let Some(g) = info.into_iter().find(|g| g.name == group.as_str()) else {
            return Err(oona_core::admin::group_not_found(topic, group).with_transport(NAME));
        };
        self.inner.depth_of(&key, &g).await
    }

    async fn list_topics(&self) -> Result<Vec<Topic>> {
        self.inner.check_open()?;
        self.inner.list_topics().await
    }

    async fn describe_topic(&self, topic: &Topic) -> Result<TopicInfo> {
        self.inner.check_open()?;
        self.inner.describe_topic(topic).await
    }

    async fn delete_group(&self, topic: &Topic, group: &Name) -> Result<()> {
        self.inner.check_open()?;
        self.inner.delete_group(topic, group).await
    }

    async fn health(&self) -> Health {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Health::new(HealthStatus::Down, NAME, "closed", None);
        }
        let started = Instant::now();
        let mut conn = self.inner.conn.clone();
        match redis::cmd("PING").query_async::<String>(&mut conn).await {
            Ok(_) => Health::new(
                HealthStatus::Up,
                NAME,
                format!("PING answered by {}", self.inner.cfg.connection.addr),
                Some(started.elapsed()),
            ),
            Err(e) => Health::new(
                HealthStatus::Down,
                NAME,
                format!("PING to {} failed: {e}", self.inner.cfg.connection.addr),
                None,
            ),
        }
    }

    async fn flush(&self) -> Result<()> {
        self.inner.check_open()?;
        // Bounded: while Redis is unreachable the acks stay queued (and are
        // retried), but a shutdown must not hang on them.
        let wait = self.inner.cfg.response_timeout;
        tokio::time::timeout(wait, self.inner.acker.flush(false))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("queued acks not written within {wait:?}; they are retried, and redelivered after their deadline if never written"),
                )
                .with_transport(NAME)
            })
    }

    fn nonce_store(&self) -> Option<Arc<dyn oona_core::security::NonceStore>> {
        Some(Arc::new(nonces::RedisNonces {
            conn: self.inner.conn.clone(),
            prefix: self.inner.cfg.prefix.clone(),
        }))
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.cancel.cancel();
        // Readers finish their blocked XREADGROUP (at most `block`) and give
        // back what it read, so nothing waits for an ack deadline.
        let readers: Vec<_> = match self.inner.readers.lock() {
            Ok(mut r) => r.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        let wait = self.inner.cfg.block + self.inner.cfg.response_timeout;
        let _ = tokio::time::timeout(wait, futures::future::join_all(readers)).await;
        self.inner.acker.flush(true).await;
        Ok(())
    }
}

/// `s` with the glob characters of `SCAN MATCH` escaped.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
