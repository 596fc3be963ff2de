//! The spool and breaker settings as query parameters of a transport URL,
//! so `OONA_URL=redis://host?spool_dir=/var/lib/svc/spool` turns spooling
//! on without code.

use std::time::Duration;

use super::breaker::BreakerConfig;
use super::spool::{SpoolConfig, SpoolSync, WhenFull};
use crate::config::ConnectUrl;
use crate::error::{Error, ErrorKind, Result};

/// The keys read by [`from_url`].
pub const KEYS: &[&str] = &[
    "spool_dir",
    "spool_max_bytes",
    "spool_sync",
    "spool_full_wait",
    "breaker_failures",
    "breaker_open_for",
    "breaker_max_open_for",
    "breaker_call_timeout",
    "breaker_conservative_for",
];

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::ConfigInvalid, msg)
}

/// `1073741824`, `512KiB`, `64MiB`, `1GiB`.
fn parse_bytes(v: &str) -> std::result::Result<u64, String> {
    let (digits, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{v:?} is not a size"))?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("{v:?}: use bytes, KiB, MiB or GiB")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{v:?} is too large"))
}

/// Take the spool and breaker parameters out of `url`:
///
/// | key | meaning (default) |
/// |---|---|
/// | `spool_dir` | turns spooling on: the spool's directory |
/// | `spool_max_bytes` | `1GiB`; bytes or `KiB`/`MiB`/`GiB` |
/// | `spool_sync` | `always` (fsync before `Ok`) or `never` |
/// | `spool_full_wait` | `5s`: how long a publish waits for room; `0` fails at once |
/// | `breaker_failures` | `3` consecutive failures open the breaker |
/// | `breaker_open_for` / `breaker_max_open_for` | `500ms` / `30s` between probes |
/// | `breaker_call_timeout` | `5s` |
/// | `breaker_conservative_for` | `10s`: conservative mode after an outage; `0` turns it off |
///
/// `None` without `spool_dir`; a breaker key without it is an error.
pub fn from_url(url: &mut ConnectUrl) -> Result<Option<(SpoolConfig, BreakerConfig)>> {
    let dir = url.take::<String>("spool_dir")?;
    let max = url.take::<String>("spool_max_bytes")?;
    let sync = url.take::<String>("spool_sync")?;
    let wait = url.take_duration("spool_full_wait")?;
    let failures = url.take::<u32>("breaker_failures")?;
    let open_for = url.take_duration("breaker_open_for")?;
    let max_open_for = url.take_duration("breaker_max_open_for")?;
    let call_timeout = url.take_duration("breaker_call_timeout")?;
    let conservative_for = url.take_duration("breaker_conservative_for")?;
    let Some(dir) = dir.filter(|d| !d.is_empty()) else {
        let any = max.is_some()
            || sync.is_some()
            || wait.is_some()
            || failures.is_some()
            || open_for.is_some()
            || max_open_for.is_some()
            || call_timeout.is_some()
            || conservative_for.is_some();
        if any {
            return Err(invalid(
                "spool and breaker query parameters need `spool_dir` (the spool's directory)"
                    .into(),
            ));
        }
        return Ok(None);
    };
    let mut spool = SpoolConfig::new(dir);
    if let Some(v) = max {
        let bytes = parse_bytes(&v)
            .map_err(|e| invalid(format!("query parameter `spool_max_bytes`: {e}")))?;
        spool = spool.max_bytes(bytes);
    }
    if let Some(v) = sync {
        spool = spool.sync(match v.as_str() {
            "always" => SpoolSync::Always,
            "never" => SpoolSync::Never,
            _ => {
                return Err(invalid(format!(
                    "query parameter `spool_sync`: {v:?} (use always or never)"
                )))
            }
        });
    }
    if let Some(d) = wait {
        spool = spool.when_full(if d.is_zero() {
            WhenFull::Fail
        } else {
            WhenFull::Wait(d)
        });
    }
    let mut breaker = BreakerConfig::default();
    if let Some(n) = failures {
        breaker = breaker.failure_threshold(n);
    }
    let set = |d: Option<Duration>, f: fn(BreakerConfig, Duration) -> BreakerConfig, b| {
        d.map_or(b, |d| f(b, d))
    };
    breaker = set(open_for, BreakerConfig::open_for, breaker);
    breaker = set(max_open_for, BreakerConfig::max_open_for, breaker);
    breaker = set(call_timeout, BreakerConfig::call_timeout, breaker);
    breaker = set(conservative_for, BreakerConfig::conservative_for, breaker);
    Ok(Some((spool, breaker)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(url: &str) -> Result<Option<(SpoolConfig, BreakerConfig)>> {
        let mut u = ConnectUrl::parse(url)?;
        let r = from_url(&mut u)?;
        u.finish()?;
        Ok(r)
    }

    #[test]
    fn the_spool_keys_are_taken_and_checked() {
        assert!(take("redis://h:1").unwrap().is_none());
        let (s, b) = take(
            "redis://h:1?spool_dir=/var/spool&spool_max_bytes=64MiB&spool_sync=never\
             &spool_full_wait=0&breaker_failures=5&breaker_call_timeout=2s\
             &breaker_conservative_for=0",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.dir, std::path::PathBuf::from("/var/spool"));
        assert_eq!(s.max_bytes, 64 << 20);
        assert_eq!(s.sync, SpoolSync::Never);
        assert_eq!(s.when_full, WhenFull::Fail);
        assert_eq!(b.failure_threshold, 5);
        assert_eq!(b.call_timeout, Duration::from_secs(2));
        assert_eq!(b.conservative_for, Duration::ZERO);
        assert_eq!(b.open_for, BreakerConfig::default().open_for);
        let e = take("redis://h:1?breaker_failures=2").unwrap_err();
        assert!(e.to_string().contains("`spool_dir`"), "{e}");
        let e = take("redis://h:1?spool_dir=/s&spool_max_bytes=1TB").unwrap_err();
        assert!(e.to_string().contains("`spool_max_bytes`"), "{e}");
        let e = take("redis://h:1?spool_dir=/s&spool_sync=sometimes").unwrap_err();
        assert!(e.to_string().contains("`spool_sync`"), "{e}");
    }
}
