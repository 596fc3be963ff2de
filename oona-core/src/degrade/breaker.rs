//! A circuit breaker: closed (calls go through), open (calls are not
//! tried until a probe time), half-open (one probe call decides).
//!
//! Failures are the temporary errors of the broker (unreachable, timed
//! out); a permanent error (a refused topic, an oversized payload) says
//! the broker answered and counts as a success of the connection.
//!
//! **Conservative mode.** A breaker that closes after an outage stays
//! conservative for [`BreakerConfig::conservative_for`] (10 s): one
//! failure opens it again (not the threshold's count: a broker just back
//! is not trusted yet), and [`Breaker::batch_limit`] lets work through in
//! small batches that double with each success (16, 32, ... up to the
//! caller's maximum), so a backlog flushed after an outage ramps up
//! instead of landing at once on a broker still warming up.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Settings of a [`Breaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker: 3.
    pub failure_threshold: u32,
    /// How long the breaker stays open before its first probe: 500 ms;
    /// doubled after each failed probe up to `max_open_for`.
    pub open_for: Duration,
    /// Longest wait between probes: 30 s.
    pub max_open_for: Duration,
    /// A call that has not answered by then counts as failed: 5 s. (A
    /// broker behind a dead network often never answers at all.)
    pub call_timeout: Duration,
    /// How long a breaker stays conservative after an outage: 10 s (0:
    /// never).
    pub conservative_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_millis(500),
            max_open_for: Duration::from_secs(30),
            call_timeout: Duration::from_secs(5),
            conservative_for: Duration::from_secs(10),
        }
    }
}

impl BreakerConfig {
    /// Set [`BreakerConfig::failure_threshold`] (at least 1).
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n.max(1);
        self
    }

    /// Set [`BreakerConfig::open_for`].
    pub fn open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }

    /// Set [`BreakerConfig::max_open_for`].
    pub fn max_open_for(mut self, d: Duration) -> Self {
        self.max_open_for = d;
        self
    }

    /// Set [`BreakerConfig::conservative_for`].
    pub fn conservative_for(mut self, d: Duration) -> Self {
        self.conservative_for = d;
        self
    }

    /// Set [`BreakerConfig::call_timeout`].
    pub fn call_timeout(mut self, d: Duration) -> Self {
        self.call_timeout = d;
        self
    }
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are not tried until the probe time.
    Open,
    /// One probe call is out; its result closes or reopens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    wait: Duration,
    probe_at: Instant,
    opened: u64,
    /// Conservative until then (after an outage).
    careful_until: Option<Instant>,
    /// Successes since the breaker closed conservatively.
    recovered: u32,
}

