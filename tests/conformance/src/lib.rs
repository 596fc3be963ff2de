#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use oona_core::{Error, ErrorKind, Retention, Topic, Transport};

pub mod access;
pub mod admin;
pub mod cases;
mod child;
pub mod degrade;
pub mod depth;
pub mod leases;
pub mod outage;
pub mod processes;
pub mod proxy;
mod support;

pub use support::{one_round_trip, random_topic, url_of, CaseResult};

/// What the suite needs from a transport's test; implemented in each
/// transport crate's `tests/conformance.rs`.
///
/// Only [`Fixture::name`] and [`Fixture::connect`] are required. The hooks
/// with defaults answer [`ErrorKind::Unsupported`]; a case that needs one
/// is then reported as *left out* (ignored, with the reason), never as
/// passed.
#[async_trait]
pub trait Fixture: Send + Sync + 'static {
    /// Transport name for output (`memory`, `redis7`, ...).
    fn name(&self) -> String;

    /// A new, independent client (own connections) to the broker under test.
    async fn connect(&self) -> oona_core::Result<Arc<dyn Transport>>;

    /// Write raw bytes (not an envelope) to `topic` with the broker's own
    /// client, as a foreign producer would. Used by the poison case.
    async fn write_raw(&self, topic: &Topic, raw: &[u8]) -> oona_core::Result<()> {
        let _ = (topic, raw);
        Err(unsupported("write_raw"))
    }

    /// Publish `envelopes` to `topic` as one producer batch of the broker's
    /// own client (one broker entry holding them all, as a batching
    /// producer of another service writes them), in Oona's documented wire
    /// format. The default leaves the batch case to
    /// [`Transport::publish_batch`].
    async fn publish_producer_batch(
        &self,
        topic: &Topic,
        envelopes: Vec<oona_core::Envelope>,
    ) -> oona_core::Result<()> {
        let _ = (topic, envelopes);
        Err(unsupported("publish_producer_batch"))
    }

    /// Cut every connection of clients made by [`Fixture::connect`] (a
    /// [`proxy::TcpProxy`] cut, or a broker stop). Until
    /// [`Fixture::restore_connections`], new connections must fail too.
    async fn cut_connections(&self) -> oona_core::Result<()> {
        Err(unsupported("cut_connections"))
    }

    /// Undo [`Fixture::cut_connections`].
    async fn restore_connections(&self) -> oona_core::Result<()> {
        Err(unsupported("restore_connections"))
    }

    /// The retention the broker actually applies to `topic`, read with the
    /// broker's own client or admin API (not through the transport).
    async fn applied_retention(&self, topic: &Topic) -> oona_core::Result<Retention> {
        let _ = topic;
        Err(unsupported("applied_retention"))
    }

    /// Whether clients in other processes reach the same broker (the
    /// cases that kill consumer processes need it; an in-process broker
    /// says no).
    fn multi_process(&self) -> bool {
        true
    }

    /// A case this transport is known to fail, with why (an open issue's
    /// work). The case still runs: a failure is reported as ignored with
    /// `KNOWN GAP: why` and the failure, and a pass fails the run ("known
    /// gap now passes: remove it"), so the list cannot go stale.
    fn known_gap(&self, case: &str) -> Option<&'static str> {
        let _ = case;
        None
    }

    /// Time and size knobs of the cases.
    fn timing(&self) -> Timing {
        Timing::default()
    }
}

fn unsupported(hook: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("the fixture does not implement {hook}"),
    )
}

/// Time and size knobs of the cases. Start from [`Timing::default`] and
/// change what a slow broker needs.
///
/// Time bounds are checked both ways: a redelivery after a nack delay or an
/// ack deadline must not come *before* the bound (less [`Timing::early`]),
/// and must come within the bound plus [`Timing::margin`] times
/// [`Timing::slack`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Timing {
    /// Ack deadline of the subscriptions in the cases that wait for it
    /// (default 1 s).
    pub ack_deadline: Duration,
    /// Nack delay asked for in the nack-delay case (default 500 ms).
    pub nack_delay: Duration,
    /// How late an expected delivery may be after its bound (default 2 s).
    pub margin: Duration,
    /// How early a delayed redelivery may come, for clock granularity
    /// (default 20 ms).
    pub early: Duration,
    /// Multiplies every wait and margin, for slow brokers (default 1.0).
    pub slack: f64,
    /// How long the cases wait for messages that must arrive (default 10 s).
    pub receive_timeout: Duration,
    /// How long the cases watch for messages that must *not* arrive
    /// (default 300 ms; deadline-based checks add the ack deadline).
    pub quiet: Duration,
    /// Messages in the round-trip case (default 1000).
    pub round_trip_messages: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ack_deadline: Duration::from_secs(1),
            nack_delay: Duration::from_millis(500),
            margin: Duration::from_secs(2),
            early: Duration::from_millis(20),
            slack: 1.0,
            receive_timeout: Duration::from_secs(10),
            quiet: Duration::from_millis(300),
            round_trip_messages: 1000,
        }
    }
}

