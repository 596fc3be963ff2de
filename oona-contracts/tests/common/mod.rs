//! Fixed sample values of every contract, shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use oona_contracts::*;

fn map<V: Clone>(items: &[(&str, V)]) -> BTreeMap<String, V> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

pub fn blueprint_submitted() -> BlueprintSubmitted {
    BlueprintSubmitted {
        blueprint_id: "b3d4f5a6".into(),
        name: "residual-adapter".into(),
        submitted_by: "human_developer".into(),
        architecture_ir_ref: "s3://esper-artifacts/blueprints/b3d4f5a6.ir".into(),
        ir_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        submitted_at_ms: 1_751_882_113_000,
        metadata: map(&[
            ("team", "urza".to_string()),
            ("priority", "high".to_string()),
        ]),
    }
}

pub fn blueprint_compiled() -> BlueprintCompiled {
    BlueprintCompiled {
        blueprint_id: "b3d4f5a6".into(),
        kernel_artifact_id: "k-77".into(),
        compiled_by: "tezzeret-worker-01".into(),
        artifact_ref: "s3://esper-artifacts/kernels/k-77.so".into(),
        checksum_sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae".into(),
        size_bytes: 1_048_576,
        op_count: 5,
        compile_duration_ms: 8_250,
        compiled_at_ms: 1_751_882_121_250,
    }
}

pub fn health_signal(seed: u32) -> HealthSignal {
    HealthSignal {
        layer_id: 12,
        seed_id: seed,
        chunk_id: seed * 2,
        epoch: 41,
        activation_variance: 0.125,
        dead_neuron_ratio: 0.03,
        avg_correlation: -0.5,
        health_score: 0.875,
        execution_latency_ms: 1.5,
        error_count: seed,
        state: SeedLifecycleState::Training as i32,
    }
}

pub fn layer_health_report() -> LayerHealthReport {
    LayerHealthReport {
        layer_id: 12,
        epoch: 41,
        health_metrics_by_seed: map(&[("0", health_signal(0)), ("1", health_signal(1))]),
        active_seeds: 2,
        total_seeds: 4,
        reported_at_ms: 1_751_190_600_000,
        sequence: 4_100,
    }
}

pub fn kasmina_control_command() -> KasminaControlCommand {
    KasminaControlCommand {
        command_id: "5f0c6a52-1c1e-4b4e-9c61-1f0c6b0e9a10".into(),
        target_layer_id: 12,
        target_seed_id: 1,
        command: CommandType::Germinate as i32,
        blueprint_id: "b3d4f5a6".into(),
        kernel_artifact_id: "k-77".into(),
        parameters: map(&[("grafting_steps", 500.0), ("learning_rate", 0.001)]),
        reason: "plateau detected on layer 12".into(),
        issued_at_epoch: 41,
        deadline_ms: 0,
    }
}

pub fn field_report() -> FieldReport {
    FieldReport {
        report_id: "0b7e1a2c-5d7f-4c8e-9a3b-6e2f1d0c9b8a".into(),
        blueprint_id: "b3d4f5a6".into(),
        kernel_artifact_id: "k-77".into(),
        layer_id: 12,
        seed_id: 1,
        outcome: BlueprintOutcome::Fossilized as i32,
        pre_metrics: map(&[("val_loss", 0.5), ("val_accuracy", 0.75)]),
        post_metrics: map(&[("val_loss", 0.25), ("val_accuracy", 0.875)]),
        observed_improvement: 0.125,
        epochs_active: 9,
        epoch: 50,
        notes: "stable after grafting".into(),
    }
}

pub fn candidate_blueprint() -> CandidateBlueprint {
    CandidateBlueprint {
        candidate_id: "c-9".into(),
        blueprint_id: "e1f2a3b4".into(),
        architecture_ir_ref: "s3://esper-artifacts/candidates/e1f2a3b4.ir".into(),
        generator: "karn-v1".into(),
        parent_blueprint_ids: strings(&["b3d4f5a6", "a1b2c3d4"]),
        novelty_score: 0.625,
        generated_at_ms: 1_751_882_200_000,
        metadata: BTreeMap::new(),
    }
}

