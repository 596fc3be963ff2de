#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use oona::config::parse_duration;
use oona::node::{Node, NodeBuilder, NodeSummary};
use oona::oona_contracts::{BlueprintCompiled, BlueprintSubmitted};
use oona::{Bus, Error, ErrorKind, HandlerError, HandlerResult, Incoming, Router, Timestamp};
use sha2::{Digest as _, Sha256};

/// The operators this compiler has kernels for.
pub const SUPPORTED_OPS: &[&str] = &[
    "conv2d",
    "batch_norm",
    "relu",
    "residual_add",
    "linear",
    "attention",
    "layer_norm",
    "gelu",
];

/// The blueprint metadata key listing its operators, comma-separated
/// (`BlueprintSubmitted` has no field for the graph).
pub const OPS_KEY: &str = "ops";

/// The service's settings, from the environment (see the README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `OONA_URL`: the broker (`memory://` by default).
    pub url: String,
    /// `OONA_SERVICE_NAME`: the node's name and the consumer group
    /// (default `tezzeret`).
    pub name: String,
    /// `OONA_NODE_ID`: the node's id (default: a fresh UUID).
    pub node_id: Option<String>,
    /// `OONA_CONCURRENCY`: blueprints compiled at once (default 4).
    pub concurrency: usize,
    /// `OONA_HANDLER_TIMEOUT`: longest one compilation may take before it
    /// is retried (default `60s`).
    pub handler_timeout: Duration,
    /// `OONA_DRAIN_TIMEOUT`: longest a shutdown waits for compilations in
    /// flight (default `30s`).
    pub drain_timeout: Duration,
    /// `TEZZERET_WORK_PER_OP`: time a compilation spends per operator
    /// (default `0ms`; a stand-in for the real compiler's work).
    pub work_per_op: Duration,
}

impl Config {
    /// Read the settings from the process environment.
    pub fn from_env() -> oona::Result<Config> {
        Config::from_vars(|k| std::env::var(k).ok())
    }

    /// Read the settings from `var` (the environment, or a map in tests).
    /// A value that does not parse is [`ErrorKind::ConfigInvalid`] naming
    /// the variable.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> oona::Result<Config> {
        let duration = |k: &str, default: Duration| -> oona::Result<Duration> {
            match var(k) {
                None => Ok(default),
                Some(v) => parse_duration(&v).map_err(|e| bad(k, &v, &e)),
            }
        };
        let concurrency = match var("OONA_CONCURRENCY") {
            None => 4,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(bad(
                        "OONA_CONCURRENCY",
                        &v,
                        "expected a whole number above 0",
                    ))
                }
            },
        };
        Ok(Config {
            url: var(oona::ENV_URL).unwrap_or_else(|| oona::DEFAULT_URL.to_string()),
            name: var("OONA_SERVICE_NAME").unwrap_or_else(|| "tezzeret".to_string()),
            node_id: var("OONA_NODE_ID"),
            concurrency,
            handler_timeout: duration("OONA_HANDLER_TIMEOUT", Duration::from_secs(60))?,
            drain_timeout: duration("OONA_DRAIN_TIMEOUT", NodeBuilder::DEFAULT_DRAIN)?,
            work_per_op: duration("TEZZERET_WORK_PER_OP", Duration::ZERO)?,
        })
    }
}

fn bad(var: &str, value: &str, why: &str) -> Error {
    Error::new(ErrorKind::ConfigInvalid, format!("{var}={value:?}: {why}"))
}

/// What every compilation shares.
#[derive(Debug)]
pub struct Tezzeret {
    bus: Bus,
    work_per_op: Duration,
}

/// Compile one blueprint into its kernel: an unsupported or missing graph
/// is a permanent failure (dead-lettered with the reason).
pub fn compile(
    bp: &BlueprintSubmitted,
    compiled_by: &str,
) -> Result<BlueprintCompiled, HandlerError> {
    let ops: Vec<&str> = match bp.metadata.get(OPS_KEY) {
        Some(ops) if !ops.trim().is_empty() => ops.split(',').map(str::trim).collect(),
        _ => {
            return Err(HandlerError::permanent(format!(
                "blueprint {} has no operators (metadata \"{OPS_KEY}\")",
                bp.blueprint_id
            )))
        }
    };
    if let Some(op) = ops.iter().find(|op| !SUPPORTED_OPS.contains(op)) {
        return Err(HandlerError::permanent(format!(
            "blueprint {}: unsupported operator {op:?}",
            bp.blueprint_id
        )));
    }
    // The "kernel": a digest of the graph, the same for the same graph.
    let kernel = Sha256::digest(ops.join(",").as_bytes());
    let hex: String = kernel.iter().map(|b| format!("{b:02x}")).collect();
    Ok(BlueprintCompiled {
        blueprint_id: bp.blueprint_id.clone(),
        kernel_artifact_id: format!("krn-{}", &hex[..16]),
        compiled_by: compiled_by.to_string(),
        checksum_sha256: hex,
        size_bytes: kernel.len() as u64,
        op_count: u32::try_from(ops.len()).map_err(|_| "more than u32::MAX operators")?,
        ..Default::default()
    })
}

