//! Message handlers and their errors.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use oona_core::{DeliveryInfo, Envelope, ErrorKind};

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// A message handed to a handler: the decoded value and its envelope.
///
/// The runner settles the delivery from the handler's result; the handler
/// never acks by itself.
#[derive(Debug, Clone)]
pub struct Incoming<T> {
    value: T,
    envelope: Envelope,
    info: DeliveryInfo,
}

impl<T> Incoming<T> {
    pub(crate) fn new(value: T, envelope: Envelope, info: DeliveryInfo) -> Self {
        Incoming {
            value,
            envelope,
            info,
        }
    }
    /// The decoded payload.
    pub fn value(&self) -> &T {
        &self.value
    }
    /// The envelope (event id, sender, timestamp, trace, key, headers, raw
    /// payload).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }
    /// 1 on first delivery, +1 on every redelivery.
    pub fn attempt(&self) -> u32 {
        self.info.attempt
    }
    /// Whether a temporary failure now dead-letters instead of retrying.
    pub fn is_last_attempt(&self) -> bool {
        self.info.attempt >= self.info.max_attempts
    }
    /// Facts about the delivery (group, max attempts, position...).
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }
    /// The payload, dropping the metadata.
    pub fn into_value(self) -> T {
        self.value
    }
    /// The payload and its envelope.
    pub fn into_parts(self) -> (T, Envelope) {
        (self.value, self.envelope)
    }
}

/// Why a handler failed, and so what happens to the message.
///
/// - [`HandlerError::temporary`]: nack; the message comes back (after the
///   error's delay, or the runner's backoff) until `max_attempts`, then it is
///   dead-lettered.
/// - [`HandlerError::permanent`]: reject; dead-lettered now with this error
///   as the reason.
///
/// Any error converts with `?`: every `std::error::Error`, `anyhow::Error`
/// (and anything else that converts into `Box<dyn Error + Send + Sync>`),
/// `String` and `&str`. An [`oona_core::Error`] anywhere in the error's
/// source chain decides: permanent when its kind is a data error (decode,
/// encode, invalid topic or name, payload too large, bad config) or a
/// handler error marked permanent; otherwise a `serde_json::Error` in the
/// chain is permanent; anything else is temporary (retried, then
/// dead-lettered, never dropped). The whole chain is the message.
pub struct HandlerError {
    permanent: bool,
    delay: Option<Duration>,
    message: String,
}

impl HandlerError {
    /// A failure worth retrying: the message is nacked.
    pub fn temporary(message: impl Into<String>) -> Self {
        HandlerError {
            permanent: false,
            delay: None,
            message: message.into(),
        }
    }

    /// A failure worth retrying after `delay`.
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        HandlerError {
            permanent: false,
            delay: Some(delay),
            message: message.into(),
        }
    }

    /// A failure retrying cannot fix: the message is dead-lettered now with
    /// `message` as the reason.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            permanent: true,
            delay: None,
            message: message.into(),
        }
    }

    /// Whether the message is dead-lettered at once.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The redelivery delay asked for, if any.
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// The message (the dead-letter reason when permanent).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("permanent", &self.permanent)
            .field("delay", &self.delay)
            .field("message", &self.message)
            .finish()
    }
}

/// What converts into a [`HandlerError`] with `?`.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

