//! The connection URL of the Pulsar transport.

use std::time::Duration;

use oona_core::{ConnectUrl, Error, ErrorKind, PolicySet, Result};

/// Settings of a [`crate::PulsarTransport`], read from its URL.
///
/// ```text
/// pulsar://host[:6650]?tenant=esper&namespace=dev
/// pulsar+ssl://host[:6651]?tenant=esper&namespace=dev&token=...&admin_url=https://host:8443
/// ```
///
/// | key | default | meaning |
/// |---|---|---|
/// | `tenant` | `public` | Pulsar tenant of every topic |
/// | `namespace` | `default` | Pulsar namespace of every topic |
/// | `token` | none | JWT for token authentication (binary protocol and admin API) |
/// | `admin_url` | none | base URL of the admin REST API; without it retention is not applied and topics are not deleted |
/// | `tls_ca_file` | none | PEM file of extra trusted CAs for `pulsar+ssl://` and an `https` admin URL |
/// | `operation_timeout` | `30s` | how long a lookup, subscribe or admin call may take |
/// | `producer_queue` | `10000` | most publishes in flight per connection before `publish` waits |
/// | `crash_counts` | `true` | count a consumer's crash as an attempt of what it held, so a message that crashes consumers reaches its dead-letter topic (see *Attempts across crashes* in the crate docs); `false` saves a write before each hand-out (about one publish round trip of latency) and leaves crashes uncounted, as Pulsar's own clients do |
///
/// `Debug` shows the token as `***`.
#[derive(Clone)]
#[non_exhaustive]
pub struct PulsarConfig {
    /// `pulsar://host:port` or `pulsar+ssl://host:port`, no query.
    pub service_url: String,
    /// Whether the binary protocol runs over TLS.
    pub tls: bool,
    /// The tenant.
    pub tenant: String,
    /// The namespace.
    pub namespace: String,
    /// Token authentication.
    pub token: Option<String>,
    /// Admin REST API base URL.
    pub admin_url: Option<String>,
    /// Extra trusted CAs (PEM file path).
    pub tls_ca_file: Option<String>,
    /// Lookup, subscribe and admin call timeout.
    pub operation_timeout: Duration,
    /// Publishes in flight per connection.
    pub producer_queue: usize,
    /// Count crashes of consumers as attempts (the marks topics).
    pub crash_counts: bool,
    /// Retention and payload limits by plane.
    pub policies: PolicySet,
}

impl std::fmt::Debug for PulsarConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = self.token.as_ref().map(|_| oona_core::config::REDACTED);
        f.debug_struct("PulsarConfig")
            .field("service_url", &self.service_url)
            .field("tls", &self.tls)
            .field("tenant", &self.tenant)
            .field("namespace", &self.namespace)
            .field("token", &token)
            .field("admin_url", &self.admin_url)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("operation_timeout", &self.operation_timeout)
            .field("producer_queue", &self.producer_queue)
            .field("crash_counts", &self.crash_counts)
            .field("policies", &self.policies)
            .finish()
    }
}

