#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod audit;
pub mod bus;
pub mod command;
pub mod context;
#[cfg(feature = "contracts")]
pub mod contract;
#[cfg(feature = "contracts")]
pub mod discovery;
pub mod handler;
pub mod health;
#[cfg(feature = "contracts")]
pub mod node;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod reducer;
pub mod registry;
pub mod request;
pub mod router;
pub mod runner;
#[cfg(feature = "http")]
pub mod serve;

// Everything of the core (envelope, topics, delivery, the Transport
// contract, codecs, wire forms, the memory transport) under `oona::`.
pub use oona_core::*;

/// The core crate itself, for paths like `oona::oona_core::wire`.
pub use oona_core;

/// The attribute for implementing Oona's async traits (layers, handlers,
/// transports) without adding the dependency yourself.
pub use async_trait::async_trait;

/// The platform's typed contracts (feature `contracts`): payload types bound
/// to their topics, and the protobuf, Avro and content-type codecs.
#[cfg(feature = "contracts")]
pub use oona_contracts;

pub use bus::{Bus, IntoSubscription, IntoTopic, MessageBuilder, TypedDelivery, TypedSubscription};
#[cfg(feature = "contracts")]
pub use contract::{contract_subscription, IntoContractSubscription};
pub use handler::{Handler, HandlerError, HandlerResult, Incoming};
pub use registry::{
    connect, connect_spooled, connect_with, drivers, env_url, find_driver, from_env, KnownScheme,
    DEFAULT_URL, ENV_URL, KNOWN_SCHEMES,
};
pub use router::Router;
pub use runner::{RunHandle, RunSummary, Runner, Shutdown, StopReason};
