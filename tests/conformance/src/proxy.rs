//! A TCP proxy that can cut connections on demand, for the reconnect case.
//!
//! A transport fixture points its clients at [`TcpProxy::addr`] instead of
//! the broker; [`TcpProxy::cut`] then breaks every live connection and
//! refuses new ones (the listening socket is closed, so clients see
//! "connection refused"), and [`TcpProxy::restore`] listens again on the
//! same address.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use oona_conformance::proxy::TcpProxy;
//! let proxy = TcpProxy::start("127.0.0.1:6379")?;
//! let url = format!("redis://{}/0", proxy.addr());
//! // ... connect clients to `url` ...
//! proxy.cut().await?;
//! proxy.restore().await?;
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A cuttable TCP forwarder on `127.0.0.1`.
#[derive(Debug)]
pub struct TcpProxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    upstream: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    cut: bool,
    accept: Option<JoinHandle<()>>,
    conns: Vec<JoinHandle<()>>,
    accepted: u64,
}

impl TcpProxy {
    /// Listen on `127.0.0.1:<free port>` and forward every connection to
    /// `upstream` (`host:port`, resolved per connection).
    ///
    /// Must be called inside a tokio runtime (the suite's
    /// [`crate::run_with_env`] builds fixtures inside one).
    pub fn start(upstream: impl Into<String>) -> io::Result<TcpProxy> {
        TcpProxy::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream)
    }

    /// [`TcpProxy::start`] on a chosen address: for brokers that tell
    /// their clients where to connect (Kafka's advertised listeners,
    /// Pulsar's lookups), the broker is set up to advertise this address,
    /// so every connection of every client passes the proxy.
    pub fn start_on(listen_on: SocketAddr, upstream: impl Into<String>) -> io::Result<TcpProxy> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "TcpProxy::start must be called inside a tokio runtime",
            ));
        }
        let listener = listen(listen_on)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            addr,
            upstream: upstream.into(),
            state: Mutex::new(State::default()),
        });
        let handle = tokio::spawn(accept_loop(Arc::clone(&inner), listener));
        inner.lock().accept = Some(handle);
        Ok(TcpProxy { inner })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The upstream address.
    pub fn upstream(&self) -> &str {
        &self.inner.upstream
    }

    /// Drop every live connection and stop listening: new connections are
    /// refused until [`TcpProxy::restore`]. When it returns, the sockets are
    /// closed. Idempotent.
    pub async fn cut(&self) -> io::Result<()> {
        let tasks: Vec<JoinHandle<()>> = {
            let mut st = self.inner.lock();
            st.cut = true;
            st.accept
                .take()
                .into_iter()
                .chain(st.conns.drain(..))
                .collect()
        };
        for t in tasks {
            t.abort();
            // An aborted task drops its sockets before its handle resolves.
            let _ = t.await;
        }
        Ok(())
    }

    /// Listen again on the same address. Idempotent.
    pub async fn restore(&self) -> io::Result<()> {
        if !self.inner.lock().cut {
            return Ok(());
        }
        // The port was just released; SO_REUSEADDR makes the bind succeed
        // at once, the retry covers slow kernels.
        let mut last = None;
        for _ in 0..50 {
            match listen(self.inner.addr) {
                Ok(listener) => {
                    let mut st = self.inner.lock();
                    st.cut = false;
                    st.accept = Some(tokio::spawn(accept_loop(Arc::clone(&self.inner), listener)));
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("could not listen again")))
    }

    /// Whether the proxy is cut.
    pub fn is_cut(&self) -> bool {
        self.inner.lock().cut
    }

    /// Connections forwarded so far (live or not).
    pub fn accepted(&self) -> u64 {
        self.inner.lock().accepted
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(a) = st.accept.take() {
            a.abort();
        }
        for c in st.conns.drain(..) {
            c.abort();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep
        // going rather than poisoning the fixture.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Transient accept errors (e.g. too many open files): back off.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        let upstream = inner.upstream.clone();
        let mut st = inner.lock();
        if st.cut {
            // Raced with cut(): the client must not get through.
            continue;
        }
        st.accepted += 1;
        st.conns.retain(|c| !c.is_finished());
        st.conns.push(tokio::spawn(forward(client, upstream)));
    }
}

async fn forward(mut client: TcpStream, upstream: String) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        // Dropping the client socket tells it the broker is unreachable.
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
