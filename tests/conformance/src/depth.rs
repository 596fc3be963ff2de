//! The case of [`oona_core::Transport::depth`]: a group's depth follows
//! what it was handed and what it settled, on the broker's own counters.

use std::time::Duration;

use oona_core::{Depth, Envelope, ErrorKind, StartPosition, Subscription, Topic};

use crate::support::{
    check, expect_delivery, failed, group, kind_of, left_out, subscribe, take_acking, with_cx,
    Context, Cx,
};
use crate::{CaseError, CaseResult, Fixture};

/// Extra. Depth: a group that never subscribed is `NotFound`; with six
/// messages published and two handed out unsettled, the group's depth
/// totals six (pending at most six); two acks bring it to four, the rest
/// to zero. Brokers update their counters asynchronously, so each figure
/// need only be reached within the case's wait.
pub async fn depth_follows_settlement(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, depth_follows_settlement_in)
}

async fn depth_follows_settlement_in(cx: &Cx<'_>) -> CaseResult {
    let topic = cx.topic("telemetry")?;
    let c = cx.client().await?;
    if !c.capabilities().depth {
        return Err(left_out("the transport cannot read depths"));
    }
    let g = group("depth");
    let before = c.depth(&topic, &g).await;
    check!(
        matches!(&before, Err(e) if e.kind() == ErrorKind::NotFound),
        "depth of a group that never subscribed: {}, expected not_found",
        kind_of(&before)
    );
    let sub = Subscription::new(topic.clone(), g.clone())
        .start(StartPosition::Earliest)
        .ack_deadline(Duration::from_secs(30))
        .prefetch(2);
    let mut s = subscribe(&c, sub).await?;
    let sent: Vec<Envelope> = (0..6)
        .map(|i| Envelope::builder(topic.clone(), format!("{{\"d\":{i}}}")).build())
        .collect();
    c.publish_batch(sent).await.ctx("publish_batch")?;
    let first = expect_delivery(&mut s, cx.t.wait(), "delivery 1 of 2").await?;
    let second = expect_delivery(&mut s, cx.t.wait(), "delivery 2 of 2").await?;
    let d = depth_reaches(
        cx,
        c.as_ref(),
        &topic,
        &g,
        6,
        "six published, two unsettled",
    )
    .await?;
    check!(d.pending <= 6, "pending {} of six published", d.pending);
    first.ack().await.ctx("ack")?;
    second.ack().await.ctx("ack")?;
    depth_reaches(cx, c.as_ref(), &topic, &g, 4, "two of six acked").await?;
    take_acking(&mut s, 4, cx.t.wait(), "the other four").await?;
    depth_reaches(cx, c.as_ref(), &topic, &g, 0, "all six acked").await?;
    Ok(())
}

/// Poll the group's depth until its total is `want`; the last depth read
/// fails the case when it never gets there.
async fn depth_reaches(
    cx: &Cx<'_>,
    c: &dyn oona_core::Transport,
    topic: &Topic,
    g: &oona_core::Name,
    want: u64,
    what: &str,
) -> Result<Depth, CaseError> {
    let until = tokio::time::Instant::now() + cx.t.wait();
    loop {
        let d = c.depth(topic, g).await.ctx("depth")?;
        if d.total() == want {
            return Ok(d);
        }
        if tokio::time::Instant::now() >= until {
            return Err(failed(format!(
                "depth {d:?} (total {}) after {what}, expected a total of {want}",
                d.total()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