impl Timing {
    /// Set [`Timing::ack_deadline`].
    pub fn with_ack_deadline(mut self, d: Duration) -> Self {
        self.ack_deadline = d;
        self
    }
    /// Set [`Timing::nack_delay`].
    pub fn with_nack_delay(mut self, d: Duration) -> Self {
        self.nack_delay = d;
        self
    }
    /// Set [`Timing::margin`].
    pub fn with_margin(mut self, d: Duration) -> Self {
        self.margin = d;
        self
    }
    /// Set [`Timing::early`].
    pub fn with_early(mut self, d: Duration) -> Self {
        self.early = d;
        self
    }
    /// Set [`Timing::slack`] (at least 1.0 makes sense).
    pub fn with_slack(mut self, slack: f64) -> Self {
        self.slack = slack;
        self
    }
    /// Set [`Timing::receive_timeout`].
    pub fn with_receive_timeout(mut self, d: Duration) -> Self {
        self.receive_timeout = d;
        self
    }
    /// Set [`Timing::quiet`].
    pub fn with_quiet(mut self, d: Duration) -> Self {
        self.quiet = d;
        self
    }
    /// Set [`Timing::round_trip_messages`].
    pub fn with_round_trip_messages(mut self, n: usize) -> Self {
        self.round_trip_messages = n;
        self
    }

    /// `d` scaled by [`Timing::slack`].
    pub fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.slack.max(0.0))
    }
    /// The scaled margin.
    pub fn late(&self) -> Duration {
        self.scaled(self.margin)
    }
    /// The scaled receive timeout.
    pub fn wait(&self) -> Duration {
        self.scaled(self.receive_timeout)
    }
    /// Longest a whole case may take before it is failed as hung: 12 receive
    /// timeouts plus 6 ack deadlines, scaled.
    pub fn case_limit(&self) -> Duration {
        self.scaled(self.receive_timeout * 12 + self.ack_deadline * 6)
    }
    /// The scaled quiet period.
    pub fn quiet_for(&self) -> Duration {
        self.scaled(self.quiet)
    }
}

/// Why a case did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseError {
    /// The transport broke the contract (or the broker failed).
    Failed(String),
    /// The case cannot run on this transport: a capability it lacks or a
    /// fixture hook it does not implement. Reported as ignored with the
    /// reason, never as passed.
    LeftOut(String),
}

impl fmt::Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaseError::Failed(m) => f.write_str(m),
            CaseError::LeftOut(m) => write!(f, "left out: {m}"),
        }
    }
}

impl std::error::Error for CaseError {}

/// A boxed case future.
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>>;

/// One case of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    /// The trial name (`round_trip`, ...).
    pub name: &'static str,
    /// Cuts connections or otherwise disturbs every client of the fixture,
    /// so it runs alone (the other cases wait).
    pub exclusive: bool,
    /// Runs the case.
    pub run: for<'a> fn(&'a dyn Fixture) -> CaseFuture<'a>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("exclusive", &self.exclusive)
            .finish()
    }
}

/// Every case of the suite, in order.
pub fn all_cases() -> Vec<Case> {
    cases::ALL.to_vec()
}

/// Whether this process is a consumer child of a case (see the cases that
/// kill consumer processes): a fixture then connects directly, without the
/// proxy its parent owns.
pub fn is_child_process() -> bool {
    std::env::var_os(child::ENV).is_some()
}

/// Whether `OONA_TEST_REQUIRE=1`: a missing broker URL fails the run
/// instead of leaving every case out.
pub fn broker_required() -> bool {
    std::env::var("OONA_TEST_REQUIRE").is_ok_and(|v| v.trim() == "1")
}

