//! The admin calls on Kafka: topics from the cluster's metadata (retry
//! topics and Kafka's own left out), messages from the watermarks, groups
//! from the group list and their committed offsets.
//!
//! A Kafka group is cluster-wide: it is on a topic when one of its members
//! subscribes to it, or, without members, when it has committed offsets
//! there (every member commits the start of each partition it is given, so
//! a group that read the topic has, until Kafka's offset retention, 7 days
//! by default, expires them).

use std::collections::BTreeSet;
use std::time::Duration;

use oona_core::admin::{group_not_found, topic_not_found};
use oona_core::TopicInfo;
use oona_core::{Depth, Error, ErrorKind, GroupInfo, Member, Name, Result, Retention, Topic};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::groups::{GroupInfo as KafkaGroup, GroupMemberInfo};
use rdkafka::producer::Producer as _;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::consumer::{offsets_client, retry_topic, RETRY_SEGMENT};
use crate::depth::unsettled;
use crate::options::KafkaOptions;
use crate::transport::{kafka_error, Inner, NAME};

/// Offset reads run this many at a time (each needs its own client, since
/// Kafka answers offsets per group id).
const PARALLEL: usize = 8;

/// The Oona topics of the cluster's metadata, sorted.
pub(crate) fn list_topics(opts: &KafkaOptions, names: Vec<String>) -> Vec<Topic> {
    let retry = format!(".{RETRY_SEGMENT}.");
    let topics: BTreeSet<Topic> = names
        .iter()
        .filter(|n| !n.starts_with("__") && !n.contains(&retry))
        .filter_map(|n| Topic::new(opts.strip_tenant(n)?).ok())
        .collect();
    topics.into_iter().collect()
}

/// Partitions, messages and groups of `topic` (blocking: run it off the
/// runtime). The retention is read by the caller, through the admin client.
pub(crate) fn describe(inner: &Inner, topic: &Topic) -> Result<TopicInfo> {
    let timeout = Timeout::After(inner.opts.timeout);
    let client = inner.producer.client();
    let md = client
        .fetch_metadata(None, timeout)
        .map_err(|e| kafka_error("fetch metadata", e))?;
    let name = inner.opts.kafka_topic(topic);
    let Some(t) = md.topics().iter().find(|t| t.name() == name) else {
        return Err(topic_not_found(topic).with_transport(NAME));
    };
    let partitions = t.partitions().len();
    let mut messages = 0u64;
    for p in t.partitions() {
        let (low, high) = client
            .fetch_watermarks(&name, p.id(), timeout)
            .map_err(|e| kafka_error("read watermarks", e))?;
        messages += u64::try_from(high - low).unwrap_or(0);
    }
    let list = client
        .fetch_group_list(None, timeout)
        .map_err(|e| kafka_error("list groups", e))?;
    // A group with members is on the topic when one of them subscribes to
    // it; only groups without members (state Empty) need their offsets
    // read to tell: one client per group, so the fewer the better.
    let candidates: Vec<(Name, &KafkaGroup)> = list
        .groups()
        .iter()
        .filter(|g| g.protocol_type() == "consumer" || g.protocol_type().is_empty())
        .filter(|g| g.state() == "Empty" || g.members().iter().any(|m| member_reads(m, &name)))
        .filter_map(|g| Some((Name::new(inner.opts.strip_tenant(g.name())?).ok()?, g)))
        .collect();
    let groups = on_topic(inner, topic, &candidates)?;
    Ok(
        TopicInfo::new(topic.clone(), u32::try_from(partitions).unwrap_or(u32::MAX))
            .with_messages(Some(messages))
            .with_groups(groups),
    )
}

/// The groups of `candidates` that are on `topic`, with their depths.
fn on_topic(
    inner: &Inner,
    topic: &Topic,
    candidates: &[(Name, &KafkaGroup)],
) -> Result<Vec<GroupInfo>> {
    let mut out = Vec::new();
    for chunk in candidates.chunks(PARALLEL) {
        let depths: Vec<Result<Option<Depth>>> = std::thread::scope(|s| {
            let running: Vec<_> = chunk
                .iter()
                .map(|(name, _)| s.spawn(move || committed_depth(inner, topic, name)))
                .collect();
            running
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::new(ErrorKind::Internal, "an offset read panicked"))
                    })
                })
                .collect()
        });
        for ((name, g), depth) in chunk.iter().zip(depths) {
            let depth = depth?;
            let live: Vec<&GroupMemberInfo> = g
                .members()
                .iter()
                .filter(|m| member_reads(m, &inner.opts.kafka_topic(topic)))
                .collect();
            if depth.is_none() && live.is_empty() {
                continue;
            }
            // The members that read this topic (a group may read others).
            let members = live.iter().map(|m| {
                Member::new(m.id()).with_address(Some(format!(
                    "{} ({})",
                    m.client_host(),
                    m.client_id()
                )))
            });
            out.push(
                GroupInfo::new(name.clone())
                    .with_members(members.collect())
                    .with_depth(depth),
            );
        }
    }
    Ok(out)
}

