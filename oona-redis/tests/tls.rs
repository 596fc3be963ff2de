//! `rediss://` against a genuine `redis-server` started here with TLS, its
//! CA and certificate made at test time with `openssl`: a private CA
//! trusted with `tls_ca_file` carries a round trip; without it the
//! certificate is refused (verification is on by default).
//!
//! The server binary comes from `OONA_TEST_REDIS_SERVER` (written by
//! `scripts/brokers.sh up redis`), else `redis-server` on the PATH; no
//! binary or no `openssl` fails the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use oona_core::{ErrorKind, Topic, Transport};
use oona_redis::RedisTransport;

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl is needed for this test: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`) and a certificate for 127.0.0.1 it signed.
fn certificates(dir: &Path) {
    run(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=oona test CA",
        ],
    );
    run(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn start(dir: &Path, port: u16) -> Server {
    let bin = std::env::var("OONA_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let child = Command::new(&bin)
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-port", &port.to_string()])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
        .args(["--dir", dir.to_str().unwrap(), "--logfile", "redis.log"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    Server(child)
}

async fn connect_when_up(url: &str) -> RedisTransport {
    for _ in 0..100 {
        if let Ok(t) = RedisTransport::connect_url(url).await {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the TLS server at {url} did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_with_tls_ca_file_and_only_then() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("oona-redis-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    certificates(&dir);
    let port = free_port();
    let _server = start(&dir, port);
    let ca = dir.join("ca.pem");
    let url = format!("rediss://127.0.0.1:{port}/0?tls_ca_file={}", ca.display());
    let t = connect_when_up(&url).await;
    let topic = Topic::new("telemetry.tls.check").unwrap();
    oona_conformance::one_round_trip(&t, &topic, Duration::from_secs(10)).await;
    t.close().await.unwrap();

    // The system's roots do not know this CA: refused, and said so.
    let plain = format!("rediss://127.0.0.1:{port}/0?timeout=2s&connect_timeout=2s");
    let r = tokio::time::timeout(Duration::from_secs(30), RedisTransport::connect_url(&plain))
        .await
        .expect("a refused certificate is an error, not a hang");
    let err = r.expect_err("an unknown CA was trusted");
    println!("without tls_ca_file: {err}");
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(!err.is_temporary(), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    // A CA file that does not exist is a configuration error naming it.
    let missing = format!("rediss://127.0.0.1:{port}/0?tls_ca_file=/nonexistent/ca.pem");
    let err = RedisTransport::connect_url(&missing)
        .await
        .expect_err("a missing CA file");
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.to_string().contains("tls_ca_file"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
