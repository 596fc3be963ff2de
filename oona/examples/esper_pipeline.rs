//! The Esper flows of the platform spec, end to end over Oona.
//!
//! ```text
//! Urza ──compilation.blueprint.submitted──▶ Tezzeret ×3 (one group, competing)
//!                                             │  bad blueprint ─▶ .dlq (reason)
//!      ◀──compilation.blueprint.compiled─────┘
//! Kasmina ──telemetry.seed.health──▶ Tamiyo (group, 4 concurrent, per-seed order)
//!                                 └─▶ Nissa  (group, sees every report too)
//! DLQ auditor ◀── compilation.blueprint.submitted.dlq
//! ```
//!
//! Each service is a [`Router`]: its group, its state shared by its
//! handlers (`Arc<S>`, no cloning per message), a route per contract.
//!
//! The payloads are the platform's typed contracts (`oona-contracts`): each
//! type knows its topic and schema, so nothing here names a topic. The
//! blueprints travel as JSON and the telemetry (the hot path) as protobuf;
//! every consumer decodes by the envelope's content type (`AnyCodec`), so a
//! producer can switch format without its consumers changing.
//!
//! Runs over `oona::from_env()`: `memory://` unless `OONA_URL` says
//! otherwise (`OONA_URL=redis://127.0.0.1:6379/0 cargo run --example
//! esper_pipeline --features redis`). Every run uses fresh consumer groups
//! starting at the latest position and tags its messages with a run id, so
//! reruns against a persistent broker count only their own messages.
//!
//! Prints a summary table and exits non-zero if any count does not add up.
//! `RUST_LOG=oona=debug` shows the `oona.publish` / `oona.deliver` spans.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use oona::oona_contracts::{
    AnyCodec, BlueprintCompiled, BlueprintSubmitted, HealthSignal, LayerHealthReport, Message,
};
use oona::router::{Router, Service};
use oona::rules::DeadLetterInfo;
use oona::{
    Bus, Codec, Envelope, HandlerError, HandlerResult, Incoming, Name, RunSummary, Shutdown,
    Subscription,
};

/// Header carrying this run's id; messages of other runs are acked and
/// ignored.
const RUN_HEADER: &str = "esper-run";

const BLUEPRINTS: u64 = 300;
/// BlueprintSubmitted has no field for the graph's operators; they travel
/// comma-separated in its `metadata` under this key.
const OPS_KEY: &str = "ops";
const INVALID_EVERY: u64 = 25; // unsupported op → permanent failure → DLQ
const FLAKY_EVERY: u64 = 40; // first attempt times out → nack → retried
const LAYERS: u32 = 8;
const SEEDS_PER_LAYER: u32 = 5;
const STEPS: u64 = 125; // reports per seed: 8 × 5 × 125 = 5,000
const TEZZERET_WORKERS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(30);

/// What one consumer saw.
#[derive(Default)]
struct Seen {
    handled: AtomicU64,
    foreign: AtomicU64,
    unique: Mutex<HashSet<String>>,
    latencies: Mutex<Vec<Duration>>,
    last_seq: Mutex<HashMap<String, u64>>,
    order_violations: AtomicU64,
    /// Content types of the payloads decoded.
    content_types: Mutex<BTreeSet<String>>,
}

