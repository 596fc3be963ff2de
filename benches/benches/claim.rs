//! What a claim-checked round trip costs: 1, 10 and 50 MB payloads
//! published through `ClaimCheck` to the genuine Redis
//! (`OONA_TEST_REDIS_URL`), with the objects on the genuine S3 server
//! (`OONA_TEST_S3_URL`, `scripts/brokers.sh up redis s3`), received and
//! fetched back through the layer; beside the store's own cost in the same
//! run (one PUT and one GET of the same bytes with `object_store`).
//!
//! ```text
//! cargo bench -p oona-benches --bench claim
//! ```
//!
//! Medians of interleaved rounds; figures in MB/s (payload bytes over the
//! time from publish to the handler holding the whole, checked payload).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use oona_benches::{bench_topic, broker_url, rounds, run_main, Res};
use oona_core::claim::ClaimCheck;
use oona_core::layer::{ConsumeLayer, ConsumeNext, Handled, PublishLayer, PublishNext};
use oona_core::{Delivery, Envelope, Name, Outcome, StartPosition, Subscription, Transport};
use oona_redis::RedisTransport;

const ROUNDS: usize = 3;
const MB: usize = 1024 * 1024;

fn main() {
    let redis = broker_url("OONA_TEST_REDIS_URL", "redis");
    let s3 = broker_url("OONA_TEST_S3_URL", "s3");
    run_main(run(redis, s3));
}

fn with_prefix(s3: &str, prefix: &str) -> Res<String> {
    let mut url = url::Url::parse(s3)?;
    url.set_path(prefix);
    Ok(url.to_string())
}

async fn run(redis: String, s3: String) -> Res<()> {
    let prefix = format!("bench-{}", std::process::id());
    let url = with_prefix(&s3, &prefix)?;
    let claims = ClaimCheck::from_url(&url)?;
    let (store, root) = (claims.store().clone(), claims.prefix().clone());
    let t: Arc<dyn Transport> = Arc::new(RedisTransport::connect_url(&redis).await?);
    println!("| payload | through Oona (MB/s) | PUT + GET alone (MB/s) | ratio |");
    println!("|---|---:|---:|---:|");
    for size in [MB, 10 * MB, 50 * MB] {
        let payload: Bytes = (0..size)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        let (oona, raw) = rounds(
            ROUNDS,
            |i| round_trip(t.clone(), claims.clone(), payload.clone(), i),
            |i| put_get(store.as_ref(), &root, payload.clone(), i),
        )
        .await?;
        println!(
            "| {} MB | {oona:.0} | {raw:.0} | {:.0}% |",
            size / MB,
            100.0 * oona / raw.max(1.0)
        );
    }
    let left: Vec<_> = store.list(Some(&root)).collect().await;
    for meta in left {
        store.delete(&meta?.location).await?;
    }
    Ok(())
}

/// Publish `payload` through the layer, receive it through the layer; MB/s.
async fn round_trip(
    t: Arc<dyn Transport>,
    claims: ClaimCheck,
    payload: Bytes,
    i: usize,
) -> Res<f64> {
    let topic = bench_topic("claim", i, true)?;
    let sub = Subscription::new(topic.clone(), Name::new("bench")?).start(StartPosition::Earliest);
    t.ensure_topic(
        &topic,
        &oona_core::TopicPolicy::new(oona_core::Retention::Indefinite),
    )
    .await?;
    let mut stream = t.subscribe(sub).await?;
    let len = payload.len();
    let started = Instant::now();
    let publish: Vec<Arc<dyn PublishLayer>> = vec![Arc::new(claims.clone())];
    PublishNext::new(&publish, t.as_ref())
        .run(vec![Envelope::builder(topic, payload).build()])
        .await?;
    let delivery = stream.next().await.ok_or("the stream ended")??;
    let consume: Vec<Arc<dyn ConsumeLayer>> = vec![Arc::new(claims)];
    let got = std::sync::Mutex::new(0usize);
    let terminal = |d: Delivery| -> BoxFuture<'_, Handled> {
        if let Ok(mut g) = got.lock() {
            *g = d.envelope().payload.len();
        }
        Box::pin(Handled::settle(d, Outcome::Ack))
    };
    let handled = ConsumeNext::new(&consume, &terminal).run(delivery).await;
    let secs = started.elapsed().as_secs_f64();
    handled.settled?;
    let got = got.into_inner().map_err(|_| "poisoned")?;
    if got != len {
        return Err(format!("the handler got {got} bytes of {len}").into());
    }
    stream.close().await;
    Ok(len as f64 / MB as f64 / secs)
}

/// One PUT and one GET of `payload` on the store alone; MB/s.
async fn put_get(store: &dyn ObjectStore, root: &Path, payload: Bytes, i: usize) -> Res<f64> {
    let key = root.child(format!("raw-{i}-{}", payload.len()));
    let len = payload.len();
    let started = Instant::now();
    store.put(&key, payload.into()).await?;
    let back = store.get(&key).await?.bytes().await?;
    let secs = started.elapsed().as_secs_f64();
    if back.len() != len {
        return Err("short read".into());
    }
    Ok(len as f64 / MB as f64 / secs)
}
