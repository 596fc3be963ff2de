//! Access control by plane, the same check on every broker: a client
//! logged in as a user the broker limits to the telemetry plane publishes
//! there, and is refused `control.*` (publish) and `innovation.*`
//! (subscribe) with a permanent `Unauthorized` error naming the topic.
//! Each transport's own test makes the user (Redis ACL, Kafka ACLs, ...)
//! and calls [`telemetry_user_refused_other_planes`].

use oona_core::{Envelope, ErrorKind, Name, Subscription, Topic, Transport};

/// Run the check on `t` (logged in as the telemetry-only user); panics
/// with what went wrong. Prints the errors the user got.
pub async fn telemetry_user_refused_other_planes(t: &dyn Transport) {
    let id = format!("{:016x}", rand::random::<u64>());
    let allowed = Topic::new(format!("telemetry.acl{id}.stats")).unwrap();
    let control = Topic::new(format!("control.acl{id}.commands")).unwrap();
    let innovation = Topic::new(format!("innovation.acl{id}.reports")).unwrap();
    let message = |topic: &Topic| {
        Envelope::builder(topic.clone(), "{}")
            .sender_id("acl")
            .build()
    };
    t.publish(message(&allowed)).await.expect("its own plane");
    let e = t
        .publish(message(&control))
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
    t.delete_topic(&allowed).await.ok();
}
