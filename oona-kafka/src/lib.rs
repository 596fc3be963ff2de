#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod admin;
mod consumer;
mod depth;
pub mod headers;
mod incremental;
mod marks;
mod options;
mod transport;

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use oona_core::{ConnectUrl, Driver, Result, Transport};

pub use consumer::retry_topic;
pub use options::{GroupProtocol, KafkaOptions};
pub use transport::KafkaTransport;

/// The `kafka://` driver, registered by the `oona` facade.
pub const DRIVER: Driver = Driver {
    name: "kafka",
    schemes: &["kafka"],
    connect: connect_url,
};

fn connect_url(url: ConnectUrl) -> BoxFuture<'static, Result<Arc<dyn Transport>>> {
    async move {
        let opts = KafkaOptions::from_url(url)?;
        let t = KafkaTransport::connect(opts).await?;
        Ok(Arc::new(t) as Arc<dyn Transport>)
    }
    .boxed()
}

/// Connect to `url` (`kafka://host:port?...`).
pub async fn connect(url: &str) -> Result<KafkaTransport> {
    let opts = KafkaOptions::from_url(ConnectUrl::parse(url)?)?;
    KafkaTransport::connect(opts).await
}
