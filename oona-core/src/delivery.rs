//! Deliveries and how they are settled.
//!
//! A [`Delivery`] is one message handed to one consumer. The consumer settles
//! it with [`Delivery::ack`], [`Delivery::nack`] or [`Delivery::reject`]. The
//! core turns that [`Outcome`] into a [`Settlement`] with the rules in
//! [`crate::rules`] (attempt counting, dead-lettering after the last attempt)
//! and hands the settlement to the transport's [`Settle`], which maps it onto
//! its broker. A delivery dropped unsettled is **not** acked: the broker hands
//! it out again after the ack deadline.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tracing::Instrument as _;

use crate::envelope::Envelope;
use crate::error::Result;
use crate::rules;
use crate::topic::{Name, Topic};

/// What the consumer says about a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: never deliver it again to this group.
    Ack,
    /// Failed: deliver it again, after `delay` when given. On the last
    /// attempt it is dead-lettered instead.
    Nack {
        /// Wait at least this long before redelivering.
        delay: Option<Duration>,
        /// Why it failed; kept in the dead letter if this was the last
        /// attempt.
        reason: Option<String>,
    },
    /// Cannot ever succeed: dead-letter it now with this reason.
    Reject {
        /// Why; stored with the dead letter.
        reason: String,
    },
}

/// What the transport must do, decided by the core from an [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Remove the message from the group's pending set.
    Ack,
    /// Make the message deliverable again after `delay`, counting an attempt.
    Redeliver {
        /// Zero means at once.
        delay: Duration,
    },
    /// Publish `dead_letter` (already built by [`rules::dead_letter`]) to its
    /// topic, then ack the original. Both or neither where the broker allows.
    DeadLetter {
        /// The envelope to publish to the dead-letter topic.
        dead_letter: Box<Envelope>,
        /// Why, also inside `dead_letter`'s headers.
        reason: String,
    },
}

/// The transport's side of one delivery.
///
/// Called at most once. Returns when the transport has accepted the
/// settlement; a transport may batch it with others (one XACK for many ids),
/// in which case [`crate::Transport::close`] flushes what is still queued.
#[async_trait]
pub trait Settle: Send + Sync + 'static {
    /// Carry out the settlement.
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<()>;

    /// Push the delivery's lease out to `by` from now (see
    /// [`Delivery::extend`]). The default cannot.
    fn extend(&self, by: Duration) -> Result<()> {
        let _ = by;
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            "this delivery's lease cannot be extended",
        ))
    }
}

/// Facts about a delivery that transports fill in.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryInfo {
    /// 1 on first delivery, +1 on every redelivery to the group.
    pub attempt: u32,
    /// The subscription's `max_attempts`.
    pub max_attempts: u32,
    /// The subscription's `ack_deadline`: how long the lease of a delivery
    /// runs from when it is handed out (or last extended).
    pub ack_deadline: Duration,
    /// The consumer group.
    pub group: Name,
    /// Where dead letters go.
    pub dead_letter: Topic,
    /// The broker's position of the message (stream id, partition/offset,
    /// message id), when it has one.
    pub position: Option<String>,
    /// The version the broker's schema registry gave the writer's schema
    /// (Pulsar: the message's `schema_version`), where the broker keeps a
    /// registry and the producer registered one
    /// ([`crate::Transport::register_schema`]). The envelope's `schema_id`
    /// is the contract's own name and version, on every transport.
    pub schema_version: Option<u64>,
}

impl DeliveryInfo {
    /// Facts for a delivery under `subscription`.
    pub fn new(subscription: &crate::Subscription, attempt: u32, position: Option<String>) -> Self {
        DeliveryInfo {
            attempt,
            max_attempts: subscription.max_attempts,
            ack_deadline: subscription.ack_deadline,
            group: subscription.group.clone(),
            dead_letter: subscription.dead_letter.clone(),
            position,
            schema_version: None,
        }
    }

    /// Set [`DeliveryInfo::schema_version`].
    pub fn with_schema_version(mut self, version: Option<u64>) -> Self {
        self.schema_version = version;
        self
    }
}

