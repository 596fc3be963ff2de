//! Layers: interception points on the publish path and around the
//! handling of each delivery, the same on every transport.
//!
//! In the spirit of tower's middleware, with object-safe traits: a layer
//! gets the work and a `next` that runs the rest of the chain (the later
//! layers, then the transport or the handler). It may change the work
//! first (sign an envelope, stamp trace context), refuse it (an error on
//! publish; a settlement of its own on consume, such as rejecting a bad
//! signature), or look at the result (metrics, tracing, de-duplication).
//! Layers run in the order they were added: the first added is the
//! outermost.
//!
//! The `oona` facade owns the chains: `Bus::with_publish_layer` and
//! `Bus::with_consume_layer`; every publish of the bus and every delivery
//! its handler runners take goes through them. Streams taken with
//! `Bus::subscribe_raw` are the application's own: consume layers do not
//! see them.
//!
//! ```
//! use oona_core::layer::{PublishLayer, PublishNext};
//! use oona_core::{Envelope, Receipt, Result};
//!
//! /// Stamps every outgoing envelope with the service's region.
//! struct Region(&'static str);
//!
//! #[async_trait::async_trait]
//! impl PublishLayer for Region {
//!     async fn publish(&self, mut envelopes: Vec<Envelope>, next: PublishNext<'_>) -> Result<Vec<Receipt>> {
//!         for e in &mut envelopes {
//!             e.headers.insert("region".into(), self.0.into());
//!         }
//!         next.run(envelopes).await
//!     }
//! }
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::delivery::{Delivery, Outcome};
use crate::envelope::Envelope;
use crate::error::Result;
use crate::topic::PolicySet;
use crate::transport::{Receipt, Transport};

/// A layer of the publish path.
#[async_trait]
pub trait PublishLayer: Send + Sync + 'static {
    /// Publish `envelopes` (in order; one or a batch) by calling
    /// `next.run`, with any changes; or return an error instead.
    async fn publish(
        &self,
        envelopes: Vec<Envelope>,
        next: PublishNext<'_>,
    ) -> Result<Vec<Receipt>>;
}

/// The rest of a publish chain.
pub struct PublishNext<'a> {
    layers: &'a [Arc<dyn PublishLayer>],
    transport: &'a dyn Transport,
    policies: Option<&'a PolicySet>,
}

impl<'a> PublishNext<'a> {
    /// The chain of `layers` in front of `transport`.
    pub fn new(layers: &'a [Arc<dyn PublishLayer>], transport: &'a dyn Transport) -> Self {
        PublishNext {
            layers,
            transport,
            policies: None,
        }
    }

    /// Apply the topics' policies after the layers, just before the
    /// transport: each payload is checked against its topic's limit (the
    /// limit is on what travels: a claim-check layer shrinks a large
    /// payload to a reference), and urgent messages of laned topics go to
    /// their lanes ([`crate::priority`]; signatures cover the named topic).
    pub fn with_policies(mut self, policies: &'a PolicySet) -> Self {
        self.policies = Some(policies);
        self
    }

    /// The topics' policies the chain applies before the transport, if
    /// any ([`PublishNext::with_policies`]).
    pub fn policies(&self) -> Option<&'a PolicySet> {
        self.policies
    }

    /// Run the later layers, then the transport: one envelope with
    /// [`Transport::publish`], several with [`Transport::publish_batch`].
    pub async fn run(self, mut envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        if let Some((layer, rest)) = self.layers.split_first() {
            let next = PublishNext {
                layers: rest,
                transport: self.transport,
                policies: self.policies,
            };
            return layer.publish(envelopes, next).await;
        }
        if let Some(policies) = self.policies {
            apply_policies(&mut envelopes, policies)?;
        }
        match envelopes.len() {
            1 => match envelopes.pop() {
                Some(e) => Ok(vec![self.transport.publish(e).await?]),
                None => Ok(Vec::new()),
            },
            _ => self.transport.publish_batch(envelopes).await,
        }
    }
}

/// What the topics' policies do to envelopes about to go to the transport:
/// each payload is checked against its topic's limit, then urgent messages
/// of laned topics move to their lanes ([`crate::priority`]).
pub fn apply_policies(envelopes: &mut [Envelope], policies: &PolicySet) -> Result<()> {
    for e in envelopes.iter() {
        policies
            .for_topic(&e.topic)
            .check_payload(&e.topic, e.payload.len())?;
    }
    crate::priority::route(envelopes, policies);
    Ok(())
}

/// What became of a delivery: how it was settled, and whether the
/// transport took the settlement.
#[derive(Debug)]
#[non_exhaustive]
pub struct Handled {
    /// The outcome it was settled with.
    pub outcome: Outcome,
    /// Whether it went to the dead-letter topic (a reject, or a nack on
    /// the last attempt).
    pub dead_lettered: bool,
    /// The transport's answer to the settlement.
    pub settled: Result<()>,
    /// When the settlement was handed to the transport, and when it
    /// answered (the `settle` span).
    pub settle_time: (std::time::SystemTime, std::time::SystemTime),
}

impl Handled {
    /// Settle `delivery` with `outcome` and say what became of it: what a
    /// layer that decides by itself returns.
    pub async fn settle(delivery: Delivery, outcome: Outcome) -> Handled {
        let dead_lettered = match &outcome {
            Outcome::Ack => false,
            Outcome::Nack { .. } => delivery.is_last_attempt(),
            Outcome::Reject { .. } => true,
        };
        let started = std::time::SystemTime::now();
        let settled = delivery.settle(outcome.clone()).await;
        Handled {
            outcome,
            dead_lettered,
            settled,
            settle_time: (started, std::time::SystemTime::now()),
        }
    }
}

/// A layer around the handling of each delivery.
#[async_trait]
pub trait ConsumeLayer: Send + Sync + 'static {
    /// Pass `delivery` on with `next.run` (the later layers, then the
    /// handler and its settlement), or settle it here with
    /// [`Handled::settle`]; return what became of it.
    async fn handle(&self, delivery: Delivery, next: ConsumeNext<'_>) -> Handled;
}

/// The innermost step of a consume chain: the handler and its settlement.
pub type Terminal<'a> = &'a (dyn Fn(Delivery) -> BoxFuture<'a, Handled> + Send + Sync);

/// The rest of a consume chain.
pub struct ConsumeNext<'a> {
    layers: &'a [Arc<dyn ConsumeLayer>],
    terminal: Terminal<'a>,
}

impl<'a> ConsumeNext<'a> {
    /// The chain of `layers` around `terminal`.
    pub fn new(layers: &'a [Arc<dyn ConsumeLayer>], terminal: Terminal<'a>) -> Self {
        ConsumeNext { layers, terminal }
    }

    /// Run the later layers, then the handler.
    pub async fn run(self, delivery: Delivery) -> Handled {
        match self.layers.split_first() {
            Some((layer, rest)) => {
                let next = ConsumeNext {
                    layers: rest,
                    terminal: self.terminal,
                };
                layer.handle(delivery, next).await
            }
            None => (self.terminal)(delivery).await,
        }
    }
}