pub fn certified_blueprint() -> CertifiedBlueprint {
    CertifiedBlueprint {
        blueprint_id: "e1f2a3b4".into(),
        candidate_id: "c-9".into(),
        status: CertificationStatus::Certified as i32,
        wep: Some(WeightedEvaluationProfile {
            metrics: map(&[("latency_ms_p99", 2.5), ("memory_mb", 64.0)]),
            weighted_score: 0.8125,
            benchmarks: strings(&["cifar10-proxy", "gradient-health"]),
        }),
        risk: Some(RiskAssessment {
            risk_score: 0.125,
            level: RiskLevel::Low as i32,
            failure_modes: Vec::new(),
        }),
        kernel_artifact_ids: strings(&["k-90"]),
        certified_by: "urabrask-1".into(),
        certified_at_ms: 1_751_882_300_000,
    }
}

pub fn epoch_event() -> EpochEvent {
    EpochEvent {
        run_id: "run-2025-07-07".into(),
        epoch: 41,
        phase: EpochPhase::Completed as i32,
        train_loss: Some(0.375),
        val_loss: Some(0.5),
        val_accuracy: None,
        metrics: map(&[("lr", 0.01)]),
        occurred_at_ms: 1_751_190_600_000,
    }
}

pub fn rollback_event() -> RollbackEvent {
    RollbackEvent {
        run_id: "run-2025-07-07".into(),
        rollback_id: "r-1".into(),
        from_epoch: 44,
        to_epoch: 40,
        checkpoint_ref: "s3://esper-checkpoints/run-2025-07-07/40.pt".into(),
        reason: "loss diverged (NaN)".into(),
        severity: RollbackSeverity::Emergency as i32,
        affected_seeds: strings(&["12:1", "12:3"]),
        executed_at_ms: 1_751_190_900_000,
    }
}

pub fn kernel_request() -> KernelRequest {
    KernelRequest {
        request_id: "q-1".into(),
        blueprint_id: "b3d4f5a6".into(),
        kernel_artifact_id: String::new(),
        requested_by: "kasmina-layer-12".into(),
        layer_id: 12,
        seed_id: 1,
        deadline_ms: 1_751_190_610_000,
    }
}

pub fn kernel_ready() -> KernelReady {
    KernelReady {
        request_id: "q-1".into(),
        blueprint_id: "b3d4f5a6".into(),
        kernel_artifact_id: "k-77".into(),
        artifact_ref: "s3://esper-artifacts/kernels/k-77.so".into(),
        checksum_sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae".into(),
        size_bytes: 1_048_576,
    }
}

pub fn kernel_error() -> KernelError {
    KernelError {
        request_id: "q-2".into(),
        blueprint_id: "deadbeef".into(),
        error_code: "compile_failed".into(),
        message: "torch.compile: unsupported op".into(),
        retryable: false,
    }
}

pub fn node_introspection_event() -> NodeIntrospectionEvent {
    NodeIntrospectionEvent {
        node_id: "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f".into(),
        node_name: "NodePostgresqlWriterEffect".into(),
        version: "1.0.0".into(),
        capabilities: Some(NodeCapabilities {
            actions: strings(&["execute_effect", "validate_input"]),
            protocols: strings(&["http", "oona"]),
            metadata: map(&[
                ("node_type", "effect".to_string()),
                ("domain", "database".to_string()),
            ]),
        }),
        tags: strings(&["postgresql", "database", "writer"]),
        health_endpoint: "/health".into(),
        correlation_id: "a1a2a3a4-b1b2-4c1c-8d1d-e1e2e3e4e5e6".into(),
    }
}

/// Calls `$f::<T>(sample)` for every contract: `$f!(value)` style through a
/// generic function taking the value.
#[macro_export]
macro_rules! each_sample {
    ($f:path) => {{
        $f(common::blueprint_submitted());
        $f(common::blueprint_compiled());
        $f(common::layer_health_report());
        $f(common::kasmina_control_command());
        $f(common::field_report());
        $f(common::candidate_blueprint());
        $f(common::certified_blueprint());
        $f(common::epoch_event());
        $f(common::rollback_event());
        $f(common::kernel_request());
        $f(common::kernel_ready());
        $f(common::kernel_error());
        $f(common::node_introspection_event());
    }};
}

/// Number of samples `each_sample!` visits (one per contract).
pub const SAMPLES: usize = 13;
