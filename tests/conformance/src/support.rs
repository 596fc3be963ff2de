//! Helpers shared by the cases: random names, clean-up, receiving with time
//! limits and exact envelope comparison.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use oona_core::{
    Delivery, DeliveryStream, Envelope, Error, ErrorKind, Name, Subscription, Topic, Transport,
};
use rand::Rng;

use crate::{CaseError, Fixture, Timing};

/// What a case returns.
pub type CaseResult = Result<(), CaseError>;

/// A fresh topic `<plane>.conf<random>.t`; `plane` must be a valid first
/// segment (`telemetry`, `control`, ...).
pub fn random_topic(plane: &str) -> oona_core::Result<Topic> {
    Topic::new(format!("{plane}.conf{}.t", random_suffix()))
}

/// The URL of a genuine broker in the environment variable `var`, or
/// `None` (that broker is not tested) when it is unset; with
/// `OONA_TEST_REQUIRE=1` (CI) a missing one panics: a broker missing from
/// CI is a failure, never a silent skip.
pub fn url_of(var: &str) -> Option<String> {
    let url = crate::required_url(var);
    if url.is_none() {
        assert!(
            !crate::broker_required(),
            "{var} is not set and OONA_TEST_REQUIRE=1"
        );
        eprintln!("{var} not set; that broker is not tested");
    }
    url
}

/// One message through `t` on `topic` (a group reading from the earliest;
/// the same event back `within`, acked): that a connection set up some way
/// (TLS, credentials, a spool) carries messages. Panics otherwise.
pub async fn one_round_trip(t: &dyn Transport, topic: &Topic, within: Duration) {
    let sub = Subscription::new(topic.clone(), Name::unique("round-trip"))
        .start(oona_core::StartPosition::Earliest);
    let mut s = t.subscribe(sub).await.expect("subscribe");
    let e = Envelope::builder(topic.clone(), "{\"round\":\"trip\"}")
        .sender_id("oona-conformance")
        .build();
    t.publish(e.clone()).await.expect("publish");
    let d = tokio::time::timeout(within, s.next())
        .await
        .expect("a delivery in time")
        .expect("the stream goes on")
        .expect("a delivery");
    assert_eq!(d.envelope().event_id, e.event_id);
    d.ack().await.expect("ack");
}

/// Ten random lower-case letters and digits.
pub(crate) fn random_suffix() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..10)
        .map(|_| char::from(CHARS[rng.gen_range(0..CHARS.len())]))
        .collect()
}

/// A fresh group name.
pub(crate) fn group(prefix: &str) -> Name {
    Name::unique(prefix)
}

pub(crate) fn failed(msg: impl Into<String>) -> CaseError {
    CaseError::Failed(msg.into())
}

pub(crate) fn left_out(msg: impl Into<String>) -> CaseError {
    CaseError::LeftOut(msg.into())
}

/// Fail the case with a formatted message unless `cond` holds.
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::CaseError::Failed(format!($($fmt)+)));
        }
    };
}
pub(crate) use check;

/// Run a case's body with a fresh context and clean up after it.
macro_rules! with_cx {
    ($fx:expr, $body:ident) => {{
        let cx = $crate::support::Cx::new($fx);
        let r = $body(&cx).await;
        cx.finish(r).await
    }};
}
pub(crate) use with_cx;

/// Turn transport errors into case failures with context.
pub(crate) trait Context<T> {
    fn ctx(self, what: &str) -> Result<T, CaseError>;
}

impl<T> Context<T> for oona_core::Result<T> {
    fn ctx(self, what: &str) -> Result<T, CaseError> {
        self.map_err(|e| failed(format!("{what}: {e}")))
    }
}

/// The result of a fixture hook: `Unsupported` leaves the case out.
pub(crate) fn hook<T>(r: oona_core::Result<T>, what: &str) -> Result<T, CaseError> {
    match r {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == ErrorKind::Unsupported => Err(left_out(format!(
            "the fixture does not support {what} ({e})"
        ))),
        Err(e) => Err(failed(format!("fixture {what}: {e}"))),
    }
}

/// A case's context: the fixture, its timing, and what to clean up.
pub(crate) struct Cx<'a> {
    pub fx: &'a dyn Fixture,
    pub t: Timing,
    clients: Mutex<Vec<Arc<dyn Transport>>>,
    topics: Mutex<Vec<Topic>>,
}

