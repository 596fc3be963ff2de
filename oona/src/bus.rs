//! The typed layer: [`Bus`] publishes values and yields decoded deliveries.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt as _;
use oona_core::layer::{apply_policies, ConsumeLayer, PublishLayer, PublishNext};
use oona_core::metrics::Metrics;
use oona_core::priority;
use oona_core::sync::lock;
use oona_core::{
    Codec, ContentType, Delivery, DeliveryInfo, DeliveryStream, Envelope, Error, ErrorKind, Health,
    HealthStatus, Json, Name, PolicySet, Priority, Receipt, Result, SchemaSpec, Subscription,
    Topic, Transport,
};
use tracing::Instrument as _;

use crate::runner::{Runner, Runners};

/// Anything that names a topic: a [`Topic`] or a string, validated before
/// any I/O (an invalid name is an [`ErrorKind::InvalidTopic`] error).
pub trait IntoTopic {
    /// The validated topic.
    fn into_topic(self) -> Result<Topic>;
}

impl IntoTopic for Topic {
    fn into_topic(self) -> Result<Topic> {
        Ok(self)
    }
}
impl IntoTopic for &Topic {
    fn into_topic(self) -> Result<Topic> {
        Ok(self.clone())
    }
}
impl IntoTopic for &str {
    fn into_topic(self) -> Result<Topic> {
        Topic::new(self)
    }
}
impl IntoTopic for String {
    fn into_topic(self) -> Result<Topic> {
        Topic::new(self)
    }
}
impl IntoTopic for &String {
    fn into_topic(self) -> Result<Topic> {
        Topic::new(self.as_str())
    }
}

/// Anything that names a subscription: a [`Subscription`] (every option),
/// or a topic and a consumer group, as strings or validated names
/// (`("telemetry.seed.health", "tamiyo")`). Strings are validated before
/// any I/O with the errors of [`Topic::new`] and [`Name::new`].
pub trait IntoSubscription {
    /// The validated subscription, with the default options for a pair.
    fn into_subscription(self) -> Result<Subscription>;
}

impl IntoSubscription for Subscription {
    fn into_subscription(self) -> Result<Subscription> {
        Ok(self)
    }
}

impl<T: IntoTopic> IntoSubscription for (T, &str) {
    fn into_subscription(self) -> Result<Subscription> {
        Ok(Subscription::new(self.0.into_topic()?, Name::new(self.1)?))
    }
}

impl<T: IntoTopic> IntoSubscription for (T, String) {
    fn into_subscription(self) -> Result<Subscription> {
        Ok(Subscription::new(self.0.into_topic()?, Name::new(self.1)?))
    }
}

impl<T: IntoTopic> IntoSubscription for (T, Name) {
    fn into_subscription(self) -> Result<Subscription> {
        Ok(Subscription::new(self.0.into_topic()?, self.1))
    }
}

/// A transport with a sender identity and topic policies: the handle
/// services publish and consume through.
///
/// Cheap to clone (two `Arc`s and a string).
#[derive(Clone)]
pub struct Bus {
    transport: Arc<dyn Transport>,
    sender_id: Arc<str>,
    policies: Arc<PolicySet>,
    publish_layers: Arc<[Arc<dyn PublishLayer>]>,
    consume_layers: Arc<[Arc<dyn ConsumeLayer>]>,
    metrics: Option<Metrics>,
    runners: Arc<Runners>,
    /// The schemas (schema id, content type) of each topic registered with
    /// the transport's schema registry by this bus and its clones.
    schemas: Arc<Mutex<Registered>>,
}

/// The schemas (schema id, content type) registered for each topic.
type Registered = HashMap<Topic, Vec<(String, ContentType)>>;

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("transport", &self.transport.name())
            .field("sender_id", &self.sender_id)
            .field("publish_layers", &self.publish_layers.len())
            .field("consume_layers", &self.consume_layers.len())
            .finish()
    }
}

