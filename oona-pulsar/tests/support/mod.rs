//! Shared test support: the broker under test behind the frame-fixing
//! proxy (see `frame_fix.rs`) and a cuttable proxy in front of it.
#![allow(dead_code)]

pub mod frame_fix;

use oona_conformance::proxy::TcpProxy;

/// The env var naming pulsar-lite (written by `scripts/brokers.sh up pulsar`).
pub const ENV: &str = "OONA_TEST_PULSAR_URL";
/// Optional admin REST API of the broker (pulsar-lite has none).
pub const ADMIN_ENV: &str = "OONA_TEST_PULSAR_ADMIN_URL";

/// The broker under test, reachable through the proxies.
#[derive(Debug)]
pub struct Broker {
    /// Cut and restored by the reconnect case; clients connect here.
    pub cut: TcpProxy,
    /// Makes pulsar-lite's frames standard.
    pub fix: frame_fix::FrameFix,
    /// The query of the test URL (tenant, namespace, ...).
    pub query: Vec<(String, String)>,
    /// Admin API base URL, when the broker has one.
    pub admin_url: Option<String>,
}

impl Broker {
    /// Start the proxies for `url` (`pulsar://host:port?...`). Call inside
    /// a tokio runtime.
    pub fn start(url: &str) -> std::io::Result<Broker> {
        let u = url::Url::parse(url).map_err(std::io::Error::other)?;
        let host = u.host_str().unwrap_or("127.0.0.1");
        let port = u.port().unwrap_or(6650);
        let fix = frame_fix::FrameFix::start(&format!("{host}:{port}"))?;
        let cut = TcpProxy::start(fix.addr().to_string())?;
        let query = u
            .query_pairs()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let admin_url = std::env::var(ADMIN_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty());
        Ok(Broker {
            cut,
            fix,
            query,
            admin_url,
        })
    }

    /// A transport URL through the proxies with `overrides` replacing or
    /// adding query parameters.
    pub fn url_with(&self, overrides: &[(&str, &str)]) -> String {
        let mut u = url::Url::parse(&format!("pulsar://{}", self.cut.addr())).expect("proxy URL");
        {
            let mut q = u.query_pairs_mut();
            for (k, v) in &self.query {
                if !overrides.iter().any(|(o, _)| o == k) {
                    q.append_pair(k, v);
                }
            }
            for (k, v) in overrides {
                q.append_pair(k, v);
            }
            if let Some(a) = &self.admin_url {
                q.append_pair("admin_url", a);
            }
        }
        u.to_string()
    }

    /// The transport URL through the proxies.
    pub fn url(&self) -> String {
        self.url_with(&[])
    }

    /// A raw `pulsar` client (the broker's own client library) through
    /// the frame fixer.
    pub async fn raw_client(&self) -> pulsar::Pulsar<pulsar::TokioExecutor> {
        pulsar::Pulsar::builder(
            format!("pulsar://{}", self.cut.addr()),
            pulsar::TokioExecutor,
        )
        .build()
        .await
        .expect("raw pulsar client")
    }

    /// `tenant` and `namespace` of the test URL.
    pub fn tenant_namespace(&self) -> (String, String) {
        let get = |k: &str, d: &str| {
            self.query
                .iter()
                .find(|(q, _)| q == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| d.to_string())
        };
        (get("tenant", "public"), get("namespace", "default"))
    }
}
