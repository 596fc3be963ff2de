//! The handler runner on the memory transport.
#![cfg(feature = "memory")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{bus, read_dead_letters, sub, topic, wait_stats, GUARD};
use oona::{HandlerError, Incoming, Name, StopReason, Subscription};
use serde::{Deserialize, Serialize};
use tokio::sync::{Barrier, Notify, Semaphore};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Cmd {
    id: u32,
    action: String,
}

fn cmd(id: u32, action: &str) -> Cmd {
    Cmd {
        id,
        action: action.to_string(),
    }
}

#[tokio::test]
async fn ok_acks_temporary_nacks_permanent_rejects_panic_and_decode_dead_letter() {
    let bus = bus().await;
    let t = topic("control.kasmina.commands");
    let mut dlq = bus
        .subscribe_raw(Subscription::new(
            t.dead_letter(),
            Name::new("audit").unwrap(),
        ))
        .await
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::<(u32, u32)>::new()));
    let seen = calls.clone();
    let handle = bus
        .runner::<Cmd>(sub(&t, "kasmina").max_attempts(3))
        .start(move |msg: Incoming<Cmd>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push((msg.value().id, msg.attempt()));
                match msg.value().action.as_str() {
                    "ok" => Ok(()),
                    // Fails once, then succeeds on redelivery.
                    "flaky" if msg.attempt() == 1 => Err(HandlerError::temporary("busy")),
                    "flaky" => Ok(()),
                    "always-busy" => Err(HandlerError::temporary("still busy")),
                    "bad" => Err(HandlerError::permanent("unknown seed 99")),
                    "boom" => panic!("handler bug on {}", msg.value().id),
                    other => Err(HandlerError::permanent(format!("unexpected {other}"))),
                }
            }
        })
        .await
        .unwrap();

    for (id, action) in [
        (1, "ok"),
        (2, "flaky"),
        (3, "bad"),
        (4, "boom"),
        (5, "always-busy"),
    ] {
        bus.publish(&t, &cmd(id, action)).await.unwrap();
    }
    let poison = oona::Envelope::builder(t.clone(), "not json at all").build();
    let poison_id = poison.event_id.clone();
    bus.publish_envelope(poison).await.unwrap();

    // ok(1) + flaky(2) + bad(1) + boom(1) + always-busy(3) + poison(1)
    wait_stats(&handle, |s| s.settled() == 9).await;
    let summary = handle.shutdown().await.unwrap();
    assert_eq!(summary.stop, StopReason::Shutdown);
    assert_eq!(summary.received, 9);
    assert_eq!(summary.acked, 2, "{summary}");
    assert_eq!(summary.nacked, 4, "{summary}"); // flaky once, always-busy 3 times
    assert_eq!(summary.rejected, 3, "{summary}"); // bad, boom, poison
    assert_eq!(summary.dead_lettered, 4, "{summary}"); // + always-busy on its last attempt
    assert_eq!(summary.decode_failures, 1);
    assert_eq!(summary.panics, 1);
    assert_eq!(summary.settle_errors, 0);

    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.contains(&(2, 1)) && calls.contains(&(2, 2)),
        "{calls:?}"
    );
    assert!(calls.contains(&(5, 3)), "{calls:?}");

    let mut dead = read_dead_letters(&mut dlq, 4).await;
    dead.sort_by(|a, b| a.reason.cmp(&b.reason));
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("decode: ")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("handler panicked: handler bug on 4")),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"unknown seed 99"), "{reasons:?}");
    assert!(
        reasons.contains(&"max attempts reached (3 of 3); last: nacked: still busy"),
        "{reasons:?}"
    );
    let poison_dl = dead
        .iter()
        .find(|d| d.reason.starts_with("decode: "))
        .unwrap();
    assert_eq!(poison_dl.original.event_id, poison_id);
    assert_eq!(poison_dl.group, "kasmina");
}

