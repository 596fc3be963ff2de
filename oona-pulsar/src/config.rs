//! The connection URL of the Pulsar transport.

use std::time::Duration;

use oona_core::{ConnectUrl, Error, ErrorKind, PolicySet, Result, Tenant, Topic};

/// Settings of a [`crate::PulsarTransport`], read from its URL.
///
/// ```text
/// pulsar://host[:6650]?tenant=run-42&admin_url=http://host:8080
/// pulsar://host[:6650]?tenant=esper&namespace=dev
/// pulsar+ssl://host[:6651]?tenant=esper&namespace=dev&token=...&admin_url=https://host:8443
/// ```
///
/// | key | default | meaning |
/// |---|---|---|
/// | `tenant` | none (Pulsar's `public`) | the Oona [`Tenant`], which is the Pulsar tenant of every topic |
/// | `namespace` | see below | one Pulsar namespace for every topic |
/// | `offload_driver` | none | tiered storage of the planes kept forever (`innovation`): the offloader of their namespaces (`filesystem`, `aws-s3`, `google-cloud-storage`, ...; its bucket, endpoint and credentials are the broker's settings); needs a namespace per plane and `admin_url` |
/// | `offload_threshold` | none | bytes of a topic kept in BookKeeper before the broker offloads closed ledgers on its own (none: only when asked, [`crate::PulsarTransport::offload`]) |
/// | `offload_deletion_lag` | the broker's (4h) | how long BookKeeper keeps a ledger after its offload |
/// | `token` | none | JWT for token authentication (binary protocol and admin API) |
/// | `admin_url` | none | base URL of the admin REST API; without it retention is not applied and topics are not deleted |
/// | `tls_ca_file` | none | PEM file of extra trusted CAs for `pulsar+ssl://` and an `https` admin URL |
/// | `operation_timeout` | `30s` | how long a lookup, subscribe or admin call may take |
/// | `producer_queue` | `10000` | most publishes in flight per connection before `publish` waits |
/// | `crash_counts` | `true` | count a consumer's crash as an attempt of what it held, so a message that crashes consumers reaches its dead-letter topic (see *Attempts across crashes* in the crate docs); `false` saves a write before each hand-out (about one publish round trip of latency) and leaves crashes uncounted, as Pulsar's own clients do |
///
/// Where topics live:
///
/// | `tenant` | `namespace` | topic `telemetry.seed.health` |
/// |---|---|---|
/// | none | none | `persistent://public/default/telemetry.seed.health` (every cluster has it) |
/// | `run-42` | none | `persistent://run-42/telemetry/telemetry.seed.health`: a namespace per plane |
/// | any | `dev` | `persistent://<tenant or public>/dev/telemetry.seed.health` |
///
/// With a namespace per plane and an `admin_url`, the transport creates the
/// tenant (when the role may) and each plane's namespace on first use, with
/// the plane's policies (see the crate README); without an `admin_url` they
/// must exist.
///
/// `Debug` shows the token as `***`.
#[derive(Clone)]
#[non_exhaustive]
pub struct PulsarConfig {
    /// `pulsar://host:port` or `pulsar+ssl://host:port`, no query.
    pub service_url: String,
    /// Whether the binary protocol runs over TLS.
    pub tls: bool,
    /// The Oona tenant: the Pulsar tenant (`public` without one).
    pub tenant: Option<Tenant>,
    /// The one namespace of every topic; `None`: `default` without a
    /// tenant, a namespace per plane with one.
    pub namespace: Option<String>,
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
    /// Tiered storage of the planes kept forever, if any.
    pub offload: Option<Offload>,
}

