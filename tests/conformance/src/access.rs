//! Access control by plane, the same check on every broker: a client
//! logged in as a user the broker limits to the telemetry plane publishes
//! there, and is refused `control.*` (publish) and `innovation.*`
//! (subscribe) with a permanent `Unauthorized` error naming the topic.
//! Each transport's own test makes the user (Redis ACL, Kafka ACLs, ...)
//! and calls [`telemetry_user_refused_other_planes`].

use oona_core::{Envelope, ErrorKind, Name, Subscription, Topic, Transport};

/// The three topics of the check: one per plane, with a random segment.
#[derive(Debug, Clone)]
pub struct PlaneTopics {
    /// `telemetry.acl<id>.stats`: the user's own plane.
    pub allowed: Topic,
    /// `control.acl<id>.commands`: refused for publishing.
    pub control: Topic,
    /// `innovation.acl<id>.reports`: refused for subscribing.
    pub innovation: Topic,
}

impl PlaneTopics {
    /// Fresh topics (a broker whose permissions are per topic grants the
    /// user `allowed` before the check).
    pub fn random() -> Self {
        let id = format!("{:016x}", rand::random::<u64>());
        let topic = |name: String| Topic::new(name).expect("a valid topic name");
        PlaneTopics {
            allowed: topic(format!("telemetry.acl{id}.stats")),
            control: topic(format!("control.acl{id}.commands")),
            innovation: topic(format!("innovation.acl{id}.reports")),
        }
    }
}

/// Run the check on `t` (logged in as the telemetry-only user) with fresh
/// topics; panics with what went wrong. Prints the errors the user got.
pub async fn telemetry_user_refused_other_planes(t: &dyn Transport) {
    telemetry_user_refused_on(t, &PlaneTopics::random()).await
}

/// [`telemetry_user_refused_other_planes`] on the given topics.
pub async fn telemetry_user_refused_on(t: &dyn Transport, topics: &PlaneTopics) {
    let PlaneTopics {
        allowed,
        control,
        innovation,
    } = topics;
    let message = |topic: &Topic| {
        Envelope::builder(topic.clone(), "{}")
            .sender_id("acl")
            .build()
    };
    t.publish(message(allowed)).await.expect("its own plane");
    let e = t
        .publish(message(control))
        .await
        .expect_err("a publish to control.*");
    println!("[{}] publish to control.*: {e}", t.name());
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(!e.is_temporary(), "{e}");
    assert!(e.to_string().contains(control.as_str()), "{e}");
    let r = t
        .subscribe(Subscription::new(
            innovation.clone(),
            Name::new("reader").unwrap(),
        ))
        .await;
    let Err(e) = r else {
        panic!("the telemetry user subscribed to innovation.*");
    };
    println!("[{}] subscribe to innovation.*: {e}", t.name());
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(!e.is_temporary(), "{e}");
    assert!(e.to_string().contains(innovation.as_str()), "{e}");
    t.delete_topic(allowed).await.ok();
}
