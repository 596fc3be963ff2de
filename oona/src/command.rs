//! Commands on `control.*`: handled once per event id, answered by an
//! acknowledgement event.
//!
//! [`Router::command`] (and [`Router::contract_command`]) add a route whose
//! handler runs once per command event id, however often the command is
//! delivered or published again ([`DedupLayer`], kept for [`DEDUP_KEEP`]
//! where the transport keeps ids for the group, Redis, else in the
//! process), and whose outcome is published as a [`CommandAck`] on the
//! command topic's acknowledgement topic ([`ack_topic`]:
//! `control.<subsystem>.acks`):
//!
//! | handler | ack `status` | the command |
//! |---|---|---|
//! | `Ok(())` | `applied` | acked |
//! | a permanent error | `rejected`, the reason in `detail` | dead-lettered with the reason |
//! | a temporary error, attempts left | none yet | redelivered |
//! | a temporary error on the last attempt | `failed`, the reason in `detail` | dead-lettered |
//!
//! A copy of a command already applied is acked without the handler and
//! without a second acknowledgement. The acknowledgement carries the
//! command's correlation id (or its event id) and, as `oona-causation-id`,
//! its event id ([`crate::context`]), so a commander waits for it by
//! either. It is published before the command is settled: if that publish
//! fails the command is retried, and the handler runs again.
//!
//! The acknowledgement's JSON (schema id [`ACK_SCHEMA`]), for readers in
//! any language:
//!
//! ```json
//! {"command_event_id": "7c1e…", "command_topic": "control.kasmina.commands",
//!  "status": "applied", "detail": "", "handled_by": "kasmina-1",
//!  "attempt": 1, "at_unix_ms": 1796170000000}
//! ```

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use oona_core::dedup::DedupLayer;
use oona_core::{Codec, Error, ErrorKind, Json, Result, Timestamp, Topic};
use serde::{Deserialize, Serialize};

use crate::bus::IntoTopic;
use crate::handler::{HandlerError, HandlerResult, Incoming};
use crate::router::{RouteHandler, Router};
use crate::Bus;

/// How long a command's event id is remembered as handled.
pub const DEDUP_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// The schema id of [`CommandAck`].
pub const ACK_SCHEMA: &str = "oona.v1.CommandAck/1";

/// What became of a command (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CommandAck {
    /// The event id of the command.
    pub command_event_id: String,
    /// The topic it came on.
    pub command_topic: String,
    /// `applied`, `rejected` or `failed`.
    pub status: String,
    /// Why, when not applied.
    pub detail: String,
    /// The sender id of the service that handled it.
    pub handled_by: String,
    /// The delivery attempt that settled it.
    pub attempt: u32,
    /// When, Unix epoch milliseconds.
    pub at_unix_ms: u64,
}

/// Where the acknowledgements of `command_topic`'s commands go:
/// `control.<subsystem>.acks`. Only `control.*` topics carry commands.
pub fn ack_topic(command_topic: &Topic) -> Result<Topic> {
    if command_topic.plane() != "control" {
        return Err(Error::new(
            ErrorKind::InvalidTopic,
            format!("{command_topic}: commands travel on control.* topics"),
        ));
    }
    let subsystem = command_topic.segments().nth(1).unwrap_or_default();
    Topic::new(format!("control.{subsystem}.acks"))
}

/// A route handler run as a command: acknowledged by an event.
pub struct Commanded<H, M> {
    handler: H,
    bus: Bus,
    _m: PhantomData<fn() -> M>,
}

/// [`RouteHandler`]'s shape for a command handler of shape `M`.
#[derive(Debug)]
pub struct AsCommand<M>(PhantomData<fn() -> M>);

