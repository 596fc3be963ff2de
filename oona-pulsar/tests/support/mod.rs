//! Shared test support: the broker under test, with a cuttable proxy on the
//! listener `scripts/brokers.sh` sets up for it.
//!
//! Pulsar clients connect to the address a lookup answers, not the one they
//! started from, so a proxy in front of the broker's main port would only
//! see the lookups. The broker therefore has a second listener (`cut`)
//! bound to `OONA_TEST_PULSAR_CUT_UPSTREAM` and advertised at
//! `OONA_TEST_PULSAR_CUT_LISTEN`; a client that connects to it gets that
//! address in its lookups (Pulsar's PIP-95), and the proxy sits there.
#![allow(dead_code)]

use std::net::SocketAddr;

use oona_conformance::proxy::TcpProxy;

/// The env var naming the broker (written by `scripts/brokers.sh up pulsar`).
pub const ENV: &str = "OONA_TEST_PULSAR_URL";

/// The broker under test.
#[derive(Debug)]
pub struct Broker {
    /// `host:port` of the broker's main listener.
    pub direct: String,
    /// Cut and restored by the reconnect case; transports from
    /// [`Broker::url`] connect through it when there is one (one per
    /// process: it listens on a fixed port).
    pub cut: Option<TcpProxy>,
    /// The query of the test URL (tenant, namespace, admin_url, ...).
    pub query: Vec<(String, String)>,
}

fn env(name: &str) -> std::io::Result<String> {
    std::env::var(name)
        .map(|v| v.trim().to_string())
        .map_err(|_| {
            std::io::Error::other(format!(
                "{name} is not set (scripts/brokers.sh up pulsar sets it)"
            ))
        })
}

impl Broker {
    /// The broker of `url` (`pulsar://host:port?...`), used directly.
    pub fn direct(url: &str) -> std::io::Result<Broker> {
        let u = url::Url::parse(url).map_err(std::io::Error::other)?;
        let direct = format!(
            "{}:{}",
            u.host_str().unwrap_or("127.0.0.1"),
            u.port().unwrap_or(6650)
        );
        let query = u
            .query_pairs()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Broker {
            direct,
            cut: None,
            query,
        })
    }

    /// [`Broker::direct`] with the proxy on the broker's `cut` listener.
    /// Call inside a tokio runtime.
    pub fn cuttable(url: &str) -> std::io::Result<Broker> {
        let listen: SocketAddr = env("OONA_TEST_PULSAR_CUT_LISTEN")?
            .parse()
            .map_err(std::io::Error::other)?;
        let cut = TcpProxy::start_on(listen, env("OONA_TEST_PULSAR_CUT_UPSTREAM")?)?;
        Ok(Broker {
            cut: Some(cut),
            ..Broker::direct(url)?
        })
    }

    /// A transport URL (through the proxy, when there is one) with
    /// `overrides` replacing or adding query parameters.
    pub fn url_with(&self, overrides: &[(&str, &str)]) -> String {
        let at = match &self.cut {
            Some(p) => p.addr().to_string(),
            None => self.direct.clone(),
        };
        let mut u = url::Url::parse(&format!("pulsar://{at}")).expect("broker URL");
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
        }
        u.to_string()
    }

    /// The transport URL of Oona tenant `tenant`: the test URL without its
    /// tenant and namespace (so a namespace per plane).
    pub fn tenant_url(&self, tenant: &str) -> String {
        let kept = Broker {
            direct: self.direct.clone(),
            cut: None,
            query: (self.query.iter())
                .filter(|(k, _)| k != "tenant" && k != "namespace")
                .cloned()
                .collect(),
        };
        kept.url_with(&[("tenant", tenant)])
    }

    /// The transport URL.
    pub fn url(&self) -> String {
        self.url_with(&[])
    }

    /// The admin REST API's base URL.
    pub fn admin_url(&self) -> Option<String> {
        self.param("admin_url")
    }

    /// Create `tenant` (allowed on the standalone cluster) and
    /// `tenant/namespace` through the admin API; existing ones are kept.
    pub async fn create_namespace(&self, tenant: &str, namespace: &str) {
        let admin = self.admin_url().expect("the test URL names admin_url");
        let http = reqwest::Client::new();
        let put = |path: String, body: &'static str| {
            http.put(format!("{admin}/admin/v2/{path}"))
                .header("Content-Type", "application/json")
                .body(body)
                .send()
        };
        for (path, body) in [
            (
                format!("tenants/{tenant}"),
                r#"{"allowedClusters":["standalone"]}"#,
            ),
            (format!("namespaces/{tenant}/{namespace}"), "{}"),
        ] {
            let r = put(path.clone(), body).await.expect("admin API reachable");
            let code = r.status().as_u16();
            assert!(
                r.status().is_success() || code == 409,
                "admin PUT {path}: HTTP {code}"
            );
        }
    }

    fn param(&self, key: &str) -> Option<String> {
        self.query
            .iter()
            .find(|(q, _)| q == key)
            .map(|(_, v)| v.clone())
    }

    /// A raw `pulsar` client (the broker's own client library) on the
    /// broker's main listener.
    pub async fn raw_client(&self) -> pulsar::Pulsar<pulsar::TokioExecutor> {
        pulsar::Pulsar::builder(format!("pulsar://{}", self.direct), pulsar::TokioExecutor)
            .build()
            .await
            .expect("raw pulsar client")
    }

    /// `tenant` and `namespace` of the test URL.
    pub fn tenant_namespace(&self) -> (String, String) {
        (
            self.param("tenant").unwrap_or_else(|| "public".into()),
            self.param("namespace").unwrap_or_else(|| "default".into()),
        )
    }
}
