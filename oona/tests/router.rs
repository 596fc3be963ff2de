//! The router on every transport: several topics in one service, one
//! state shared by the handlers, a layer and a concurrency on one route
//! only, a timeout for every route, errors of any type with `?`, and names
//! that do not validate refused at start.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oona::layer::{ConsumeLayer, ConsumeNext, Handled};
use oona::router::Router;
use oona::{async_trait, Bus, Delivery, ErrorKind, HandlerResult, Incoming, Topic};
use serde_json::{json, Value};

#[macro_use]
mod common;

/// What the service's handlers share.
#[derive(Default)]
struct Ledger {
    totals: Mutex<BTreeMap<String, i64>>,
    commands: AtomicU64,
}

async fn on_deposit(ledger: Arc<Ledger>, msg: Incoming<Value>) -> HandlerResult {
    let account = msg.value()["account"].as_str().ok_or("no account")?;
    let amount = msg.value()["amount"].as_i64().ok_or("no amount")?;
    // The first attempt of a slow deposit outlives the route's timeout:
    // it is nacked and the second attempt goes through.
    if msg.value()["slow"].as_bool() == Some(true) && msg.attempt() == 1 {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    *ledger
        .totals
        .lock()
        .unwrap()
        .entry(account.into())
        .or_default() += amount;
    Ok(())
}

async fn on_command(ledger: Arc<Ledger>, msg: Incoming<Value>) -> HandlerResult {
    use anyhow::Context as _;
    // An anyhow error around a decode error is permanent: dead-lettered.
    let _: u32 = serde_json::from_value(msg.value()["n"].clone()).context("reading n")?;
    ledger.commands.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A layer that notes the topic of every delivery it sees.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

#[async_trait]
impl ConsumeLayer for Seen {
    async fn handle(&self, delivery: Delivery, next: ConsumeNext<'_>) -> Handled {
        self.0
            .lock()
            .unwrap()
            .push(delivery.envelope().topic.to_string());
        next.run(delivery).await
    }
}

async fn one_service_many_topics(url: &str) {
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("router-test");
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let deposits = Topic::new(format!("control.rt{id}.deposit")).unwrap();
    let commands = Topic::new(format!("control.rt{id}.command")).unwrap();
    for t in [&deposits, &commands, &commands.dead_letter()] {
        bus.ensure_topic(t).await.unwrap();
    }
    let mut dlq = bus
        .subscribe_raw((commands.dead_letter(), "auditor"))
        .await
        .unwrap();
    let seen = Seen::default();
    let router = Router::new(&bus, format!("ledger-{id}")).with_state(Ledger::default());
    let ledger = router.state().clone();
    let layer = seen.clone();
    let service = router
        .handler_timeout(Duration::from_millis(500))
        .route_with(
            deposits.clone(),
            move |r| r.concurrency(4).layer(layer),
            on_deposit,
        )
        .route(commands.clone(), on_command)
        .start()
        .await
        .unwrap();

    for (account, amount) in [("a", 5), ("b", 7), ("a", -2)] {
        bus.publish(&deposits, &json!({"account": account, "amount": amount}))
            .await
            .unwrap();
    }
    bus.publish(
        &deposits,
        &json!({"account": "c", "amount": 1, "slow": true}),
    )
    .await
    .unwrap();
    bus.publish(&commands, &json!({"n": 3})).await.unwrap();
    bus.publish(&commands, &json!({"n": "three"}))
        .await
        .unwrap();

    common::wait_stats_of(|| service.stats(), |s| s.acked >= 5 && s.dead_lettered >= 1).await;
    let dead = common::read_dead_letters(&mut dlq, 1).await;
    assert!(
        dead[0].reason.starts_with("reading n: "),
        "{}",
        dead[0].reason
    );
    let per_route = service.shutdown().await.unwrap();
    let by_topic: BTreeMap<String, oona::RunSummary> = per_route.into_iter().collect();
    let d = &by_topic[deposits.as_str()];
    assert_eq!((d.acked, d.nacked, d.dead_lettered), (4, 1, 0), "{d}");
    let c = &by_topic[commands.as_str()];
    assert_eq!((c.acked, c.rejected, c.dead_lettered), (1, 1, 1), "{c}");

    let totals = ledger.totals.lock().unwrap().clone();
    assert_eq!(
        totals,
        BTreeMap::from([("a".into(), 3), ("b".into(), 7), ("c".into(), 1)])
    );
    assert_eq!(ledger.commands.load(Ordering::Relaxed), 1);
    // The layer was on the deposits route only: 4 deposits and one redelivery.
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(seen.iter().all(|t| t == deposits.as_str()), "{seen:?}");
}

on_every_transport!(one_service_many_topics);

#[tokio::test]
async fn names_that_do_not_validate_fail_at_start() {
    let bus = common::bus().await;
    let on = |_m: Incoming<Value>| async { Ok(()) };
    let e = Router::new(&bus, "ok")
        .route("not a topic", on)
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{e}");
    assert!(e.to_string().contains("not a topic"), "{e}");
    let e = Router::new(&bus, "no spaces allowed")
        .route("control.router.ok", on)
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName, "{e}");
    assert!(e.to_string().contains("route control.router.ok"), "{e}");
    // A route that starts before a failing one is stopped again: its group
    // has no consumer left, so deleting it is not refused as busy.
    let e = Router::new(&bus, "first")
        .route("control.router.first", on)
        .route("bad topic", on)
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{e}");
    let first = Topic::new("control.router.first").unwrap();
    bus.transport()
        .delete_group(&first, &oona::Name::new("first").unwrap())
        .await
        .unwrap();
}
