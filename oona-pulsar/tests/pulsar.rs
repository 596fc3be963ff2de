//! Pulsar-specific behaviour beyond the conformance suite: tenants, the
//! Key_Shared order guarantee, the documented wire mapping seen by the
//! broker's own client, producer batches from foreign producers, and the
//! driver. Runs against `OONA_TEST_PULSAR_URL` (Apache Pulsar, started by
//! `scripts/brokers.sh up pulsar`).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use oona_core::{
    ConnectUrl, DeliveryStream, Envelope, ErrorKind, Name, StartPosition, Subscription, Topic,
    Transport,
};
use oona_pulsar::{PulsarTransport, DRIVER};

const WAIT: Duration = Duration::from_secs(10);

/// The broker, or `None` (test skipped) when the env var is unset and
/// `OONA_TEST_REQUIRE` is not 1.
fn broker() -> Option<support::Broker> {
    oona_conformance::url_of(support::ENV)
        .map(|url| support::Broker::direct(&url).expect("the test broker's URL"))
}

fn topic(plane: &str) -> Topic {
    Topic::new(format!(
        "{plane}.pulsartest{}.t",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap()
}

fn group(prefix: &str) -> Name {
    Name::unique(prefix)
}

async fn next(s: &mut DeliveryStream, within: Duration) -> Option<oona_core::Delivery> {
    match tokio::time::timeout(within, s.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        Ok(Some(Err(e))) => panic!("stream error: {e}"),
        Ok(None) => panic!("stream ended"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_topic_in_two_tenants_is_isolated() {
    let Some(b) = broker() else { return };
    let (tenant, ns) = b.tenant_namespace();
    let other_tenant = format!("{tenant}-other");
    b.create_namespace(&other_tenant, &ns).await;
    let a = PulsarTransport::connect_url(&b.url()).await.unwrap();
    let o =
        PulsarTransport::connect_url(&b.url_with(&[("tenant", &other_tenant), ("namespace", &ns)]))
            .await
            .unwrap();
    let t = topic("control");
    assert_ne!(a.pulsar_topic(&t), o.pulsar_topic(&t));
    assert_eq!(
        a.pulsar_topic(&t),
        format!("persistent://{tenant}/{ns}/{t}")
    );
    let sub = |g: &str| {
        Subscription::new(t.clone(), group(g))
            .start(StartPosition::Earliest)
            .ack_deadline(Duration::from_secs(30))
    };
    let mut sa = a.subscribe(sub("iso")).await.unwrap();
    let mut so = o.subscribe(sub("iso")).await.unwrap();
    let ea = Envelope::builder(t.clone(), "{\"tenant\":\"a\"}")
        .sender_id("a")
        .build();
    let eo = Envelope::builder(t.clone(), "{\"tenant\":\"o\"}")
        .sender_id("o")
        .build();
    a.publish(ea.clone()).await.unwrap();
    o.publish(eo.clone()).await.unwrap();
    let da = next(&mut sa, WAIT)
        .await
        .expect("tenant a gets its message");
    assert_eq!(da.envelope(), &ea);
    da.ack().await.unwrap();
    let d_o = next(&mut so, WAIT)
        .await
        .expect("the other tenant gets its message");
    assert_eq!(d_o.envelope(), &eo);
    d_o.ack().await.unwrap();
    // Neither sees the other's message.
    assert!(next(&mut sa, Duration::from_millis(500)).await.is_none());
    assert!(next(&mut so, Duration::from_millis(500)).await.is_none());
    a.close().await.unwrap();
    o.close().await.unwrap();
}

/// An Oona tenant without a `namespace`: the transport creates the Pulsar
/// tenant and a namespace per plane with the plane's policies (retention,
/// a time to live as long, the backlog quota where the policy has one),
/// and the broker reads them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_gets_a_namespace_per_plane_with_the_planes_policies() {
    use oona_core::{PolicySet, Retention, TopicPolicy};
    let Some(b) = broker() else { return };
    let tenant = format!("tp{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let month = Retention::For(Duration::from_secs(30 * 24 * 3600));
    let policies = PolicySet::default().with_plane(
        "control",
        TopicPolicy::new(month).with_backlog_limit_bytes(Some(1 << 20)),
    );
    let config = oona_pulsar::PulsarConfig::parse(&b.tenant_url(&tenant))
        .unwrap()
        .with_policies(policies);
    let t = PulsarTransport::connect(config).await.unwrap();
    let (tele, ctl, inno) = (topic("telemetry"), topic("control"), topic("innovation"));
    for x in [&tele, &ctl, &inno] {
        t.publish(Envelope::builder(x.clone(), "{}").build())
            .await
            .unwrap();
        let plane = x.plane();
        assert_eq!(
            t.pulsar_topic(x),
            format!("persistent://{tenant}/{plane}/{x}")
        );
    }
    let hours_72 = Duration::from_secs(72 * 3600);
    let p = t.namespace_policies("telemetry").await.unwrap();
    println!("namespace {tenant}/telemetry as the admin API reads it back: retention_policies {}, message_ttl_in_seconds {}, backlog_quota_map {}",
        p.raw["retention_policies"], p.raw["message_ttl_in_seconds"], p.raw["backlog_quota_map"]);
    assert_eq!(p.retention, Some(Retention::For(hours_72)));
    assert_eq!(p.message_ttl, Some(hours_72));
    assert_eq!(p.backlog_quota, None);
    let c = t.namespace_policies("control").await.unwrap();
    println!("namespace {tenant}/control: retention_policies {}, message_ttl_in_seconds {}, backlog_quota_map {}",
        c.raw["retention_policies"], c.raw["message_ttl_in_seconds"], c.raw["backlog_quota_map"]);
    assert_eq!(c.retention, Some(month));
    assert_eq!(
        c.backlog_quota,
        Some((1 << 20, "producer_exception".to_string()))
    );
    let i = t.namespace_policies("innovation").await.unwrap();
    assert_eq!(i.retention, Some(Retention::Indefinite));
    assert_eq!(i.message_ttl, None, "innovation is kept, read or not");
    // The topic reads its retention from the namespace (no topic policy).
    let info = t.describe_topic(&tele).await.unwrap();
    assert_eq!(info.retention, Some(Retention::For(hours_72)));
    assert_eq!(t.applied_retention(&tele).await.unwrap(), None);
    let listed = t.list_topics().await.unwrap();
    for x in [&tele, &ctl, &inno] {
        assert!(listed.contains(x), "{x} not in {listed:?}");
        t.delete_topic(x).await.unwrap();
    }
    t.close().await.unwrap();
}

/// Tiered storage of `innovation.*`: the plane's namespace gets the offload
/// policy (driver `filesystem`, the broker's local-disk offloader from
/// Maven Central); a topic written over two ledgers has the closed one
/// offloaded, and a new subscription replays every message from the
/// earliest, the offloaded ones read back from tiered storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn innovation_offloads_to_tiered_storage_and_replays_from_the_earliest() {
    let Some(b) = broker() else { return };
    let offload_dir = std::env::var("OONA_TEST_PULSAR_OFFLOAD_DIR")
        .expect("scripts/brokers.sh up pulsar sets OONA_TEST_PULSAR_OFFLOAD_DIR");
    let tenant = format!("to{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let url = format!(
        "{}&offload_driver=filesystem&offload_deletion_lag=0s&operation_timeout=60s",
        b.tenant_url(&tenant)
    );
    let t = PulsarTransport::connect_url(&url).await.unwrap();
    let x = topic("innovation");
    let publish = |from: usize, n: usize| {
        let (t, x) = (&t, &x);
        async move {
            let batch: Vec<Envelope> = (from..from + n)
                .map(|i| Envelope::builder(x.clone(), format!("{{\"i\":{i}}}")).build())
                .collect();
            t.publish_batch(batch).await.unwrap()
        }
    };
    let mut ids: Vec<_> = publish(0, 100)
        .await
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    let p = t.namespace_policies("innovation").await.unwrap();
    println!(
        "namespace {tenant}/innovation offload_policies as the admin API reads it back: {}",
        p.raw["offload_policies"]
    );
    assert_eq!(p.offload_driver.as_deref(), Some("filesystem"));
    assert_eq!(
        p.raw["offload_policies"]["managedLedgerOffloadDeletionLagInMillis"],
        0
    );
    let own = t.namespace_policies("oona").await.unwrap();
    assert_eq!(own.offload_driver, None, "only planes kept forever offload");
    // Unloading the topic closes its ledger: only closed ledgers offload.
    let admin = b.admin_url().unwrap();
    let unload = reqwest::Client::new()
        .put(format!(
            "{admin}/admin/v2/persistent/{tenant}/innovation/{x}/unload"
        ))
        .send()
        .await
        .unwrap();
    assert!(unload.status().is_success(), "unload: {}", unload.status());
    ids.extend(publish(100, 50).await.into_iter().map(|r| r.event_id));
    t.offload(&x).await.unwrap();
    let ledgers = t.ledgers(&x).await.unwrap();
    println!("ledgers of {x} after the offload (id, offloaded): {ledgers:?}");
    assert!(
        ledgers.first().is_some_and(|(_, off)| *off),
        "the first ledger is offloaded: {ledgers:?}"
    );
    let files = std::path::Path::new(&offload_dir).join(&tenant);
    assert!(
        files.is_dir(),
        "nothing offloaded under {}",
        files.display()
    );
    // A new subscription from the earliest replays all 150, in order.
    let sub = Subscription::new(x.clone(), group("replay")).start(StartPosition::Earliest);
    let mut s = t.subscribe(sub).await.unwrap();
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let d = next(&mut s, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("replay stopped after {} of {}", got.len(), ids.len()));
        got.push(d.envelope().event_id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(got, ids, "every message once, in publish order");
    println!(
        "replayed {} messages from the earliest after the offload",
        got.len()
    );
    drop(s);
    t.delete_topic(&x).await.unwrap();
    t.close().await.unwrap();
}

/// A tenant or namespace that does not exist is a clear, permanent
/// configuration error at the first lookup, not a connection problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_namespace_is_a_permanent_config_error() {
    let Some(b) = broker() else { return };
    let t = PulsarTransport::connect_url(&b.url_with(&[("namespace", "no-such-namespace")]))
        .await
        .unwrap();
    let e = t
        .publish(Envelope::builder(topic("control"), "{}").build())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(!e.is_temporary(), "{e}");
    assert!(e.to_string().contains("namespace"), "{e}");
    t.close().await.unwrap();
}

/// Per key: the consumer holding it now and the sequence numbers seen.
type KeyLog = BTreeMap<String, (Option<usize>, Vec<usize>)>;

/// Key_Shared: three consumers, messages of one key never in flight on two
/// consumers at once and always in publish order, and every key reaches
/// exactly one consumer at a time, with the default prefetch (several
/// unacked messages of one key held by one consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_shared_keeps_per_key_order_across_consumers() {
    let Some(b) = broker() else { return };
    let t = topic("control");
    let g = group("keyshared");
    let p = PulsarTransport::connect_url(&b.url()).await.unwrap();
    let (keys, per_key) = (8usize, 20usize);
    let total = keys * per_key;
    // key -> (holder now, sequence seen in order)
    let log: Arc<Mutex<KeyLog>> = Arc::new(Mutex::new(BTreeMap::new()));
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for c in 0..3usize {
        let client = PulsarTransport::connect_url(&b.url()).await.unwrap();
        let mut s = client
            .subscribe(
                Subscription::new(t.clone(), g.clone())
                    .start(StartPosition::Earliest)
                    .key_ordered(true)
                    .ack_deadline(Duration::from_secs(30)),
            )
            .await
            .unwrap();
        clients.push(client);
        let (log, seen) = (Arc::clone(&log), Arc::clone(&seen));
        tasks.push(tokio::spawn(async move {
            let mut mine = 0usize;
            while seen.load(std::sync::atomic::Ordering::SeqCst) < total {
                let Some(d) = next(&mut s, Duration::from_millis(200)).await else {
                    continue;
                };
                let key = d.envelope().key.clone().unwrap();
                let seq: usize = d.envelope().header("seq").unwrap().parse().unwrap();
                {
                    let mut l = log.lock().unwrap();
                    let e = l.entry(key.clone()).or_default();
                    assert!(
                        e.0.is_none(),
                        "key {key} handed to consumer {c} while consumer {:?} holds it",
                        e.0
                    );
                    e.0 = Some(c);
                    e.1.push(seq);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                log.lock().unwrap().get_mut(&key).unwrap().0 = None;
                d.ack().await.unwrap();
                mine += 1;
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            mine
        }));
    }
    // A key's messages back to back: a broker that ignored the key would
    // hand consecutive ones to different consumers at once.
    for k in 0..keys {
        for seq in 0..per_key {
            let e = Envelope::builder(t.clone(), "{}")
                .key(format!("key-{k}"))
                .header("seq", seq.to_string())
                .build();
            p.publish(e).await.unwrap();
        }
    }
    let mut per_consumer = Vec::new();
    for task in tasks {
        per_consumer.push(
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let log = std::mem::take(&mut *log.lock().unwrap());
    assert_eq!(log.len(), keys);
    for (k, (_, seqs)) in log.iter() {
        assert_eq!(
            *seqs,
            (0..per_key).collect::<Vec<_>>(),
            "key {k} out of order or duplicated"
        );
    }
    assert_eq!(per_consumer.iter().sum::<usize>(), total);
    for c in clients {
        c.close().await.unwrap();
    }
    p.close().await.unwrap();
}

/// The documented mapping, read with the broker's own client: metadata in
/// properties, payload as payload, key as message key, timestamp as event
/// time; and a foreign message written that way reads as an envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_mapping_interoperates_with_the_pulsar_client() {
    let Some(b) = broker() else { return };
    let (tenant, ns) = b.tenant_namespace();
    let t = topic("telemetry");
    let full = format!("persistent://{tenant}/{ns}/{t}");
    let oona = PulsarTransport::connect_url(&b.url()).await.unwrap();
    let raw = b.raw_client().await;
    let mut raw_consumer: pulsar::Consumer<Vec<u8>, _> = raw
        .consumer()
        .with_topic(&full)
        .with_subscription("raw-reader")
        .with_subscription_type(pulsar::SubType::Shared)
        .with_options(
            pulsar::ConsumerOptions::default()
                .with_initial_position(pulsar::consumer::InitialPosition::Earliest),
        )
        .build()
        .await
        .unwrap();
    let e = Envelope::builder(t.clone(), "{\"layer\":3}")
        .sender_id("kasmina")
        .key("layer-3")
        .correlation_id("c-9")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .build();
    oona.publish(e.clone()).await.unwrap();
    let m = tokio::time::timeout(WAIT, raw_consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let props: BTreeMap<String, String> = m
        .metadata()
        .properties
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    assert_eq!(m.payload.data, b"{\"layer\":3}");
    assert_eq!(m.key().as_deref(), Some("layer-3"));
    assert_eq!(m.metadata().event_time, Some(e.timestamp.unix_millis()));
    assert_eq!(props["event_id"], e.event_id.as_str());
    assert_eq!(props["sender_id"], "kasmina");
    assert_eq!(props["timestamp"], e.timestamp.to_rfc3339());
    assert_eq!(props["topic"], t.as_str());
    assert_eq!(props["correlation_id"], "c-9");
    assert_eq!(props["content_type"], "application/json");
    assert_eq!(props["h.traceparent"], e.headers["traceparent"]);
    raw_consumer.ack(&m).await.unwrap();

    // A foreign producer (what a Python service with pulsar-client does).
    let mut s = oona
        .subscribe(
            Subscription::new(t.clone(), group("foreign"))
                .start(StartPosition::Latest)
                .ack_deadline(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    let mut producer = raw.producer().with_topic(&full).build().await.unwrap();
    let msg = pulsar::producer::Message {
        payload: b"{\"from\":\"python\"}".to_vec(),
        properties: [
            ("event_id", "py-1"),
            ("sender_id", "nissa-py"),
            ("timestamp", "2026-01-02T03:04:05.123Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        partition_key: Some("seed-7".into()),
        ..Default::default()
    };
    producer
        .send_non_blocking(msg)
        .await
        .unwrap()
        .await
        .unwrap();
    let d = next(&mut s, WAIT).await.expect("the foreign message");
    let env = d.envelope();
    assert_eq!(env.event_id.as_str(), "py-1");
    assert_eq!(env.sender_id, "nissa-py");
    assert_eq!(env.key.as_deref(), Some("seed-7"));
    assert_eq!(env.topic, t);
    assert_eq!(&env.payload[..], b"{\"from\":\"python\"}");
    d.ack().await.unwrap();
    oona.close().await.unwrap();
}

/// A foreign producer that batches (the Java client's default): every
/// message of the batch is delivered once and, once all are acked, none
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_entries_from_foreign_producers() {
    let Some(b) = broker() else { return };
    let (tenant, ns) = b.tenant_namespace();
    let t = topic("system");
    let full = format!("persistent://{tenant}/{ns}/{t}");
    let oona = PulsarTransport::connect_url(&b.url()).await.unwrap();
    let mut s = oona
        .subscribe(
            Subscription::new(t.clone(), group("batch"))
                .start(StartPosition::Earliest)
                .ack_deadline(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    let raw = b.raw_client().await;
    let mut producer = raw
        .producer()
        .with_topic(&full)
        .with_options(pulsar::ProducerOptions {
            batch_size: Some(5),
            ..Default::default()
        })
        .build()
        .await
        .unwrap();
    let sent: Vec<Envelope> = (0..5)
        .map(|i| {
            Envelope::builder(t.clone(), format!("{{\"i\":{i}}}"))
                .sender_id("java")
                .build()
        })
        .collect();
    let mut receipts = Vec::new();
    for e in &sent {
        let mut m = pulsar::producer::Message {
            payload: e.payload.to_vec(),
            ..Default::default()
        };
        m.properties = oona_core::wire::fields::encode(e).into_iter().collect();
        receipts.push(producer.send_non_blocking(m).await.unwrap());
    }
    for r in receipts {
        r.await.unwrap();
    }
    let mut got = HashSet::new();
    for _ in 0..5 {
        let d = next(&mut s, WAIT).await.expect("a batch member");
        assert_eq!(d.attempt(), 1);
        let pos = d.info().position.clone().unwrap_or_default();
        assert_eq!(pos.matches(':').count(), 2, "not a batch member: {pos}");
        got.insert(d.envelope().event_id.to_string());
        d.ack().await.unwrap();
    }
    let want: HashSet<String> = sent.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(got, want);
    // Past the ack deadline: nothing comes back.
    assert!(next(&mut s, Duration::from_secs(3)).await.is_none());
    oona.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_connects_and_rejects_bad_urls() {
    assert_eq!(DRIVER.name, "pulsar");
    assert_eq!(DRIVER.schemes, &["pulsar", "pulsar+ssl"]);
    let bad = (DRIVER.connect)(
        ConnectUrl::parse("pulsar://127.0.0.1:1?tenant=esper&namespce=dev").unwrap(),
    )
    .await;
    let e = bad.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    assert!(e.to_string().contains("`namespce`"), "{e}");
    let Some(b) = broker() else { return };
    let t = (DRIVER.connect)(ConnectUrl::parse(&b.url()).unwrap())
        .await
        .unwrap();
    assert_eq!(t.name(), "pulsar");
    assert!(t.health().await.is_up());
    assert_eq!(
        t.capabilities().retention,
        b.admin_url().is_some(),
        "retention is claimed exactly when an admin API is configured"
    );
    t.close().await.unwrap();
    assert!(!t.health().await.is_up());
}

/// Every message of the marks topic of `g` on `t` so far, as (key, payload),
/// read with the broker's own client (what a service in another language
/// would see).
async fn marks_of(b: &support::Broker, t: &Topic, g: &Name) -> Vec<(String, Vec<u8>)> {
    let (tenant, ns) = b.tenant_namespace();
    let raw = b.raw_client().await;
    let mut c: pulsar::Consumer<Vec<u8>, _> = raw
        .consumer()
        .with_topic(format!("persistent://{tenant}/{ns}/{t}=oona-marks={g}"))
        .with_subscription(format!("look-{}", uuid::Uuid::new_v4().simple()))
        .with_subscription_type(pulsar::SubType::Exclusive)
        .with_options(
            pulsar::ConsumerOptions::default()
                .durable(false)
                .with_initial_position(pulsar::consumer::InitialPosition::Earliest),
        )
        .build()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), c.next()).await {
        out.push((m.key().unwrap_or_default(), m.payload.data.clone()));
    }
    let _ = c.close().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_list_hand_outs_and_go_with_the_topic() {
    let Some(b) = broker() else { return };
    let Some(admin) = b.admin_url() else {
        panic!("the test broker has no admin_url");
    };
    let (tenant, ns) = b.tenant_namespace();
    let t = topic("control");
    let g = group("marks");
    let oona = PulsarTransport::connect_url(&b.url()).await.unwrap();
    let sub = Subscription::new(t.clone(), g.clone()).start(StartPosition::Earliest);
    drop(oona.subscribe(sub.clone()).await.unwrap());
    for i in 0..3 {
        let e = Envelope::builder(t.clone(), format!("m{i}")).build();
        oona.publish(e).await.unwrap();
    }
    let mut s = oona.subscribe(sub).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut s, WAIT).await.expect("a delivery"));
    }
    // Handed out, so listed: one list (the session's key) naming 3 entries.
    let marks = marks_of(&b, &t, &g).await;
    let (session, list) = marks.last().cloned().expect("a list before the hand-out");
    let list = String::from_utf8(list).unwrap();
    let entries = list.strip_prefix("oona1;held=").expect(&list);
    assert_eq!(entries.split(',').count(), 3, "{list}");
    for d in held {
        d.ack().await.unwrap();
    }
    oona.close().await.unwrap();
    // Closed in order with nothing held: the session's key is deleted.
    let marks = marks_of(&b, &t, &g).await;
    let last = marks.iter().rev().find(|(k, _)| *k == session).unwrap();
    assert!(
        last.1.is_empty(),
        "the last list of the session: {:?}",
        last.1
    );

    let oona = PulsarTransport::connect_url(&b.url()).await.unwrap();
    oona.delete_topic(&t).await.unwrap();
    let names: Vec<String> = reqwest::get(format!("{admin}/admin/v2/persistent/{tenant}/{ns}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let left: Vec<&String> = names.iter().filter(|n| n.contains(t.as_str())).collect();
    assert!(left.is_empty(), "left after delete_topic: {left:?}");
    oona.close().await.unwrap();
}
