//! Connection URLs and transport drivers.
//!
//! Every transport is chosen and configured by one URL:
//! `scheme://[user:password@]host[:port][/path]?key=value&...`. A transport
//! crate exports a [`Driver`]; the `oona` facade picks the driver by scheme.
//! Query parameters are read with [`ConnectUrl::take`] and friends, and
//! [`ConnectUrl::finish`] rejects any key nobody read, naming it, so a typo
//! never silently falls back to a default.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::error::{Error, ErrorKind, Result};
use crate::transport::Transport;

/// A transport's connect function: from a parsed URL to a live transport.
pub type ConnectFn = fn(ConnectUrl) -> BoxFuture<'static, Result<Arc<dyn Transport>>>;

/// A transport's entry point, registered with the facade.
#[derive(Clone, Copy)]
pub struct Driver {
    /// The transport's name (`redis`).
    pub name: &'static str,
    /// URL schemes it serves (`redis`, `rediss`).
    pub schemes: &'static [&'static str],
    /// Connect from a parsed URL.
    pub connect: ConnectFn,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("name", &self.name)
            .field("schemes", &self.schemes)
            .finish()
    }
}

/// What a secret prints as.
pub const REDACTED: &str = "***";

/// Whether a setting called `key` holds a secret, whose value is never
/// printed: passwords, tokens, secrets, credentials (`token`,
/// `tls_key_password`, `sasl.password`, ...).
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "token", "secret", "credential"]
        .iter()
        .any(|w| k.contains(w))
}

/// A parsed connection URL whose query parameters are consumed as they are
/// read. `Debug` shows the password and secret parameters as `***`.
#[derive(Clone)]
pub struct ConnectUrl {
    url: url::Url,
    params: BTreeMap<String, String>,
    known: Vec<&'static str>,
}

impl std::fmt::Debug for ConnectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let params: BTreeMap<&str, &str> = self
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { REDACTED } else { v.as_str() }))
            .collect();
        f.debug_struct("ConnectUrl")
            .field("url", &self.redacted())
            .field("params", &params)
            .finish()
    }
}

impl ConnectUrl {
    /// Parse `s`. Errors are [`ErrorKind::ConfigInvalid`]; a repeated query
    /// key is an error too.
    pub fn parse(s: &str) -> Result<Self> {
        let url = url::Url::parse(s).map_err(|e| {
            Error::new(
                ErrorKind::ConfigInvalid,
                format!("invalid transport URL {:?}: {e}", redact(s)),
            )
        })?;
        let mut params = BTreeMap::new();
        for (k, v) in url.query_pairs() {
            if params.insert(k.to_string(), v.to_string()).is_some() {
                return Err(Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("query parameter `{k}` given twice"),
                ));
            }
        }
        Ok(ConnectUrl {
            url,
            params,
            known: Vec::new(),
        })
    }

    /// The scheme (`redis`).
    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }

    /// The parsed URL, query included.
    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// The URL without its query, password hidden (for logs).
    pub fn redacted(&self) -> String {
        let mut u = self.url.clone();
        u.set_query(None);
        if u.password().is_some() {
            let _ = u.set_password(Some("***"));
        }
        u.to_string()
    }

    /// Take parameter `key` and parse it; absent gives `None`. A value that
    /// does not parse is an error naming the key.
    pub fn take<T>(&mut self, key: &'static str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        self.known.push(key);
        match self.params.remove(key) {
            None => Ok(None),
            Some(v) => v.parse::<T>().map(Some).map_err(|e| {
                Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("query parameter `{key}`: invalid value {v:?}: {e}"),
                )
            }),
        }
    }

    /// Take a duration parameter written `500ms`, `30s`, `5m`, `2h` or plain
    /// milliseconds.
    pub fn take_duration(&mut self, key: &'static str) -> Result<Option<Duration>> {
        let Some(v) = self.take::<String>(key)? else {
            return Ok(None);
        };
        parse_duration(&v).map(Some).map_err(|e| {
            Error::new(
                ErrorKind::ConfigInvalid,
                format!("query parameter `{key}`: invalid duration {v:?}: {e}"),
            )
        })
    }

    /// Take a boolean parameter (`true/false/1/0/yes/no`).
    pub fn take_bool(&mut self, key: &'static str) -> Result<Option<bool>> {
        let Some(v) = self.take::<String>(key)? else {
            return Ok(None);
        };
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Some(true)),
            "false" | "0" | "no" | "off" => Ok(Some(false)),
            _ => Err(Error::new(
                ErrorKind::ConfigInvalid,
                format!("query parameter `{key}`: invalid boolean {v:?} (use true or false)"),
            )),
        }
    }

    /// Fail if any parameter was not taken, naming it and the known keys.
    pub fn finish(&self) -> Result<()> {
        if let Some(k) = self.params.keys().next() {
            let mut known = self.known.clone();
            known.sort_unstable();
            known.dedup();
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                format!(
                    "unknown query parameter `{k}` for {}:// (known: {})",
                    self.scheme(),
                    known.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// Parse `500ms`, `30s`, `5m`, `2h`, or plain milliseconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number followed by ms, s, m or h".to_string())?;
    match unit {
        "" | "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        other => Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    }
}

fn redact(s: &str) -> String {
    // Hide anything between "://" and "@" (credentials) in error messages.
    match (s.find("://"), s.rfind('@')) {
        (Some(a), Some(b)) if b > a => format!("{}://***{}", &s[..a], &s[b..]),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_parameter_is_named() {
        let mut u = ConnectUrl::parse("memory://?capacity=10&capacty=3").unwrap();
        assert_eq!(u.take::<usize>("capacity").unwrap(), Some(10));
        let e = u.finish().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains("`capacty`"), "{e}");
        assert!(e.to_string().contains("capacity"), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let mut u = ConnectUrl::parse("memory://?capacity=lots").unwrap();
        let e = u.take::<usize>("capacity").unwrap_err();
        assert!(e.to_string().contains("`capacity`"), "{e}");
        let mut u = ConnectUrl::parse("redis://h?block=3x").unwrap();
        let e = u.take_duration("block").unwrap_err();
        assert!(e.to_string().contains("`block`"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_millis(15));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1d").is_err());
    }

    #[test]
    fn debug_hides_passwords_and_secret_parameters() {
        let u = ConnectUrl::parse(
            "kafka://svc:hunter2@h:9092?sasl_mechanism=PLAIN&tls_key_password=pw-9&token=tk-7&client_id=c",
        )
        .unwrap();
        let shown = format!("{u:?}");
        for secret in ["hunter2", "pw-9", "tk-7"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("client_id") && shown.contains("PLAIN"),
            "{shown}"
        );
        assert!(is_secret("sasl.password") && is_secret("OONA_SIGNING_SECRET"));
        assert!(!is_secret("client_id"));
    }

    #[test]
    fn redacts_password() {
        let u = ConnectUrl::parse("redis://user:secret@h:6379/0?x=1").unwrap();
        assert!(!u.redacted().contains("secret"));
        let e = ConnectUrl::parse("redis://user:secret@[bad").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
