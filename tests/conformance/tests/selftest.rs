//! The suite must catch broken transports. Each test wraps the real memory
//! transport in one deliberate fault (a "mutant") and checks that the case
//! meant to notice it fails — so a green run of the suite means something.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use oona_conformance::{cases, CaseError, Fixture, Timing};
use oona_core::memory::MemoryTransport;
use oona_core::{
    Capabilities, Delivery, DeliveryStream, Depth, Envelope, Error, ErrorKind, Health,
    HealthStatus, Name, Receipt, Result, Retention, Settle, Settlement, StartPosition,
    Subscription, Topic, TopicPolicy, Transport,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Deliveries carry an extra header.
    ExtraHeader,
    /// Every 50th publish answers Ok without storing anything.
    LosePublishes,
    /// Acks are dropped (the delivery is never settled).
    AckIgnored,
    /// Nack delays are ignored.
    NackDelayIgnored,
    /// Attempts are always reported as 1.
    AttemptAlwaysOne,
    /// Reject acks instead of dead-lettering.
    RejectAcks,
    /// The stream ends at the first error.
    StreamEndsOnError,
    /// Close does nothing.
    CloseIgnored,
    /// Claims a 1000-byte limit but does not enforce it.
    LimitNotEnforced,
    /// Latest groups start from earliest.
    LatestIsEarliest,
    /// Earliest groups start from latest.
    EarliestIsLatest,
    /// Start-at-time groups start from earliest.
    StartAtIgnored,
    /// `key_ordered` is not passed on.
    KeyOrderIgnored,
    /// Two consecutive deliveries of one key are handed out swapped.
    SwapSameKey,
    /// The prefetch limit is not passed on.
    PrefetchIgnored,
    /// A custom dead-letter topic is replaced by `<topic>.dlq`.
    DeadLetterTopicIgnored,
    /// Every group is the same group.
    OneGroup,
    /// Every subscription gets a group of its own.
    GroupPerConsumer,
    /// The fixture's raw write stores a valid envelope.
    RawIsEnvelope,
    /// The fixture reads back the wrong retention.
    WrongRetention,
    /// Depth leaves out what the group was handed and has not settled.
    DepthWithoutPending,
    /// Depth of an unknown group is an empty depth.
    DepthOfUnknownGroup,
    /// Health says degraded.
    HealthDegraded,
    /// Deleting a group answers Ok and deletes nothing.
    DeleteGroupKeepsIt,
    /// Deleting a group deletes the topic's other groups too.
    DeleteGroupDeletesAll,
}

#[derive(Debug)]
struct Mutant {
    inner: Arc<dyn Transport>,
    fault: Fault,
    publishes: std::sync::atomic::AtomicUsize,
}

struct Forward(Delivery);

#[async_trait]
impl Settle for Forward {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<()> {
        let d = self.0;
        match settlement {
            Settlement::Ack => d.ack().await,
            Settlement::Redeliver { delay } if delay.is_zero() => d.nack(None).await,
            Settlement::Redeliver { delay } => d.nack(Some(delay)).await,
            // The inner delivery decides again from its own attempt count.
            Settlement::DeadLetter { reason, .. } if reason.starts_with("max attempts") => {
                d.nack(None).await
            }
            Settlement::DeadLetter { reason, .. } => d.reject(reason).await,
        }
    }
}

struct Dropped;

#[async_trait]
impl Settle for Dropped {
    async fn settle(self: Box<Self>, _: Settlement) -> Result<()> {
        Ok(())
    }
}

fn wrap(fault: Fault, d: Delivery) -> Delivery {
    let mut env = d.envelope().clone();
    let mut info = d.info().clone();
    if fault == Fault::ExtraHeader {
        env.headers.insert("x-mutant".into(), "1".into());
    }
    if fault == Fault::AttemptAlwaysOne {
        info.attempt = 1;
    }
    Delivery::new(env, info, Box::new(MutantSettle { fault, d }))
}

struct MutantSettle {
    fault: Fault,
    d: Delivery,
}

