#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod admin;
pub mod config;
mod conn;
mod consumer;
mod mapping;
mod marks;
mod schema;
mod tls;
mod transport;

use std::sync::Arc;

use futures::FutureExt;
use oona_core::{ConnectUrl, Driver, Result, Transport};

pub use admin::NamespacePolicies;
pub use config::{Offload, PulsarConfig};
pub use transport::{PulsarTransport, MAX_PAYLOAD_BYTES};

/// The transport's name.
pub const NAME: &str = "pulsar";

/// The driver the `oona` facade registers for `pulsar://` and
/// `pulsar+ssl://`.
pub const DRIVER: Driver = Driver {
    name: NAME,
    schemes: &["pulsar", "pulsar+ssl"],
    connect: connect_driver,
};

fn connect_driver(
    url: ConnectUrl,
) -> futures::future::BoxFuture<'static, Result<Arc<dyn Transport>>> {
    async move {
        let config = PulsarConfig::from_url(url)?;
        let t = PulsarTransport::connect(config).await?;
        Ok(Arc::new(t) as Arc<dyn Transport>)
    }
    .boxed()
}