/// The handler of `compilation.blueprint.submitted`.
async fn on_submitted(tz: Arc<Tezzeret>, msg: Incoming<BlueprintSubmitted>) -> HandlerResult {
    let started = Instant::now();
    let mut kernel = compile(msg.value(), tz.bus.sender_id())?;
    tokio::time::sleep(tz.work_per_op * kernel.op_count).await;
    kernel.compile_duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    kernel.compiled_at_ms = i64::try_from(Timestamp::now().unix_millis()).unwrap_or(i64::MAX);
    // The kernel carries the blueprint's correlation id and trace, and its
    // event id as causation (oona::context).
    tz.bus
        .message_contract(&kernel)
        .key(&kernel.blueprint_id)
        .send()
        .await?;
    tracing::debug!(blueprint = %kernel.blueprint_id, kernel = %kernel.kernel_artifact_id, "compiled");
    Ok(())
}

/// The service's routes on `bus`.
pub fn router(bus: &Bus, config: &Config) -> Router<Tezzeret> {
    Router::new(bus, config.name.clone())
        .with_state(Tezzeret {
            bus: bus.clone(),
            work_per_op: config.work_per_op,
        })
        .concurrency(config.concurrency)
        .handler_timeout(config.handler_timeout)
        .contract(on_submitted)
}

/// Connect, announce the node, compile until SIGINT or SIGTERM, drain.
pub async fn run(config: Config) -> oona::Result<NodeSummary> {
    let transport = oona::connect(&config.url).await?;
    // The node id names the instance in the registry and as sender.
    let node_id = config
        .node_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let short: String = node_id.chars().take(8).collect();
    let bus = Bus::new(transport).with_sender_id(format!("{}-{short}", config.name));
    let node = Node::builder(config.name.clone(), env!("CARGO_PKG_VERSION"))
        .node_id(node_id)
        .action("compile")
        .drain_timeout(config.drain_timeout);
    let node = node.initialize(bus.clone()).await?;
    let routes = router(&bus, &config);
    tracing::info!(
        node = %config.name,
        id = node.id(),
        url = %redact(&config.url),
        group = %config.name,
        concurrency = config.concurrency,
        "tezzeret started: compiling compilation.blueprint.submitted"
    );
    node.serve(routes).await
}

/// `url` without its secrets.
pub fn redact(url: &str) -> String {
    oona::ConnectUrl::parse(url)
        .map(|u| u.redacted())
        .unwrap_or_else(|_| "<a URL that does not parse>".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn bp(ops: Option<&str>) -> BlueprintSubmitted {
        BlueprintSubmitted {
            blueprint_id: "bp-1".into(),
            metadata: ops
                .map(|o| (OPS_KEY.to_string(), o.to_string()))
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn compiles_supported_graphs_the_same_way_every_time() {
        let a = compile(&bp(Some("conv2d,relu")), "tz-1").unwrap();
        let b = compile(&bp(Some("conv2d, relu")), "tz-2").unwrap();
        assert_eq!(a.kernel_artifact_id, b.kernel_artifact_id);
        assert_eq!(a.op_count, 2);
        assert_eq!(a.checksum_sha256.len(), 64);
        let c = compile(&bp(Some("relu,conv2d")), "tz-1").unwrap();
        assert_ne!(a.kernel_artifact_id, c.kernel_artifact_id);
    }

    #[test]
    fn refuses_unsupported_or_missing_graphs_permanently() {
        let e = compile(&bp(Some("conv2d,quantum_conv")), "tz").unwrap_err();
        assert!(e.is_permanent());
        assert!(e.message().contains("\"quantum_conv\""), "{e}");
        let e = compile(&bp(None), "tz").unwrap_err();
        assert!(e.is_permanent());
        assert!(e.message().contains("no operators"), "{e}");
    }

    #[test]
    fn config_defaults_and_errors() {
        let none = Config::from_vars(|_| None).unwrap();
        assert_eq!(none.name, "tezzeret");
        assert_eq!(none.concurrency, 4);
        assert_eq!(none.url, oona::DEFAULT_URL);
        let vars: HashMap<&str, &str> = [
            ("OONA_URL", "redis://127.0.0.1:6379/0"),
            ("OONA_CONCURRENCY", "8"),
            ("TEZZERET_WORK_PER_OP", "5ms"),
        ]
        .into();
        let c = Config::from_vars(|k| vars.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(
            (c.concurrency, c.work_per_op),
            (8, Duration::from_millis(5))
        );
        let e = Config::from_vars(|k| (k == "OONA_CONCURRENCY").then(|| "0".into())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains("OONA_CONCURRENCY"), "{e}");
        let e =
            Config::from_vars(|k| (k == "OONA_DRAIN_TIMEOUT").then(|| "soon".into())).unwrap_err();
        assert!(e.to_string().contains("OONA_DRAIN_TIMEOUT=\"soon\""), "{e}");
    }
}