#[async_trait]
impl Settle for MutantSettle {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<()> {
        let settlement = match (self.fault, settlement) {
            (Fault::AckIgnored, Settlement::Ack) => {
                return Box::new(Dropped).settle(Settlement::Ack).await
            }
            (Fault::NackDelayIgnored, Settlement::Redeliver { .. }) => Settlement::Redeliver {
                delay: Duration::ZERO,
            },
            (Fault::RejectAcks, Settlement::DeadLetter { reason, .. })
                if !reason.starts_with("max attempts") =>
            {
                Settlement::Ack
            }
            (_, s) => s,
        };
        Box::new(Forward(self.d)).settle(settlement).await
    }
}

#[async_trait]
impl Transport for Mutant {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        let c = self.inner.capabilities();
        if self.fault == Fault::LimitNotEnforced {
            c.with_max_payload_bytes(1000)
        } else {
            c
        }
    }
    async fn ensure_topic(&self, topic: &Topic, policy: &TopicPolicy) -> Result<()> {
        self.inner.ensure_topic(topic, policy).await
    }
    async fn publish(&self, envelope: Envelope) -> Result<Receipt> {
        let n = self
            .publishes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.fault == Fault::LosePublishes && n % 50 == 49 {
            return Ok(Receipt::new(envelope.event_id, envelope.topic, None));
        }
        self.inner.publish(envelope).await
    }
    async fn subscribe(&self, mut subscription: Subscription) -> Result<DeliveryStream> {
        match (self.fault, subscription.start) {
            (Fault::LatestIsEarliest, StartPosition::Latest)
            | (Fault::StartAtIgnored, StartPosition::At(_)) => {
                subscription = subscription.start(StartPosition::Earliest);
            }
            (Fault::EarliestIsLatest, StartPosition::Earliest) => {
                subscription = subscription.start(StartPosition::Latest);
            }
            _ => {}
        }
        if self.fault == Fault::OneGroup {
            subscription.group = Name::new("shared").expect("valid name");
        }
        if self.fault == Fault::GroupPerConsumer {
            subscription.group = Name::unique("own");
        }
        if self.fault == Fault::DeadLetterTopicIgnored {
            let default = subscription.topic.dead_letter();
            subscription = subscription.dead_letter(default);
        }
        if self.fault == Fault::PrefetchIgnored {
            subscription = subscription.prefetch(Subscription::DEFAULT_PREFETCH);
        }
        if self.fault == Fault::KeyOrderIgnored {
            subscription = subscription.key_ordered(false);
        }
        let fault = self.fault;
        let s = self.inner.subscribe(subscription).await?;
        if fault == Fault::SwapSameKey {
            return Ok(DeliveryStream::new(
                swap_same_key(s).map(move |r| r.map(|d| wrap(fault, d))),
            ));
        }
        if fault == Fault::StreamEndsOnError {
            return Ok(DeliveryStream::new(
                s.take_while(|r| futures::future::ready(r.is_ok()))
                    .map(move |r| r.map(|d| wrap(fault, d))),
            ));
        }
        Ok(DeliveryStream::new(
            s.map(move |r| r.map(|d| wrap(fault, d))),
        ))
    }
    async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        self.inner.delete_topic(topic).await
    }
    async fn list_topics(&self) -> Result<Vec<Topic>> {
        self.inner.list_topics().await
    }
    async fn describe_topic(&self, topic: &Topic) -> Result<oona_core::TopicInfo> {
        self.inner.describe_topic(topic).await
    }
    async fn delete_group(&self, topic: &Topic, group: &Name) -> Result<()> {
        match self.fault {
            Fault::DeleteGroupKeepsIt => Ok(()),
            Fault::DeleteGroupDeletesAll => {
                for g in self.inner.describe_topic(topic).await?.groups {
                    self.inner.delete_group(topic, &g.group).await?;
                }
                Ok(())
            }
            _ => self.inner.delete_group(topic, group).await,
        }
    }
    async fn depth(&self, topic: &Topic, group: &Name) -> Result<Depth> {
        let d = self.inner.depth(topic, group).await;
        match (self.fault, d) {
            (Fault::DepthWithoutPending, Ok(d)) => Ok(Depth::new(d.backlog, 0)),
            (Fault::DepthOfUnknownGroup, Err(e)) if e.kind() == ErrorKind::NotFound => {
                Ok(Depth::default())
            }
            (_, d) => d,
        }
    }
    async fn health(&self) -> Health {
        let h = self.inner.health().await;
        if self.fault == Fault::HealthDegraded {
            return Health::new(HealthStatus::Degraded, h.transport, "mutant", None);
        }
        h
    }
    async fn close(&self) -> Result<()> {
        if self.fault == Fault::CloseIgnored {
            return Ok(());
        }
        self.inner.close().await
    }
}