/// Tiered storage of a namespace: Pulsar moves closed ledgers of its topics
/// to object storage, and reads them from there when a subscription
/// replays; nothing changes for producers and consumers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Offload {
    /// The offloader (`managedLedgerOffloadDriver`).
    pub driver: String,
    /// Bytes kept in BookKeeper before an automatic offload; `None`: only
    /// on request.
    pub threshold_bytes: Option<u64>,
    /// How long BookKeeper keeps an offloaded ledger; `None`: the broker's.
    pub deletion_lag: Option<Duration>,
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
            .field("offload", &self.offload)
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
        let tenant = url.take::<Tenant>("tenant")?;
        let namespace = url.take::<String>("namespace")?;
        if let Some(ns) = &namespace {
            check_segment("namespace", ns)?;
        }
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
        let offload = Self::offload_of(&mut url)?;
        url.finish()?;
        if offload.is_some() && (namespace.is_some() || tenant.is_none() || admin_url.is_none()) {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                "query parameter `offload_driver`: tiered storage is set on the namespaces of a \
                 tenant's planes: give a `tenant`, no `namespace`, and an `admin_url`",
            ));
        }
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
            offload,
        })
    }

    fn offload_of(url: &mut ConnectUrl) -> Result<Option<Offload>> {
        let driver = url.take::<String>("offload_driver")?;
        let threshold_bytes = url.take::<u64>("offload_threshold")?;
        let deletion_lag = url.take_duration("offload_deletion_lag")?;
        match driver {
            Some(d) if !d.is_empty() => Ok(Some(Offload {
                driver: d,
                threshold_bytes,
                deletion_lag,
            })),
            _ if threshold_bytes.is_some() || deletion_lag.is_some() => Err(Error::new(
                ErrorKind::ConfigInvalid,
                "query parameters `offload_threshold` and `offload_deletion_lag` need an `offload_driver`",
            )),
            _ => Ok(None),
        }
    }

    /// Parse a URL string.
    pub fn parse(url: &str) -> Result<Self> {
        Self::from_url(ConnectUrl::parse(url)?)
    }

    /// The Pulsar tenant: the Oona tenant, or `public`.
    pub fn pulsar_tenant(&self) -> &str {
        self.tenant.as_ref().map_or("public", Tenant::as_str)
    }

    /// Whether each plane has a namespace of its own (a tenant without a
    /// `namespace`).
    pub fn namespace_per_plane(&self) -> bool {
        self.tenant.is_some() && self.namespace.is_none()
    }

    /// The namespace of the topic whose local name is `local` (an Oona
    /// topic, or a name that starts with one, as marks topics do).
    pub fn namespace_of<'a>(&'a self, local: &'a str) -> &'a str {
        match (&self.namespace, &self.tenant) {
            (Some(ns), _) => ns,
            (None, None) => "default",
            (None, Some(_)) => local.split('.').next().unwrap_or(local),
        }
    }

    /// `persistent://<tenant>/<namespace>/<topic>`.
    pub fn full_topic(&self, topic: &Topic) -> String {
        format!(
            "persistent://{}/{}/{topic}",
            self.pulsar_tenant(),
            self.namespace_of(topic.as_str())
        )
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
        assert_eq!(c.pulsar_tenant(), "esper");
        assert_eq!(c.namespace.as_deref(), Some("dev"));
        let t = Topic::new("telemetry.seed.health").unwrap();
        assert_eq!(
            c.full_topic(&t),
            "persistent://esper/dev/telemetry.seed.health"
        );
        assert!(!c.namespace_per_plane());
        assert!(!c.tls && c.token.is_none() && c.admin_url.is_none());
        assert!(c.crash_counts, "crashes count unless turned off");
        let c = PulsarConfig::parse(
            "pulsar+ssl://broker.example?token=abc&admin_url=https://broker.example:8443/&operation_timeout=5s&crash_counts=false",
        )
        .unwrap();
        assert_eq!(c.service_url, "pulsar+ssl://broker.example:6651");
        assert_eq!(c.pulsar_tenant(), "public");
        let t = Topic::new("telemetry.seed.health").unwrap();
        assert_eq!(
            c.full_topic(&t),
            "persistent://public/default/telemetry.seed.health"
        );
        assert_eq!(c.token.as_deref(), Some("abc"));
        assert_eq!(c.admin_url.as_deref(), Some("https://broker.example:8443"));
        assert_eq!(c.operation_timeout, Duration::from_secs(5));
        assert!(!c.crash_counts);
        let shown = format!("{c:?}");
        assert!(!shown.contains("abc") && shown.contains("***"), "{shown}");
    }

    #[test]
    fn a_tenant_has_a_namespace_per_plane() {
        let c = PulsarConfig::parse("pulsar://h?tenant=run-42&admin_url=http://h:8080").unwrap();
        assert!(c.namespace_per_plane());
        let t = |s: &str| Topic::new(s).unwrap();
        assert_eq!(
            c.full_topic(&t("telemetry.seed.health")),
            "persistent://run-42/telemetry/telemetry.seed.health"
        );
        assert_eq!(
            c.full_topic(&t("innovation.field_reports")),
            "persistent://run-42/innovation/innovation.field_reports"
        );
        assert_eq!(c.namespace_of("control.a.b=oona-marks=g"), "control");
        let c = PulsarConfig::parse("pulsar://h?namespace=dev").unwrap();
        assert_eq!(c.full_topic(&t("a.b")), "persistent://public/dev/a.b");
    }

    #[test]
    fn offload_settings() {
        let c = PulsarConfig::parse(
            "pulsar://h?tenant=t&admin_url=http://h:8080&offload_driver=filesystem&offload_threshold=1048576&offload_deletion_lag=0s",
        )
        .unwrap();
        let o = c.offload.unwrap();
        assert_eq!(o.driver, "filesystem");
        assert_eq!(o.threshold_bytes, Some(1 << 20));
        assert_eq!(o.deletion_lag, Some(Duration::ZERO));
        for bad in [
            "pulsar://h?tenant=t&offload_driver=filesystem",
            "pulsar://h?tenant=t&namespace=n&admin_url=http://h&offload_driver=filesystem",
            "pulsar://h?admin_url=http://h&offload_driver=filesystem",
            "pulsar://h?tenant=t&admin_url=http://h&offload_threshold=5",
        ] {
            let e = PulsarConfig::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{bad}");
            assert!(e.to_string().contains("offload"), "{e}");
        }
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
