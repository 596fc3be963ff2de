//! What a handler's publishes inherit from the message it handles.
//!
//! While a runner calls a handler, the message being handled is the
//! task's [`Cause`]. Every message the handler builds with
//! [`Bus::message`](crate::Bus::message) (and so `publish`,
//! `publish_contract`, [`reply`](crate::request::reply)) inherits, unless
//! the builder sets its own:
//!
//! | field | value |
//! |---|---|
//! | `correlation_id` | the cause's correlation id, or its event id when it has none: a whole conversation shares the id of the message that began it |
//! | header [`CAUSATION_ID`] (`oona-causation-id`) | the cause's event id: which message this one answers |
//! | `traceparent` and `trace_id` | the current span's when a tracing layer traces the delivery (`oona::otel`, feature `otel`), else the cause's: the trace goes on across services |
//!
//! A ready envelope given to `publish_envelope` is published as it is.
//! A task the handler spawns does not inherit the cause (tokio task-locals
//! stay on their task): carry it with [`Cause::scope`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> oona::Result<()> {
//! use oona::context::Cause;
//! let request = oona::Envelope::builder(oona::Topic::new("control.demo.ping")?, "{}").build();
//! let cause = Cause::of(&request);
//! let inherited = cause.scope(async { Cause::current() }).await;
//! assert_eq!(inherited.map(|c| c.event_id().to_string()), Some(request.event_id.to_string()));
//! assert!(Cause::current().is_none(), "outside the scope there is none");
//! # Ok(()) }
//! ```

use std::future::Future;

use oona_core::{header, Envelope};

/// The header naming the event id of the message that caused this one.
pub const CAUSATION_ID: &str = "oona-causation-id";

tokio::task_local! {
    static CAUSE: Cause;
}

/// The message a handler is handling: what its publishes inherit (see the
/// [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    event_id: String,
    correlation_id: Option<String>,
    trace_id: Option<String>,
    traceparent: Option<String>,
}

impl Cause {
    /// The cause a handler of `envelope` runs under.
    pub fn of(envelope: &Envelope) -> Cause {
        Cause {
            event_id: envelope.event_id.to_string(),
            correlation_id: envelope.correlation_id.clone(),
            trace_id: envelope.trace_id.clone(),
            traceparent: envelope.header(header::TRACEPARENT).map(str::to_string),
        }
    }

    /// The cause of the handler running on this task, if any.
    pub fn current() -> Option<Cause> {
        CAUSE.try_with(Clone::clone).ok()
    }

    /// Run `f` with this cause (for work a handler spawns on other tasks).
    pub async fn scope<F: Future>(self, f: F) -> F::Output {
        CAUSE.scope(self, f).await
    }

    /// The event id of the message being handled.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// The correlation id its publishes inherit.
    pub fn correlation_id(&self) -> &str {
        self.correlation_id.as_deref().unwrap_or(&self.event_id)
    }

    /// The `traceparent` its publishes continue when no tracing layer runs.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// The trace id its publishes keep when there is no `traceparent`.
    pub fn trace_id(&self) -> Option<&str> {
        self.trace_id.as_deref()
    }

    /// The trace context a publish under this cause continues: the
    /// tracing layer's current span if one traces the delivery, else the
    /// cause's own.
    pub(crate) fn continued_traceparent(&self) -> Option<String> {
        #[cfg(feature = "otel")]
        if let Some(tp) = oona_core::otel::current_traceparent() {
            return Some(tp);
        }
        self.traceparent.clone()
    }
}