/// The broker URL from `env_var` (e.g. `OONA_TEST_REDIS_URL`), if set and
/// not empty. [`run_with_env`] decides what a missing one means (see
/// [`broker_required`]).
pub fn required_url(env_var: &str) -> Option<String> {
    std::env::var(env_var)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Run the suite against the broker named by `env_var`: one line in a
/// transport's `tests/conformance.rs`.
///
/// - `env_var` set: `make(url)` builds the fixture (inside the suite's tokio
///   runtime, so it may bind a [`proxy::TcpProxy`] or spawn tasks) and every
///   case runs.
/// - not set, `OONA_TEST_REQUIRE=1`: every case fails, naming the variable.
/// - not set otherwise: every case is reported as ignored,
///   `left out: no broker: set <env_var>`.
pub fn run_with_env<F, M>(env_var: &str, make: M) -> ExitCode
where
    F: Fixture,
    M: FnOnce(String) -> F,
{
    let args = Arguments::from_args();
    match required_url(env_var) {
        Some(url) => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    return setup_failed(
                        &args,
                        &env_var_kind(env_var),
                        &format!("tokio runtime: {e}"),
                    )
                }
            };
            let fixture = {
                let _guard = rt.enter();
                make(url)
            };
            if let Ok(spec) = std::env::var(child::ENV) {
                return child::main(Arc::new(fixture), &rt, &spec);
            }
            run_on(args, rt, fixture)
        }
        None if broker_required() => setup_failed(
            &args,
            &env_var_kind(env_var),
            &format!("{env_var} is not set and OONA_TEST_REQUIRE=1: the broker is required"),
        ),
        None => {
            let reason = format!("left out: no broker: set {env_var}");
            let trials = cases::ALL
                .iter()
                .map(|c| {
                    let reason = reason.clone();
                    Trial::ignorable_test(c.name, move || Ok(Completion::ignored_with(reason)))
                        .with_kind(env_var_kind(env_var))
                })
                .collect();
            libtest_mimic::run(&args, trials).exit_code()
        }
    }
}

/// Run the suite against `fixture` (e.g. the memory transport, which needs
/// no broker).
pub fn run<F: Fixture>(fixture: F) -> ExitCode {
    let args = Arguments::from_args();
    match runtime() {
        Ok(rt) => run_on(args, rt, fixture),
        Err(e) => setup_failed(&args, &fixture.name(), &format!("tokio runtime: {e}")),
    }
}

fn env_var_kind(env_var: &str) -> String {
    // OONA_TEST_REDIS_URL -> redis
    env_var
        .trim_start_matches("OONA_TEST_")
        .trim_end_matches("_URL")
        .to_ascii_lowercase()
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
}

fn setup_failed(args: &Arguments, kind: &str, why: &str) -> ExitCode {
    let trials = cases::ALL
        .iter()
        .map(|c| {
            let why = why.to_string();
            Trial::test(c.name, move || Err(Failed::from(why))).with_kind(kind)
        })
        .collect();
    libtest_mimic::run(args, trials).exit_code()
}

/// Cases mostly wait on timers and the broker, so more run at once than
/// there are cores: `--test-threads`, else `RUST_TEST_THREADS`, else 8.
fn default_threads(args: &mut Arguments) {
    if args.test_threads.is_none() {
        let from_env = std::env::var("RUST_TEST_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0);
        args.test_threads = Some(from_env.unwrap_or(DEFAULT_THREADS));
    }
}

const DEFAULT_THREADS: usize = 8;

fn run_on<F: Fixture>(mut args: Arguments, rt: tokio::runtime::Runtime, fixture: F) -> ExitCode {
    default_threads(&mut args);
    let rt = Arc::new(rt);
    let fixture: Arc<dyn Fixture> = Arc::new(fixture);
    // Exclusive cases (connection cuts) take the write side; the others
    // share the read side and run in parallel.
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let kind = fixture.name();
    let trials = cases::ALL
        .iter()
        .map(|case| {
            let case = *case;
            let rt = Arc::clone(&rt);
            let fixture = Arc::clone(&fixture);
            let gate = Arc::clone(&gate);
            let name = kind.clone();
            Trial::ignorable_test(case.name, move || {
                let limit = fixture.timing().case_limit();
                let gap = fixture.known_gap(case.name);
                let result = rt.block_on(async move {
                    let run = async {
                        match tokio::time::timeout(limit, (case.run)(fixture.as_ref())).await {
                            Ok(r) => r,
                            Err(_) => Err(CaseError::Failed(format!(
                                "the case did not finish within {limit:?} (hung transport?)"
                            ))),
                        }
                    };
                    if case.exclusive {
                        let _held = gate.write().await;
                        run.await
                    } else {
                        let _held = gate.read().await;
                        run.await
                    }
                });
                match (result, gap) {
                    (Ok(()), None) => Ok(Completion::Completed),
                    (Ok(()), Some(gap)) => Err(Failed::from(format!(
                        "known gap now passes: remove it from the fixture ({gap})"
                    ))),
                    (Err(CaseError::LeftOut(why)), _) => {
                        Ok(Completion::ignored_with(format!("left out: {why}")))
                    }
                    (Err(CaseError::Failed(msg)), Some(gap)) => {
                        eprintln!("KNOWN GAP [{name}] {}: {gap}; failing: {msg}", case.name);
                        Ok(Completion::ignored_with(format!("KNOWN GAP: {gap}")))
                    }
                    (Err(CaseError::Failed(msg)), None) => Err(Failed::from(msg)),
                }
            })
            .with_kind(kind.clone())
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Shut down without waiting for tasks a broken transport may leave
    // behind, so a failing run still ends.
    if let Ok(rt) = Arc::try_unwrap(rt) {
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    conclusion.exit_code()
}
