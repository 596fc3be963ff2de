//! Priority lanes: emergency and high messages overtake normal ones, the
//! same on every transport.
//!
//! A topic whose policy has [`crate::TopicPolicy::with_priority_lanes`] has
//! two lane topics beside it, `<topic>.lane-emergency` and
//! `<topic>.lane-high` (last segments reserved, like `dlq`). The `oona`
//! facade's bus publishes a message of [`Priority::Emergency`] or
//! [`Priority::High`] to its lane, after every publish layer (signatures
//! cover the topic the publisher named), and subscribes a group to the
//! topic and both lanes at once, merged with a bias: a delivery waiting in
//! the emergency lane is handed out before one of the high lane, and that
//! before one of the topic itself. The handler sees the topic the
//! publisher named, and so does a dead letter (it goes to the topic's
//! dead-letter topic, as published, priority included: requeued, it takes
//! its lane again); settlement and attempts are the lane's own
//! subscription's. Each consumer holds three subscriptions (three times
//! the prefetch); the merged stream ends when any lane's does. A lane
//! subscription starts where the subscription says: with `Latest`, start
//! the consumers before turning lanes on for publishers. Receipts name the
//! lane the message went to. Dead-letter and lane topics have no lanes.
//!
//! The bias is strict: a steady flood of emergencies holds normal messages
//! back until it ebbs. Order per key holds within a lane, not across
//! lanes (an emergency overtakes what was published before it, which is the
//! point). `Low` travels with normal messages.
//!
//! On the wire a lane is a plain topic: a reader using only its broker's
//! client subscribes to the three names.

mod reroute;

pub use reroute::{Reroute, Rerouted, REROUTED_HEADER};

use crate::delivery::{Delivery, DeliveryStream};
use crate::envelope::{Envelope, Priority};
use crate::topic::{PolicySet, Topic};

/// The reserved last segment of emergency lanes.
pub const EMERGENCY_LANE: &str = "lane-emergency";
/// The reserved last segment of high lanes.
pub const HIGH_LANE: &str = "lane-high";

/// The topic a message of priority `p` on `topic` travels on: its lane, or
/// `topic` itself for normal and low messages (and for a name too long to
/// take the suffix: such a topic has no lanes, see [`check_lanes`]).
pub fn lane_of(topic: &Topic, p: Priority) -> Topic {
    let suffix = match p {
        Priority::Emergency => EMERGENCY_LANE,
        Priority::High => HIGH_LANE,
        Priority::Normal | Priority::Low => return topic.clone(),
    };
    Topic::new(format!("{topic}.{suffix}")).unwrap_or_else(|_| topic.clone())
}

/// The topic a lane belongs to, when `topic` is a lane.
pub fn base_of(topic: &Topic) -> Option<Topic> {
    let (base, last) = topic.as_str().rsplit_once('.')?;
    if last == EMERGENCY_LANE || last == HIGH_LANE {
        Topic::new(base).ok()
    } else {
        None
    }
}

/// The topics a subscription to `topic` reads, most urgent first.
pub fn lanes(topic: &Topic) -> Vec<Topic> {
    let mut out = Vec::with_capacity(3);
    for p in [Priority::Emergency, Priority::High] {
        let lane = lane_of(topic, p);
        if lane != *topic {
            out.push(lane);
        }
    }
    out.push(topic.clone());
    out
}

/// Whether `topic` has lanes under `policies`: its plane turned them on,
/// it is neither a lane nor a dead-letter topic itself, and its name
/// leaves room for the lanes' suffix.
pub fn laned(topic: &Topic, policies: &PolicySet) -> bool {
    policies.for_topic(topic).priority_lanes
        && !topic.is_dead_letter()
        && base_of(topic).is_none()
        && check_lanes(topic).is_ok()
}

/// Whether `topic`'s lanes can be named: its name must leave room for
/// `.lane-emergency` within [`Topic::MAX_LEN`]. (`Bus::ensure_topic` of
/// the facade refuses a laned topic whose name is longer.)
pub fn check_lanes(topic: &Topic) -> crate::Result<()> {
    let room = Topic::MAX_LEN - EMERGENCY_LANE.len() - 1;
    if topic.as_str().len() <= room {
        return Ok(());
    }
    Err(crate::Error::new(
        crate::ErrorKind::InvalidTopic,
        format!(
            "topic {topic} is {} bytes long: a topic with priority lanes takes at most {room} \
             (its lanes add `.{EMERGENCY_LANE}`)",
            topic.as_str().len()
        ),
    ))
}