impl<S, T, H, M> RouteHandler<S, T, AsCommand<M>> for Commanded<H, M>
where
    S: Send + Sync + 'static,
    T: Send + 'static,
    H: RouteHandler<S, T, M>,
    M: 'static,
{
    type Future = BoxFuture<'static, HandlerResult>;

    fn call(&self, state: &Arc<S>, msg: Incoming<T>) -> Self::Future {
        let ack = Pending::of(&msg, self.bus.sender_id());
        let bus = self.bus.clone();
        let run = self.handler.call(state, msg);
        Box::pin(async move {
            let result = run.await;
            let (status, detail) = match &result {
                Ok(()) => ("applied", String::new()),
                Err(e) if e.is_permanent() => ("rejected", e.message().to_string()),
                Err(e) if ack.last_attempt => ("failed", e.message().to_string()),
                // Redelivered: the ack waits for the last word.
                Err(_) => return result,
            };
            ack.publish(&bus, status, detail).await?;
            result
        })
    }
}

/// The acknowledgement of the command being handled, waiting for its status.
struct Pending {
    topic: Result<Topic>,
    ack: CommandAck,
    last_attempt: bool,
}

impl Pending {
    fn of<T>(msg: &Incoming<T>, handled_by: &str) -> Pending {
        let env = msg.envelope();
        Pending {
            topic: ack_topic(&env.topic),
            ack: CommandAck {
                command_event_id: env.event_id.to_string(),
                command_topic: env.topic.to_string(),
                status: String::new(),
                detail: String::new(),
                handled_by: handled_by.to_string(),
                attempt: msg.attempt(),
                at_unix_ms: 0,
            },
            last_attempt: msg.is_last_attempt(),
        }
    }

    async fn publish(mut self, bus: &Bus, status: &str, detail: String) -> HandlerResult {
        self.ack.status = status.to_string();
        self.ack.detail = detail;
        self.ack.at_unix_ms = Timestamp::now().unix_millis();
        let topic = self.topic.map_err(HandlerError::from)?;
        bus.message(topic, &self.ack)
            .key(self.ack.command_event_id.clone())
            .schema_id(ACK_SCHEMA)
            .send()
            .await
            .map_err(|e| HandlerError::temporary(format!("publishing the command's ack: {e}")))?;
        Ok(())
    }
}

impl<S: Send + Sync + 'static> Router<S> {
    /// Handle `topic`'s commands (JSON into `T`) once per event id and
    /// acknowledge each (see [`crate::command`]). A topic outside
    /// `control.*` fails at [`Router::start`].
    pub fn command<T, H, M>(self, topic: impl IntoTopic, handler: H) -> Self
    where
        T: Send + 'static,
        Json: Codec<T>,
        H: RouteHandler<S, T, M>,
        M: 'static,
    {
        let topic = topic.into_topic().and_then(|t| ack_topic(&t).map(|_| t));
        let (dedup, wrapped) = self.commanded(handler);
        self.route_topic(topic, move |r| r.layer(dedup), wrapped)
    }

    /// [`Router::command`] for a contract type's topic (decoded by content
    /// type), such as `KasminaControlCommand` on `control.kasmina.commands`.
    #[cfg(feature = "contracts")]
    pub fn contract_command<T, H, M>(self, handler: H) -> Self
    where
        T: oona_contracts::Message,
        H: RouteHandler<S, T, M>,
        M: 'static,
    {
        let topic = ack_topic(&T::topic()).map(|_| T::topic());
        let (dedup, wrapped) = self.commanded(handler);
        let options = move |r: crate::runner::Runner<T, Json>| {
            r.codec(oona_contracts::AnyCodec::default()).layer(dedup)
        };
        self.route_topic(topic, options, wrapped)
    }

    fn commanded<H, M>(&self, handler: H) -> (DedupLayer, Commanded<H, M>) {
        let bus = self.bus().clone();
        let dedup = DedupLayer::for_transport(DEDUP_KEEP, bus.transport().as_ref());
        let wrapped = Commanded {
            handler,
            bus,
            _m: PhantomData,
        };
        (dedup, wrapped)
    }
}
