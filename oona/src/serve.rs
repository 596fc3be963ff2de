//! The built-in HTTP endpoints of a service: `/metrics` (Prometheus text),
//! `/healthz` (liveness) and `/readyz` (readiness).
//!
//! One setting turns them on: the environment variable
//! [`METRICS_ADDR_ENV`] (`OONA_METRICS_ADDR=0.0.0.0:9464`). With it set, a
//! [`Bus`] records [`Metrics`] ([`Metrics::global`]) and the first handler
//! runner the process starts serves the endpoints for its bus while the
//! process runs. [`Endpoints::start`] serves them on any address, for a
//! service that configures them in code.
//!
//! - `/metrics`: the bus's [`Metrics::render`], with the depth of each
//!   running runner's group read first (at most once per 5 s, waiting at
//!   most 2 s).
//! - `/healthz`: `200 ok` while the process answers.
//! - `/readyz`: `200` when the broker is reachable ([`Bus::health`] up or
//!   degraded) and no runner of the bus stopped by itself (its stream
//!   ended); else `503` with the reason.
//!
//! Anything else is `404`. One request per connection, its head within
//! 10 s, at most 64 connections at once. The endpoints have no
//! authentication: listen on an address only the scraper reaches.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use oona_core::metrics::{Metrics, CONTENT_TYPE};
use oona_core::{Error, ErrorKind, HealthStatus, Result};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::Bus;

/// The variable that turns the endpoints on: `host:port` to listen on.
pub const METRICS_ADDR_ENV: &str = "OONA_METRICS_ADDR";

/// How long `/metrics` waits for the groups' depths.
const DEPTH_WAIT: Duration = Duration::from_secs(2);

/// Endpoints being served; [`Endpoints::stop`] ends them (dropping the
/// value does too).
#[derive(Debug)]
pub struct Endpoints {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Endpoints {
    /// Serve `bus`'s endpoints on `addr` (`127.0.0.1:0` picks a port).
    /// The bus must record metrics (`Bus::with_metrics`) for `/metrics` to
    /// show more than the depths.
    pub async fn start(addr: &str, bus: Bus) -> Result<Endpoints> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            Error::new(
                ErrorKind::ConfigInvalid,
                format!("metrics endpoints: cannot listen on {addr:?}: {e}"),
            )
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("metrics endpoints: {e}")))?;
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept(listener, bus, stopped));
        tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
        Ok(Endpoints { addr: local, stop })
    }

    /// Where they listen.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting connections.
    pub fn stop(self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The address [`METRICS_ADDR_ENV`] gives, if set and not blank.
pub(crate) fn addr_from_env() -> Option<String> {
    let v = std::env::var(METRICS_ADDR_ENV).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// Start the endpoints for `bus` on [`METRICS_ADDR_ENV`] if it is set and
/// nothing serves them yet in this process; they run while the process
/// does. An address that cannot be listened on is a
/// [`ErrorKind::ConfigInvalid`] error.
pub(crate) async fn from_env(bus: &Bus) -> Result<()> {
    static SERVING: tokio::sync::OnceCell<Endpoints> = tokio::sync::OnceCell::const_new();
    let Some(addr) = addr_from_env() else {
        return Ok(());
    };
    SERVING
        .get_or_try_init(|| async {
            Endpoints::start(&addr, bus.clone())
                .await
                .map_err(|e| Error::new(e.kind(), format!("{METRICS_ADDR_ENV}: {e}")))
        })
        .await?;
    Ok(())
}

/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 64;

/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept(listener: TcpListener, bus: Bus, mut stopped: watch::Receiver<bool>) {
    let room = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let depths = Arc::new(DepthCache::default());
    loop {
        let Ok(permit) = Arc::clone(&room).acquire_owned().await else {
            return;
        };
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoints: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let (bus, depths) = (bus.clone(), Arc::clone(&depths));
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(bus.clone(), Arc::clone(&depths), req));
            // One request per connection, its head within the timeout: a
            // slow or idle client holds a slot for seconds, not forever.
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "metrics endpoints: connection failed");
            }
            drop(permit);
        });
    }
}

/// When the groups' depths were last read: a scrape reads them at most
/// once per [`DEPTH_EVERY`], however often it is asked.
#[derive(Default)]
struct DepthCache(tokio::sync::Mutex<Option<tokio::time::Instant>>);

/// The shortest time between two depth readings.
const DEPTH_EVERY: Duration = Duration::from_secs(5);

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn answer(
    bus: Bus,
    depths: Arc<DepthCache>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    Ok(match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            CONTENT_TYPE,
            metrics_page(&bus, &depths).await,
        ),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => match readiness(&bus).await {
            Ok(detail) => reply(StatusCode::OK, TEXT, detail),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, why),
        },
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    })
}

async fn metrics_page(bus: &Bus, depths: &DepthCache) -> String {
    let metrics = bus.metrics().cloned().unwrap_or_else(Metrics::new);
    let mut last = depths.0.lock().await;
    if last.is_none_or(|at| at.elapsed() >= DEPTH_EVERY) {
        let groups = bus.runners().groups();
        let sampled = tokio::time::timeout(
            DEPTH_WAIT,
            metrics.sample_depths(bus.transport().as_ref(), &groups),
        )
        .await;
        for e in sampled.unwrap_or_default() {
            tracing::debug!(error = %e, "metrics: a group's depth was not read");
        }
        *last = Some(tokio::time::Instant::now());
    }
    drop(last);
    metrics.render()
}

/// `Ok(detail)` when ready, `Err(why)` when not ([`Bus::readiness`]).
async fn readiness(bus: &Bus) -> std::result::Result<String, String> {
    let h = bus.readiness().await;
    let line = format!("{} {:?}: {}\n", h.transport, h.status, h.detail);
    match h.status {
        HealthStatus::Up | HealthStatus::Degraded => Ok(line),
        _ => Err(line),
    }
}