/// The depth of `group` on `topic` from its committed offsets; `None` when
/// it committed nothing there.
fn committed_depth(inner: &Inner, topic: &Topic, group: &Name) -> Result<Option<Depth>> {
    let c = offsets_client(inner, group)?;
    let name = inner.opts.kafka_topic(topic);
    let Some(main) = unsettled(inner, &c, &name)? else {
        return Ok(None);
    };
    let retry = unsettled(inner, &c, &retry_topic(&name, group))?.unwrap_or(0);
    Ok(Some(Depth::new(main + retry, 0)))
}

/// Whether member `m` reads the Kafka topic `name`.
fn member_reads(m: &GroupMemberInfo, name: &str) -> bool {
    m.metadata().is_some_and(|md| subscribes(md, name))
}

/// Whether a member's subscription metadata (Kafka's
/// ConsumerProtocolSubscription: version i16, then an array of topic
/// strings, i32 count and i16 lengths) names `topic`.
fn subscribes(md: &[u8], topic: &str) -> bool {
    let mut r = md.get(2..).unwrap_or_default();
    let mut take = |n: usize| {
        let (head, rest) = (r.get(..n)?, r.get(n..)?);
        r = rest;
        Some(head)
    };
    let Some(count) = take(4).and_then(|b| Some(i32::from_be_bytes(b.try_into().ok()?))) else {
        return false;
    };
    for _ in 0..count.max(0) {
        let Some(len) = take(2).and_then(|b| Some(i16::from_be_bytes(b.try_into().ok()?))) else {
            return false;
        };
        match take(usize::try_from(len).unwrap_or(0)) {
            Some(name) if name == topic.as_bytes() => return true,
            Some(_) => {}
            None => return false,
        }
    }
    false
}

/// Kafka deletes a group whole (its offsets on every topic): refused when
/// the group has committed offsets on another of `topics` (names and
/// partition counts, from the metadata), `NotFound` when it has none on
/// this one. Blocking.
pub(crate) fn check_deletable(
    inner: &Inner,
    topic: &Topic,
    group: &Name,
    topics: &[(String, usize)],
) -> Result<()> {
    let timeout = Timeout::After(inner.opts.timeout);
    let c: BaseConsumer = offsets_client(inner, group)?;
    let name = inner.opts.kafka_topic(topic);
    if unsettled(inner, &c, &name)?.is_none() {
        return Err(group_not_found(topic, group).with_transport(NAME));
    }
    let own_retry = retry_topic(&name, group);
    let mut tpl = TopicPartitionList::new();
    for (n, partitions) in topics {
        if *n == name || *n == own_retry {
            continue;
        }
        for p in 0..i32::try_from(*partitions).unwrap_or(i32::MAX) {
            tpl.add_partition(n, p);
        }
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    let committed = c
        .committed_offsets(tpl, timeout)
        .map_err(|e| kafka_error("read committed offsets", e))?;
    let elsewhere: BTreeSet<String> = committed
        .elements()
        .iter()
        .filter(|e| matches!(e.offset(), Offset::Offset(_)))
        .map(|e| e.topic().to_string())
        .collect();
    if elsewhere.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Unsupported,
        format!(
            "Kafka deletes group {group} whole, and it also reads {}: remove it from those with Kafka's own tools (kafka-consumer-groups --delete-offsets)",
            elsewhere.into_iter().collect::<Vec<_>>().join(", ")
        ),
    )
    .with_transport(NAME))
}

/// The retention of a `retention.ms` value (-1: indefinite).
pub(crate) fn retention(ms: Option<i64>) -> Option<Retention> {
    ms.map(|ms| match u64::try_from(ms) {
        Ok(ms) => Retention::For(Duration::from_millis(ms)),
        Err(_) => Retention::Indefinite,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(topics: &[&str]) -> Vec<u8> {
        let mut b = vec![0, 1];
        b.extend((topics.len() as i32).to_be_bytes());
        for t in topics {
            b.extend((t.len() as i16).to_be_bytes());
            b.extend(t.as_bytes());
        }
        b.extend([0, 0, 0, 0]); // user data
        b
    }

    #[test]
    fn member_subscriptions_are_read() {
        let md = subscription(&["a.b.c", "telemetry.seed.health"]);
        assert!(subscribes(&md, "telemetry.seed.health"));
        assert!(subscribes(&md, "a.b.c"));
        assert!(!subscribes(&md, "a.b"));
        assert!(!subscribes(&md[..9], "telemetry.seed.health"), "truncated");
        assert!(!subscribes(&[], "a.b.c"));
    }

    #[test]
    fn retry_and_internal_topics_are_not_listed() {
        let listed = list_topics(
            &KafkaOptions::default(),
            vec![
                "__consumer_offsets".into(),
                "a.b.c".into(),
                format!("a.b.c.{RETRY_SEGMENT}.g"),
                "Not A Topic".into(),
                "a.b.c.dlq".into(),
            ],
        );
        let names: Vec<&str> = listed.iter().map(Topic::as_str).collect();
        assert_eq!(names, ["a.b.c", "a.b.c.dlq"]);
    }
}