/// A circuit breaker (see the module docs).
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// Its settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Run `call` under the breaker's call timeout: a call that does not
    /// answer in time is a temporary [`ErrorKind::Timeout`] error. (The
    /// caller records the outcome.)
    ///
    /// [`ErrorKind::Timeout`]: crate::ErrorKind::Timeout
    pub async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = crate::Result<T>>,
    ) -> crate::Result<T> {
        let limit = self.config.call_timeout;
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(crate::Error::new(
                crate::ErrorKind::Timeout,
                format!("the broker did not answer within {limit:?}"),
            ))
        })
    }

    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                wait: config.open_for,
                probe_at: Instant::now(),
                opened: 0,
                careful_until: None,
                recovered: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain counters: consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// How many times the breaker opened from closed (outages, not
    /// failed probes).
    pub fn times_opened(&self) -> u64 {
        self.lock().opened
    }

    /// Whether the breaker is in conservative mode (see the module docs).
    pub fn conservative(&self) -> bool {
        self.lock()
            .careful_until
            .is_some_and(|t| Instant::now() < t)
    }

    /// How many items the next call may carry, at most `max`: the first
    /// batch (16) while the breaker is not closed (a probe), 16 doubled
    /// per success since it closed while it is conservative, else `max`.
    pub fn batch_limit(&self, max: usize) -> usize {
        let s = self.lock();
        let max = max.max(1);
        if s.state != BreakerState::Closed {
            return Self::FIRST_BATCH.min(max);
        }
        match s.careful_until {
            Some(t) if Instant::now() < t => Self::FIRST_BATCH
                .saturating_mul(1 << s.recovered.min(20))
                .min(max),
            _ => max,
        }
    }

    /// The batch a conservative breaker starts with.
    pub const FIRST_BATCH: usize = 16;

    /// Whether a call may be tried now. An open breaker past its probe
    /// time lets one call through and turns half-open; `Err(at)` says
    /// when to ask again.
    pub fn try_call(&self) -> Result<(), Instant> {
        let mut s = self.lock();
        match s.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open if Instant::now() >= s.probe_at => {
                s.state = BreakerState::HalfOpen;
                s.probe_at = Instant::now();
                Ok(())
            }
            BreakerState::Open => Err(s.probe_at),
            // A probe that never reported (its caller gave up on it) does
            // not hold the breaker: after a call timeout another may go.
            BreakerState::HalfOpen if Instant::now() >= s.probe_at + self.config.call_timeout => {
                s.probe_at = Instant::now();
                Ok(())
            }
            // The probe is out: ask again after a short while.
            BreakerState::HalfOpen => Err(Instant::now() + self.config.open_for),
        }
    }

    /// A call went through (or the broker answered with a permanent
    /// error): a half-open breaker closes, conservatively after an outage.
    /// An open breaker ignores it (a call begun before it opened: the
    /// probe decides).
    pub fn success(&self) {
        let mut s = self.lock();
        let now = Instant::now();
        match s.state {
            BreakerState::Open => return,
            BreakerState::HalfOpen => {
                s.careful_until = (!self.config.conservative_for.is_zero())
                    .then(|| now + self.config.conservative_for);
                s.recovered = 0;
            }
            BreakerState::Closed => {
                s.recovered = s.recovered.saturating_add(1);
                if s.careful_until.is_none_or(|t| now >= t) {
                    // Recovered for good: the next outage starts afresh.
                    s.careful_until = None;
                    s.wait = self.config.open_for;
                }
            }
        }
        s.state = BreakerState::Closed;
        s.failures = 0;
    }

    /// A call failed with a temporary error. A closed breaker opens after
    /// the threshold's count of failures in a row (one, while
    /// conservative: a relapse of the same outage, whose wait keeps
    /// doubling); a half-open one opens again with its wait doubled; an
    /// open one ignores it.
    pub fn failure(&self) {
        let mut s = self.lock();
        let now = Instant::now();
        let careful = s.careful_until.is_some_and(|t| now < t);
        s.failures += 1;
        match s.state {
            BreakerState::Open => return,
            BreakerState::Closed if careful => s.wait = (s.wait * 2).min(self.config.max_open_for),
            BreakerState::Closed if s.failures >= self.config.failure_threshold => {
                s.opened += 1;
                s.wait = self.config.open_for;
            }
            BreakerState::Closed => return,
            BreakerState::HalfOpen => s.wait = (s.wait * 2).min(self.config.max_open_for),
        }
        s.state = BreakerState::Open;
        s.probe_at = now + s.wait;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_probes_with_a_growing_wait() {
        let b = Breaker::new(
            BreakerConfig::default()
                .failure_threshold(2)
                .open_for(Duration::from_secs(1))
                .max_open_for(Duration::from_secs(3))
                .conservative_for(Duration::ZERO),
        );
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_call().is_err(), "open: not tried");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_call().is_ok(), "the probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_call().is_err(), "one probe at a time");
        b.failure();
        let at = b.try_call().unwrap_err();
        assert_eq!(at - Instant::now(), Duration::from_secs(2), "doubled");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.try_call().is_ok());
        b.failure();
        let at = b.try_call().unwrap_err();
        assert_eq!(at - Instant::now(), Duration::from_secs(3), "capped");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(b.try_call().is_ok());
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.times_opened(), 1);
        // Closed again: the count and the wait start over.
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_outage_it_is_conservative_for_a_while() {
        let b = Breaker::new(
            BreakerConfig::default()
                .failure_threshold(3)
                .open_for(Duration::from_secs(1))
                .conservative_for(Duration::from_secs(10)),
        );
        assert!(!b.conservative());
        assert_eq!(b.batch_limit(256), 256);
        for _ in 0..3 {
            b.failure();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_call().is_ok());
        b.success();
        assert!(b.conservative(), "closed after an outage");
        assert_eq!(b.batch_limit(256), 16);
        b.success();
        b.success();
        assert_eq!(b.batch_limit(256), 64, "doubling per success");
        for _ in 0..10 {
            b.success();
        }
        assert_eq!(b.batch_limit(256), 256, "up to the caller's maximum");
        b.failure();
        assert_eq!(b.state(), BreakerState::Open, "one failure reopens it");
        assert_eq!(b.times_opened(), 1, "a relapse of the same outage");
        assert_eq!(b.batch_limit(256), 16, "a probe is small");
        let at = b.try_call().unwrap_err();
        assert_eq!(
            at - Instant::now(),
            Duration::from_secs(2),
            "the wait doubles"
        );
        b.success();
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "a late success does not close it"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.try_call().is_ok());
        b.success();
        assert_eq!(b.batch_limit(256), 16, "the ramp starts over");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!b.conservative());
        assert_eq!(b.batch_limit(256), 256);
        b.success();
        b.failure();
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed, "the threshold again");
        b.failure();
        let at = b.try_call().unwrap_err();
        assert_eq!(
            at - Instant::now(),
            Duration::from_secs(1),
            "a new outage starts afresh"
        );
        assert_eq!(b.times_opened(), 2);
    }
}
