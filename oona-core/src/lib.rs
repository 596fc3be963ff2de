#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod admin;
#[cfg(feature = "claim-check")]
pub mod claim;
pub mod codec;
pub mod config;
pub mod dedup;
pub mod degrade;
pub mod delivery;
pub mod engine;
pub mod envelope;
pub mod error;
pub mod flow;
pub mod layer;
pub mod memory;
pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
pub mod priority;
pub mod rules;
pub mod security;
pub mod subscription;
pub mod sync;
pub mod topic;
pub mod transport;
pub mod wire;

pub use admin::{GroupInfo, Member, TopicInfo};
pub use codec::{Codec, Json, Raw};
pub use config::{ConnectUrl, Driver};
pub use delivery::{Delivery, DeliveryInfo, DeliveryStream, Outcome, Settle, Settlement};
pub use envelope::{
    header, ContentType, Envelope, EnvelopeBuilder, EventId, Headers, Priority, Timestamp,
};
pub use error::{Error, ErrorKind, Result};
pub use subscription::{StartPosition, Subscription};
pub use topic::{Name, PolicySet, Retention, Tenant, Topic, TopicPattern, TopicPolicy};
pub use transport::{Capabilities, Depth, Health, HealthStatus, Receipt, SchemaSpec, Transport};