impl PulsarConfig {
    /// Read the settings from a parsed URL, rejecting unknown keys.
    pub fn from_url(mut url: ConnectUrl) -> Result<Self> {
        let tls = match url.scheme() {
            "pulsar" => false,
            "pulsar+ssl" => true,
            other => {
                return Err(Error::new(
                    ErrorKind::UnknownScheme,
                    format!(
                        "the pulsar transport serves pulsar:// and pulsar+ssl://, not {other}://"
                    ),
                ))
            }
        };
        let host = url
            .url()
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("pulsar URL {} has no host", url.redacted()),
                )
            })?
            .to_string();
        let port = url.url().port().unwrap_or(if tls { 6651 } else { 6650 });
        let path = url.url().path();
        if !(path.is_empty() || path == "/") {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                format!(
                    "pulsar URL {} has a path {path:?}: give tenant and namespace as query parameters (?tenant=..&namespace=..)",
                    url.redacted()
                ),
            ));
        }
        let tenant = url
            .take::<String>("tenant")?
            .unwrap_or_else(|| "public".into());
        let namespace = url
            .take::<String>("namespace")?
            .unwrap_or_else(|| "default".into());
        check_segment("tenant", &tenant)?;
        check_segment("namespace", &namespace)?;
        let token = url.take::<String>("token")?.filter(|t| !t.is_empty());
        let admin_url = url.take::<String>("admin_url")?;
        if let Some(a) = &admin_url {
            let parsed = url::Url::parse(a).map_err(|e| {
                Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("query parameter `admin_url`: invalid URL {a:?}: {e}"),
                )
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("query parameter `admin_url`: {a:?} is not http:// or https://"),
                ));
            }
        }
        let tls_ca_file = url.take::<String>("tls_ca_file")?;
        let operation_timeout = url
            .take_duration("operation_timeout")?
            .unwrap_or(Duration::from_secs(30));
        if operation_timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                "query parameter `operation_timeout`: must be more than zero",
            ));
        }
        let producer_queue = url.take::<usize>("producer_queue")?.unwrap_or(10_000);
        if producer_queue == 0 {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                "query parameter `producer_queue`: must be at least 1",
            ));
        }
        let crash_counts = url.take::<bool>("crash_counts")?.unwrap_or(true);
        url.finish()?;
        let scheme = if tls { "pulsar+ssl" } else { "pulsar" };
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(PulsarConfig {
            service_url: format!("{scheme}://{host}:{port}"),
            tls,
            tenant,
            namespace,
            token,
            admin_url: admin_url.map(|a| a.trim_end_matches('/').to_string()),
            tls_ca_file,
            operation_timeout,
            producer_queue,
            crash_counts,
            policies: PolicySet::default(),
        })
    }

    /// Parse a URL string.
    pub fn parse(url: &str) -> Result<Self> {
        Self::from_url(ConnectUrl::parse(url)?)
    }

    /// Use these retention and payload policies instead of the platform's
    /// defaults.
    pub fn with_policies(mut self, policies: PolicySet) -> Self {
        self.policies = policies;
        self
    }
}

/// Tenant and namespace names: Pulsar accepts `[A-Za-z0-9_.=:-]`.
fn check_segment(key: &'static str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | ':'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::ConfigInvalid,
            format!(
                "query parameter `{key}`: invalid value {v:?} (1 to 128 of A-Z a-z 0-9 - _ . = :)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_params() {
        let c = PulsarConfig::parse("pulsar://127.0.0.1?tenant=esper&namespace=dev").unwrap();
        assert_eq!(c.service_url, "pulsar://127.0.0.1:6650");
        assert_eq!((c.tenant.as_str(), c.namespace.as_str()), ("esper", "dev"));
        assert!(!c.tls && c.token.is_none() && c.admin_url.is_none());
        assert!(c.crash_counts, "crashes count unless turned off");
        let c = PulsarConfig::parse(
            "pulsar+ssl://broker.example?token=abc&admin_url=https://broker.example:8443/&operation_timeout=5s&crash_counts=false",
        )
        .unwrap();
        assert_eq!(c.service_url, "pulsar+ssl://broker.example:6651");
        assert_eq!(c.tenant, "public");
        assert_eq!(c.token.as_deref(), Some("abc"));
        assert_eq!(c.admin_url.as_deref(), Some("https://broker.example:8443"));
        assert_eq!(c.operation_timeout, Duration::from_secs(5));
        assert!(!c.crash_counts);
        let shown = format!("{c:?}");
        assert!(!shown.contains("abc") && shown.contains("***"), "{shown}");
    }

    #[test]
    fn bad_input_names_the_key() {
        let e = PulsarConfig::parse("pulsar://h?tenant=esper&namepsace=dev").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains("`namepsace`"), "{e}");
        let e = PulsarConfig::parse("pulsar://h?tenant=a/b").unwrap_err();
        assert!(e.to_string().contains("`tenant`"), "{e}");
        let e = PulsarConfig::parse("pulsar://h?admin_url=ftp://x").unwrap_err();
        assert!(e.to_string().contains("`admin_url`"), "{e}");
        let e = PulsarConfig::parse("pulsar://h?crash_counts=maybe").unwrap_err();
        assert!(e.to_string().contains("`crash_counts`"), "{e}");
        let e = PulsarConfig::parse("pulsar://h/esper/dev").unwrap_err();
        assert!(e.to_string().contains("path"), "{e}");
        assert_eq!(
            PulsarConfig::parse("kafka://h").unwrap_err().kind(),
            ErrorKind::UnknownScheme
        );
    }
}