/// One message handed to one consumer.
pub struct Delivery {
    envelope: Envelope,
    /// The envelope as it arrived, once a layer changed it: what a dead
    /// letter keeps.
    arrived: Option<Box<Envelope>>,
    info: DeliveryInfo,
    settler: Option<Box<dyn Settle>>,
    /// When the transport handed it over (the `receive` span starts here).
    received_at: std::time::SystemTime,
}

impl Delivery {
    /// Made by transports.
    pub fn new(envelope: Envelope, info: DeliveryInfo, settler: Box<dyn Settle>) -> Self {
        Delivery {
            envelope,
            arrived: None,
            info,
            settler: Some(settler),
            received_at: std::time::SystemTime::now(),
        }
    }

    /// When the transport handed the delivery over (before prefetch
    /// queues, layers and the handler).
    pub fn received_at(&self) -> std::time::SystemTime {
        self.received_at
    }

    /// The message.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Show the delivery under `topic` (a lane's, under its topic's name),
    /// the dead-letter copy included: it travels as published.
    pub(crate) fn show_topic(&mut self, topic: crate::Topic) {
        if let Some(a) = self.arrived.as_deref_mut() {
            a.topic = topic.clone();
        }
        self.envelope.topic = topic;
    }

    /// The message, for a consume layer to change before the handler sees
    /// it (the claim-check puts the payload back). A dead letter keeps the
    /// envelope as it arrived.
    pub fn envelope_mut(&mut self) -> &mut Envelope {
        if self.arrived.is_none() {
            self.arrived = Some(Box::new(self.envelope.clone()));
        }
        &mut self.envelope
    }

    /// 1 on first delivery, +1 on every redelivery.
    pub fn attempt(&self) -> u32 {
        self.info.attempt
    }

    /// Facts about this delivery.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// Whether a nack now would dead-letter instead of redelivering.
    pub fn is_last_attempt(&self) -> bool {
        self.info.attempt >= self.info.max_attempts
    }

    /// Keep the delivery for `by` more from now: its lease (which began
    /// when it was handed out, for the subscription's ack deadline) now
    /// ends `by` from now, so it is not redelivered meanwhile. The handler
    /// runner calls this while a handler runs. Fails with
    /// [`crate::ErrorKind::LeaseExpired`] when the lease already ran out.
    pub fn extend(&self, by: Duration) -> Result<()> {
        match &self.settler {
            Some(s) => s.extend(by),
            None => Err(crate::Error::new(
                crate::ErrorKind::AlreadySettled,
                "delivery already settled",
            )),
        }
    }

