//! Layers on the publish path and around handling, on the memory transport.
#![cfg(feature = "memory")]

mod common;

use std::sync::{Arc, Mutex};

use common::{bus, read_dead_letters, sub, topic, wait_stats};
use oona::async_trait;
use oona::layer::{ConsumeLayer, ConsumeNext, Handled, PublishLayer, PublishNext};
use oona::{Delivery, Envelope, Error, ErrorKind, Incoming, Name, Outcome, Receipt, Subscription};

/// Records its name on every publish, then adds a header with it.
struct Stamp(&'static str, Arc<Mutex<Vec<&'static str>>>);

#[async_trait]
impl PublishLayer for Stamp {
    async fn publish(
        &self,
        mut envelopes: Vec<Envelope>,
        next: PublishNext<'_>,
    ) -> oona::Result<Vec<Receipt>> {
        self.1.lock().unwrap().push(self.0);
        for e in &mut envelopes {
            let chain = e.header("chain").map(|c| format!("{c},{}", self.0));
            e.headers
                .insert("chain".into(), chain.unwrap_or_else(|| self.0.to_string()));
        }
        next.run(envelopes).await
    }
}

/// Refuses envelopes without a `chain` header, as a signature check would.
struct RequireChain(Arc<Mutex<Vec<String>>>);

#[async_trait]
impl ConsumeLayer for RequireChain {
    async fn handle(&self, delivery: Delivery, next: ConsumeNext<'_>) -> Handled {
        if delivery.envelope().header("chain").is_none() {
            return Handled::settle(
                delivery,
                Outcome::Reject {
                    reason: "signature: missing".into(),
                },
            )
            .await;
        }
        let handled = next.run(delivery).await;
        let seen = match &handled.outcome {
            Outcome::Ack => "ack",
            Outcome::Nack { .. } => "nack",
            Outcome::Reject { .. } => "reject",
        };
        self.0.lock().unwrap().push(seen.to_string());
        handled
    }
}

/// Refuses every publish.
struct Closed;

#[async_trait]
impl PublishLayer for Closed {
    async fn publish(&self, _: Vec<Envelope>, _: PublishNext<'_>) -> oona::Result<Vec<Receipt>> {
        Err(Error::new(ErrorKind::Unsupported, "publishing is off"))
    }
}

#[tokio::test]
async fn publish_layers_run_outermost_first_and_consume_layers_see_outcomes() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let plain = bus().await;
    let layered = plain
        .clone()
        .with_publish_layer(Stamp("outer", order.clone()))
        .with_publish_layer(Stamp("inner", order.clone()))
        .with_consume_layer(RequireChain(outcomes.clone()));
    let t = topic("control.kasmina.layers");
    let mut dlq = plain
        .subscribe_raw(Subscription::new(
            t.dead_letter(),
            Name::new("audit").unwrap(),
        ))
        .await
        .unwrap();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let seen = handled.clone();
    let handle = layered
        .runner::<String>(sub(&t, "kasmina"))
        .start(move |msg: Incoming<String>| {
            let seen = seen.clone();
            async move {
                let chain = msg.envelope().header("chain").map(str::to_string);
                seen.lock().unwrap().push((msg.value().clone(), chain));
                if msg.value() == "bad" {
                    return Err(oona::HandlerError::permanent("bad value"));
                }
                Ok(())
            }
        })
        .await
        .unwrap();
    layered.publish(&t, &"one".to_string()).await.unwrap();
    layered
        .publish_envelopes(vec![
            Envelope::builder(t.clone(), "\"two\"").build(),
            Envelope::builder(t.clone(), "\"bad\"").build(),
        ])
        .await
        .unwrap();
    // Published without the layers: the consume layer rejects it before
    // the handler sees it.
    plain.publish(&t, &"unsigned".to_string()).await.unwrap();
    wait_stats(&handle, |s| s.settled() == 4).await;
    let summary = handle.shutdown().await.unwrap();
    assert_eq!(
        (summary.acked, summary.rejected, summary.dead_lettered),
        (2, 2, 2),
        "{summary}"
    );
    assert_eq!(
        *order.lock().unwrap(),
        vec!["outer", "inner", "outer", "inner"]
    );
    let chain = Some("outer,inner".to_string());
    assert_eq!(
        *handled.lock().unwrap(),
        vec![
            ("one".to_string(), chain.clone()),
            ("two".to_string(), chain.clone()),
            ("bad".to_string(), chain)
        ]
    );
    // After the handler: what the layer saw is what the runner settled.
    assert_eq!(*outcomes.lock().unwrap(), vec!["ack", "ack", "reject"]);
    let mut reasons: Vec<String> = read_dead_letters(&mut dlq, 2)
        .await
        .into_iter()
        .map(|d| d.reason)
        .collect();
    reasons.sort();
    assert_eq!(reasons, vec!["bad value", "signature: missing"]);
}

#[tokio::test]
async fn a_publish_layer_can_refuse_before_the_transport_sees_anything() {
    let plain = bus().await;
    let refusing = plain.clone().with_publish_layer(Closed);
    let t = topic("control.kasmina.refused");
    let mut s = plain
        .subscribe_raw(Subscription::new(t.clone(), Name::new("g").unwrap()))
        .await
        .unwrap();
    let e = refusing.publish(&t, &"x".to_string()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    plain.publish(&t, &"y".to_string()).await.unwrap();
    let d = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        futures::StreamExt::next(&mut s),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(
        &d.envelope().payload[..],
        b"\"y\"",
        "the refused message never reached the broker"
    );
    d.ack().await.unwrap();
}
