//! The [`Transport`] contract every backend implements.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::admin::{self, TopicInfo};
use crate::delivery::DeliveryStream;
use crate::envelope::{Envelope, EventId};
use crate::error::Result;
use crate::subscription::Subscription;
use crate::topic::{Name, Topic, TopicPolicy};

/// A message broker behind Oona's delivery semantics.
///
/// # Contract
///
/// - **publish** returns once the broker has durably accepted the message
///   (as durable as the broker is configured to be); an `Err` means it may or
///   may not have been stored, and a retry may duplicate it (at-least-once).
///   Before any I/O it calls [`crate::rules::check_publish`]; a topic that does
///   not exist yet is created with its plane's [`TopicPolicy`].
/// - **publish_batch** publishes in order; transports that can do it in one
///   round trip must. Receipts come back in input order.
/// - **subscribe** joins (creating if needed) the consumer group of the
///   [`Subscription`] and yields [`crate::Delivery`]s. Each message reaches one
///   consumer of a group; every group sees every message. Unsettled
///   deliveries come back after the ack deadline with `attempt + 1`.
///   Settlements follow [`crate::rules`]; an entry that is no envelope is
///   dead-lettered with a decode reason and the stream goes on.
/// - **close** stops subscriptions (their streams end), flushes queued
///   settlements and publishes, and releases connections. Calls after close
///   fail with [`crate::ErrorKind::Closed`].
///
/// Object safe: use it as `Arc<dyn Transport>`.
#[async_trait]
pub trait Transport: fmt::Debug + Send + Sync + 'static {
    /// Short name: `memory`, `redis`, `kafka`, `pulsar`.
    fn name(&self) -> &'static str;

    /// What this transport can do.
    fn capabilities(&self) -> Capabilities;

    /// Create the topic if missing and apply `policy` (retention, limits).
    /// Idempotent.
    async fn ensure_topic(&self, topic: &Topic, policy: &TopicPolicy) -> Result<()>;

    /// Publish one message.
    async fn publish(&self, envelope: Envelope) -> Result<Receipt>;

    /// Publish several messages, in order. The default publishes one by one.
    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        let mut receipts = Vec::with_capacity(envelopes.len());
        for e in envelopes {
            receipts.push(self.publish(e).await?);
        }
        Ok(receipts)
    }

    /// Start consuming.
    async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream>;

    /// Delete a topic and its groups (tests and tooling).
    async fn delete_topic(&self, topic: &Topic) -> Result<()>;

    /// Check the broker is reachable.
    async fn health(&self) -> Health;

    /// Wait until the settlements and publishes queued so far have been
    /// written to the broker, without closing (the handler runner calls it
    /// on graceful shutdown; the transport may be shared). The default does
    /// nothing: right for transports that write each settlement before
    /// returning from [`crate::Settle::settle`].
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// How far `group` is behind on `topic` (a moment's sample: the
    /// broker's own counters, read without consuming). [`Depth::total`] is
    /// what the group has not settled yet. [`crate::ErrorKind::NotFound`]
    /// when the group has never subscribed to the topic;
    /// [`crate::ErrorKind::Unsupported`], the default, when the broker
    /// cannot tell ([`Capabilities::depth`]).
    async fn depth(&self, topic: &Topic, group: &Name) -> Result<Depth> {
        let _ = (topic, group);
        Err(admin::unsupported(self.name(), "read a group's depth"))
    }

    /// The Oona topics the broker holds under this transport's namespace
    /// (its prefix, tenant or cluster), sorted; internal topics (Kafka retry
    /// topics) are left out. [`crate::ErrorKind::Unsupported`], the
    /// default, when the transport has no admin calls ([`Capabilities::admin`]).
    async fn list_topics(&self) -> Result<Vec<Topic>> {
        Err(admin::unsupported(self.name(), "list topics"))
    }

    /// What the broker holds of `topic`: partitions, messages retained,
    /// retention, and each subscribed group with its members and depth.
    /// [`crate::ErrorKind::NotFound`] when the topic does not exist.
    async fn describe_topic(&self, topic: &Topic) -> Result<TopicInfo> {
        let _ = topic;
        Err(admin::unsupported(self.name(), "describe topics"))
    }

    /// Remove `group`'s subscription to `topic`: its position, what it holds
    /// unsettled and its parked redeliveries, so the broker keeps nothing
    /// for it (a group of the operator CLI's `tail`, say). The topic's
    /// messages and other groups are untouched. While consumers of the
    /// group still read, a temporary error (a running consumer would bring
    /// the group back): close its streams first. [`crate::ErrorKind::NotFound`]
    /// when the group never subscribed to the topic; on Kafka, which
    /// deletes a group whole, [`crate::ErrorKind::Unsupported`] when the
    /// group also has positions on other topics.
    async fn delete_group(&self, topic: &Topic, group: &Name) -> Result<()> {
        let _ = (topic, group);
        Err(admin::unsupported(self.name(), "delete groups"))
    }

    /// Register `schema` as the schema of what this client publishes to
    /// `topic`, with the broker's schema registry where it keeps one
    /// (Pulsar), before the first publish of a typed contract (the facade
    /// calls it once per topic, schema and codec). The registry checks it
    /// against the topic's schema under its compatibility strategy: an
    /// incompatible schema is [`crate::ErrorKind::IncompatibleSchema`]
    /// naming the fields. `Ok(Some(v))`: the registry's version of it,
    /// which consumers see in [`crate::DeliveryInfo::schema_version`].
    /// `Ok(None)`, the default: the broker keeps no registry; the
    /// envelope's `schema_id` and the contracts' compatibility check in CI
    /// are the contract.
    async fn register_schema(&self, topic: &Topic, schema: &SchemaSpec) -> Result<Option<u64>> {
        let _ = (topic, schema);
        Ok(None)
    }

    /// A record of event ids the broker keeps for a whole consumer group
    /// (replay protection: [`crate::security::ReplayLayer`]). `None`, the
    /// default: the broker has no place for one, and each process keeps
    /// its own.
    fn nonce_store(&self) -> Option<std::sync::Arc<dyn crate::security::NonceStore>> {
        None
    }

    /// Stop, flush and release. Idempotent.
    async fn close(&self) -> Result<()>;
}

