//! OpenTelemetry spans per the messaging semantic conventions (feature
//! `otel`), with W3C trace context carried through every broker.
//!
//! [`TraceLayer`] is a publish layer and a consume layer at once, over any
//! OpenTelemetry [`Tracer`] (the application's provider decides where
//! spans go: OTLP, stdout, an in-memory exporter in tests):
//!
//! - **publish**: a `send <topic>` span (kind `PRODUCER`) per message. Its
//!   context travels in the envelope's `traceparent` header (W3C; the
//!   trace id in `trace_id` too), so a consumer anywhere, in any
//!   language, continues the trace. Its parent is the message's own
//!   `traceparent` if the publisher set one, else the delivery being
//!   handled (see below), else none (a new trace).
//! - **receive**: a `receive <topic>` span (kind `CONSUMER`) from when the
//!   transport handed the delivery over to when its handling starts (the
//!   time it waited in prefetch), a child of the message's `send` span.
//! - **settle**: an `ack <topic>`, `nack <topic>` or `reject <topic>` span
//!   (kind `CLIENT`, `messaging.operation.type` `settle`) over the
//!   settlement's round trip, a child of the `process` span.
//! - **consume**: a `process <topic>` span (kind `CONSUMER`) around the
//!   handler and its settlement, child of the message's `send` span (the
//!   conventions allow the creation context as parent for single-message
//!   processing; we take it so publish → consume → handler → publish is
//!   one tree). While the handler runs, its context is the task's current
//!   one ([`current_traceparent`]): whatever the handler publishes is a
//!   child of its `process` span, without code. The settlement is recorded
//!   on the span: `oona.outcome` (`ack`, `nack`, `reject`),
//!   `oona.dead_lettered`, and an error status when the handler failed or
//!   the broker refused the settlement.
//!
//! Attributes: `messaging.system` (`redis`, `kafka`, `pulsar`, `memory`),
//! `messaging.destination.name`, `messaging.operation.type` (`send`,
//! `receive`, `process`, `settle`), `messaging.operation.name`, `messaging.message.id` (the
//! event id), `messaging.message.conversation_id` (the correlation id),
//! `messaging.consumer.group.name` and `oona.delivery.attempt` (the
//! conventions have no generic attempt attribute).
//!
//! Add the layer before a signing layer (so signatures cover the
//! `traceparent` it writes) and on both paths of a bus.

use std::borrow::Cow;

use async_trait::async_trait;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer,
};
use opentelemetry::{Context, KeyValue};

use crate::delivery::{Delivery, Outcome};
use crate::envelope::{header, Envelope};
use crate::error::Result;
use crate::layer::{ConsumeLayer, ConsumeNext, Handled, PublishLayer, PublishNext};
use crate::transport::Receipt;

tokio::task_local! {
    static CURRENT: String;
}

