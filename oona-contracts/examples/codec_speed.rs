//! Encode and decode speed of each codec on a FieldReport, in messages per
//! second and bytes per message (a figure, not a test):
//!
//! ```text
//! cargo run --release -p oona-contracts --example codec_speed
//! ```

use std::collections::BTreeMap;
use std::time::Instant;

use oona_contracts::{AnyCodec, BlueprintOutcome, FieldReport, Message};
use oona_core::{Codec, Envelope};

fn main() -> oona_core::Result<()> {
    let metrics: BTreeMap<String, f64> = [
        ("val_loss".to_string(), 0.25),
        ("val_accuracy".to_string(), 0.875),
    ]
    .into();
    let report = FieldReport {
        report_id: "0b7e1a2c-5d7f-4c8e-9a3b-6e2f1d0c9b8a".into(),
        blueprint_id: "b3d4f5a6".into(),
        kernel_artifact_id: "k-77".into(),
        layer_id: 12,
        seed_id: 1,
        outcome: BlueprintOutcome::Fossilized as i32,
        pre_metrics: metrics.clone(),
        post_metrics: metrics,
        observed_improvement: 0.125,
        epochs_active: 9,
        epoch: 50,
        notes: "stable after grafting".into(),
    };
    let n = 50_000u32;
    println!(
        "{:<9} {:>7} {:>14} {:>14}",
        "codec", "bytes", "encode msg/s", "decode msg/s"
    );
    for (name, codec) in [
        ("json", AnyCodec::json()),
        ("protobuf", AnyCodec::protobuf()),
        ("avro", AnyCodec::avro()),
    ] {
        let t = Instant::now();
        let mut bytes = Default::default();
        for _ in 0..n {
            bytes = Codec::<FieldReport>::encode(&codec, &report)?;
        }
        let enc = f64::from(n) / t.elapsed().as_secs_f64();
        let env = Envelope::builder(FieldReport::topic(), bytes.clone())
            .content_type(Codec::<FieldReport>::content_type(&codec))
            .schema_id(FieldReport::schema_id())
            .build();
        let t = Instant::now();
        for _ in 0..n {
            let back: FieldReport = codec.decode(&env)?;
            std::hint::black_box(back);
        }
        let dec = f64::from(n) / t.elapsed().as_secs_f64();
        println!("{name:<9} {:>7} {enc:>14.0} {dec:>14.0}", bytes.len());
    }
    Ok(())
}
