//! The conformance suite against the in-memory reference transport:
//! `cargo test -p oona-conformance` (filter by case name as usual, e.g.
//! `cargo test -p oona-conformance -- nack`).

use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use oona_conformance::Fixture;
use oona_core::memory::MemoryTransport;
use oona_core::{Error, ErrorKind, Retention, Topic, Transport};

/// One private broker; every `connect` is a new handle on it.
struct MemoryFixture {
    broker: MemoryTransport,
}

#[async_trait]
impl Fixture for MemoryFixture {
    fn name(&self) -> String {
        "memory".into()
    }

    async fn connect(&self) -> oona_core::Result<Arc<dyn Transport>> {
        Ok(Arc::new(self.broker.connect_same()))
    }

    fn multi_process(&self) -> bool {
        false // the broker lives in this process
    }

    async fn write_raw(&self, topic: &Topic, raw: &[u8]) -> oona_core::Result<()> {
        self.broker.inject_raw(topic, Bytes::copy_from_slice(raw))
    }

    async fn cut_connections(&self) -> oona_core::Result<()> {
        self.broker.set_offline(true);
        Ok(())
    }

    async fn restore_connections(&self) -> oona_core::Result<()> {
        self.broker.set_offline(false);
        Ok(())
    }

    async fn applied_retention(&self, topic: &Topic) -> oona_core::Result<Retention> {
        self.broker
            .applied_retention(topic)
            .ok_or_else(|| Error::new(ErrorKind::Broker, format!("topic {topic} does not exist")))
    }
}

fn main() -> ExitCode {
    oona_conformance::run(MemoryFixture {
        broker: MemoryTransport::new(),
    })
}