/// The `traceparent` of the delivery whose handler runs on this task, if
/// a [`TraceLayer`] is tracing one.
pub fn current_traceparent() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The span context a W3C `traceparent` names (version `00`); `None` when
/// it is malformed or all zero.
pub fn parse_traceparent(tp: &str) -> Option<SpanContext> {
    let mut parts = tp.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if version != "00" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// The W3C `traceparent` of `sc`.
pub fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// The context a `traceparent` continues, or an empty one.
fn remote(tp: Option<&str>) -> Context {
    match tp.and_then(parse_traceparent) {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    }
}

/// The tracing layer (see the module docs).
#[derive(Debug, Clone)]
pub struct TraceLayer<T> {
    tracer: T,
    system: Cow<'static, str>,
}

impl<T> TraceLayer<T>
where
    T: Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    /// Spans from `tracer`, for a bus on the transport named `system`
    /// (`Transport::name`: `redis`, `kafka`, `pulsar`, `memory`).
    pub fn new(tracer: T, system: impl Into<Cow<'static, str>>) -> Self {
        TraceLayer {
            tracer,
            system: system.into(),
        }
    }

    fn common(&self, e: &Envelope, operation: &'static str) -> Vec<KeyValue> {
        let mut attrs = vec![
            KeyValue::new("messaging.system", self.system.clone()),
            KeyValue::new("messaging.destination.name", e.topic.to_string()),
            KeyValue::new("messaging.operation.type", operation),
            KeyValue::new("messaging.operation.name", operation),
            KeyValue::new("messaging.message.id", e.event_id.to_string()),
        ];
        if let Some(c) = &e.correlation_id {
            attrs.push(KeyValue::new(
                "messaging.message.conversation_id",
                c.clone(),
            ));
        }
        attrs
    }

    /// The `receive` span of `d`: from when the transport handed it over
    /// to now (its handling starts), a child of the message's `send`.
    fn receive_span(&self, d: &Delivery, parent: &Context) {
        use opentelemetry::trace::Span as _;
        let e = d.envelope();
        let mut attrs = self.common(e, "receive");
        attrs.push(KeyValue::new(
            "messaging.consumer.group.name",
            d.info().group.to_string(),
        ));
        let mut span = self
            .tracer
            .span_builder(format!("receive {}", e.topic))
            .with_kind(SpanKind::Consumer)
            .with_start_time(d.received_at())
            .with_attributes(attrs)
            .start_with_context(&self.tracer, parent);
        span.end();
    }

    /// The `settle` span (kind `CLIENT`) of what became of a delivery, a
    /// child of its `process` span, over the settlement's own time.
    fn settle_span(&self, topic: &crate::Topic, h: &Handled, process: &Context) {
        use opentelemetry::trace::Span as _;
        let name = outcome_name(&h.outcome);
        let attrs = vec![
            KeyValue::new("messaging.system", self.system.clone()),
            KeyValue::new("messaging.destination.name", topic.to_string()),
            KeyValue::new("messaging.operation.type", "settle"),
            KeyValue::new("messaging.operation.name", name),
        ];
        let mut span = self
            .tracer
            .span_builder(format!("{name} {topic}"))
            .with_kind(SpanKind::Client)
            .with_start_time(h.settle_time.0)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, process);
        if let Err(e) = &h.settled {
            span.set_attribute(KeyValue::new("error.type", e.kind().as_str()));
            span.set_status(Status::error(e.to_string()));
        }
        span.end_with_timestamp(h.settle_time.1);
    }

    /// Start the `send` span of `e` and write its context into `e`.
    fn send_span(&self, e: &mut Envelope) -> T::Span {
        let own = e.headers.get(header::TRACEPARENT).cloned();
        let parent = remote(own.or_else(current_traceparent).as_deref());
        let span = self
            .tracer
            .span_builder(format!("send {}", e.topic))
            .with_kind(SpanKind::Producer)
            .with_attributes(self.common(e, "send"))
            .start_with_context(&self.tracer, &parent);
        let sc = opentelemetry::trace::Span::span_context(&span).clone();
        if sc.is_valid() {
            e.headers
                .insert(header::TRACEPARENT.into(), format_traceparent(&sc));
            e.trace_id = Some(sc.trace_id().to_string());
        }
        span
    }
}

#[async_trait]
impl<T> PublishLayer for TraceLayer<T>
where
    T: Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    async fn publish(
        &self,
        mut envelopes: Vec<Envelope>,
        next: PublishNext<'_>,
    ) -> Result<Vec<Receipt>> {
        use opentelemetry::trace::Span as _;
        let mut spans: Vec<T::Span> = envelopes.iter_mut().map(|e| self.send_span(e)).collect();
        let result = next.run(envelopes).await;
        for span in &mut spans {
            if let Err(e) = &result {
                span.set_attribute(KeyValue::new("error.type", e.kind().as_str()));
                span.set_status(Status::error(e.to_string()));
            }
            span.end();
        }
        result
    }
}

#[async_trait]
impl<T> ConsumeLayer for TraceLayer<T>
where
    T: Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    async fn handle(&self, delivery: Delivery, next: ConsumeNext<'_>) -> Handled {
        let e = delivery.envelope();
        let parent = remote(e.headers.get(header::TRACEPARENT).map(String::as_str));
        let mut attrs = self.common(e, "process");
        attrs.push(KeyValue::new(
            "messaging.consumer.group.name",
            delivery.info().group.to_string(),
        ));
        attrs.push(KeyValue::new(
            "oona.delivery.attempt",
            i64::from(delivery.attempt()),
        ));
        let span = self
            .tracer
            .span_builder(format!("process {}", e.topic))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        self.receive_span(&delivery, &parent);
        let cx = parent.with_span(span);
        let current = format_traceparent(cx.span().span_context());
        let topic = delivery.envelope().topic.clone();
        let handled = CURRENT.scope(current, next.run(delivery)).await;
        self.settle_span(&topic, &handled, &cx);
        let span = cx.span();
        span.set_attribute(KeyValue::new(
            "oona.outcome",
            outcome_name(&handled.outcome),
        ));
        span.set_attribute(KeyValue::new("oona.dead_lettered", handled.dead_lettered));
        match (&handled.outcome, &handled.settled) {
            (_, Err(e)) => span.set_status(Status::error(format!("settlement refused: {e}"))),
            (Outcome::Nack { reason, .. }, _) => {
                span.set_status(Status::error(reason.clone().unwrap_or_default()))
            }
            (Outcome::Reject { reason }, _) => span.set_status(Status::error(reason.clone())),
            (Outcome::Ack, Ok(())) => {}
        }
        span.end();
        handled
    }
}

/// The settlement's name: the `settle` span's and `oona.outcome`.
fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Ack => "ack",
        Outcome::Nack { .. } => "nack",
        Outcome::Reject { .. } => "reject",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_format_back() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp).unwrap();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(format_traceparent(&sc), tp);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
        assert_eq!(current_traceparent(), None, "no delivery is handled here");
    }
}
