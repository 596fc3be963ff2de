//! A node that announces itself, heartbeats and runs until SIGINT or
//! SIGTERM: `cargo run -p oona --example node -- <name>`.

use std::time::Duration;

use oona::node::Node;
use oona::Bus;

#[tokio::main]
async fn main() -> oona::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "demo".into());
    let bus = Bus::new(oona::from_env().await?).with_sender_id(name.clone());
    let node = Node::builder(name, env!("CARGO_PKG_VERSION"))
        .action("demo")
        .protocol("oona")
        .tag("example")
        .heartbeat_every(Duration::from_secs(1))
        .initialize(bus)
        .await?;
    eprintln!("node {} up; SIGTERM or Ctrl-C stops it", node.id());
    let summary = node.run_until_signal().await?;
    eprintln!("node stopped: {} runners drained", summary.runners.len());
    Ok(())
}