impl Seen {
    /// Record a delivery of this run; false if it belongs to another run.
    fn record(&self, env: &Envelope, run: &str) -> bool {
        if env.header(RUN_HEADER) != Some(run) {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let latency = env.timestamp.elapsed();
        self.handled.fetch_add(1, Ordering::Relaxed);
        lock(&self.latencies).push(latency);
        lock(&self.unique).insert(env.event_id.to_string());
        lock(&self.content_types).insert(env.content_type.as_str().to_string());
        true
    }

    fn content_types(&self) -> String {
        let seen = lock(&self.content_types);
        if seen.is_empty() {
            return "-".into();
        }
        seen.iter().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Check the per-key sequence.
    fn check_order(&self, key: &str, seq: u64) {
        let mut last = lock(&self.last_seq);
        if let Some(prev) = last.insert(key.to_string(), seq) {
            if seq <= prev {
                self.order_violations.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn unique(&self) -> u64 {
        lock(&self.unique).len() as u64
    }

    fn percentiles(&self) -> (Duration, Duration) {
        let mut v = lock(&self.latencies).clone();
        if v.is_empty() {
            return (Duration::ZERO, Duration::ZERO);
        }
        v.sort_unstable();
        let at = |p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
        (at(50), at(99))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("esper_pipeline: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> oona::Result<bool> {
    let url = oona::env_url();
    let transport = oona::from_env().await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let bus = Bus::new(transport);
    // The topics come from the contract types.
    let submitted = BlueprintSubmitted::topic();
    let compiled = BlueprintCompiled::topic();
    let health = LayerHealthReport::topic();
    let dlq = submitted.dead_letter();
    for t in [&submitted, &compiled, &health, &dlq] {
        bus.ensure_topic(t).await?;
    }
    let group = |name: &str| format!("{name}-{run_id}");
    let shutdown = Shutdown::new();

    // --- Consumers first: fresh groups start at "latest", so they must
    // exist before anything is published.

    // Tezzeret: three workers, each a service of its own, in one group;
    // each blueprint goes to one. What a handler needs is the router's
    // state, shared as an Arc.
    let tezzeret_seen = Arc::new(Seen::default());
    let per_worker: Arc<Vec<AtomicU64>> =
        Arc::new((0..TEZZERET_WORKERS).map(|_| AtomicU64::new(0)).collect());
    let mut tezzeret = Vec::new();
    for w in 0..TEZZERET_WORKERS {
        let worker = Worker {
            bus: bus.clone().with_sender_id(format!("tezzeret-{w}")),
            seen: tezzeret_seen.clone(),
            per_worker: per_worker.clone(),
            index: w,
            run: run_id.clone(),
        };
        let service = Router::new(&worker.bus, group("tezzeret"))
            .with_state(worker)
            .concurrency(2)
            .shutdown_on(shutdown.clone())
            .contract(compile)
            .start()
            .await?;
        tezzeret.push(service);
    }

    // Urza collects compiled kernels; Tamiyo and Nissa are two groups that
    // each see every health report. Tamiyo runs 4 handlers at once and
    // still sees each seed's reports in order.
    let observer = |seen: &Arc<Seen>| Observer {
        seen: seen.clone(),
        run: run_id.clone(),
    };
    let urza_seen = Arc::new(Seen::default());
    let urza = Router::new(&bus, group("urza"))
        .with_state(observer(&urza_seen))
        .shutdown_on(shutdown.clone())
        .contract(on_compiled)
        .start()
        .await?;
    let tamiyo_seen = Arc::new(Seen::default());
    let nissa_seen = Arc::new(Seen::default());
    let mut observers = Vec::new();
    for (name, seen, concurrency) in [("tamiyo", &tamiyo_seen, 4), ("nissa", &nissa_seen, 1)] {
        let service = Router::new(&bus, group(name))
            .with_state(observer(seen))
            .concurrency(concurrency)
            .shutdown_on(shutdown.clone())
            .contract(on_health)
            .start()
            .await?;
        observers.push((name, service));
    }

    // The dead-letter auditor reads the DLQ directly.
    let mut dead_letters = bus
        .subscribe_raw(Subscription::new(
            dlq.clone(),
            Name::new(group("dlq-auditor"))?,
        ))
        .await?;

    // --- Publish: Urza's submissions and Kasmina's telemetry, concurrently.
    let started = Instant::now();
    let urza_bus = bus.clone().with_sender_id("urza-1");
    let kasmina_bus = bus.clone().with_sender_id("kasmina-1");
    let (submissions, reports) = tokio::join!(
        publish_blueprints(&urza_bus, &run_id),
        publish_health(&kasmina_bus, &run_id),
    );
    let (submissions, reports) = (submissions?, reports?);
    let publish_time = started.elapsed();

    let invalid = (1..=BLUEPRINTS).filter(|i| i % INVALID_EVERY == 0).count() as u64;
    let flaky = (1..=BLUEPRINTS)
        .filter(|i| i % FLAKY_EVERY == 0 && i % INVALID_EVERY != 0)
        .count() as u64;
    let valid = BLUEPRINTS - invalid;
    let expected_dead = invalid + 1; // + the malformed submission

    // --- Read the dead letters while the rest drains.
    let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut dead_read = 0u64;
    let mut dead_content_types = BTreeSet::new();
    let any = AnyCodec::default();
    let until = started + DEADLINE;
    while dead_read < expected_dead {
        let next = tokio::time::timeout_at(until.into(), dead_letters.next()).await;
        let Ok(Some(item)) = next else { break };
        let d = item?;
        if let Some(info) = DeadLetterInfo::parse(d.envelope()) {
            if info.original.header(RUN_HEADER) == Some(run_id.as_str()) {
                dead_read += 1;
                dead_content_types.insert(info.original.content_type.as_str().to_string());
                // The original, exactly as published: decode it as the
                // consumers would.
                let what = Codec::<BlueprintSubmitted>::decode(&any, &info.original)
                    .map(|b| b.blueprint_id)
                    .unwrap_or_else(|_| format!("event {}", info.original.event_id));
                // Drop the per-message event id so equal failures group.
                let mut reason = info.reason.clone();
                if let Some(start) = reason.find(" (event ") {
                    if let Some(len) = reason[start..].find(')') {
                        reason.replace_range(start..start + len + 1, "");
                    }
                }
                reasons.entry(reason).or_default().push(what);
            }
        }
        d.ack().await?;
    }

    // --- Wait for every consumer to catch up, then shut down gracefully.
    let total_reports = reports;
    let caught_up = || {
        let tz: RunSummary = tezzeret.iter().map(|s| s.stats()).sum();
        tz.acked >= valid
            && tz.rejected >= expected_dead
            && urza_seen.unique() >= valid
            && tamiyo_seen.unique() >= total_reports
            && nissa_seen.unique() >= total_reports
    };
    while !caught_up() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = started.elapsed();
    shutdown.trigger();
    let mut tz_summaries = Vec::new();
    for service in tezzeret {
        tz_summaries.push(total(service).await?);
    }
    let tz: RunSummary = tz_summaries.into_iter().sum();
    let urza_summary = total(urza).await?;
    let mut obs = Vec::new();
    for (name, service) in observers {
        obs.push((name, total(service).await?));
    }
    drop(dead_letters);
    // Writes out anything the transport still queues, then disconnects.
    bus.close().await?;

    // --- Report.
    println!();
    println!(
        "Esper pipeline over {} (run {run_id}, {})",
        redact(&url),
        tenant_of(&url).map_or("no tenant".to_string(), |t| format!("tenant {t}"))
    );
    println!();
    let line = "-".repeat(145);
    println!(
        "{:<36} {:<9} {:<22} {:<24} {:>9} {:>8} {:>7} {:>6} {:>9} {:>9}",
        "topic",
        "from",
        "content type",
        "group (consumers)",
        "published",
        "handled",
        "nacked",
        "dead",
        "p50",
        "p99"
    );
    println!("{line}");
    let (p50, p99) = tezzeret_seen.percentiles();
    println!(
        "{:<36} {:<9} {:<22} {:<24} {:>9} {:>8} {:>7} {:>6} {:>9} {:>9}",
        submitted.as_str(),
        "urza",
        tezzeret_seen.content_types(),
        format!("tezzeret ({TEZZERET_WORKERS} competing)"),
        submissions,
        tz.acked,
        tz.nacked,
        tz.dead_lettered,
        ms(p50),
        ms(p99)
    );
    let (p50, p99) = urza_seen.percentiles();
    println!(
        "{:<36} {:<9} {:<22} {:<24} {:>9} {:>8} {:>7} {:>6} {:>9} {:>9}",
        compiled.as_str(),
        "tezzeret",
        urza_seen.content_types(),
        "urza",
        tz.acked,
        urza_summary.acked,
        urza_summary.nacked,
        urza_summary.dead_lettered,
        ms(p50),
        ms(p99)
    );
    for ((name, s), seen) in obs.iter().zip([&tamiyo_seen, &nissa_seen]) {
        let (p50, p99) = seen.percentiles();
        let label = if *name == "tamiyo" {
            "tamiyo (4 concurrent)".to_string()
        } else {
            name.to_string()
        };
        println!(
            "{:<36} {:<9} {:<22} {:<24} {:>9} {:>8} {:>7} {:>6} {:>9} {:>9}",
            health.as_str(),
            "kasmina",
            seen.content_types(),
            label,
            reports,
            s.acked,
            s.nacked,
            s.dead_lettered,
            ms(p50),
            ms(p99)
        );
    }
    println!(
        "{:<36} {:<9} {:<22} {:<24} {:>9} {:>8} {:>7} {:>6} {:>9} {:>9}",
        dlq.as_str(),
        "oona",
        dead_content_types
            .into_iter()
            .collect::<Vec<_>>()
            .join(", "),
        "dlq-auditor",
        tz.dead_lettered,
        dead_read,
        "-",
        "-",
        "-",
        "-"
    );
    println!("{line}");
    let split: Vec<String> = per_worker
        .iter()
        .enumerate()
        .map(|(i, n)| format!("tezzeret-{i}: {}", n.load(Ordering::Relaxed)))
        .collect();
    println!(
        "Tezzeret workers (competing, compiled):  {}",
        split.join(", ")
    );
    println!("Flaky blueprints retried after a nack:   {flaky} (attempt 2 succeeded)");
    let (proto_len, json_len) = health_payload_sizes()?;
    println!(
        "Content types: producers pick the format, consumers decode by content type (AnyCodec); a health report is {proto_len} bytes as protobuf, {json_len} as JSON."
    );
    println!(
        "Latency: envelope timestamp to handler; telemetry arrives as one burst of {reports}, so it includes queueing."
    );
    println!("Dead letters by reason:");
    for (reason, items) in &reasons {
        let shown: Vec<&str> = items.iter().take(4).map(String::as_str).collect();
        let more = if items.len() > 4 {
            format!(", +{} more", items.len() - 4)
        } else {
            String::new()
        };
        println!(
            "  {:>3} × {reason}  [{}{more}]",
            items.len(),
            shown.join(", ")
        );
    }
    let delivered = tz.settled()
        + urza_summary.settled()
        + obs.iter().map(|(_, s)| s.settled()).sum::<u64>()
        + dead_read;
    let published = submissions + tz.acked + reports;
    println!(
        "Published {published} messages in {} ms; {delivered} deliveries settled in {} ms: {:.0} deliveries/s",
        publish_time.as_millis(),
        wall.as_millis(),
        delivered as f64 / wall.as_secs_f64().max(1e-9)
    );
    let foreign: u64 = [&tezzeret_seen, &urza_seen, &tamiyo_seen, &nissa_seen]
        .iter()
        .map(|s| s.foreign.load(Ordering::Relaxed))
        .sum();
    if foreign > 0 {
        println!("Ignored {foreign} messages of other runs.");
    }

    // --- Do the counts add up?
    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    // A tenant is this run's alone: a message of another run in it crossed
    // tenants.
    if let Some(t) = tenant_of(&url) {
        check(
            foreign == 0,
            format!("tenant {t} saw {foreign} messages of other runs"),
        );
    }
    check(
        submissions == BLUEPRINTS + 1,
        format!(
            "published {submissions} submissions, expected {}",
            BLUEPRINTS + 1
        ),
    );
    check(
        tezzeret_seen.unique() == valid,
        format!(
            "tezzeret compiled {} distinct blueprints, expected {valid}",
            tezzeret_seen.unique()
        ),
    );
    check(
        tz.acked == valid,
        format!("tezzeret acked {}, expected {valid}", tz.acked),
    );
    check(
        tz.nacked == flaky,
        format!("tezzeret nacked {}, expected {flaky}", tz.nacked),
    );
    check(
        tz.rejected == expected_dead && tz.dead_lettered == expected_dead,
        format!(
            "tezzeret dead-lettered {}, expected {expected_dead}",
            tz.dead_lettered
        ),
    );
    check(
        tz.decode_failures == 1,
        format!("{} decode failures, expected 1", tz.decode_failures),
    );
    check(
        dead_read == expected_dead,
        format!("read {dead_read} dead letters, expected {expected_dead}"),
    );
    check(
        reasons.keys().any(|r| r.starts_with("decode: ")),
        "no decode dead letter".into(),
    );
    check(
        reasons.keys().any(|r| r.contains("unsupported op")),
        "no unsupported-op dead letter".into(),
    );
    check(
        urza_seen.unique() == valid,
        format!(
            "urza received {} compiled kernels, expected {valid}",
            urza_seen.unique()
        ),
    );
    for (name, seen) in [("tamiyo", &tamiyo_seen), ("nissa", &nissa_seen)] {
        check(
            seen.unique() == reports,
            format!(
                "{name} saw {} health reports, expected {reports}",
                seen.unique()
            ),
        );
        let v = seen.order_violations.load(Ordering::Relaxed);
        check(v == 0, format!("{name}: {v} per-seed order violations"));
    }
    for (what, seen, ct) in [
        ("tezzeret", &tezzeret_seen, oona::ContentType::JSON),
        ("urza", &urza_seen, oona::ContentType::JSON),
        ("tamiyo", &tamiyo_seen, oona::ContentType::PROTOBUF),
        ("nissa", &nissa_seen, oona::ContentType::PROTOBUF),
    ] {
        check(
            seen.content_types() == ct,
            format!("{what} decoded {}, expected {ct}", seen.content_types()),
        );
    }
    for s in [&tz, &urza_summary]
        .into_iter()
        .chain(obs.iter().map(|(_, s)| s))
    {
        check(
            s.settle_errors == 0 && s.panics == 0,
            format!("settle errors or panics: {s}"),
        );
    }
    let used_workers = per_worker
        .iter()
        .filter(|n| n.load(Ordering::Relaxed) > 0)
        .count();
    check(
        used_workers > 1,
        format!("only {used_workers} tezzeret worker did any work"),
    );

    if problems.is_empty() {
        println!("OK: every count adds up (graceful shutdown: all runners stopped with nothing in flight).");
        Ok(true)
    } else {
        for p in &problems {
            println!("FAILED: {p}");
        }
        Ok(false)
    }
}

/// A Tezzeret worker's state: its bus (its sender id) and what it counts.
struct Worker {
    bus: Bus,
    seen: Arc<Seen>,
    per_worker: Arc<Vec<AtomicU64>>,
    index: usize,
    run: String,
}

/// An observer's state: what it saw of this run.
struct Observer {
    seen: Arc<Seen>,
    run: String,
}

/// Urza's handler: note a compiled kernel.
async fn on_compiled(o: Arc<Observer>, msg: Incoming<BlueprintCompiled>) -> HandlerResult {
    o.seen.record(msg.envelope(), &o.run);
    Ok(())
}

/// Tamiyo's and Nissa's handler: note a report and check its seed's order.
async fn on_health(o: Arc<Observer>, msg: Incoming<LayerHealthReport>) -> HandlerResult {
    if o.seen.record(msg.envelope(), &o.run) {
        let key = msg.envelope().key.clone().unwrap_or_default();
        o.seen.check_order(&key, msg.value().sequence);
    }
    Ok(())
}

/// Stop a service and add up its routes' counts.
async fn total(service: Service) -> oona::Result<RunSummary> {
    Ok(service.shutdown().await?.into_iter().map(|(_, s)| s).sum())
}

/// Tezzeret's handler: "compile" a blueprint and announce the kernel.
async fn compile(w: Arc<Worker>, msg: Incoming<BlueprintSubmitted>) -> HandlerResult {
    let (bus, seen, run) = (&w.bus, &w.seen, w.run.as_str());
    if msg.envelope().header(RUN_HEADER) != Some(run) {
        seen.foreign.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    let bp = msg.value();
    let ops: Vec<&str> = match bp.metadata.get(OPS_KEY) {
        Some(ops) if !ops.is_empty() => ops.split(',').collect(),
        _ => {
            return Err(HandlerError::permanent(format!(
                "blueprint without metadata \"{OPS_KEY}\""
            )))
        }
    };
    if let Some(op) = ops.iter().find(|op| **op == "quantum_conv") {
        return Err(HandlerError::permanent(format!("unsupported op '{op}'")));
    }
    if bp.name.ends_with("-flaky") && msg.attempt() == 1 {
        return Err(HandlerError::temporary("artifact store timed out"));
    }
    // The "compilation": a stable digest of the graph.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ops.iter().flat_map(|o| o.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let kernel = BlueprintCompiled {
        blueprint_id: bp.blueprint_id.clone(),
        kernel_artifact_id: format!("krn-{h:016x}"),
        compiled_by: bus.sender_id().to_string(),
        op_count: u32::try_from(ops.len())
            .map_err(|_| HandlerError::permanent("more than u32::MAX ops"))?,
        ..Default::default()
    };
    // To BlueprintCompiled::topic(), as JSON. A failed publish is an
    // oona::Error; `?` makes it a temporary failure (nack) unless it is a
    // data error.
    bus.message_contract(&kernel)
        .key(&bp.blueprint_id)
        .correlation_id(msg.envelope().event_id.to_string())
        .header(RUN_HEADER, run)
        .send()
        .await?;
    seen.record(msg.envelope(), run);
    w.per_worker[w.index].fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn publish_blueprints(bus: &Bus, run: &str) -> oona::Result<u64> {
    let ops = ["conv2d", "batch_norm", "relu", "residual_add", "linear"];
    let mut n = 0;
    for i in 1..=BLUEPRINTS {
        let mut bp_ops: Vec<&str> = ops.iter().take(2 + (i as usize % 4)).copied().collect();
        let mut name = format!("bp-{i}");
        if i % INVALID_EVERY == 0 {
            bp_ops.push("quantum_conv");
        } else if i % FLAKY_EVERY == 0 {
            name.push_str("-flaky");
        }
        let bp = BlueprintSubmitted {
            blueprint_id: format!("bp-{run}-{i:04}"),
            name,
            submitted_by: "urza-api".into(),
            metadata: [(OPS_KEY.to_string(), bp_ops.join(","))].into(),
            ..Default::default()
        };
        // To BlueprintSubmitted::topic(), as JSON, with its schema id.
        bus.message_contract(&bp)
            .key(&bp.blueprint_id)
            .header(RUN_HEADER, run)
            .send()
            .await?;
        n += 1;
    }
    // A submission whose payload is not a BlueprintSubmitted (a field of the
    // wrong type): the runner dead-letters it with a decode reason instead
    // of dropping it.
    let malformed = Envelope::builder(BlueprintSubmitted::topic(), r#"{"blueprint_id": 42}"#)
        .header(RUN_HEADER, run)
        .build();
    bus.publish_envelope(malformed).await?;
    Ok(n + 1)
}

/// One seed's health at the end of a step, as a report with one entry.
fn health_report(layer: u32, seed: u32, step: u64) -> LayerHealthReport {
    let health = 1.0 - (step as f64 / STEPS as f64) * 0.1;
    LayerHealthReport {
        layer_id: layer,
        epoch: step / 25,
        // Per-key sequence: consumers check the order of each seed's reports.
        sequence: step,
        health_metrics_by_seed: [(
            seed.to_string(),
            HealthSignal {
                layer_id: layer,
                seed_id: seed,
                epoch: step / 25,
                health_score: health,
                ..Default::default()
            },
        )]
        .into(),
        active_seeds: 1,
        total_seeds: SEEDS_PER_LAYER,
        ..Default::default()
    }
}

/// The payload size of one health report as protobuf and as JSON.
fn health_payload_sizes() -> oona::Result<(usize, usize)> {
    let report = health_report(3, 2, 100);
    let proto = Codec::<LayerHealthReport>::encode(&AnyCodec::protobuf(), &report)?;
    let json = Codec::<LayerHealthReport>::encode(&AnyCodec::json(), &report)?;
    Ok((proto.len(), json.len()))
}

async fn publish_health(bus: &Bus, run: &str) -> oona::Result<u64> {
    // The hot path: binary protobuf, in batches.
    let protobuf = AnyCodec::protobuf();
    let mut n = 0;
    let mut batch = Vec::with_capacity(200);
    for step in 0..STEPS {
        for layer in 0..LAYERS {
            for seed in 0..SEEDS_PER_LAYER {
                let report = health_report(layer, seed, step);
                let env = bus
                    .message_contract(&report)
                    .codec(&protobuf)
                    .key(format!("layer-{layer}/seed-{seed}"))
                    .header(RUN_HEADER, run)
                    .build()?;
                batch.push(env);
                if batch.len() == 200 {
                    n += bus
                        .publish_envelopes(std::mem::take(&mut batch))
                        .await?
                        .len() as u64;
                }
            }
        }
    }
    if !batch.is_empty() {
        n += bus.publish_envelopes(batch).await?.len() as u64;
    }
    Ok(n)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The `tenant` of the URL, if it names one.
fn tenant_of(url: &str) -> Option<String> {
    url::Url::parse(url)
        .ok()?
        .query_pairs()
        .find_map(|(k, v)| (k == "tenant").then(|| v.into_owned()))
}

fn redact(url: &str) -> String {
    oona::ConnectUrl::parse(url)
        .map(|u| u.redacted())
        .unwrap_or_else(|_| "<a URL that does not parse>".to_string())
}