#[tokio::test]
async fn concurrency_is_bounded_and_used() {
    const N: usize = 3;
    let bus = bus().await;
    let t = topic("telemetry.seed.health");
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(0));
    let (i, m, s, g) = (
        in_flight.clone(),
        max_seen.clone(),
        started.clone(),
        gate.clone(),
    );
    let handle = bus
        .runner::<Cmd>(sub(&t, "tamiyo"))
        .concurrency(N)
        .start(move |_msg: Incoming<Cmd>| {
            let (i, m, s, g) = (i.clone(), m.clone(), s.clone(), g.clone());
            async move {
                let now = i.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                s.notify_one();
                // Hold the slot until the test opens the gate.
                g.acquire().await.unwrap().forget();
                i.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .await
        .unwrap();
    // No key: any free slot may take them.
    for id in 0..20 {
        bus.publish(&t, &cmd(id, "ok")).await.unwrap();
    }
    // Wait until the bound is reached, then give the runner every chance
    // to exceed it before opening the gate.
    tokio::time::timeout(GUARD, async {
        while in_flight.load(Ordering::SeqCst) < N {
            started.notified().await;
        }
    })
    .await
    .expect("never reached the concurrency bound");
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(in_flight.load(Ordering::SeqCst), N);
    gate.add_permits(1000);
    wait_stats(&handle, |s| s.acked == 20).await;
    let summary = handle.shutdown().await.unwrap();
    assert_eq!(summary.acked, 20);
    assert_eq!(
        max_seen.load(Ordering::SeqCst),
        N,
        "bound exceeded or never reached"
    );
}

#[tokio::test]
async fn per_key_order_holds_with_concurrency() {
    const N: usize = 4;
    const PER_KEY: u32 = 50;
    let keys: Vec<String> = (0..N).map(|i| format!("seed-{i}")).collect();
    let bus = bus().await;
    let t = topic("telemetry.seed.health");
    let order: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    // The first message of every key waits for the first of all others:
    // proves N handlers ran at once (it would hang otherwise).
    let barrier = Arc::new(Barrier::new(N));
    let (o, b) = (order.clone(), barrier.clone());
    let handle = bus
        .runner::<Cmd>(sub(&t, "tamiyo"))
        .concurrency(N)
        .start(move |msg: Incoming<Cmd>| {
            let (o, b) = (o.clone(), b.clone());
            async move {
                let key = msg.envelope().key.clone().unwrap_or_default();
                let seq = msg.value().id;
                if seq == 0 {
                    b.wait().await;
                }
                // Vary the interleaving between keys.
                for _ in 0..(rand::random::<u8>() % 8) {
                    tokio::task::yield_now().await;
                }
                o.lock().unwrap().entry(key).or_default().push(seq);
                Ok(())
            }
        })
        .await
        .unwrap();
    // First every key's seq 0 (they meet at the barrier), then the keys
    // interleaved at random, each key's sequence ascending.
    for k in &keys {
        bus.message(&t, &cmd(0, "ok")).key(k).send().await.unwrap();
    }
    let mut next_seq = [1u32; N];
    while next_seq.iter().any(|s| *s < PER_KEY) {
        let i = rand::random::<usize>() % N;
        if next_seq[i] < PER_KEY {
            let k = &keys[i];
            bus.message(&t, &cmd(next_seq[i], "ok"))
                .key(k)
                .send()
                .await
                .unwrap();
            next_seq[i] += 1;
        }
    }
    let total = u64::from(PER_KEY) * N as u64;
    wait_stats(&handle, |s| s.acked == total).await;
    let summary = handle.shutdown().await.unwrap();
    assert_eq!(summary.acked, total);
    let order = order.lock().unwrap();
    for k in &keys {
        let expected: Vec<u32> = (0..PER_KEY).collect();
        assert_eq!(order.get(k), Some(&expected), "key {k} out of order");
    }
}

#[tokio::test]
async fn busy_key_holds_back_only_itself() {
    let bus = bus().await;
    let t = topic("telemetry.seed.health");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let slow_order: Arc<Mutex<Vec<u32>>> = Arc::default();
    let (g, o) = (gate.clone(), slow_order.clone());
    let handle = bus
        .runner::<Cmd>(sub(&t, "tamiyo"))
        .concurrency(2)
        .start(move |msg: Incoming<Cmd>| {
            let (g, o) = (g.clone(), o.clone());
            async move {
                if msg.envelope().key.as_deref() == Some("slow") {
                    g.acquire().await.unwrap().forget();
                    o.lock().unwrap().push(msg.value().id);
                }
                Ok(())
            }
        })
        .await
        .unwrap();
    // Three of the slow key (the first blocks its handler), then twenty
    // other keys and five without a key: all of those are handled while
    // the slow key waits.
    for id in 0..3 {
        bus.message(&t, &cmd(id, "ok"))
            .key("slow")
            .send()
            .await
            .unwrap();
    }
    for id in 0..20 {
        let key = format!("fast-{id}");
        bus.message(&t, &cmd(id, "ok"))
            .key(key)
            .send()
            .await
            .unwrap();
    }
    for id in 0..5 {
        bus.publish(&t, &cmd(id, "ok")).await.unwrap();
    }
    wait_stats(&handle, |s| s.acked == 25).await;
    assert!(slow_order.lock().unwrap().is_empty(), "the slow key ran");
    gate.add_permits(3);
    wait_stats(&handle, |s| s.acked == 28).await;
    assert_eq!(
        *slow_order.lock().unwrap(),
        [0, 1, 2],
        "the slow key kept its order"
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_in_flight_and_stops_taking_work() {
    let bus = bus().await;
    let t = topic("control.kasmina.commands");
    let started = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());
    let finished = Arc::new(AtomicBool::new(false));
    let (s, g, f) = (started.clone(), gate.clone(), finished.clone());
    let handle = bus
        .runner::<Cmd>(sub(&t, "kasmina").ack_deadline(std::time::Duration::from_secs(600)))
        .concurrency(2)
        .start(move |_msg: Incoming<Cmd>| {
            let (s, g, f) = (s.clone(), g.clone(), f.clone());
            async move {
                s.notify_one();
                g.notified().await;
                f.store(true, Ordering::SeqCst);
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.publish(&t, &cmd(1, "slow")).await.unwrap();
    tokio::time::timeout(GUARD, started.notified())
        .await
        .unwrap();
    let token = handle.shutdown_token();
    token.trigger();
    // Published after shutdown: must not be taken by this runner.
    bus.publish(&t, &cmd(2, "later")).await.unwrap();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(
        !handle.is_finished(),
        "returned while a handler was in flight"
    );
    gate.notify_one();
    let summary = tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
    assert!(finished.load(Ordering::SeqCst));
    assert_eq!(summary.stop, StopReason::Shutdown);
    assert_eq!(summary.received, 1, "{summary}");
    assert_eq!(summary.acked, 1, "{summary}");

    // The in-flight message was acked (not left for redelivery) and the
    // later one is still there for the group's next consumer.
    let mut next = bus.subscribe::<Cmd>(sub(&t, "kasmina")).await.unwrap();
    let d = tokio::time::timeout(GUARD, next.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.value().id, 2);
    assert_eq!(d.attempt(), 1);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn runners_stop_when_the_transport_closes() {
    let bus = bus().await;
    let t = topic("system.events.epoch");
    let handle = bus
        .runner::<Cmd>(sub(&t, "nissa"))
        .start(|_m: Incoming<Cmd>| async { Ok(()) })
        .await
        .unwrap();
    bus.publish(&t, &cmd(1, "epoch")).await.unwrap();
    wait_stats(&handle, |s| s.acked == 1).await;
    bus.close().await.unwrap();
    let summary = tokio::time::timeout(GUARD, handle.join())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.stop, StopReason::StreamEnded);
    assert_eq!(summary.acked, 1);
    // run() on a closed transport reports the subscribe error.
    let e = bus
        .runner(sub(&t, "tamiyo"))
        .run(|_m: Incoming<Cmd>| async { Ok(()) })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), oona::ErrorKind::Closed, "{e}");
}

#[tokio::test]
async fn a_handler_slower_than_the_ack_deadline_keeps_its_lease() {
    let bus = bus().await;
    let t = topic("control.kasmina.slow");
    let calls = Arc::new(Mutex::new(Vec::<(u32, u32)>::new()));
    let seen = calls.clone();
    let deadline = std::time::Duration::from_millis(200);
    let handle = bus
        .runner::<Cmd>(sub(&t, "kasmina").ack_deadline(deadline))
        .start(move |msg: Incoming<Cmd>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push((msg.value().id, msg.attempt()));
                // Three deadlines: only the runner's extensions keep it.
                tokio::time::sleep(deadline * 3).await;
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.publish(&t, &cmd(1, "slow")).await.unwrap();
    bus.publish(&t, &cmd(2, "slow")).await.unwrap();
    wait_stats(&handle, |s| s.acked == 2).await;
    tokio::time::sleep(deadline * 2).await;
    let summary = handle.shutdown().await.unwrap();
    assert_eq!(summary.received, 2, "{summary}");
    assert_eq!(summary.settle_errors, 0, "{summary}");
    assert_eq!(*calls.lock().unwrap(), vec![(1, 1), (2, 1)]);
}

#[tokio::test]
async fn a_handler_past_its_timeout_is_nacked_then_dead_lettered() {
    let bus = bus().await;
    let t = topic("control.kasmina.hung");
    let mut dlq = bus
        .subscribe_raw(Subscription::new(
            t.dead_letter(),
            Name::new("audit").unwrap(),
        ))
        .await
        .unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    let handle = bus
        .runner::<Cmd>(sub(&t, "kasmina").max_attempts(2))
        .handler_timeout(std::time::Duration::from_millis(100))
        .start(move |_msg: Incoming<Cmd>| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.publish(&t, &cmd(7, "hang")).await.unwrap();
    let dead = read_dead_letters(&mut dlq, 1).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(
        dead[0].reason,
        "max attempts reached (2 of 2); last: nacked: handler timed out after 100ms"
    );
    let summary = handle.shutdown().await.unwrap();
    assert_eq!((summary.nacked, summary.dead_lettered), (2, 1), "{summary}");
}
