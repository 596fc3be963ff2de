//! `TcpProxy` against a local echo server: forwards, cuts live
//! connections, refuses new ones while cut, and works again after restore.

use std::time::Duration;

use oona_conformance::proxy::TcpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    Ok(buf)
}

#[tokio::test]
async fn forwards_cuts_refuses_and_restores() {
    let upstream = echo_server().await;
    let proxy = TcpProxy::start(upstream.to_string()).unwrap();
    assert_ne!(proxy.addr().port(), upstream.port());

    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut a, b"hello").await.unwrap(), b"hello");
    assert_eq!(proxy.accepted(), 1);

    proxy.cut().await.unwrap();
    assert!(proxy.is_cut());
    // The live connection is broken: EOF or an error, never an echo.
    let mut buf = [0u8; 1];
    let _ = a.write_all(b"x").await;
    let r = tokio::time::timeout(Duration::from_secs(2), a.read(&mut buf))
        .await
        .expect("a cut connection must not hang");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "cut connection still answers: {r:?}"
    );
    // New connections are refused.
    assert!(TcpStream::connect(proxy.addr()).await.is_err());

    proxy.restore().await.unwrap();
    assert!(!proxy.is_cut());
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut b, b"again").await.unwrap(), b"again");
    // Idempotent both ways.
    proxy.restore().await.unwrap();
    proxy.cut().await.unwrap();
    proxy.cut().await.unwrap();
}

#[test]
fn start_outside_a_runtime_is_an_error_not_a_panic() {
    let e = TcpProxy::start("127.0.0.1:1").unwrap_err();
    assert!(e.to_string().contains("tokio runtime"), "{e}");
}