/// Send each urgent envelope of a laned topic to its lane.
pub fn route(envelopes: &mut [Envelope], policies: &PolicySet) {
    for e in envelopes {
        if matches!(e.priority, Priority::Emergency | Priority::High) && laned(&e.topic, policies) {
            e.topic = lane_of(&e.topic, e.priority);
        }
    }
}

/// Merge the streams of a topic's lanes, most urgent first (as
/// [`lanes`] lists them): each poll takes from the first stream with a
/// delivery ready. Deliveries, and their dead-letter copies, show the
/// topic the publisher named. The merged stream ends when any lane's ends,
/// and closing it closes every lane.
pub fn merge(streams: Vec<DeliveryStream>) -> DeliveryStream {
    DeliveryStream::merge_biased(streams, named_topic)
}

/// A lane's delivery shows its base topic.
fn named_topic(mut d: Delivery) -> Delivery {
    if let Some(base) = base_of(&d.envelope().topic) {
        d.show_topic(base);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryTransport;
    use crate::transport::Transport;
    use crate::{Name, StartPosition, Subscription, TopicPolicy};
    use futures::StreamExt;

    #[test]
    fn lanes_are_named_beside_the_topic() {
        let t = Topic::new("control.kasmina.commands").unwrap();
        let e = lane_of(&t, Priority::Emergency);
        assert_eq!(e.as_str(), "control.kasmina.commands.lane-emergency");
        assert_eq!(base_of(&e), Some(t.clone()));
        assert_eq!(lane_of(&t, Priority::Low), t);
        assert_eq!(base_of(&t), None);
        assert_eq!(lanes(&t).len(), 3);
        let on = PolicySet::default().with_plane(
            "control",
            TopicPolicy::new(crate::Retention::Indefinite).with_priority_lanes(true),
        );
        assert!(laned(&t, &on));
        assert!(!laned(&e, &on) && !laned(&t.dead_letter(), &on));
        let long = Topic::new(format!("control.{}", "x".repeat(190))).unwrap();
        assert!(!laned(&long, &on), "no room for the lanes' names");
        let e = check_lanes(&long).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidTopic);
    }

    #[tokio::test]
    async fn urgent_messages_overtake_waiting_normal_ones() {
        let t = MemoryTransport::new();
        let topic = Topic::new("control.lanes.cmd").unwrap();
        let policies = PolicySet::default().with_plane(
            "control",
            TopicPolicy::new(crate::Retention::Indefinite).with_priority_lanes(true),
        );
        let mut batch = Vec::new();
        for (i, p) in [
            Priority::Normal,
            Priority::Normal,
            Priority::High,
            Priority::Emergency,
        ]
        .into_iter()
        .enumerate()
        {
            batch.push(
                Envelope::builder(topic.clone(), i.to_string())
                    .priority(p)
                    .build(),
            );
        }
        route(&mut batch, &policies);
        // Routing is done once: a lane topic is not laned again.
        let again = batch.clone();
        route(&mut batch, &policies);
        assert_eq!(batch, again);
        for e in batch {
            t.publish(e).await.unwrap();
        }
        let sub = Subscription::new(topic.clone(), Name::new("g").unwrap())
            .start(StartPosition::Earliest);
        let mut streams = Vec::new();
        for lane in lanes(&topic) {
            let mut s = sub.clone();
            s.topic = lane;
            streams.push(t.subscribe(s).await.unwrap());
        }
        // Let every lane's first read land.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut merged = merge(streams);
        let mut order = Vec::new();
        for _ in 0..4 {
            let d = merged.next().await.unwrap().unwrap();
            assert_eq!(d.envelope().topic, topic, "handlers see the named topic");
            order.push(String::from_utf8(d.envelope().payload.to_vec()).unwrap());
            d.ack().await.unwrap();
        }
        assert_eq!(order, ["3", "2", "0", "1"]);
    }
}