/// Hold each delivery until the next one: if it has the same key, hand the
/// two out swapped. A held delivery is released after 100 ms of silence.
fn swap_same_key(inner: DeliveryStream) -> DeliveryStream {
    struct St {
        inner: DeliveryStream,
        held: Option<Delivery>,
        out: std::collections::VecDeque<Delivery>,
    }
    let st = St {
        inner,
        held: None,
        out: Default::default(),
    };
    let s = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(d) = st.out.pop_front() {
                return Some((Ok(d), st));
            }
            let next = if st.held.is_some() {
                match tokio::time::timeout(Duration::from_millis(100), st.inner.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        let h = st.held.take()?;
                        return Some((Ok(h), st));
                    }
                }
            } else {
                st.inner.next().await
            };
            match next {
                Some(Ok(d)) => match st.held.take() {
                    Some(h) if h.envelope().key == d.envelope().key => {
                        st.out.push_back(d);
                        st.out.push_back(h);
                    }
                    Some(h) => {
                        st.out.push_back(h);
                        st.held = Some(d);
                    }
                    None => st.held = Some(d),
                },
                Some(Err(e)) => return Some((Err(e), st)),
                None => {
                    let h = st.held.take()?;
                    return Some((Ok(h), st));
                }
            }
        }
    });
    DeliveryStream::new(s)
}

struct MutantFixture {
    broker: MemoryTransport,
    fault: Fault,
}

#[async_trait]
impl Fixture for MutantFixture {
    fn name(&self) -> String {
        format!("memory-{:?}", self.fault)
    }
    async fn connect(&self) -> Result<Arc<dyn Transport>> {
        Ok(Arc::new(Mutant {
            inner: Arc::new(self.broker.connect_same()),
            fault: self.fault,
            publishes: Default::default(),
        }))
    }
    async fn write_raw(&self, topic: &Topic, raw: &[u8]) -> Result<()> {
        if self.fault == Fault::RawIsEnvelope {
            let e = Envelope::builder(topic.clone(), raw.to_vec()).build();
            return self.broker.publish(e).await.map(|_| ());
        }
        self.broker.inject_raw(topic, raw.to_vec())
    }
    async fn applied_retention(&self, topic: &Topic) -> Result<Retention> {
        if self.fault == Fault::WrongRetention {
            return Ok(Retention::For(Duration::from_secs(3600)));
        }
        self.broker
            .applied_retention(topic)
            .ok_or_else(|| Error::new(ErrorKind::Broker, "no such topic"))
    }
    async fn cut_connections(&self) -> Result<()> {
        self.broker.set_offline(true);
        Ok(())
    }
    async fn restore_connections(&self) -> Result<()> {
        self.broker.set_offline(false);
        Ok(())
    }
    // Short waits: a mutant is caught by a wrong answer or a missing
    // delivery, so nothing here needs the default patience.
    fn timing(&self) -> Timing {
        Timing::default()
            .with_ack_deadline(Duration::from_millis(400))
            .with_nack_delay(Duration::from_millis(400))
            .with_margin(Duration::from_millis(800))
            .with_receive_timeout(Duration::from_secs(2))
            .with_quiet(Duration::from_millis(200))
            .with_round_trip_messages(200)
    }
}

async fn must_fail(fault: Fault, case: &str) {
    let case = cases::ALL
        .iter()
        .find(|c| c.name == case)
        .unwrap_or_else(|| panic!("no case named {case}"));
    let fx = MutantFixture {
        broker: MemoryTransport::new(),
        fault,
    };
    match (case.run)(&fx).await {
        Err(CaseError::Failed(why)) => eprintln!("{fault:?} caught by {}: {why}", case.name),
        other => panic!("{fault:?} was not caught by {}: {other:?}", case.name),
    }
}

macro_rules! caught {
    ($test:ident, $fault:expr, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            must_fail($fault, stringify!($case)).await;
        }
    };
}

