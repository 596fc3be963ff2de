//! Batched acknowledgements.
//!
//! An ack is queued and `Delivery::ack` returns at once; one task drains the
//! queue and sends everything queued since its last write as one pipeline
//! (one XACK per stream and group, with all their ids). Under load many
//! acks share a round trip; when idle an ack is written immediately. A
//! failed write is retried (the connection manager reconnects meanwhile);
//! if it never succeeds the entries stay pending and are redelivered after
//! the ack deadline, so nothing is lost. `close` flushes the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use oona_core::{Error, ErrorKind, Result};
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

type Batch = Vec<(Arc<str>, Arc<str>, Vec<String>)>;

enum Msg {
    Ack {
        key: Arc<str>,
        group: Arc<str>,
        id: String,
    },
    Flush(oneshot::Sender<()>),
}

/// The sending side; cheap to share.
#[derive(Debug)]
pub(crate) struct Acker {
    tx: mpsc::UnboundedSender<Msg>,
    closing: Arc<AtomicBool>,
}

/// Most ids written in one pipeline.
const MAX_BATCH: usize = 4096;
/// Attempts of one write once the transport is closing.
const CLOSING_ATTEMPTS: u32 = 5;

impl Acker {
    pub(crate) fn start(conn: ConnectionManager) -> Acker {
        let (tx, rx) = mpsc::unbounded_channel();
        let closing = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(conn, rx, Arc::clone(&closing)));
        Acker { tx, closing }
    }

    pub(crate) fn ack(&self, key: Arc<str>, group: Arc<str>, id: String) -> Result<()> {
        self.tx
            .send(Msg::Ack { key, group, id })
            .map_err(|_| closed())
    }

    /// Wait until everything queued before this call is written (or given
    /// up on, when the broker stays unreachable while closing).
    pub(crate) async fn flush(&self, closing: bool) {
        if closing {
            self.closing.store(true, Ordering::SeqCst);
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "the Redis transport is closed").with_transport(crate::NAME)
}

async fn run(
    conn: ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    closing: Arc<AtomicBool>,
) {
    // Usually one (stream, group) per batch: a list with pointer checks
    // beats hashing two strings per ack.
    let mut batch: Batch = Vec::new();
    let mut waiters = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut n = 0;
        let mut push = |m: Msg, n: &mut usize| match m {
            Msg::Ack { key, group, id } => {
                match batch.iter_mut().find(|(k, g, _)| {
                    Arc::ptr_eq(k, &key) && Arc::ptr_eq(g, &group) || (**k == *key && **g == *group)
                }) {
                    Some((_, _, ids)) => ids.push(id),
                    None => batch.push((key, group, vec![id])),
                }
                *n += 1;
            }
            Msg::Flush(w) => waiters.push(w),
        };
        push(first, &mut n);
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => push(m, &mut n),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write(&conn, &batch, &closing).await;
            batch.clear();
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

async fn write(conn: &ConnectionManager, batch: &Batch, closing: &AtomicBool) {
    let mut pipe = redis::pipe();
    for (key, group, ids) in batch {
        pipe.cmd("XACK").arg(&**key).arg(&**group).arg(ids).ignore();
    }
    let mut delay = Duration::from_millis(20);
    let mut attempts = 0u32;
    loop {
        let mut c = conn.clone();
        match pipe.query_async::<()>(&mut c).await {
            Ok(()) => return,
            Err(e) => {
                attempts += 1;
                if closing.load(Ordering::SeqCst) && attempts >= CLOSING_ATTEMPTS {
                    tracing::warn!(error = %e, "giving up on acks while closing; those entries will be redelivered after their ack deadline");
                    return;
                }
                tracing::debug!(error = %e, attempts, "ack write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}
