//! The one error type of the framework.
//!
//! Every fallible operation in Oona returns [`Error`]: a [`ErrorKind`] that
//! says what went wrong, whether retrying can help ([`Error::is_temporary`]),
//! which transport raised it, a human message and the underlying source.
//! Retry layers decide by `is_temporary()`, never by parsing messages.

use std::fmt;

/// Result alias used throughout Oona.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong. New kinds may be added in minor releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A configuration value is invalid (the message names the key).
    ConfigInvalid,
    /// The URL scheme is not known to any driver.
    UnknownScheme,
    /// The URL scheme is known but its Cargo feature is not enabled.
    FeatureDisabled,
    /// A topic name does not follow the grammar.
    InvalidTopic,
    /// A consumer group or consumer name is invalid.
    InvalidName,
    /// The payload exceeds the size limit of the topic or transport.
    PayloadTooLarge,
    /// Bytes could not be decoded into an envelope or payload.
    Decode,
    /// A value could not be encoded.
    Encode,
    /// The broker could not be reached or the connection broke.
    Connection,
    /// An operation did not complete in time.
    Timeout,
    /// The transport (or the stream) was closed.
    Closed,
    /// Credentials were refused.
    Unauthenticated,
    /// The credentials were accepted but do not allow this operation (on
    /// this topic, say: the message names it).
    Unauthorized,
    /// The transport cannot do what was asked.
    Unsupported,
    /// A bounded resource (a topic's capacity, a buffer) is full.
    ResourceExhausted,
    /// The local spool holds its limit of bytes and the broker has not
    /// taken them back (see [`crate::degrade`]).
    SpoolFull,
    /// A publish was dropped by its topic's drop policy, in favour of newer
    /// messages (see [`crate::flow`]); only where a user turned one on.
    Dropped,
    /// What was asked about does not exist (a consumer group that never
    /// subscribed to the topic, say).
    NotFound,
    /// The delivery was already settled, or is no longer known to the broker.
    AlreadySettled,
    /// The delivery's lease ran out before it was settled: the message was
    /// already given back for redelivery and the settlement changed nothing
    /// (see [`crate::engine`], late settlement).
    LeaseExpired,
    /// The broker's schema registry refused a schema as incompatible with
    /// the one its topic has (the message names the fields); permanent.
    IncompatibleSchema,
    /// The broker answered with an error.
    Broker,
    /// A message handler failed (see [`Error::is_temporary`] for the outcome).
    Handler,
    /// A bug or broken invariant inside Oona.
    Internal,
}

impl ErrorKind {
    /// Whether errors of this kind are usually worth retrying.
    pub const fn default_temporary(self) -> bool {
        matches!(
            self,
            ErrorKind::Connection
                | ErrorKind::Timeout
                | ErrorKind::ResourceExhausted
                | ErrorKind::SpoolFull
        )
    }

    /// A stable snake_case name, used in logs, metrics and dead-letter reasons.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConfigInvalid => "config_invalid",
            ErrorKind::UnknownScheme => "unknown_scheme",
            ErrorKind::FeatureDisabled => "feature_disabled",
            ErrorKind::InvalidTopic => "invalid_topic",
            ErrorKind::InvalidName => "invalid_name",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Decode => "decode",
            ErrorKind::Encode => "encode",
            ErrorKind::Connection => "connection",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "closed",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::SpoolFull => "spool_full",
            ErrorKind::Dropped => "dropped",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadySettled => "already_settled",
            ErrorKind::LeaseExpired => "lease_expired",
            ErrorKind::IncompatibleSchema => "incompatible_schema",
            ErrorKind::Broker => "broker",
            ErrorKind::Handler => "handler",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error type of Oona. Cheap to move (one box).
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    temporary: bool,
    transport: Option<&'static str>,
    message: String,
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind`; temporary-ness defaults from the kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                temporary: kind.default_temporary(),
                transport: None,
                message: message.into(),
                source: None,
            }),
        }
    }

    /// A handler failure that should be retried (the delivery is nacked).
    pub fn temporary(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Handler, message).set_temporary(true)
    }

    /// A handler failure that retrying cannot fix (the delivery is rejected
    /// and dead-lettered at once).
    pub fn permanent(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Handler, message).set_temporary(false)
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Name the transport that raised the error.
    pub fn with_transport(mut self, transport: &'static str) -> Self {
        self.inner.transport = Some(transport);
        self
    }

    /// Override whether retrying may help.
    pub fn set_temporary(mut self, temporary: bool) -> Self {
        self.inner.temporary = temporary;
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_temporary(&self) -> bool {
        self.inner.temporary
    }

    /// The transport that raised the error, if any.
    pub fn transport(&self) -> Option<&'static str> {
        self.inner.transport
    }

    /// The human-readable message (without kind or transport).
    pub fn message(&self) -> &str {
        &self.inner.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(t) = self.inner.transport {
            write!(f, "{t}: ")?;
        }
        write!(f, "{}: {}", self.inner.kind, self.inner.message)?;
        if let Some(src) = &self.inner.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("temporary", &self.inner.temporary)
            .field("transport", &self.inner.transport)
            .field("message", &self.inner.message)
            .field("source", &self.inner.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::new(ErrorKind::Decode, "invalid JSON").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_sets_default_temporariness_and_display_names_everything() {
        let e = Error::new(ErrorKind::Connection, "refused").with_transport("redis");
        assert!(e.is_temporary());
        assert_eq!(e.to_string(), "redis: connection: refused");
        let e = Error::new(ErrorKind::InvalidTopic, "bad").set_temporary(true);
        assert!(e.is_temporary());
        assert!(!Error::permanent("x").is_temporary());
        assert_eq!(Error::temporary("x").kind(), ErrorKind::Handler);
    }
}
