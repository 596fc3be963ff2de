//! The case of the admin calls ([`oona_core::Transport::list_topics`],
//! [`oona_core::Transport::describe_topic`],
//! [`oona_core::Transport::delete_group`]): what the operator CLI shows is
//! what the broker holds, and removing a group leaves the rest alone.

use std::time::Duration;

use oona_core::{Envelope, ErrorKind, Name, StartPosition, Subscription, Topic, TopicInfo};

use crate::support::{
    check, expect_delivery, failed, group, kind_of, left_out, subscribe, with_cx, Context, Cx,
};
use crate::CaseResult;
use crate::{CaseError, Fixture};

/// Extra. Admin: a topic never written is `NotFound`; with three messages
/// published and two groups subscribed (one holding a message unsettled),
/// the topic is listed, describes 3 messages where the broker counts them,
/// both groups with a total depth of 3, and a member in the one holding;
/// deleting that group is refused (temporary) while its consumer reads;
/// once closed, deleting removes it (its depth is `NotFound`, a second
/// delete is `NotFound`) and leaves the messages and the other group (at
/// depth 3, no members) as they were.
pub async fn admin_describes_topics_and_groups(fx: &dyn Fixture) -> CaseResult {
    with_cx!(fx, admin_in)
}

async fn admin_in(cx: &Cx<'_>) -> CaseResult {
    let c = cx.client().await?;
    if !c.capabilities().admin {
        return Err(left_out("the transport has no admin calls"));
    }
    let never = cx.topic("telemetry")?;
    let r = c.describe_topic(&never).await;
    check!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::NotFound),
        "describe of a topic never written: {}, expected not_found",
        kind_of(&r)
    );
    let topic = cx.topic("telemetry")?;
    let (held, idle) = (group("held"), group("idle"));
    let sub = |g: &Name| {
        Subscription::new(topic.clone(), g.clone())
            .start(StartPosition::Earliest)
            .ack_deadline(Duration::from_secs(60))
            .prefetch(1)
    };
    let mut s = subscribe(&c, sub(&held)).await?;
    subscribe(&c, sub(&idle)).await?.close().await;
    let sent: Vec<Envelope> = (0..3)
        .map(|i| Envelope::builder(topic.clone(), format!("{{\"a\":{i}}}")).build())
        .collect();
    c.publish_batch(sent).await.ctx("publish_batch")?;
    let d = expect_delivery(&mut s, cx.t.wait(), "a delivery to hold").await?;
    let info = describe_until(cx, c.as_ref(), &topic, "both groups at depth 3", |i| {
        [&held, &idle].iter().all(|g| {
            i.group(g)
                .is_some_and(|g| g.depth.is_some_and(|d| d.total() == 3))
        }) && i.group(&held).is_some_and(|g| !g.members.is_empty())
    })
    .await?;
    check!(info.partitions >= 1, "{} partitions", info.partitions);
    check!(
        info.messages.is_none_or(|n| n == 3),
        "{:?} messages retained, expected 3",
        info.messages
    );
    listed_within(cx, c.as_ref(), &topic).await?;
    // A running consumer would bring the group back: refused, for now.
    let live = c.delete_group(&topic, &held).await;
    check!(
        matches!(&live, Err(e) if e.is_temporary()),
        "deleting a group with a consumer reading: {}, expected a temporary error",
        kind_of(&live)
    );
    d.ack().await.ctx("ack")?;
    s.close().await;
    delete_within(cx, c.as_ref(), &topic, &held).await?;
    let after = describe_until(
        cx,
        c.as_ref(),
        &topic,
        "the deleted group gone, the other at depth 3 without members",
        |i| {
            i.group(&held).is_none()
                && i.group(&idle).is_some_and(|g| {
                    g.members.is_empty() && g.depth.is_some_and(|d| d.total() == 3)
                })
        },
    )
    .await?;
    check!(
        after.messages.is_none_or(|n| n == 3),
        "{:?} messages retained after deleting a group, expected 3",
        after.messages
    );
    let depth = c.depth(&topic, &held).await;
    check!(
        matches!(&depth, Err(e) if e.kind() == ErrorKind::NotFound),
        "depth of a deleted group: {}, expected not_found",
        kind_of(&depth)
    );
    let again = c.delete_group(&topic, &held).await;
    check!(
        matches!(&again, Err(e) if e.kind() == ErrorKind::NotFound),
        "deleting a deleted group: {}, expected not_found",
        kind_of(&again)
    );
    Ok(())
}

/// Describe `topic` until `ok` holds; the last description fails the case
/// when it never does (brokers update their records asynchronously).
async fn describe_until(
    cx: &Cx<'_>,
    c: &dyn oona_core::Transport,
    topic: &Topic,
    what: &str,
    ok: impl Fn(&TopicInfo) -> bool,
) -> Result<TopicInfo, CaseError> {
    let until = tokio::time::Instant::now() + cx.t.wait();
    loop {
        let info = c.describe_topic(topic).await.ctx("describe_topic")?;
        if ok(&info) {
            return Ok(info);
        }
        if tokio::time::Instant::now() >= until {
            return Err(failed(format!("expected {what}, described {info:?}")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn listed_within(cx: &Cx<'_>, c: &dyn oona_core::Transport, topic: &Topic) -> CaseResult {
    let until = tokio::time::Instant::now() + cx.t.wait();
    loop {
        let topics = c.list_topics().await.ctx("list_topics")?;
        check!(
            topics.windows(2).all(|w| w[0] < w[1]),
            "list_topics is not sorted and free of repeats"
        );
        if topics.contains(topic) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= until {
            return Err(failed(format!(
                "{topic} not among the {} topics listed",
                topics.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Delete `group`, retrying while the broker still counts the closed
/// consumer as a member (a temporary error).
async fn delete_within(
    cx: &Cx<'_>,
    c: &dyn oona_core::Transport,
    topic: &Topic,
    g: &Name,
) -> CaseResult {
    let until = tokio::time::Instant::now() + cx.t.wait();
    loop {
        match c.delete_group(topic, g).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_temporary() && tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(failed(format!("delete_group {g}: {e}"))),
        }
    }
}
