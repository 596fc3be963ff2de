//! The Oona conformance suite against Pulsar (pulsar-lite in CI), through
//! the test-only frame-fixing proxy (`support/frame_fix.rs`).
//!
//! Cases left out, each only because of a named pulsar-lite deviation (see
//! the crate README), and only when the broker says it is pulsar-lite in
//! its handshake; against Apache Pulsar every case runs:
//! - `retention_applied`: pulsar-lite has no admin REST API (the transport
//!   then declares `retention = false`; with `OONA_TEST_PULSAR_ADMIN_URL`
//!   the case runs).
//! - `key_ordered_competing`: pulsar-lite's Key_Shared dispatcher hands a
//!   key's next messages to a consumer that joins while an earlier consumer
//!   still holds unacked messages of that key (Apache Pulsar holds them back
//!   for recently joined consumers). `tests/pulsar.rs` checks Key_Shared
//!   order with all consumers joined before the first message.

mod support;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

use async_trait::async_trait;
use oona_conformance::{CaseError, Fixture};
use oona_core::{Error, ErrorKind, Retention, Topic, Transport};
use oona_pulsar::PulsarTransport;

struct PulsarFixture {
    broker: support::Broker,
}

#[async_trait]
impl Fixture for PulsarFixture {
    fn name(&self) -> String {
        "pulsar".into()
    }

    async fn connect(&self) -> oona_core::Result<Arc<dyn Transport>> {
        Ok(Arc::new(
            PulsarTransport::connect_url(&self.broker.url()).await?,
        ))
    }

    async fn write_raw(&self, topic: &Topic, raw: &[u8]) -> oona_core::Result<()> {
        let (tenant, ns) = self.broker.tenant_namespace();
        let client = self.broker.raw_client().await;
        let mut p = client
            .producer()
            .with_topic(format!("persistent://{tenant}/{ns}/{topic}"))
            .build()
            .await
            .map_err(|e| Error::new(ErrorKind::Broker, e.to_string()))?;
        p.send_non_blocking(raw.to_vec())
            .await
            .map_err(|e| Error::new(ErrorKind::Broker, e.to_string()))?
            .await
            .map_err(|e| Error::new(ErrorKind::Broker, e.to_string()))?;
        Ok(())
    }

    async fn cut_connections(&self) -> oona_core::Result<()> {
        self.broker
            .cut
            .cut()
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))
    }

    async fn restore_connections(&self) -> oona_core::Result<()> {
        self.broker
            .cut
            .restore()
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))
    }

    async fn applied_retention(&self, topic: &Topic) -> oona_core::Result<Retention> {
        if self.broker.admin_url.is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "pulsar-lite has no admin REST API (set OONA_TEST_PULSAR_ADMIN_URL for a broker that has one)",
            ));
        }
        let t = PulsarTransport::connect_url(&self.broker.url()).await?;
        let r = t.applied_retention(topic).await;
        let _ = t.close().await;
        r?.ok_or_else(|| Error::new(ErrorKind::Broker, format!("no retention set on {topic}")))
    }
}

/// Cases whose only cause of failure on pulsar-lite is a listed deviation.
const PULSAR_LITE_DEVIATIONS: &[(&str, &str)] = &[(
    "key_ordered_competing",
    "pulsar-lite deviation: its Key_Shared dispatcher gives a key's messages to a newly joined \
     consumer while an earlier one still holds unacked messages of that key (see README)",
)];

/// The broker's `server_version` from a protocol handshake.
async fn server_version(addr: &str) -> std::io::Result<String> {
    use pulsar::message::proto::{self, base_command::Type, BaseCommand};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut frames = tokio_util::codec::Framed::new(tcp, pulsar::message::Codec);
    let connect = BaseCommand {
        r#type: Type::Connect as i32,
        connect: Some(proto::CommandConnect {
            client_version: "oona-pulsar-test".into(),
            protocol_version: Some(12),
            ..Default::default()
        }),
        ..Default::default()
    };
    frames
        .send(pulsar::message::Message {
            command: connect,
            payload: None,
        })
        .await
        .map_err(std::io::Error::other)?;
    match tokio::time::timeout(Duration::from_secs(5), frames.next()).await {
        Ok(Some(Ok(m))) => Ok(m
            .command
            .connected
            .map(|c| c.server_version)
            .unwrap_or_default()),
        _ => Err(std::io::Error::other("no CONNECTED answer")),
    }
}

fn main() -> ExitCode {
    let Some(url) = oona_conformance::required_url(support::ENV) else {
        // No broker: the suite reports (or, when required, fails) every case.
        return oona_conformance::run_with_env(support::ENV, |url| PulsarFixture {
            broker: support::Broker::start(&url).expect("start the test proxies"),
        });
    };
    let args = Arguments::from_args();
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("tokio runtime"),
    );
    let (fixture, version) = rt.block_on(async {
        let broker = support::Broker::start(&url).expect("start the test proxies");
        let version = server_version(&broker.cut.addr().to_string())
            .await
            .unwrap_or_default();
        (PulsarFixture { broker }, version)
    });
    let lite = version.to_ascii_lowercase().contains("lite");
    eprintln!(
        "conformance against {version:?}{}",
        if lite {
            " (pulsar-lite deviations apply)"
        } else {
            ""
        }
    );
    let fixture: Arc<dyn Fixture> = Arc::new(fixture);
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let trials = oona_conformance::all_cases()
        .into_iter()
        .map(|case| {
            let deviation = PULSAR_LITE_DEVIATIONS
                .iter()
                .find(|(n, _)| lite && *n == case.name)
                .map(|(_, why)| *why);
            let (rt, fixture, gate) = (Arc::clone(&rt), Arc::clone(&fixture), Arc::clone(&gate));
            Trial::ignorable_test(case.name, move || {
                if let Some(why) = deviation {
                    return Ok(Completion::ignored_with(format!("left out: {why}")));
                }
                let limit = fixture.timing().case_limit();
                let result = rt.block_on(async move {
                    let run = async {
                        tokio::time::timeout(limit, (case.run)(fixture.as_ref()))
                            .await
                            .unwrap_or_else(|_| {
                                Err(CaseError::Failed(format!(
                                    "the case did not finish within {limit:?}"
                                )))
                            })
                    };
                    // Connection cuts run alone.
                    if case.exclusive {
                        let _held = gate.write().await;
                        run.await
                    } else {
                        let _held = gate.read().await;
                        run.await
                    }
                });
                match result {
                    Ok(()) => Ok(Completion::Completed),
                    Err(CaseError::LeftOut(why)) => {
                        Ok(Completion::ignored_with(format!("left out: {why}")))
                    }
                    Err(CaseError::Failed(msg)) => Err(Failed::from(msg)),
                }
            })
            .with_kind("pulsar")
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Ok(rt) = Arc::try_unwrap(rt) {
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    conclusion.exit_code()
}