impl<'a> Cx<'a> {
    pub fn new(fx: &'a dyn Fixture) -> Self {
        Cx {
            fx,
            t: fx.timing(),
            clients: Mutex::new(Vec::new()),
            topics: Mutex::new(Vec::new()),
        }
    }

    /// A new client, closed at the end of the case.
    pub async fn client(&self) -> Result<Arc<dyn Transport>, CaseError> {
        let c = self.fx.connect().await.ctx("fixture connect")?;
        lock(&self.clients).push(Arc::clone(&c));
        Ok(c)
    }

    /// A fresh topic on `plane`, deleted at the end of the case.
    pub fn topic(&self, plane: &str) -> Result<Topic, CaseError> {
        let t = random_topic(plane).ctx("random topic")?;
        self.track(&t);
        Ok(t)
    }

    /// Delete `topic` at the end of the case too (e.g. a dead-letter topic).
    pub fn track(&self, topic: &Topic) {
        let mut ts = lock(&self.topics);
        if !ts.contains(topic) {
            ts.push(topic.clone());
        }
    }

    /// Clean up: close every client (ending its subscriptions), then delete
    /// the topics with a fresh client. A clean-up failure fails an
    /// otherwise passing case; every step is bounded so a hung transport
    /// cannot hang the run.
    pub async fn finish(self, result: CaseResult) -> CaseResult {
        let topics = std::mem::take(&mut *lock(&self.topics));
        let clients = std::mem::take(&mut *lock(&self.clients));
        let limit = self.t.wait();
        let mut problems = Vec::new();
        for c in clients {
            match tokio::time::timeout(limit, c.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(format!("close: {e}")),
                Err(_) => problems.push(format!("close did not finish within {limit:?}")),
            }
        }
        if !topics.is_empty() {
            match tokio::time::timeout(limit, self.fx.connect()).await {
                Ok(Ok(admin)) => {
                    for t in &topics {
                        match tokio::time::timeout(limit, admin.delete_topic(t)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => problems.push(format!("delete_topic({t}): {e}")),
                            Err(_) => problems
                                .push(format!("delete_topic({t}) did not finish within {limit:?}")),
                        }
                    }
                    if let Ok(Err(e)) = tokio::time::timeout(limit, admin.close()).await {
                        problems.push(format!("close of the clean-up client: {e}"));
                    }
                }
                Ok(Err(e)) => problems.push(format!("connect for clean-up: {e}")),
                Err(_) => {
                    problems.push(format!("connect for clean-up: no answer within {limit:?}"))
                }
            }
        }
        match result {
            Ok(()) if !problems.is_empty() => {
                Err(failed(format!("clean-up failed: {}", problems.join("; "))))
            }
            other => other,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One item from a stream, waiting at most `within`. Temporary errors
/// (reconnecting) are skipped and counted in `transient`; a permanent
/// error or the end of the stream fails the case. `Ok(None)` on timeout.
pub(crate) async fn next_within(
    stream: &mut DeliveryStream,
    within: Duration,
    transient: &mut usize,
) -> Result<Option<Delivery>, CaseError> {
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, stream.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Err(failed("the delivery stream ended unexpectedly")),
            Ok(Some(Ok(d))) => return Ok(Some(d)),
            Ok(Some(Err(e))) if e.is_temporary() => *transient += 1,
            Ok(Some(Err(e))) => return Err(failed(format!("the delivery stream failed: {e}"))),
        }
    }
}

/// The next delivery, which must come within `within`.
pub(crate) async fn expect_delivery(
    stream: &mut DeliveryStream,
    within: Duration,
    what: &str,
) -> Result<Delivery, CaseError> {
    let mut transient = 0;
    next_within(stream, within, &mut transient)
        .await?
        .ok_or_else(|| failed(format!("no delivery within {within:?}: expected {what}")))
}

/// Nothing may be delivered during `period`.
pub(crate) async fn expect_quiet(
    stream: &mut DeliveryStream,
    period: Duration,
    what: &str,
) -> CaseResult {
    let mut transient = 0;
    match next_within(stream, period, &mut transient).await? {
        None => Ok(()),
        Some(d) => Err(failed(format!(
            "unexpected delivery ({what}): event {} attempt {} on {}",
            d.envelope().event_id,
            d.attempt(),
            d.envelope().topic
        ))),
    }
}

/// Receive `n` deliveries, acking each, within `within` overall. Returns
/// the envelopes with their attempts in arrival order.
pub(crate) async fn take_acking(
    stream: &mut DeliveryStream,
    n: usize,
    within: Duration,
    what: &str,
) -> Result<Vec<(Envelope, u32)>, CaseError> {
    let deadline = Instant::now() + within;
    let mut got = Vec::with_capacity(n);
    let mut transient = 0;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(d) = next_within(stream, left, &mut transient).await? else {
            return Err(failed(format!(
                "{what}: got {} of {n} deliveries within {within:?}",
                got.len()
            )));
        };
        let env = d.envelope().clone();
        let attempt = d.attempt();
        d.ack().await.ctx("ack")?;
        got.push((env, attempt));
    }
    Ok(got)
}

