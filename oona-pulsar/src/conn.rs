//! A consumer's own connection to the broker, speaking the binary protocol
//! with `pulsar`'s frame codec and protobuf types.
//!
//! Why not `pulsar::Consumer`: it does not expose a message's
//! `redelivery_count`, which Oona's attempt numbers come from, and it sends
//! one ack command per message. Producers, lookups and the connection pool
//! stay with the `pulsar` client.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use pulsar::message::proto::{self, base_command::Type, BaseCommand};
use pulsar::message::{Codec, Message};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use oona_core::{Error, ErrorKind, Result};

use crate::config::PulsarConfig;
use crate::NAME;

/// Any byte stream the protocol can run over (TCP or TLS over TCP).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A framed protocol connection.
pub(crate) type Frames = Framed<Box<dyn Io>, Codec>;

/// Opens protocol connections to the broker that owns a topic.
pub(crate) struct Connector {
    config: Arc<PulsarConfig>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

pub(crate) fn conn_err(what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Connection, what.to_string()).with_transport(NAME)
}

/// The kind of a broker's error answer: refused credentials and refused
/// permissions are permanent, a busy broker is worth a retry.
pub(crate) fn server_error_kind(code: proto::ServerError) -> ErrorKind {
    use proto::ServerError as E;
    match code {
        E::AuthenticationError => ErrorKind::Unauthenticated,
        E::AuthorizationError => ErrorKind::Unauthorized,
        E::ServiceNotReady | E::TooManyRequests | E::ConsumerBusy => ErrorKind::Connection,
        E::IncompatibleSchema => ErrorKind::IncompatibleSchema,
        // A backlog quota (`TopicPolicy::backlog_limit_bytes`) is full.
        E::ProducerBlockedQuotaExceededError | E::ProducerBlockedQuotaExceededException => {
            ErrorKind::ResourceExhausted
        }
        _ => ErrorKind::Broker,
    }
}

/// A failed TLS handshake: a certificate that does not verify is a
/// permanent configuration error (the CA is not trusted), the rest a
/// connection error.
fn handshake_err(host: &str, port: u16, e: std::io::Error) -> Error {
    let bad_cert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
    if bad_cert {
        return Error::new(
            ErrorKind::ConfigInvalid,
            format!(
                "TLS handshake with {host}:{port}: {e}: the broker's certificate does not \
                 verify (a private CA is trusted with `tls_ca_file`)"
            ),
        )
        .with_transport(NAME)
        .set_temporary(false);
    }
    conn_err(format!("TLS handshake with {host}:{port}: {e}"))
}

pub(crate) fn command(t: Type, fill: impl FnOnce(&mut BaseCommand)) -> Message {
    let mut c = BaseCommand {
        r#type: t as i32,
        ..Default::default()
    };
    fill(&mut c);
    Message {
        command: c,
        payload: None,
    }
}

impl Connector {
    pub(crate) fn new(config: Arc<PulsarConfig>) -> Result<Self> {
        let tls = if config.tls {
            Some(tokio_rustls::TlsConnector::from(Arc::new(
                crate::tls::client_config(config.tls_ca_file.as_deref())?,
            )))
        } else {
            None
        };
        Ok(Connector { config, tls })
    }