    /// Run `work` while keeping this delivery's lease: extended by an ack
    /// deadline every half deadline (what the handler runner does around a
    /// handler, and a layer around slow work of its own). `None` when
    /// `timeout` passed first (the work is dropped).
    pub async fn while_leased<F: std::future::Future>(
        &self,
        work: F,
        timeout: Option<Duration>,
    ) -> Option<F::Output> {
        let lease = self.info.ack_deadline;
        let every = (lease / 2).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let limit = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(work, limit);
        let mut extending = true;
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                _ = &mut limit => return None,
                _ = tick.tick(), if extending => {
                    // A transport without leases of its own says Unsupported;
                    // a lease already gone says LeaseExpired: stop trying.
                    extending = self.extend(lease).is_ok();
                }
            }
        }
    }

    /// Done with it.
    pub async fn ack(self) -> Result<()> {
        self.settle(Outcome::Ack).await
    }

    /// Failed; deliver again (after `delay`), or dead-letter on the last
    /// attempt.
    pub async fn nack(self, delay: Option<Duration>) -> Result<()> {
        self.settle(Outcome::Nack {
            delay,
            reason: None,
        })
        .await
    }

    /// Like [`Delivery::nack`], saying why: the reason is kept in the dead
    /// letter if this was the last attempt.
    pub async fn nack_because(
        self,
        delay: Option<Duration>,
        reason: impl Into<String>,
    ) -> Result<()> {
        self.settle(Outcome::Nack {
            delay,
            reason: Some(reason.into()),
        })
        .await
    }

    /// Cannot succeed: dead-letter now.
    pub async fn reject(self, reason: impl Into<String>) -> Result<()> {
        self.settle(Outcome::Reject {
            reason: reason.into(),
        })
        .await
    }

    /// Settle with an outcome.
    pub async fn settle(mut self, outcome: Outcome) -> Result<()> {
        let arrived = self.arrived.as_deref().unwrap_or(&self.envelope);
        let settlement = rules::settle(arrived, &self.info, outcome);
        let span = tracing::debug_span!(
            "oona.settle",
            topic = %self.envelope.topic,
            event_id = %self.envelope.event_id,
            group = %self.info.group,
            attempt = self.info.attempt,
            settlement = rules::settlement_name(&settlement),
        );
        match self.settler.take() {
            Some(s) => s.settle(settlement).instrument(span).await,
            // Only reachable if settle were called twice, which `self` by
            // value prevents.
            None => Err(crate::Error::new(
                crate::ErrorKind::AlreadySettled,
                "delivery already settled",
            )),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.settler.is_some() {
            tracing::debug!(
                topic = %self.envelope.topic,
                event_id = %self.envelope.event_id,
                "delivery dropped unsettled; it will be redelivered after the ack deadline"
            );
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("envelope", &self.envelope)
            .field("info", &self.info)
            .field("settled", &self.settler.is_none())
            .finish()
    }
}

/// The stream a subscription yields.
///
/// An `Err` item reports a problem: after a temporary one (connection lost
/// and being re-established) the stream goes on; after a permanent one it
/// ends. The stream ends (`None`) when the transport is closed.
///
/// Dropping it stops the subscription: messages read but not handed out
/// go back to the broker at once, in the background. [`DeliveryStream::close`]
/// does the same and returns when they are back, so a process may exit
/// right after (deliveries already handed out can still be settled).
pub struct DeliveryStream {
    inner: BoxStream<'static, Result<Delivery>>,
    close: Option<CloseHook>,
}

type CloseHook = Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>;

impl DeliveryStream {
    /// A stream of deliveries (with nothing to wait for on close).
    pub fn new(stream: impl futures::Stream<Item = Result<Delivery>> + Send + 'static) -> Self {
        DeliveryStream {
            inner: Box::pin(stream),
            close: None,
        }
    }

    /// Made by the engine: `hook` runs after the stream is dropped, and
    /// resolves when what it held is given back.
    pub(crate) fn with_close(mut self, hook: CloseHook) -> Self {
        self.close = Some(hook);
        self
    }

    /// One stream of several, the first listed first: each poll takes from
    /// the first stream with a delivery ready, each delivery passed through
    /// `map`. It ends when any of them ends (a lane that stops must not go
    /// unnoticed), and closing it closes them all.
    pub(crate) fn merge_biased(
        streams: Vec<DeliveryStream>,
        map: fn(Delivery) -> Delivery,
    ) -> Self {
        use futures::stream::{select_with_strategy, PollNext};
        use futures::StreamExt as _;
        type Marked = BoxStream<'static, Option<Result<Delivery>>>;
        let mut hooks = Vec::new();
        let mut merged: Option<Marked> = None;
        for s in streams.into_iter().rev() {
            let DeliveryStream { inner, close } = s;
            hooks.extend(close);
            let marked = inner
                .map(move |d| Some(d.map(map)))
                .chain(futures::stream::once(async { None }))
                .boxed();
            merged = Some(match merged {
                None => marked,
                Some(rest) => {
                    select_with_strategy(marked, rest, |_: &mut ()| PollNext::Left).boxed()
                }
            });
        }
        let stream = merged
            .unwrap_or_else(|| futures::stream::empty().boxed())
            .take_while(|d| std::future::ready(d.is_some()))
            .filter_map(std::future::ready);
        let hook: CloseHook = Box::new(move || {
            Box::pin(async move {
                for h in hooks {
                    h().await;
                }
            })
        });
        DeliveryStream::new(stream).with_close(hook)
    }

    /// Stop consuming and wait until the messages read but not handed out
    /// are back with the broker.
    pub async fn close(mut self) {
        let hook = self.close.take();
        drop(self);
        if let Some(hook) = hook {
            hook().await;
        }
    }
}

impl futures::Stream for DeliveryStream {
    type Item = Result<Delivery>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for DeliveryStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryStream").finish_non_exhaustive()
    }
}
