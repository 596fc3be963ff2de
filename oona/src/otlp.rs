//! OTLP export of Oona's spans (feature `otlp`).
//!
//! [`tracer_provider`] builds an OpenTelemetry tracer provider that sends
//! spans in batches over OTLP/HTTP (protobuf) to the collector the standard
//! variables name: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
//! `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`, else
//! `http://localhost:4318/v1/traces`; `OTEL_EXPORTER_OTLP_HEADERS` and
//! `OTEL_EXPORTER_OTLP_TIMEOUT` apply too. [`traced`] puts a
//! [`crate::otel::TraceLayer`] of that provider on both paths of a bus.
//!
//! ```no_run
//! # async fn demo() -> oona::Result<()> {
//! let provider = oona::otlp::tracer_provider("tezzeret")?;
//! let bus = oona::otlp::traced(oona::Bus::new(oona::from_env().await?), &provider);
//! // ... publish and run handlers: send/receive/process/settle spans ...
//! bus.close().await?;
//! oona::otlp::shutdown(&provider)?; // flush what is still batched
//! # Ok(()) }
//! ```

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

use crate::otel::TraceLayer;
use crate::{Bus, Error, ErrorKind, Result};

/// A tracer provider exporting over OTLP/HTTP in batches, its resource
/// naming the service (`service.name`).
pub fn tracer_provider(service_name: impl Into<String>) -> Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|e| Error::new(ErrorKind::ConfigInvalid, format!("the OTLP exporter: {e}")))?;
    let resource = Resource::builder()
        .with_service_name(service_name.into())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// `bus` with a tracing layer of `provider` on its publish and consume
/// paths (add it before a signing layer: signatures then cover the
/// `traceparent` it writes).
pub fn traced(bus: Bus, provider: &SdkTracerProvider) -> Bus {
    let system = bus.transport().name();
    let layer = TraceLayer::new(provider.tracer("oona"), system);
    bus.with_publish_layer(layer.clone())
        .with_consume_layer(layer)
}

/// Export what is still batched and stop the provider.
pub fn shutdown(provider: &SdkTracerProvider) -> Result<()> {
    provider
        .shutdown()
        .map_err(|e| Error::new(ErrorKind::Connection, format!("flushing OTLP spans: {e}")))
}
