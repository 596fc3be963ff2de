//! Wire forms of the envelope that every transport shares.
//!
//! - [`json`]: the canonical JSON document, `{"envelope": {...}, "payload": ...}`,
//!   used where a whole message travels as one blob (dumps, the CLI, brokers
//!   without headers) and for interchange with the Python platform.
//! - [`fields`]: the envelope as flat string fields beside raw payload bytes,
//!   used by transports with per-message metadata (Redis stream entry fields,
//!   Pulsar properties). Kafka maps the same fields to CloudEvents headers.
//!
//! Both are specified in `docs/wire-format.md` of the repository.

pub mod fields;
pub mod json;
