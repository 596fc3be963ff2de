//! Connection settings, read from a `redis://` / `rediss://` URL.

use std::time::Duration;

use oona_core::{ConnectUrl, Error, ErrorKind, PolicySet, Result, Tenant};

/// Settings of a [`crate::RedisTransport`].
///
/// Every field has a default and a URL query parameter (named in brackets);
/// [`RedisConfig::from_url`] rejects unknown parameters by name. `Debug`
/// shows the password as `***`.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// What the `redis` crate connects to (host, port, TLS, user, password,
    /// db).
    pub connection: redis::ConnectionInfo,
    /// Prepended to every key this transport writes (`prefix`, default
    /// `oona:`, then the tenant and `:` when there is one). The stream of
    /// topic `a.b` is `<prefix>a.b`: `oona:a.b`, or `oona:run-42:a.b` in
    /// tenant `run-42`.
    pub prefix: String,
    /// The tenant (`tenant`): its keys are under a prefix of their own, so
    /// its topics, groups and dead letters never meet another tenant's.
    pub tenant: Option<Tenant>,
    /// Retention and payload limits by plane (not in the URL; see
    /// [`RedisConfig::with_policies`]).
    pub policies: PolicySet,
    /// Longest XREADGROUP BLOCK of a subscription (`block`, default 250ms).
    /// It bounds how late a subscription notices due delayed redeliveries
    /// and a close.
    pub block: Duration,
    /// How often a subscription looks for entries to claim: due delayed
    /// nacks and entries idle past the ack deadline (`claim_interval`,
    /// default 250ms).
    pub claim_interval: Duration,
    /// Most entries one XREADGROUP asks for (`read_batch`, default 256;
    /// never more than the free prefetch).
    pub read_batch: usize,
    /// How often retention is enforced with XTRIM on every known topic, for
    /// topics nobody publishes to (`housekeeping`, default 60s; `0`
    /// disables it).
    pub housekeeping: Duration,
    /// Reply timeout of ordinary commands (`timeout`, default 10s).
    pub response_timeout: Duration,
    /// Connect timeout (`connect_timeout`, default 5s).
    pub connect_timeout: Duration,
    /// Prefetch of subscriptions that keep the core default (`prefetch`).
    pub default_prefetch: Option<usize>,
    /// Ack deadline of subscriptions that keep the core default
    /// (`ack_deadline`).
    pub default_ack_deadline: Option<Duration>,
    /// Max attempts of subscriptions that keep the core default
    /// (`max_attempts`).
    pub default_max_attempts: Option<u32>,
    /// A PEM file of the CAs to trust for `rediss://` instead of the
    /// system's (`tls_ca_file`): a private CA. Certificates are always
    /// verified.
    pub tls_ca_file: Option<String>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.connection.redis;
        let password = r.password.as_ref().map(|_| oona_core::config::REDACTED);
        f.debug_struct("RedisConfig")
            .field("addr", &self.connection.addr.to_string())
            .field("db", &r.db)
            .field("username", &r.username)
            .field("password", &password)
            .field("prefix", &self.prefix)
            .field("tenant", &self.tenant)
            .field("policies", &self.policies)
            .field("block", &self.block)
            .field("claim_interval", &self.claim_interval)
            .field("read_batch", &self.read_batch)
            .field("housekeeping", &self.housekeeping)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("default_prefetch", &self.default_prefetch)
            .field("default_ack_deadline", &self.default_ack_deadline)
            .field("default_max_attempts", &self.default_max_attempts)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl RedisConfig {
    /// Default [`RedisConfig::prefix`].
    pub const DEFAULT_PREFIX: &'static str = "oona:";

    /// Settings for `url` (`redis://[user:password@]host[:port][/db][?key=value...]`,
    /// `rediss://` for TLS).
    ///
    /// Query parameters: `user`, `password`, `db` (override the URL's own),
    /// `prefix`, `tenant`, `block`, `claim_interval`, `read_batch`, `housekeeping`,
    /// `timeout`, `connect_timeout`, and the subscription defaults
    /// `prefetch`, `ack_deadline`, `max_attempts`. Durations are written
    /// `500ms`, `30s`, `5m`, `2h` or plain milliseconds.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_connect_url(ConnectUrl::parse(url)?)
    }

    /// Settings from a parsed URL (the facade's entry point).
    pub fn from_connect_url(mut url: ConnectUrl) -> Result<Self> {
        let scheme = url.scheme().to_string();
        if scheme != "redis" && scheme != "rediss" {
            return Err(Error::new(
                ErrorKind::UnknownScheme,
                format!("oona-redis serves redis:// and rediss://, not {scheme}://"),
            ));
        }
        let user: Option<String> = url.take("user")?;
        let password: Option<String> = url.take("password")?;
        let db: Option<i64> = url.take("db")?;
        let prefix: Option<String> = url.take("prefix")?;
        let tenant: Option<Tenant> = url.take("tenant")?;
        let block = url.take_duration("block")?;
        let claim_interval = url.take_duration("claim_interval")?;
        let read_batch: Option<usize> = url.take("read_batch")?;
        let housekeeping = url.take_duration("housekeeping")?;
        let response_timeout = url.take_duration("timeout")?;
        let connect_timeout = url.take_duration("connect_timeout")?;
        let default_prefetch: Option<usize> = url.take("prefetch")?;
        let default_ack_deadline = url.take_duration("ack_deadline")?;
        let default_max_attempts: Option<u32> = url.take("max_attempts")?;
        let tls_ca_file: Option<String> = url.take("tls_ca_file")?;
        if tls_ca_file.is_some() && scheme != "rediss" {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                "query parameter `tls_ca_file` needs a rediss:// URL",
            ));
        }
        url.finish()?;

        // The redis crate reads host, port, user, password and db from the
        // URL; the query (ours) is removed first so it never sees it.
        let mut bare = url.url().clone();
        bare.set_query(None);
        let mut connection = redis::IntoConnectionInfo::into_connection_info(bare.as_str())
            .map_err(|e| {
                Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("invalid Redis URL {}: {e}", url.redacted()),
                )
                .with_transport(crate::NAME)
            })?;
        if let Some(u) = user {
            connection.redis.username = Some(u);
        }
        if let Some(p) = password {
            connection.redis.password = Some(p);
        }
        if let Some(db) = db {
            connection.redis.db = db;
        }
        let positive = |key: &str, d: Option<Duration>, default: Duration| -> Result<Duration> {
            match d {
                Some(d) if d.is_zero() => Err(Error::new(
                    ErrorKind::ConfigInvalid,
                    format!("query parameter `{key}` must be above zero"),
                )),
                Some(d) => Ok(d),
                None => Ok(default),
            }
        };
        let mut prefix = prefix.unwrap_or_else(|| Self::DEFAULT_PREFIX.to_string());
        if prefix.contains(char::is_whitespace) {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                format!("query parameter `prefix`: {prefix:?} contains whitespace"),
            ));
        }
        // `:` is not in the topic grammar, so a tenant's keys never read as
        // topics of the prefix without a tenant.
        if let Some(t) = &tenant {
            prefix = format!("{prefix}{t}:");
        }
        if read_batch == Some(0) || default_prefetch == Some(0) || default_max_attempts == Some(0) {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                "query parameters `read_batch`, `prefetch` and `max_attempts` must be at least 1",
            ));
        }
        Ok(RedisConfig {
            connection,
            prefix,
            tenant,
            policies: PolicySet::default(),
            block: positive("block", block, Duration::from_millis(250))?,
            claim_interval: positive("claim_interval", claim_interval, Duration::from_millis(250))?,
            read_batch: read_batch.unwrap_or(256),
            housekeeping: housekeeping.unwrap_or(Duration::from_secs(60)),
            response_timeout: positive("timeout", response_timeout, Duration::from_secs(10))?,
            connect_timeout: positive("connect_timeout", connect_timeout, Duration::from_secs(5))?,
            default_prefetch,
            default_ack_deadline: match default_ack_deadline {
                Some(d) if d.is_zero() => {
                    return Err(Error::new(
                        ErrorKind::ConfigInvalid,
                        "query parameter `ack_deadline` must be above zero",
                    ))
                }
                other => other,
            },
            default_max_attempts,
            tls_ca_file,
        })
    }

    /// Use these retention and payload policies.
    pub fn with_policies(mut self, policies: PolicySet) -> Self {
        self.policies = policies;
        self
    }

    /// Use this key prefix (the tenant, if any, still follows it).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        if let Some(t) = &self.tenant {
            self.prefix = format!("{}{t}:", self.prefix);
        }
        self
    }

    /// Set [`RedisConfig::housekeeping`].
    pub fn with_housekeeping(mut self, every: Duration) -> Self {
        self.housekeeping = every;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_everything() {
        let c = RedisConfig::from_url(
            "redis://u:p@127.0.0.1:6380/2?prefix=t:&block=100ms&ack_deadline=5s&max_attempts=3&prefetch=10&db=4&user=v",
        )
        .unwrap();
        assert_eq!(c.prefix, "t:");
        assert_eq!(c.block, Duration::from_millis(100));
        assert_eq!(c.default_ack_deadline, Some(Duration::from_secs(5)));
        assert_eq!(c.default_max_attempts, Some(3));
        assert_eq!(c.default_prefetch, Some(10));
        assert_eq!(c.connection.redis.db, 4);
        assert_eq!(c.connection.redis.username.as_deref(), Some("v"));
        assert_eq!(c.connection.redis.password.as_deref(), Some("p"));
        let c = RedisConfig::from_url("redis://u:hunter2@127.0.0.1:6380/2").unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
        let c = RedisConfig::from_url("redis://127.0.0.1/3").unwrap();
        assert_eq!(c.connection.redis.db, 3);
        assert_eq!(c.prefix, "oona:");
        assert!(c.tenant.is_none());
    }

    #[test]
    fn a_tenant_has_keys_of_its_own() {
        let c = RedisConfig::from_url("redis://127.0.0.1?tenant=run-42").unwrap();
        assert_eq!(c.prefix, "oona:run-42:");
        assert_eq!(c.tenant.as_ref().map(|t| t.as_str()), Some("run-42"));
        let c = RedisConfig::from_url("redis://127.0.0.1?prefix=esper/&tenant=a").unwrap();
        assert_eq!(c.prefix, "esper/a:");
        assert_eq!(c.with_prefix("x:").prefix, "x:a:", "the tenant stays");
        let e = RedisConfig::from_url("redis://127.0.0.1?tenant=Run:1").unwrap_err();
        assert!(e.to_string().contains("`tenant`"), "{e}");
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = RedisConfig::from_url("redis://127.0.0.1?prefx=a").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains("`prefx`"), "{e}");
        let e = RedisConfig::from_url("redis://127.0.0.1?block=soon").unwrap_err();
        assert!(e.to_string().contains("`block`"), "{e}");
        let e = RedisConfig::from_url("redis://127.0.0.1?db=x").unwrap_err();
        assert!(e.to_string().contains("`db`"), "{e}");
        let e = RedisConfig::from_url("redis://127.0.0.1?read_batch=0").unwrap_err();
        assert!(e.to_string().contains("read_batch"), "{e}");
        let e = RedisConfig::from_url("kafka://127.0.0.1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnknownScheme);
    }

    #[test]
    fn tls_scheme_is_accepted() {
        let c = RedisConfig::from_url("rediss://127.0.0.1:6380/0").unwrap();
        assert!(matches!(
            c.connection.addr,
            redis::ConnectionAddr::TcpTls { .. }
        ));
        let c = RedisConfig::from_url("rediss://h:6380/0?tls_ca_file=/etc/ca.pem").unwrap();
        assert_eq!(c.tls_ca_file.as_deref(), Some("/etc/ca.pem"));
        let e = RedisConfig::from_url("redis://h?tls_ca_file=/etc/ca.pem").unwrap_err();
        assert!(e.to_string().contains("rediss://"), "{e}");
    }
}