/// Subscribe, failing the case on error.
pub(crate) async fn subscribe(
    client: &Arc<dyn Transport>,
    sub: Subscription,
) -> Result<DeliveryStream, CaseError> {
    let what = format!("subscribe {} as {}", sub.topic, sub.group);
    client.subscribe(sub).await.ctx(&what)
}

/// Publish, failing the case on error.
pub(crate) async fn publish(client: &Arc<dyn Transport>, env: Envelope) -> CaseResult {
    let what = format!("publish to {}", env.topic);
    client.publish(env).await.ctx(&what).map(|_| ())
}

/// Field-by-field differences between two envelopes; empty when equal.
pub(crate) fn diff(expected: &Envelope, got: &Envelope) -> String {
    let mut out = String::new();
    macro_rules! field {
        ($f:ident) => {
            if expected.$f != got.$f {
                let _ = write!(
                    out,
                    " {}: expected {:?}, got {:?};",
                    stringify!($f),
                    expected.$f,
                    got.$f
                );
            }
        };
    }
    field!(event_id);
    field!(sender_id);
    field!(timestamp);
    field!(trace_id);
    field!(topic);
    field!(correlation_id);
    field!(key);
    field!(content_type);
    field!(schema_id);
    field!(priority);
    if expected.headers != got.headers {
        let _ = write!(out, " headers:");
        for (k, v) in &expected.headers {
            match got.headers.get(k) {
                None => {
                    let _ = write!(out, " {k:?} missing,");
                }
                Some(g) if g != v => {
                    let _ = write!(out, " {k:?}: expected {}, got {},", short(v), short(g));
                }
                Some(_) => {}
            }
        }
        for (k, v) in &got.headers {
            if !expected.headers.contains_key(k) {
                let _ = write!(out, " unexpected {k:?} = {},", short(v));
            }
        }
        out.push(';');
    }
    if expected.payload != got.payload {
        let first = expected
            .payload
            .iter()
            .zip(got.payload.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.payload.len().min(got.payload.len()));
        let _ = write!(
            out,
            " payload: expected {} bytes, got {} bytes, first difference at byte {first};",
            expected.payload.len(),
            got.payload.len()
        );
    }
    // Catches fields added to Envelope later that the list above misses.
    if out.is_empty() && expected != got {
        out.push_str(" envelopes differ in a field the suite does not name;");
    }
    out
}

/// A value for messages, cut to 80 characters.
fn short(v: &str) -> String {
    if v.chars().count() <= 80 {
        format!("{v:?}")
    } else {
        let head: String = v.chars().take(80).collect();
        format!("{head:?}... ({} bytes)", v.len())
    }
}

/// Fail unless `got` equals `expected` in every field.
pub(crate) fn same_envelope(expected: &Envelope, got: &Envelope, what: &str) -> CaseResult {
    let d = diff(expected, got);
    check!(
        d.is_empty(),
        "{what}: envelope {} changed:{d}",
        expected.event_id
    );
    Ok(())
}

/// The error kind of a result, for messages.
pub(crate) fn kind_of<T>(r: &oona_core::Result<T>) -> String {
    match r {
        Ok(_) => "Ok".to_string(),
        Err(e) => format!("Err({:?}: {e})", e.kind()),
    }
}

/// Whether `e` is of `kind`.
pub(crate) fn is_kind(e: &Error, kind: ErrorKind) -> bool {
    e.kind() == kind
}

/// Event ids that occur more than once in `ids`.
pub(crate) fn duplicates<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut dup = Vec::new();
    for id in ids {
        if !seen.insert(id) {
            dup.push(id.to_string());
        }
    }
    dup
}