caught!(
    extra_header_fails_round_trip,
    Fault::ExtraHeader,
    round_trip
);
caught!(
    extra_header_fails_trace_case,
    Fault::ExtraHeader,
    trace_context_and_headers
);
caught!(
    lost_publishes_fail_round_trip,
    Fault::LosePublishes,
    round_trip
);
caught!(
    lost_publishes_fail_concurrency_case,
    Fault::LosePublishes,
    concurrent_publishers_and_subscribers
);
caught!(
    ignored_acks_fail_restart_case,
    Fault::AckIgnored,
    acked_not_redelivered_after_restart
);
caught!(
    ignored_acks_fail_close_case,
    Fault::AckIgnored,
    close_ends_streams_and_flushes_acks
);
caught!(
    ignored_acks_fail_redelivery_case,
    Fault::AckIgnored,
    redeliver_after_ack_deadline
);
caught!(
    ignored_nack_delay_fails,
    Fault::NackDelayIgnored,
    nack_delay_respected
);
caught!(
    wrong_attempts_fail_redelivery_case,
    Fault::AttemptAlwaysOne,
    redeliver_after_ack_deadline
);
caught!(
    wrong_attempts_fail_nack_case,
    Fault::AttemptAlwaysOne,
    nack_redelivers
);
caught!(
    reject_as_ack_fails,
    Fault::RejectAcks,
    reject_dead_letters_at_once
);
caught!(
    stream_ending_on_error_fails_reconnect,
    Fault::StreamEndsOnError,
    reconnect_after_cut
);
caught!(
    ignored_close_fails,
    Fault::CloseIgnored,
    close_ends_streams_and_flushes_acks
);
caught!(
    unenforced_limit_fails,
    Fault::LimitNotEnforced,
    oversized_payload_rejected
);
caught!(
    latest_as_earliest_fails,
    Fault::LatestIsEarliest,
    latest_skips_history
);
caught!(
    earliest_as_latest_fails,
    Fault::EarliestIsLatest,
    earliest_replays_history
);
caught!(start_at_ignored_fails, Fault::StartAtIgnored, start_at_time);
caught!(
    key_order_ignored_fails,
    Fault::KeyOrderIgnored,
    key_ordered_competing
);
caught!(swapped_key_order_fails, Fault::SwapSameKey, per_key_order);
caught!(
    swapped_batch_order_fails,
    Fault::SwapSameKey,
    publish_batch_in_order
);
caught!(
    prefetch_ignored_fails,
    Fault::PrefetchIgnored,
    prefetch_limits_unsettled
);
caught!(
    dead_letter_topic_ignored_fails,
    Fault::DeadLetterTopicIgnored,
    dead_letter_topic_override
);
caught!(
    wrong_attempts_fail_dead_letter_case,
    Fault::AttemptAlwaysOne,
    dead_letter_after_max_attempts
);
caught!(
    wrong_attempts_fail_expiry_case,
    Fault::AttemptAlwaysOne,
    dead_letter_after_deadline_expiry
);
caught!(
    one_group_fails_independent_groups,
    Fault::OneGroup,
    independent_groups
);
caught!(
    group_per_consumer_fails_competing,
    Fault::GroupPerConsumer,
    competing_consumers
);
caught!(
    group_per_consumer_fails_resume,
    Fault::GroupPerConsumer,
    existing_group_resumes_ignoring_start
);
caught!(
    raw_envelope_fails_poison_case,
    Fault::RawIsEnvelope,
    poison_goes_to_dead_letter
);
caught!(
    wrong_retention_fails,
    Fault::WrongRetention,
    retention_applied
);
caught!(
    degraded_health_fails,
    Fault::HealthDegraded,
    health_reports_up
);
caught!(
    depth_without_pending_fails,
    Fault::DepthWithoutPending,
    depth_follows_settlement
);
caught!(
    delete_group_keeping_it_fails,
    Fault::DeleteGroupKeepsIt,
    admin_describes_topics_and_groups
);
caught!(
    delete_group_deleting_all_fails,
    Fault::DeleteGroupDeletesAll,
    admin_describes_topics_and_groups
);
caught!(
    depth_of_unknown_group_fails,
    Fault::DepthOfUnknownGroup,
    depth_follows_settlement
);
