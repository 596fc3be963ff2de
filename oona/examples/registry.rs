//! Print the live table of nodes as they join, leave and expire.
//!
//! ```sh
//! OONA_URL=redis://127.0.0.1:6379/0 cargo run -p oona --example registry --features redis
//! # elsewhere: OONA_URL=... cargo run -p oona --example node --features redis -- tezzeret
//! ```

use oona::discovery::{NodeEvent, NodeRegistry, RegistryHandle};
use oona::{Bus, Shutdown};

fn print(reg: &RegistryHandle, why: &str) {
    println!("\n{why}");
    println!(
        "{:<12} {:<38} {:<8} {:<9} {:>5} {:>9}",
        "NODE", "ID", "VERSION", "STATUS", "BEATS", "LAST SEEN"
    );
    for n in reg.table() {
        println!(
            "{:<12} {:<38} {:<8} {:<9} {:>5} {:>7}ms",
            n.node_name,
            n.node_id,
            n.version,
            n.status,
            n.heartbeats,
            n.last_seen.as_millis()
        );
    }
}

#[tokio::main]
async fn main() -> oona::Result<()> {
    let bus = Bus::new(oona::from_env().await?).with_sender_id("registry");
    let stop = Shutdown::new();
    let reg = NodeRegistry::new(&bus).start(stop.clone()).await?;
    let mut events = reg.events();
    println!("registry: watching oona.nodes.heartbeat and oona.nodes.introspection; Ctrl-C stops");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            e = events.recv() => match e {
                Ok(NodeEvent::Joined(n)) => print(&reg, &format!("+ {} joined", n.node_name)),
                Ok(NodeEvent::Left(n)) => print(&reg, &format!("- {} left (shut down)", n.node_name)),
                Ok(NodeEvent::Expired(n)) => print(&reg, &format!("x {} expired (missed heartbeats)", n.node_name)),
                Ok(_) => {}
                Err(_) => break,
            },
        }
    }
    stop.trigger();
    reg.join().await;
    bus.close().await
}