/// The schema of a topic's payloads, as a broker's schema registry keeps
/// it ([`Transport::register_schema`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct SchemaSpec {
    /// The envelope's schema id, `<name>/<version>`
    /// (`esper.v1.FieldReport/1`).
    pub schema_id: String,
    /// How the payloads are encoded (JSON, protobuf, Avro).
    pub content_type: crate::ContentType,
    /// The schema in its Avro form (JSON): what registries compare
    /// versions by, whatever the encoding.
    pub avro: std::sync::Arc<str>,
}

impl SchemaSpec {
    /// The schema `schema_id` of payloads encoded as `content_type`, whose
    /// Avro form is `avro`.
    pub fn new(
        schema_id: impl Into<String>,
        content_type: crate::ContentType,
        avro: impl Into<std::sync::Arc<str>>,
    ) -> Self {
        SchemaSpec {
            schema_id: schema_id.into(),
            content_type,
            avro: avro.into(),
        }
    }
}

/// What a transport supports; the conformance suite leaves out (and names)
/// the cases a transport declares it cannot do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Several consumers of one group share the work.
    pub competing_consumers: bool,
    /// [`Subscription::key_ordered`] is honoured.
    pub key_ordered_competing: bool,
    /// Nack delays are honoured (not just immediate redelivery).
    pub nack_delay: bool,
    /// [`crate::StartPosition::At`] is honoured.
    pub start_at_time: bool,
    /// [`crate::StartPosition::Earliest`] replays all retained history.
    pub replay: bool,
    /// Retention policies are applied on the broker.
    pub retention: bool,
    /// Largest payload the transport accepts, in bytes.
    pub max_payload_bytes: usize,
    /// [`Transport::depth`] answers.
    pub depth: bool,
    /// [`Transport::list_topics`], [`Transport::describe_topic`] and
    /// [`Transport::delete_group`] answer.
    pub admin: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            competing_consumers: true,
            key_ordered_competing: false,
            nack_delay: true,
            start_at_time: true,
            replay: true,
            retention: true,
            max_payload_bytes: TopicPolicy::DEFAULT_MAX_PAYLOAD,
            depth: false,
            admin: false,
        }
    }
}

