//! The Oona conformance suite against Pulsar (pulsar-lite in CI), through
//! the test-only frame-fixing proxy (`support/frame_fix.rs`).
//!
//! Cases left out, each only for a named pulsar-lite deviation (see the
//! crate README): `retention_applied` (pulsar-lite has no admin REST API;
//! it runs when `OONA_TEST_PULSAR_ADMIN_URL` names one).

mod support;

use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use oona_conformance::Fixture;
use oona_core::{Error, ErrorKind, Retention, Topic, Transport};
use oona_pulsar::PulsarTransport;

struct PulsarFixture {
    broker: support::Broker,
}

#[async_trait]
impl Fixture for PulsarFixture {
    fn name(&self) -> String {
        "pulsar".into()
    }

    async fn connect(&self) -> oona_core::Result<Arc<dyn Transport>> {
        Ok(Arc::new(
            PulsarTransport::connect_url(&self.broker.url()).await?,
        ))
    }

    async fn write_raw(&self, topic: &Topic, raw: &[u8]) -> oona_core::Result<()> {
        let (tenant, ns) = self.broker.tenant_namespace();
        let client = self.broker.raw_client().await;
        let mut p = client
            .producer()
            .with_topic(format!("persistent://{tenant}/{ns}/{topic}"))
            .build()
            .await
            .map_err(|e| Error::new(ErrorKind::Broker, e.to_string()))?;
        p.send_non_blocking(raw.to_vec())
            .await
            .map_err(|e| Error::new(ErrorKind::Broker, e.to_string()))?
            .await
            .map_err(|e| Error::new(ErrorKind::Broker, e.to_string()))?;
        Ok(())
    }

    async fn cut_connections(&self) -> oona_core::Result<()> {
        self.broker
            .cut
            .cut()
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))
    }

    async fn restore_connections(&self) -> oona_core::Result<()> {
        self.broker
            .cut
            .restore()
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))
    }

    async fn applied_retention(&self, topic: &Topic) -> oona_core::Result<Retention> {
        if self.broker.admin_url.is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "pulsar-lite has no admin REST API (set OONA_TEST_PULSAR_ADMIN_URL for a broker that has one)",
            ));
        }
        let t = PulsarTransport::connect_url(&self.broker.url()).await?;
        let r = t.applied_retention(topic).await;
        let _ = t.close().await;
        r?.ok_or_else(|| Error::new(ErrorKind::Broker, format!("no retention set on {topic}")))
    }
}

fn main() -> ExitCode {
    oona_conformance::run_with_env(support::ENV, |url| PulsarFixture {
        broker: support::Broker::start(&url).expect("start the test proxies"),
    })
}