impl Bus {
    /// The sender id used until [`Bus::with_sender_id`] sets one.
    pub const DEFAULT_SENDER_ID: &'static str = "oona";

    /// Wrap a transport, with sender id [`Bus::DEFAULT_SENDER_ID`] and the
    /// platform's default [`PolicySet`]. With `OONA_METRICS_ADDR` set (and
    /// feature `http`), the bus records the process's [`Metrics::global`]
    /// for the endpoints its runners serve (see `oona::serve`).
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        let bus = Bus {
            transport,
            sender_id: Arc::from(Self::DEFAULT_SENDER_ID),
            policies: Arc::new(PolicySet::default()),
            publish_layers: Arc::new([]),
            consume_layers: Arc::new([]),
            metrics: None,
            runners: Arc::default(),
            schemas: Arc::default(),
        };
        #[cfg(feature = "http")]
        if crate::serve::addr_from_env().is_some() {
            return bus.with_metrics(Metrics::global());
        }
        bus
    }

    /// Record `metrics` of everything this bus publishes and its runners
    /// handle: the layer goes outermost on both paths, so it times the
    /// other layers too (see [`oona_core::metrics`]). A second call
    /// replaces the first.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        // The metrics layer is always first: a second call replaces it.
        let old = usize::from(self.metrics.replace(metrics.clone()).is_some());
        let mut p: Vec<Arc<dyn PublishLayer>> = vec![Arc::new(metrics.clone())];
        p.extend(self.publish_layers.iter().skip(old).cloned());
        self.publish_layers = p.into();
        let mut c: Vec<Arc<dyn ConsumeLayer>> = vec![Arc::new(metrics)];
        c.extend(self.consume_layers.iter().skip(old).cloned());
        self.consume_layers = c.into();
        self
    }

    /// The metrics this bus records, if any.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    /// The handler runners of this bus and its clones.
    pub(crate) fn runners(&self) -> &Arc<Runners> {
        &self.runners
    }

    /// Run every publish of this bus through `layer` (after the layers
    /// added before it); see [`oona_core::layer`].
    pub fn with_publish_layer(mut self, layer: impl PublishLayer) -> Self {
        let mut v = self.publish_layers.to_vec();
        v.push(Arc::new(layer));
        self.publish_layers = v.into();
        self
    }

    /// Run every delivery this bus's handler runners take through `layer`
    /// (inside the layers added before it); see [`oona_core::layer`].
    pub fn with_consume_layer(mut self, layer: impl ConsumeLayer) -> Self {
        let mut v = self.consume_layers.to_vec();
        v.push(Arc::new(layer));
        self.consume_layers = v.into();
        self
    }

    /// The consume layers, for the runners.
    pub(crate) fn consume_layers(&self) -> &Arc<[Arc<dyn ConsumeLayer>]> {
        &self.consume_layers
    }

    /// Publish as `sender_id` (`tamiyo-controller-1`).
    pub fn with_sender_id(mut self, sender_id: impl Into<String>) -> Self {
        self.sender_id = Arc::from(sender_id.into());
        self
    }

    /// Use these topic policies for [`Bus::ensure_topic`] and the payload
    /// check before publishing.
    pub fn with_policies(mut self, policies: PolicySet) -> Self {
        self.policies = Arc::new(policies);
        self
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Who this bus publishes as.
    pub fn sender_id(&self) -> &str {
        &self.sender_id
    }

    /// The topic policies.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// Publish `value` to `topic` as JSON.
    pub async fn publish<T>(&self, topic: impl IntoTopic, value: &T) -> Result<Receipt>
    where
        Json: Codec<T>,
    {
        self.message(topic, value).send().await
    }

    /// Start a message with options (codec, key, correlation id,
    /// headers...); JSON unless [`MessageBuilder::codec`] says otherwise.
    /// Finish with [`MessageBuilder::send`] (or [`MessageBuilder::build`]
    /// for [`Bus::publish_envelopes`]).
    pub fn message<'a, T>(
        &'a self,
        topic: impl IntoTopic,
        value: &'a T,
    ) -> MessageBuilder<'a, T, Json> {
        MessageBuilder::new(self, &Json, topic.into_topic(), value)
    }

    /// Publish a ready envelope. An empty `sender_id` is filled with this
    /// bus's. The payload is checked against the topic's policy after the
    /// publish layers (a claim-check shrinks a large one), before the
    /// transport.
    pub async fn publish_envelope(&self, mut envelope: Envelope) -> Result<Receipt> {
        if envelope.sender_id.is_empty() {
            envelope.sender_id = self.sender_id.to_string();
        }
        let span = tracing::debug_span!(
            "oona.publish",
            topic = %envelope.topic,
            event_id = %envelope.event_id,
            sender = %envelope.sender_id,
            transport = self.transport.name(),
        );
        if self.publish_layers.is_empty() {
            apply_policies(std::slice::from_mut(&mut envelope), &self.policies)?;
            return self.transport.publish(envelope).instrument(span).await;
        }
        let mut receipts = self
            .publish_chain()
            .run(vec![envelope])
            .instrument(span)
            .await?;
        receipts
            .pop()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "a publish layer returned no receipt"))
    }

    /// Publish several envelopes in order (one round trip where the
    /// transport can); payloads are checked as with
    /// [`Bus::publish_envelope`].
    pub async fn publish_envelopes(&self, mut envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        for e in &mut envelopes {
            if e.sender_id.is_empty() {
                e.sender_id = self.sender_id.to_string();
            }
        }
        let span = tracing::debug_span!(
            "oona.publish",
            count = envelopes.len(),
            transport = self.transport.name(),
        );
        self.publish_chain().run(envelopes).instrument(span).await
    }

    /// Register the schema of a contract's envelope (its schema id, content
    /// type and `avro` form) with the transport's schema registry, once per
    /// topic and schema for this bus and its clones
    /// ([`Transport::register_schema`]).
    pub(crate) async fn ensure_schema(
        &self,
        envelope: &Envelope,
        avro: &'static str,
    ) -> Result<()> {
        let Some(id) = &envelope.schema_id else {
            return Ok(());
        };
        let ct = &envelope.content_type;
        let known = lock(&self.schemas)
            .get(&envelope.topic)
            .is_some_and(|s| s.iter().any(|(i, c)| i == id && c == ct));
        if known {
            return Ok(());
        }
        let spec = SchemaSpec::new(id.clone(), ct.clone(), avro);
        self.transport
            .register_schema(&envelope.topic, &spec)
            .await?;
        // High and emergency messages of a topic with lanes go to the lane
        // topics: the schema is theirs too.
        if priority::laned(&envelope.topic, &self.policies) {
            for lane in priority::lanes(&envelope.topic) {
                if lane == envelope.topic {
                    continue;
                }
                self.transport.register_schema(&lane, &spec).await?;
            }
        }
        lock(&self.schemas)
            .entry(envelope.topic.clone())
            .or_default()
            .push((spec.schema_id, spec.content_type));
        Ok(())
    }

    /// The publish layers, the topics' policies, then the transport.
    fn publish_chain(&self) -> PublishNext<'_> {
        PublishNext::new(&self.publish_layers, self.transport.as_ref())
            .with_policies(&self.policies)
    }

    /// Create `topic` if missing, with its plane's policy (and its lanes,
    /// where the policy has priority lanes: a name too long to carry them
    /// is refused with [`ErrorKind::InvalidTopic`]).
    pub async fn ensure_topic(&self, topic: impl IntoTopic) -> Result<()> {
        let topic = topic.into_topic()?;
        let policy = self.policies.for_topic(&topic).clone();
        if policy.priority_lanes && !topic.is_dead_letter() && priority::base_of(&topic).is_none() {
            priority::check_lanes(&topic)?;
        }
        if !priority::laned(&topic, &self.policies) {
            return self.transport.ensure_topic(&topic, &policy).await;
        }
        for lane in priority::lanes(&topic) {
            self.transport.ensure_topic(&lane, &policy).await?;
        }
        Ok(())
    }

    /// Raw, undecoded deliveries. On a topic with priority lanes the
    /// group reads the topic and its lanes, the most urgent first
    /// ([`oona_core::priority`]).
    pub async fn subscribe_raw(
        &self,
        subscription: impl IntoSubscription,
    ) -> Result<DeliveryStream> {
        let subscription = subscription.into_subscription()?;
        if !priority::laned(&subscription.topic, &self.policies) {
            return self.transport.subscribe(subscription).await;
        }
        let mut streams = Vec::new();
        for lane in priority::lanes(&subscription.topic) {
            let mut s = subscription.clone();
            s.topic = lane;
            match self.transport.subscribe(s).await {
                Ok(stream) => streams.push(stream),
                Err(e) => {
                    // The lanes opened so far give back what they read.
                    for s in streams {
                        s.close().await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(priority::merge(streams))
    }

    /// Deliveries decoded from JSON into `T` (another codec with
    /// [`TypedSubscription::codec`]). A payload that does not decode is
    /// rejected (dead-lettered with the decode error as reason) and
    /// skipped, never dropped.
    pub async fn subscribe<T>(
        &self,
        subscription: impl IntoSubscription,
    ) -> Result<TypedSubscription<T, Json>> {
        let stream = self.subscribe_raw(subscription).await?;
        Ok(TypedSubscription {
            stream,
            codec: Json,
            _t: PhantomData,
        })
    }

    /// A handler runner for `subscription`, decoding JSON into `T` (another
    /// codec with [`Runner::codec`]). A subscription that does not
    /// validate fails at [`Runner::start`] or [`Runner::run`].
    pub fn runner<T>(&self, subscription: impl IntoSubscription) -> Runner<T, Json> {
        Runner::new(self.clone(), subscription.into_subscription(), Json)
    }

    /// The transport's health.
    pub async fn health(&self) -> Health {
        self.transport.health().await
    }

    /// Whether the service can do its work: the broker's [`Bus::health`],
    /// made `Down` when a handler runner of this bus stopped by itself
    /// (its stream ended) rather than by its shutdown token. What
    /// `/readyz` answers ([`crate::serve`]).
    pub async fn readiness(&self) -> Health {
        let h = self.health().await;
        let stopped = self.runners.stopped();
        if stopped.is_empty() {
            return h;
        }
        Health::new(
            HealthStatus::Down,
            h.transport,
            format!(
                "{}; runners stopped by themselves: {}",
                h.detail,
                stopped.join(", ")
            ),
            h.round_trip,
        )
    }

    /// Close the transport (streams end, queued settlements are flushed).
    pub async fn close(&self) -> Result<()> {
        self.transport.close().await
    }
}

/// A message being built; see [`Bus::message`].
#[must_use = "a message is only published by .send().await"]
pub struct MessageBuilder<'a, T, C> {
    bus: &'a Bus,
    codec: &'a C,
    topic: Result<Topic>,
    value: &'a T,
    key: Option<String>,
    correlation_id: Option<String>,
    traceparent: Option<String>,
    priority: Option<Priority>,
    schema_id: Option<String>,
    /// The schema id of a contract type, when the codec names none.
    pub(crate) contract_schema: Option<String>,
    /// The Avro form of a contract type's schema, registered with the
    /// transport's schema registry before the message is sent.
    pub(crate) contract_avro: Option<&'static str>,
    headers: Vec<(String, String)>,
}

impl<'a, T, C> MessageBuilder<'a, T, C> {
    pub(crate) fn new(bus: &'a Bus, codec: &'a C, topic: Result<Topic>, value: &'a T) -> Self {
        MessageBuilder {
            bus,
            codec,
            topic,
            value,
            key: None,
            correlation_id: None,
            traceparent: None,
            priority: None,
            schema_id: None,
            contract_schema: None,
            contract_avro: None,
            headers: Vec::new(),
        }
    }

    /// Encode with `codec` instead (protobuf, Avro, a codec of your own).
    pub fn codec<C2: Codec<T>>(self, codec: &'a C2) -> MessageBuilder<'a, T, C2> {
        MessageBuilder {
            bus: self.bus,
            codec,
            topic: self.topic,
            value: self.value,
            key: self.key,
            correlation_id: self.correlation_id,
            traceparent: self.traceparent,
            priority: self.priority,
            schema_id: self.schema_id,
            contract_schema: self.contract_schema,
            contract_avro: self.contract_avro,
            headers: self.headers,
        }
    }
}

impl<'a, T, C: Codec<T>> MessageBuilder<'a, T, C> {
    /// Partition / ordering key: messages with one key keep their order.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Correlation id (ties a reply to its request). Inside a handler it
    /// defaults to the handled message's ([`crate::context`]).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
    /// Continue a W3C trace (`traceparent` header; sets the trace id).
    /// Inside a handler the handled message's trace goes on by default.
    pub fn traceparent(mut self, tp: impl Into<String>) -> Self {
        self.traceparent = Some(tp.into());
        self
    }
    /// Priority (default normal).
    pub fn priority(mut self, p: Priority) -> Self {
        self.priority = Some(p);
        self
    }
    /// Override the schema id the codec gives.
    pub fn schema_id(mut self, id: impl Into<String>) -> Self {
        self.schema_id = Some(id.into());
        self
    }
    /// Add a header. Names starting with `oona-` are reserved: sending such
    /// a message fails with [`ErrorKind::ConfigInvalid`].
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Encode and build the envelope without publishing it.
    pub fn build(self) -> Result<Envelope> {
        let topic = self.topic?;
        let payload = self.codec.encode(self.value)?;
        let mut b = Envelope::builder(topic, payload)
            .sender_id(self.bus.sender_id.to_string())
            .content_type(self.codec.content_type());
        let schema = self.schema_id.or_else(|| self.codec.schema_id());
        if let Some(s) = schema.or(self.contract_schema) {
            b = b.schema_id(s);
        }
        if let Some(k) = self.key {
            b = b.key(k);
        }
        // Inside a handler the message inherits from the one handled.
        let cause = crate::context::Cause::current();
        let correlation = self
            .correlation_id
            .or_else(|| cause.as_ref().map(|c| c.correlation_id().to_string()));
        if let Some(c) = correlation {
            b = b.correlation_id(c);
        }
        let traceparent = self
            .traceparent
            .or_else(|| cause.as_ref().and_then(|c| c.continued_traceparent()));
        if let Some(tp) = traceparent {
            b = b.traceparent(tp);
        } else if let Some(t) = cause.as_ref().and_then(|c| c.trace_id()) {
            b = b.trace_id(t);
        }
        if let Some(c) = &cause {
            b = b.header(crate::context::CAUSATION_ID, c.event_id());
        }
        if let Some(p) = self.priority {
            b = b.priority(p);
        }
        for (k, v) in self.headers {
            if k.starts_with(oona_core::header::RESERVED_PREFIX) {
                return Err(Error::new(
                    ErrorKind::ConfigInvalid,
                    format!(
                        "header `{k}`: names starting with `{}` are reserved for Oona",
                        oona_core::header::RESERVED_PREFIX
                    ),
                ));
            }
            b = b.header(k, v);
        }
        Ok(b.build())
    }

    /// Encode and publish (a contract's schema registered first, where the
    /// broker keeps a registry).
    pub async fn send(self) -> Result<Receipt> {
        let (bus, avro) = (self.bus, self.contract_avro);
        let envelope = self.build()?;
        if let Some(avro) = avro {
            bus.ensure_schema(&envelope, avro).await?;
        }
        bus.publish_envelope(envelope).await
    }
}

/// A delivery with its payload decoded. Settle it with
/// [`TypedDelivery::ack`], [`TypedDelivery::nack`] or
/// [`TypedDelivery::reject`]; dropped unsettled it comes back after the ack
/// deadline.
#[derive(Debug)]
pub struct TypedDelivery<T> {
    value: T,
    delivery: Delivery,
}

impl<T> TypedDelivery<T> {
    /// The decoded payload.
    pub fn value(&self) -> &T {
        &self.value
    }
    /// The envelope (metadata and raw payload).
    pub fn envelope(&self) -> &Envelope {
        self.delivery.envelope()
    }
    /// 1 on first delivery, +1 on every redelivery.
    pub fn attempt(&self) -> u32 {
        self.delivery.attempt()
    }
    /// Facts about this delivery (group, max attempts, position...).
    pub fn info(&self) -> &DeliveryInfo {
        self.delivery.info()
    }
    /// Split into the value and the raw delivery (which still needs settling).
    pub fn into_parts(self) -> (T, Delivery) {
        (self.value, self.delivery)
    }
    /// Done with it.
    pub async fn ack(self) -> Result<()> {
        self.delivery.ack().await
    }
    /// Failed; deliver again after `delay` (dead-lettered on the last attempt).
    pub async fn nack(self, delay: Option<Duration>) -> Result<()> {
        self.delivery.nack(delay).await
    }
    /// Cannot succeed: dead-letter now with `reason`.
    pub async fn reject(self, reason: impl Into<String>) -> Result<()> {
        self.delivery.reject(reason).await
    }
}

/// Decoded deliveries of one subscription; see [`Bus::subscribe`].
pub struct TypedSubscription<T, C = Json> {
    stream: DeliveryStream,
    codec: C,
    _t: PhantomData<fn() -> T>,
}

impl<T, C> fmt::Debug for TypedSubscription<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedSubscription")
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T, C> TypedSubscription<T, C> {
    /// Decode with `codec` instead (nothing is decoded before the first
    /// [`TypedSubscription::next`]).
    pub fn codec<C2: Codec<T>>(self, codec: C2) -> TypedSubscription<T, C2> {
        TypedSubscription {
            stream: self.stream,
            codec,
            _t: PhantomData,
        }
    }
}

impl<T, C: Codec<T>> TypedSubscription<T, C> {
    /// The next decoded delivery; `None` when the stream has ended.
    ///
    /// A payload that does not decode is rejected with the decode error as
    /// reason and skipped. If that rejection itself fails, the error is
    /// returned (the message stays unsettled and comes back after the ack
    /// deadline).
    pub async fn next(&mut self) -> Option<Result<TypedDelivery<T>>> {
        loop {
            let delivery = match self.stream.next().await? {
                Ok(d) => d,
                Err(e) => return Some(Err(e)),
            };
            match decode(&self.codec, delivery).await {
                Ok(Some(td)) => return Some(Ok(td)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// As a `Stream`.
    pub fn into_stream(self) -> BoxStream<'static, Result<TypedDelivery<T>>>
    where
        T: Send + 'static,
        C: 'static,
    {
        futures::stream::unfold(self, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
        .boxed()
    }
}

/// Decode a delivery; on failure reject it with the reason and return
/// `Ok(None)`.
pub(crate) async fn decode<T, C: Codec<T>>(
    codec: &C,
    delivery: Delivery,
) -> Result<Option<TypedDelivery<T>>> {
    match codec.decode(delivery.envelope()) {
        Ok(value) => Ok(Some(TypedDelivery { value, delivery })),
        Err(e) => {
            tracing::warn!(
                topic = %delivery.envelope().topic,
                event_id = %delivery.envelope().event_id,
                error = %e,
                "oona: payload does not decode; dead-lettering"
            );
            delivery.reject(decode_reason(&e)).await?;
            Ok(None)
        }
    }
}

/// The dead-letter reason of a decode failure.
pub(crate) fn decode_reason(e: &Error) -> String {
    if e.kind() == ErrorKind::Decode {
        format!("decode: {}", e.message())
    } else {
        format!("decode: {e}")
    }
}
