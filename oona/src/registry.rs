//! Choosing a transport by URL.
//!
//! Each transport crate exports a `const DRIVER: Driver` (name, URL schemes,
//! connect function). This module holds the list of drivers compiled into
//! this build, chosen by Cargo feature, sqlx-style: no global registry and
//! nothing runs at load time. [`KNOWN_SCHEMES`] lists every scheme Oona
//! knows, compiled in or not, so a URL for a transport whose feature is off
//! gets an error naming the feature instead of "unknown scheme".

use std::sync::Arc;

use oona_core::{ConnectUrl, Driver, Error, ErrorKind, Result, Transport};

/// The environment variable [`from_env`] reads.
pub const ENV_URL: &str = "OONA_URL";

/// The URL [`from_env`] uses when [`ENV_URL`] is unset.
pub const DEFAULT_URL: &str = "memory://";

/// A URL scheme Oona knows and the Cargo feature of `oona` that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownScheme {
    /// The URL scheme (`rediss`).
    pub scheme: &'static str,
    /// The Cargo feature of the `oona` crate that enables it (`redis`).
    pub feature: &'static str,
}

/// Every scheme Oona knows, whether or not its feature is enabled.
pub const KNOWN_SCHEMES: &[KnownScheme] = &[
    KnownScheme {
        scheme: "memory",
        feature: "memory",
    },
    KnownScheme {
        scheme: "redis",
        feature: "redis",
    },
    KnownScheme {
        scheme: "rediss",
        feature: "redis",
    },
    KnownScheme {
        scheme: "kafka",
        feature: "kafka",
    },
    KnownScheme {
        scheme: "pulsar",
        feature: "pulsar",
    },
    KnownScheme {
        scheme: "pulsar+ssl",
        feature: "pulsar",
    },
];

/// The drivers compiled into this build (by Cargo feature).
pub fn drivers() -> Vec<Driver> {
    let compiled_in: &[Driver] = &[
        #[cfg(feature = "memory")]
        oona_core::memory::DRIVER,
        #[cfg(feature = "kafka")]
        oona_kafka::DRIVER,
        #[cfg(feature = "redis")]
        oona_redis::DRIVER,
        #[cfg(feature = "pulsar")]
        oona_pulsar::DRIVER,
        // Transport helpers add theirs here, e.g.
        // `#[cfg(feature = "redis")] oona_redis::DRIVER,`
        // when the crate becomes an optional dependency of that feature.
    ];
    compiled_in.to_vec()
}

/// Connect to the transport `url` names, with the drivers of this build.
///
/// | error kind | when |
/// |---|---|
/// | [`ErrorKind::ConfigInvalid`] | the URL does not parse, or a query parameter is unknown or bad (the message names the key) |
/// | [`ErrorKind::FeatureDisabled`] | the scheme is known but its Cargo feature is off (the message names the feature) |
/// | [`ErrorKind::UnknownScheme`] | no transport serves the scheme (the message lists the known ones) |
/// | anything the driver returns | e.g. [`ErrorKind::Connection`] |
pub async fn connect(url: &str) -> Result<Arc<dyn Transport>> {
    connect_with(&drivers(), url).await
}

/// [`connect`] with an explicit driver list: the built-in [`drivers`] plus
/// your own, or a subset.
///
/// With `spool_dir=...` in the query the transport publishes through a
/// durable local spool ([`oona_core::degrade::from_url`] lists the keys),
/// as [`connect_spooled`] does.
pub async fn connect_with(drivers: &[Driver], url: &str) -> Result<Arc<dyn Transport>> {
    let mut parsed = ConnectUrl::parse(url)?;
    let driver = find_driver(drivers, parsed.scheme())?;
    let redacted = parsed.redacted();
    tracing::debug!(transport = driver.name, url = %redacted, "oona: connecting");
    match oona_core::degrade::from_url(&mut parsed)? {
        None => (driver.connect)(parsed).await,
        Some((spool, breaker)) => {
            let connect = driver.connect;
            let retry: oona_core::degrade::Connect = Box::new(move || connect(parsed.clone()));
            let spooled = oona_core::degrade::Spooled::connect(retry, spool, breaker).await?;
            Ok(Arc::new(spooled))
        }
    }
}

/// [`connect`] through a durable local spool (see [`oona_core::degrade`]):
/// publishes survive a broker outage, in order, and the broker may be away
/// when this is called (publishes then go to the spool while connecting is
/// tried again). A permanent error (a bad URL, refused credentials) is
/// returned at once.
///
/// ```no_run
/// # async fn demo() -> oona::Result<()> {
/// use std::sync::Arc;
/// use oona::degrade::{BreakerConfig, SpoolConfig};
///
/// let spooled = oona::connect_spooled(
///     "redis://127.0.0.1:6379",
///     SpoolConfig::new("/var/lib/kasmina/spool"),
///     BreakerConfig::default(),
/// )
/// .await?;
/// let bus = oona::Bus::new(Arc::new(spooled));
/// # Ok(()) }
/// ```
pub async fn connect_spooled(
    url: &str,
    spool: oona_core::degrade::SpoolConfig,
    breaker: oona_core::degrade::BreakerConfig,
) -> Result<oona_core::degrade::Spooled> {
    let url = url.to_string();
    let connect: oona_core::degrade::Connect = Box::new(move || {
        let url = url.clone();
        Box::pin(async move { connect(&url).await })
    });
    oona_core::degrade::Spooled::connect(connect, spool, breaker).await
}

/// Connect to the URL in `OONA_URL`, or to [`DEFAULT_URL`] (`memory://`)
/// when it is unset or empty.
pub async fn from_env() -> Result<Arc<dyn Transport>> {
    connect(&env_url()).await
}

/// The URL [`from_env`] would use.
pub fn env_url() -> String {
    match std::env::var(ENV_URL) {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ => DEFAULT_URL.to_string(),
    }
}

/// Pick the driver of `scheme`, or explain why there is none.
pub fn find_driver(drivers: &[Driver], scheme: &str) -> Result<Driver> {
    let scheme = scheme.to_ascii_lowercase();
    if let Some(d) = drivers
        .iter()
        .find(|d| d.schemes.contains(&scheme.as_str()))
    {
        return Ok(*d);
    }
    if let Some(k) = KNOWN_SCHEMES.iter().find(|k| k.scheme == scheme) {
        return Err(Error::new(
            ErrorKind::FeatureDisabled,
            format!(
                "the {scheme}:// transport is not compiled in: enable the \"{}\" feature of oona \
                 (e.g. `oona = {{ version = \"0.1\", features = [\"{}\"] }}`)",
                k.feature, k.feature
            ),
        ));
    }
    let mut known: Vec<&str> = KNOWN_SCHEMES.iter().map(|k| k.scheme).collect();
    for d in drivers {
        for s in d.schemes {
            if !known.contains(s) {
                known.push(s);
            }
        }
    }
    Err(Error::new(
        ErrorKind::UnknownScheme,
        format!(
            "unknown transport scheme {scheme:?}; known schemes: {}",
            known
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}
