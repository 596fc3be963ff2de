//! Nodes and the registry on every transport: three nodes join, one
//! leaves by shutting down, one stops heartbeating (dropped, as a crashed
//! process) and expires, and the table follows.

use std::time::Duration;

use oona::discovery::{NodeEvent, NodeRegistry};
use oona::node::Node;
use oona::{Bus, Shutdown};

#[macro_use]
mod common;

async fn bus(url: &str, name: &str) -> Bus {
    Bus::new(oona::connect(url).await.unwrap()).with_sender_id(name)
}

/// The next event about one of `ids`.
async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
    ids: &[String],
) -> NodeEvent {
    let id_of = |e: &NodeEvent| match e {
        NodeEvent::Joined(n) | NodeEvent::Left(n) | NodeEvent::Expired(n) => n.node_id.clone(),
        _ => String::new(),
    };
    tokio::time::timeout(common::GUARD, async {
        loop {
            let e = rx.recv().await.unwrap();
            if ids.contains(&id_of(&e)) {
                return e;
            }
        }
    })
    .await
    .expect("no registry event")
}

async fn nodes_join_leave_and_expire(url: &str) {
    let stop = Shutdown::new();
    let registry = NodeRegistry::new(&bus(url, "registry").await)
        .missed(3)
        .start(stop.clone())
        .await
        .unwrap();
    let mut events = registry.events();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let n = Node::builder(format!("svc-{i}"), "1.2.3")
            .tag("e2e")
            .action("compile")
            .heartbeat_every(Duration::from_millis(200))
            .initialize(bus(url, &format!("svc-{i}")).await)
            .await
            .unwrap();
        nodes.push(n);
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.id().to_string()).collect();
    for _ in 0..3 {
        let e = next_event(&mut events, &ids).await;
        assert!(matches!(e, NodeEvent::Joined(_)), "{e:?}");
    }
    let ours = |reg: &oona::discovery::RegistryHandle| {
        reg.table()
            .into_iter()
            .filter(|n| ids.contains(&n.node_id))
            .collect::<Vec<_>>()
    };
    let table = ours(&registry);
    assert_eq!(table.len(), 3, "{table:?}");
    assert!(table
        .iter()
        .all(|n| n.version == "1.2.3" && n.status == "up"));

    // svc-0 shuts down: it leaves.
    let summary = nodes.remove(0).shutdown().await.unwrap();
    assert_eq!(summary.not_drained, 0);
    match next_event(&mut events, &ids).await {
        NodeEvent::Left(n) => assert_eq!(n.node_name, "svc-0"),
        e => panic!("expected svc-0 to leave: {e:?}"),
    }
    // svc-1 stops heartbeating without a word: it expires.
    drop(nodes.remove(0));
    match next_event(&mut events, &ids).await {
        NodeEvent::Expired(n) => assert_eq!(n.node_name, "svc-1"),
        e => panic!("expected svc-1 to expire: {e:?}"),
    }
    let table = ours(&registry);
    assert_eq!(table.len(), 1, "{table:?}");
    assert_eq!(table[0].node_name, "svc-2");
    assert!(table[0].heartbeats >= 2, "{table:?}");
    assert_eq!(table[0].tags, ["e2e"], "tags from the announcement");
    nodes.remove(0).shutdown().await.unwrap();
    stop.trigger();
    registry.join().await;
}

on_every_transport!(nodes_join_leave_and_expire);