    /// Connect to the broker at `addr` (as the lookup answered) and finish
    /// the handshake.
    pub(crate) async fn connect(&self, addr: &pulsar::BrokerAddress) -> Result<Frames> {
        let timeout = self.config.operation_timeout;
        tokio::time::timeout(timeout, self.connect_inner(addr))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("connecting to {} took more than {timeout:?}", addr.url),
                )
                .with_transport(NAME)
            })?
    }

    async fn connect_inner(&self, addr: &pulsar::BrokerAddress) -> Result<Frames> {
        let host = addr
            .url
            .host_str()
            .ok_or_else(|| conn_err(format!("broker URL {} has no host", addr.url)))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = addr
            .url
            .port()
            .unwrap_or(if self.tls.is_some() { 6651 } else { 6650 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| conn_err(format!("connect to {host}:{port}: {e}")).with_source(e))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                    Error::new(
                        ErrorKind::ConfigInvalid,
                        format!("TLS server name {host:?}: {e}"),
                    )
                    .with_transport(NAME)
                })?;
                Box::new(
                    tls.connect(name, tcp)
                        .await
                        .map_err(|e| handshake_err(&host, port, e))?,
                )
            }
        };
        let mut frames = Framed::new(io, Codec);
        let token = self.config.token.clone();
        let proxy_to = addr.proxy.then(|| addr.broker_url.clone());
        frames
            .send(command(Type::Connect, |c| {
                c.connect = Some(proto::CommandConnect {
                    client_version: format!("oona-pulsar-{}", env!("CARGO_PKG_VERSION")),
                    protocol_version: Some(12),
                    auth_method_name: token.as_ref().map(|_| "token".to_string()),
                    auth_data: token.as_ref().map(|t| t.as_bytes().to_vec()),
                    proxy_to_broker_url: proxy_to,
                    ..Default::default()
                })
            }))
            .await
            .map_err(|e| conn_err(format!("send CONNECT: {e}")))?;
        loop {
            let msg = next_frame(&mut frames).await?;
            let c = msg.command;
            if c.connected.is_some() {
                return Ok(frames);
            }
            if let Some(e) = c.error {
                let kind = proto::ServerError::try_from(e.error)
                    .map_or(ErrorKind::Broker, server_error_kind);
                return Err(Error::new(
                    kind,
                    format!("broker refused the connection: {}", e.message),
                )
                .with_transport(NAME));
            }
            if c.auth_challenge.is_some() {
                // Tokens do not change within a connection: answer with the
                // same one.
                let token = self.config.token.clone().unwrap_or_default();
                frames
                    .send(command(Type::AuthResponse, |c| {
                        c.auth_response = Some(proto::CommandAuthResponse {
                            client_version: Some(format!(
                                "oona-pulsar-{}",
                                env!("CARGO_PKG_VERSION")
                            )),
                            response: Some(proto::AuthData {
                                auth_method_name: Some("token".into()),
                                auth_data: Some(token.into_bytes()),
                            }),
                            protocol_version: Some(12),
                        })
                    }))
                    .await
                    .map_err(|e| conn_err(format!("send AUTH_RESPONSE: {e}")))?;
            }
        }
    }
}

/// The next frame, or a connection error at the end of the stream.
pub(crate) async fn next_frame(frames: &mut Frames) -> Result<Message> {
    match frames.next().await {
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(conn_err(format!("reading from the broker: {e}"))),
        None => Err(conn_err("the broker closed the connection")),
    }
}

/// Send the reply a broker ping wants; `true` if `msg` was one.
pub(crate) async fn answer_ping(frames: &mut Frames, msg: &Message) -> Result<bool> {
    if msg.command.ping.is_some() || msg.command.r#type == Type::Ping as i32 {
        frames
            .send(command(Type::Pong, |c| {
                c.pong = Some(proto::CommandPong {})
            }))
            .await
            .map_err(|e| conn_err(format!("send PONG: {e}")))?;
        return Ok(true);
    }
    Ok(false)
}

/// Wait for the reply to request `request_id` (`Success` or `Error`),
/// answering pings meanwhile. Messages that arrive first are returned to
/// the caller through `early`.
pub(crate) async fn await_success(
    frames: &mut Frames,
    request_id: u64,
    timeout: Duration,
    early: &mut Vec<Message>,
) -> Result<()> {
    let wait = async {
        loop {
            let msg = next_frame(frames).await?;
            if answer_ping(frames, &msg).await? {
                continue;
            }
            if let Some(s) = &msg.command.success {
                if s.request_id == request_id {
                    return Ok(());
                }
            }
            if let Some(e) = &msg.command.error {
                if e.request_id == request_id {
                    let kind = proto::ServerError::try_from(e.error)
                        .map_or(ErrorKind::Broker, server_error_kind);
                    return Err(Error::new(kind, format!("broker error: {}", e.message))
                        .with_transport(NAME));
                }
            }
            early.push(msg);
        }
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        Error::new(
            ErrorKind::Timeout,
            format!("no answer from the broker within {timeout:?}"),
        )
        .with_transport(NAME)
    })?
}
