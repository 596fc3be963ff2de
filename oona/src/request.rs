//! Request/reply over any topic: [`Requester`] and [`reply`].
//!
//! A requester owns an inbox topic (`system.oona_inbox.i<random>`) that it
//! reads through a group of its own. [`Requester::request`] publishes the
//! request with a fresh correlation id and the header [`REPLY_TO`] naming
//! the inbox, then waits (up to a timeout) for the envelope on the inbox
//! with the same correlation id. A responder's handler answers with
//! [`reply`]: the reply goes to the request's inbox with the request's
//! correlation id and the header [`CAUSATION_ID`] set to the request's
//! event id. A request unanswered within its timeout is
//! [`ErrorKind::Timeout`]; a late reply is acked and dropped, logged.
//! [`Requester::close`] deletes the inbox.
//!
//! In the wire form a request is an ordinary envelope with
//! `oona-reply-to` and `correlation_id` set, so a service in any language
//! can answer: publish to the `oona-reply-to` topic with the same
//! `correlation_id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use oona_core::{
    Codec, Envelope, Error, ErrorKind, Json, Name, Receipt, Result, StartPosition, Subscription,
    Topic,
};
use tokio::sync::oneshot;

use crate::bus::IntoTopic;
use crate::handler::Incoming;
use crate::Bus;

/// The header naming where a request's reply goes.
pub const REPLY_TO: &str = "oona-reply-to";

/// The header of a reply naming the event id of its request (every
/// message published by a handler carries it; see [`crate::context`]).
pub use crate::context::CAUSATION_ID;

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>>;

/// Sends requests and waits for their replies (see the module docs).
#[derive(Debug)]
pub struct Requester {
    bus: Bus,
    inbox: Topic,
    group: Name,
    waiting: Waiting,
    reader: tokio::task::JoinHandle<()>,
}

impl Requester {
    /// Make the inbox and start reading it.
    pub async fn new(bus: &Bus) -> Result<Requester> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let inbox = Topic::new(format!("system.oona_inbox.i{}", &id[..12]))?;
        bus.ensure_topic(inbox.clone()).await?;
        let group = Name::new("oona-inbox")?;
        let sub = Subscription::new(inbox.clone(), group.clone()).start(StartPosition::Latest);
        let mut stream = bus.subscribe_raw(sub).await?;
        let waiting: Waiting = Arc::default();
        let w = waiting.clone();
        let reader = tokio::spawn(async move {
            while let Some(d) = stream.next().await {
                let Ok(d) = d else { continue };
                let env = d.envelope().clone();
                let waiter = env
                    .correlation_id
                    .as_ref()
                    .and_then(|c| oona_core::sync::lock(&w).remove(c));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(env);
                    }
                    None => {
                        tracing::info!(correlation_id = ?env.correlation_id, "oona: a reply nobody waits for (late, or not ours); dropped")
                    }
                }
                if let Err(e) = d.ack().await {
                    tracing::debug!(error = %e, "oona: acking a reply failed");
                }
            }
        });
        Ok(Requester {
            bus: bus.clone(),
            inbox,
            group,
            waiting,
            reader,
        })
    }

    /// The inbox topic replies come to.
    pub fn inbox(&self) -> &Topic {
        &self.inbox
    }

    /// Send `value` (JSON) to `topic` and decode the reply as `R`.
    pub async fn request<Q, R>(
        &self,
        topic: impl IntoTopic,
        value: &Q,
        timeout: Duration,
    ) -> Result<R>
    where
        Json: Codec<Q> + Codec<R>,
    {
        let reply = self.request_envelope(topic, value, timeout).await?;
        Json.decode(&reply)
    }

    /// Send `value` (JSON) to `topic` and return the reply's envelope.
    pub async fn request_envelope<Q>(
        &self,
        topic: impl IntoTopic,
        value: &Q,
        timeout: Duration,
    ) -> Result<Envelope>
    where
        Json: Codec<Q>,
    {
        let correlation = uuid::Uuid::new_v4().to_string();
        let mut env = self
            .bus
            .message(topic, value)
            .correlation_id(correlation.clone())
            .build()?;
        env.headers
            .insert(REPLY_TO.into(), self.inbox.as_str().into());
        let to = env.topic.clone();
        let (tx, rx) = oneshot::channel();
        oona_core::sync::lock(&self.waiting).insert(correlation.clone(), tx);
        let forget = || oona_core::sync::lock(&self.waiting).remove(&correlation);
        if let Err(e) = self.bus.publish_envelope(env).await {
            forget();
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(Error::new(
                ErrorKind::Closed,
                "the requester's inbox closed",
            )),
            Err(_) => {
                forget();
                Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no reply from {to} within {timeout:?}"),
                ))
            }
        }
    }

    /// Stop reading and delete the inbox.
    pub async fn close(self) -> Result<()> {
        self.reader.abort();
        let _ = self
            .bus
            .transport()
            .delete_group(&self.inbox, &self.group)
            .await;
        self.bus.transport().delete_topic(&self.inbox).await
    }
}

/// Answer `request` with `value` (JSON): to its [`REPLY_TO`] topic, with
/// its correlation id and [`CAUSATION_ID`] its event id.
/// [`ErrorKind::ConfigInvalid`] when the message is no request.
pub async fn reply<T, R>(bus: &Bus, request: &Incoming<T>, value: &R) -> Result<Receipt>
where
    Json: Codec<R>,
{
    let req = request.envelope();
    let (Some(to), Some(correlation)) = (req.header(REPLY_TO), req.correlation_id.clone()) else {
        return Err(Error::new(
            ErrorKind::ConfigInvalid,
            format!(
                "event {} is no request: it has no {REPLY_TO} header or correlation id",
                req.event_id
            ),
        ));
    };
    let mut env = bus.message(to, value).correlation_id(correlation).build()?;
    env.headers
        .insert(CAUSATION_ID.into(), req.event_id.to_string());
    if let Some(tp) = req.header(oona_core::header::TRACEPARENT) {
        env.headers
            .entry(oona_core::header::TRACEPARENT.into())
            .or_insert_with(|| tp.to_string());
    }
    bus.publish_envelope(env).await
}