impl Capabilities {
    /// Set [`Capabilities::key_ordered_competing`].
    pub fn with_key_ordered_competing(mut self, yes: bool) -> Self {
        self.key_ordered_competing = yes;
        self
    }
    /// Set [`Capabilities::nack_delay`].
    pub fn with_nack_delay(mut self, yes: bool) -> Self {
        self.nack_delay = yes;
        self
    }
    /// Set [`Capabilities::start_at_time`].
    pub fn with_start_at_time(mut self, yes: bool) -> Self {
        self.start_at_time = yes;
        self
    }
    /// Set [`Capabilities::retention`].
    pub fn with_retention(mut self, yes: bool) -> Self {
        self.retention = yes;
        self
    }
    /// Set [`Capabilities::depth`].
    pub fn with_depth(mut self, yes: bool) -> Self {
        self.depth = yes;
        self
    }
    /// Set [`Capabilities::admin`].
    pub fn with_admin(mut self, yes: bool) -> Self {
        self.admin = yes;
        self
    }
    /// Set [`Capabilities::max_payload_bytes`].
    pub fn with_max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload_bytes = n;
        self
    }
}

/// How far a consumer group is behind on a topic ([`Transport::depth`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Depth {
    /// Messages not handed to the group yet. Where the broker tells only
    /// what is unsettled (Kafka: the end offsets less the committed ones),
    /// everything is counted here and `pending` is 0.
    pub backlog: u64,
    /// Messages handed to the group's consumers (or waiting for their
    /// redelivery) and not settled yet.
    pub pending: u64,
}

impl Depth {
    /// A depth of `backlog` messages not handed out and `pending` ones
    /// unsettled.
    pub fn new(backlog: u64, pending: u64) -> Self {
        Depth { backlog, pending }
    }

    /// What the group has not settled yet: `backlog + pending`.
    pub fn total(&self) -> u64 {
        self.backlog.saturating_add(self.pending)
    }
}

/// Where a published message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Receipt {
    /// The message's id.
    pub event_id: EventId,
    /// Its topic.
    pub topic: Topic,
    /// The broker's position (stream id, `partition/offset`, message id).
    pub position: Option<String>,
}

impl Receipt {
    /// Made by transports.
    pub fn new(event_id: EventId, topic: Topic, position: Option<String>) -> Self {
        Receipt {
            event_id,
            topic,
            position,
        }
    }
}

/// Coarse health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    /// Working.
    Up,
    /// Working with problems (reconnecting, slow).
    Degraded,
    /// Not working.
    Down,
}

/// The result of [`Transport::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Up, degraded or down.
    pub status: HealthStatus,
    /// The transport's name.
    pub transport: &'static str,
    /// What was seen, for humans.
    pub detail: String,
    /// Time of the check's round trip, when one was made.
    pub round_trip: Option<Duration>,
}

impl Health {
    /// Made by transports.
    pub fn new(
        status: HealthStatus,
        transport: &'static str,
        detail: impl Into<String>,
        round_trip: Option<Duration>,
    ) -> Self {
        Health {
            status,
            transport,
            detail: detail.into(),
            round_trip,
        }
    }

    /// Whether the status is [`HealthStatus::Up`].
    pub fn is_up(&self) -> bool {
        self.status == HealthStatus::Up
    }
}
