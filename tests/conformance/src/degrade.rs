//! The degradation case: publishing through a cut with a spool
//! ([`oona_core::degrade::Spooled`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use oona_core::degrade::{BreakerConfig, SpoolConfig, Spooled};
use oona_core::{Envelope, StartPosition, Subscription, Transport};

use crate::support::{check, failed, group, hook, next_within, random_suffix, subscribe, Cx};
use crate::{CaseResult, Fixture};

const TOTAL: usize = 300;
const CUT_AFTER: usize = 80;
const KEYS: usize = 4;

/// Case 12b: through a spool, every publish returns `Ok` while the
/// connections are cut (the publishes of the cut wait in the spool), and
/// after the restore every one of them is on the broker, in order per key
/// (read by a new group afterwards).
pub async fn spooled_publishes_survive_a_cut(fx: &dyn Fixture) -> CaseResult {
    let cx = Cx::new(fx);
    let r = spooled_in(&cx).await;
    cx.finish(r).await
}

fn message(topic: &oona_core::Topic, i: usize) -> Envelope {
    Envelope::builder(topic.clone(), format!("{{\"i\":{i}}}"))
        .sender_id("oona-conformance")
        .key(format!("k{}", i % KEYS))
        .build()
}

async fn spooled_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("telemetry")?;
    let dir = std::env::temp_dir().join(format!("oona-conformance-spool-{}", random_suffix()));
    let breaker = BreakerConfig::default()
        .call_timeout(cx.t.scaled(Duration::from_secs(2)))
        .open_for(Duration::from_millis(200))
        .max_open_for(cx.t.scaled(Duration::from_secs(1)));
    let p = Arc::new(
        Spooled::new(cx.client().await?, SpoolConfig::new(&dir), breaker)
            .map_err(|e| failed(format!("open the spool: {e}")))?,
    );
    let publisher = {
        let (p, topic) = (Arc::clone(&p), topic.clone());
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(TOTAL);
            for i in 0..TOTAL {
                let e = message(&topic, i);
                ids.push(e.event_id.to_string());
                p.publish(e)
                    .await
                    .map_err(|e| failed(format!("publish {i} through the spool failed: {e}")))?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, crate::CaseError>(ids)
        })
    };
    while p.stats().direct + p.stats().spooled < CUT_AFTER as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Err(e) = hook(cx.fx.cut_connections().await, "cut_connections") {
        publisher.abort();
        p.close().await.ok();
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    tokio::time::sleep(cx.t.scaled(Duration::from_secs(2))).await;
    hook(cx.fx.restore_connections().await, "restore_connections")?;
    let ids = publisher
        .await
        .map_err(|e| failed(format!("publisher: {e}")))??;
    let drained = p.drained(cx.t.wait() * 4).await;
    let stats = p.stats();
    check!(
        drained,
        "the spool did not drain after the restore: {stats:?}"
    );
    check!(
        stats.spooled > 0,
        "nothing was spooled during the cut: {stats:?}"
    );

    // Read the topic afterwards with a new group: the broker's order is
    // the spool's (a consumer cut too would see its own redeliveries).
    let c = cx.client().await?;
    let sub = Subscription::new(topic.clone(), group("spooled")).start(StartPosition::Earliest);
    let mut s = subscribe(&c, sub).await?;
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut last: HashMap<String, usize> = HashMap::new();
    let (mut transient, mut deliveries) = (0, 0);
    while want.iter().any(|id| !seen.contains_key(*id)) {
        let Some(d) = next_within(&mut s, cx.t.wait() * 2, &mut transient).await? else {
            let missing = want.iter().filter(|id| !seen.contains_key(**id)).count();
            return Err(failed(format!(
                "{missing} of {TOTAL} Ok'd publishes never delivered"
            )));
        };
        deliveries += 1;
        let env = d.envelope();
        let i: usize = serde_i(&env.payload)?;
        let n = seen.entry(env.event_id.to_string()).or_default();
        *n += 1;
        if *n == 1 {
            let key = env.key.clone().unwrap_or_default();
            if let Some(prev) = last.insert(key.clone(), i) {
                check!(prev < i, "key {key}: message {i} after {prev}");
            }
        }
        let _ = d.ack().await; // a lost ack comes back: counted as a duplicate
    }
    eprintln!(
        "spooled_publishes_survive_a_cut [{}]: {TOTAL} publishes, all Ok ({} direct, {} spooled, \
         {} outages), {deliveries} deliveries, lost 0, {} duplicates, {transient} transient stream errors",
        cx.fx.name(),
        stats.direct,
        stats.spooled,
        stats.outages,
        seen.values().filter(|n| **n > 1).count(),
    );
    p.close().await.ok();
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// The `i` of a [`message`] payload.
fn serde_i(payload: &[u8]) -> Result<usize, crate::CaseError> {
    let text = std::str::from_utf8(payload).unwrap_or_default();
    text.strip_prefix("{\"i\":")
        .and_then(|t| t.strip_suffix('}'))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| failed(format!("payload {text:?} is not the one sent")))
}