// HandlerError deliberately does not implement std::error::Error, so this
// blanket conversion does not collide with `From<T> for T`. Taking
// `Into<BoxError>` (not `std::error::Error`) lets `anyhow::Error`, which
// converts into a box but is no std error, and `String`/`&str` through.
impl<E> From<E> for HandlerError
where
    E: Into<BoxError>,
{
    fn from(e: E) -> Self {
        let e: BoxError = e.into();
        let chain = || {
            std::iter::successors(Some(&*e as &(dyn std::error::Error + 'static)), |x| {
                x.source()
            })
        };
        // The first Oona error of the chain decides (anyhow's context
        // wraps it); a JSON error anywhere is bad data.
        let permanent = match chain().find_map(|x| x.downcast_ref::<oona_core::Error>()) {
            Some(oe) => match oe.kind() {
                ErrorKind::Handler => !oe.is_temporary(),
                ErrorKind::Decode
                | ErrorKind::Encode
                | ErrorKind::InvalidTopic
                | ErrorKind::InvalidName
                | ErrorKind::PayloadTooLarge
                | ErrorKind::ConfigInvalid => true,
                _ => false,
            },
            None => chain().any(|x| x.is::<serde_json::Error>()),
        };
        let mut message = String::new();
        for s in chain() {
            let text = s.to_string();
            if message.is_empty() {
                message = text;
            } else if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
        }
        HandlerError {
            permanent,
            delay: None,
            message,
        }
    }
}

/// Handles messages of type `T`. Implemented for every
/// `Fn(Incoming<T>) -> impl Future<Output = HandlerResult>`, so an async
/// closure or `fn` works:
///
/// ```
/// use oona::{HandlerError, HandlerResult, Incoming};
///
/// async fn on_report(msg: Incoming<serde_json::Value>) -> HandlerResult {
///     if msg.value().get("layer").is_none() {
///         return Err(HandlerError::permanent("report without a layer"));
///     }
///     Ok(())
/// }
/// # fn assert_handler<H: oona::Handler<serde_json::Value>>(_: H) {}
/// # assert_handler(on_report);
/// ```
pub trait Handler<T>: Send + Sync + 'static {
    /// The future of one call.
    type Future: Future<Output = HandlerResult> + Send + 'static;
    /// Handle one message.
    fn call(&self, msg: Incoming<T>) -> Self::Future;
}

impl<T, F, Fut> Handler<T> for F
where
    F: Fn(Incoming<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    type Future = Fut;
    fn call(&self, msg: Incoming<T>) -> Fut {
        self(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv<E: Into<BoxError>>(e: E) -> HandlerError {
        HandlerError::from(e)
    }

    #[test]
    fn errors_convert_by_class() {
        use oona_core::Error;
        assert!(conv(Error::new(ErrorKind::Decode, "bad bytes")).is_permanent());
        assert!(conv(Error::new(ErrorKind::InvalidTopic, "x")).is_permanent());
        assert!(!conv(Error::new(ErrorKind::Connection, "reset")).is_permanent());
        assert!(!conv(Error::new(ErrorKind::Closed, "closed")).is_permanent());
        assert!(conv(Error::permanent("no such seed")).is_permanent());
        assert!(!conv(Error::temporary("busy")).is_permanent());
        let json = serde_json::from_str::<u32>("\"x\"").unwrap_err();
        assert!(conv(json).is_permanent());
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow disk");
        let h = conv(io);
        assert!(!h.is_permanent());
        assert_eq!(h.message(), "slow disk");
        // The source chain ends up in the message (it becomes the DLQ reason).
        let e = Error::new(ErrorKind::Decode, "payload")
            .with_source(std::io::Error::other("truncated"));
        assert_eq!(conv(e).message(), "decode: payload: truncated");
    }

    #[test]
    fn anyhow_and_strings_convert() {
        fn anyhow_decode() -> Result<(), HandlerError> {
            use anyhow::Context as _;
            let r: Result<(), oona_core::Error> =
                Err(oona_core::Error::new(ErrorKind::Decode, "bad field"));
            r.context("reading the blueprint")?;
            Ok(())
        }
        let e = anyhow_decode().unwrap_err();
        assert!(e.is_permanent(), "the Oona error under the context decides");
        assert_eq!(e.message(), "reading the blueprint: decode: bad field");
        fn anyhow_plain() -> Result<(), HandlerError> {
            Err(anyhow::anyhow!("the database is down"))?;
            Ok(())
        }
        let e = anyhow_plain().unwrap_err();
        assert!(!e.is_permanent());
        assert_eq!(e.message(), "the database is down");
        fn text() -> Result<(), HandlerError> {
            Err("no capacity")?;
            Ok(())
        }
        assert_eq!(text().unwrap_err().message(), "no capacity");
    }

    #[test]
    fn constructors() {
        let e = HandlerError::retry_after("later", Duration::from_millis(5));
        assert!(!e.is_permanent());
        assert_eq!(e.delay(), Some(Duration::from_millis(5)));
        assert!(HandlerError::permanent("no").is_permanent());
        assert_eq!(HandlerError::temporary("t").delay(), None);
    }
}
