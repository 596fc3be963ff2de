//! Exit codes scripts can rely on, and the failure that carries one.

use std::fmt;
use std::process::ExitCode;

use oona::{Error, ErrorKind};

/// What went wrong, with the exit code it ends the process with.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

/// The exit codes (documented in the README and in `oona --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 1: the operation failed (a broker error, say).
    Failed = 1,
    /// 2: bad usage: arguments, topic names, JSON, URL or configuration.
    Usage = 2,
    /// 3: the topic or group does not exist.
    NotFound = 3,
    /// 4: the broker is unreachable or timed out (a retry may succeed).
    Unavailable = 4,
    /// 5: done in part (some messages failed, or health is degraded).
    Partial = 5,
    /// 6: the broker refused the credentials.
    Unauthorized = 6,
    /// 130: SIGINT or SIGTERM stopped a finite job (replay, inspect,
    /// requeue) before it finished.
    Interrupted = 130,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Code::Usage, message)
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code as u8)
    }
}

/// The exit code of an Oona error.
pub fn code_of(e: &Error) -> Code {
    match e.kind() {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::ConfigInvalid
        | ErrorKind::UnknownScheme
        | ErrorKind::FeatureDisabled
        | ErrorKind::InvalidTopic
        | ErrorKind::InvalidName
        | ErrorKind::PayloadTooLarge
        | ErrorKind::Decode
        | ErrorKind::Encode
        | ErrorKind::Unsupported => Code::Usage,
        ErrorKind::Connection
        | ErrorKind::Timeout
        | ErrorKind::Closed
        | ErrorKind::ResourceExhausted
        | ErrorKind::SpoolFull => Code::Unavailable,
        ErrorKind::Unauthenticated | ErrorKind::Unauthorized => Code::Unauthorized,
        _ => Code::Failed,
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(code_of(&e), e.to_string())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Add what was being done to an error.
pub trait Context<T> {
    fn ctx(self, what: &str) -> Result<T, Failure>;
}

impl<T> Context<T> for oona::Result<T> {
    fn ctx(self, what: &str) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(code_of(&e), format!("{what}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_documented_codes() {
        let code = |k| code_of(&Error::new(k, "x")) as u8;
        assert_eq!(code(ErrorKind::NotFound), 3);
        assert_eq!(code(ErrorKind::InvalidTopic), 2);
        assert_eq!(code(ErrorKind::Connection), 4);
        assert_eq!(code(ErrorKind::Unauthenticated), 6);
        assert_eq!(code(ErrorKind::Broker), 1);
    }
}
