//! Test-only Pulsar proxy that makes pulsar-lite's frames standard.
//!
//! pulsar-lite (the broker the tests run on) deviates from the Pulsar
//! binary protocol in one way that matters to clients: its MESSAGE frames
//! carry the metadata size right after the command, without the magic
//! number `0x0e01` and the CRC32C checksum that every Pulsar broker sends
//! and that the `pulsar` crate's frame decoder requires. This proxy sits
//! between the clients and pulsar-lite and inserts both. It also answers
//! lookups as a Pulsar proxy does (`proxy_through_service_url`), so clients
//! keep talking through it instead of connecting to the broker's own
//! address.
//!
//! It exists only for tests and benches; the transport never contains it.

use std::io;
use std::net::SocketAddr;

use prost::Message as _;
use pulsar::message::proto::BaseCommand;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAGIC: u16 = 0x0e01;
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
/// Largest frame accepted (Pulsar's default max message size plus room).
const MAX_FRAME: usize = 8 * 1024 * 1024;

/// A running frame-fixing proxy.
#[derive(Debug)]
pub struct FrameFix {
    addr: SocketAddr,
    task: tokio::task::AbortHandle,
}

impl FrameFix {
    /// Listen on `127.0.0.1:<free port>` and forward to `upstream`
    /// (`host:port` of pulsar-lite). Call inside a tokio runtime.
    pub fn start(upstream: &str) -> io::Result<FrameFix> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let addr = listener.local_addr()?;
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let _ = forward(client, &upstream).await;
                });
            }
        })
        .abort_handle();
        Ok(FrameFix { addr, task })
    }

    /// `host:port` clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for FrameFix {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, upstream: &str) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let r = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
        r.map(|_| ())
    };
    let down = async move {
        let r = fix_frames(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
        r
    };
    // Either direction ending ends the connection, as a broker would.
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

async fn fix_frames(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        let total = match from.read_u32().await {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if !(4..=MAX_FRAME).contains(&total) {
            return Err(io::Error::other(format!("bad frame size {total}")));
        }
        let mut body = vec![0u8; total];
        from.read_exact(&mut body).await?;
        out.clear();
        fix_frame(&body, &mut out)?;
        to.write_all(&out).await?;
    }
}

/// `body` is one frame without its leading total size; appends the fixed
/// frame (with its size) to `out`.
fn fix_frame(body: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let cmd_size = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
    if 4 + cmd_size > body.len() {
        return Err(io::Error::other("command larger than its frame"));
    }
    let cmd_bytes = &body[4..4 + cmd_size];
    let rest = &body[4 + cmd_size..];
    let mut cmd = BaseCommand::decode(cmd_bytes).map_err(io::Error::other)?;
    let mut new_cmd = None;
    if let Some(r) = cmd.lookup_topic_response.as_mut() {
        r.proxy_through_service_url = Some(true);
        new_cmd = Some(cmd.encode_to_vec());
    }
    let cmd_bytes = new_cmd.as_deref().unwrap_or(cmd_bytes);
    let needs_checksum =
        !rest.is_empty() && (rest.len() < 2 || u16::from_be_bytes([rest[0], rest[1]]) != MAGIC);
    let extra = if needs_checksum { 6 } else { 0 };
    let total = 4 + cmd_bytes.len() + extra + rest.len();
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(cmd_bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(cmd_bytes);
    if needs_checksum {
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&CRC32C.checksum(rest).to_be_bytes());
    }
    out.extend_from_slice(rest);
    Ok(())
}
