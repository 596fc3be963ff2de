//! The Grafana dashboard (`dashboards/grafana-oona.json`) queries only
//! metrics that Oona exposes: every `oona_*` name in its expressions is a
//! family on the page of a bus's `Metrics` with every collector attached.

use std::collections::BTreeSet;
use std::sync::Arc;

use oona::audit::DeadLetterAuditor;
use oona::degrade::{BreakerConfig, SpoolConfig, Spooled};
use oona::flow::FlowControl;
use oona::metrics::Metrics;
use oona::priority::Reroute;
use oona::{Bus, Shutdown, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_oona_exposes() {
    let metrics = Metrics::new();
    let memory: Arc<dyn Transport> = Arc::new(oona::memory::MemoryTransport::new());
    let bus = Bus::new(memory.clone()).with_metrics(metrics.clone());
    metrics.watch_flow(&FlowControl::new(8));
    metrics.watch_reroute(&Reroute::new(memory.clone()));
    let dir = std::env::temp_dir().join(format!("oona-dash-{}", uuid::Uuid::new_v4().simple()));
    let spooled = Spooled::new(memory, SpoolConfig::new(&dir), BreakerConfig::default()).unwrap();
    metrics.watch_spooled(Arc::new(spooled));
    let stop = Shutdown::new();
    let audit = DeadLetterAuditor::new(&bus)
        .unwrap()
        .watch("compilation.dash.submitted.dlq")
        .unwrap()
        .start(stop.clone())
        .await
        .unwrap();
    let page = metrics.render();
    let exposed: BTreeSet<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dashboards/grafana-oona.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("oona_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    for name in &queried {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| exposed.contains(f)))
            .unwrap_or(name);
        assert!(
            exposed.contains(family),
            "the dashboard queries {name}, which Oona does not expose"
        );
    }
    stop.trigger();
    audit.join().await;
    let _ = std::fs::remove_dir_all(dir);
}
