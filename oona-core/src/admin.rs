//! What an operator asks a broker about its topics and groups:
//! [`TopicInfo`], [`GroupInfo`] and [`Member`], the answers of
//! [`crate::Transport::list_topics`], [`crate::Transport::describe_topic`]
//! and [`crate::Transport::delete_group`].
//!
//! These read the broker's own records (Redis `XINFO`, Kafka metadata and
//! group offsets, Pulsar's admin API) and never consume: the `oona`
//! operator CLI and dashboards are built on them.

use crate::error::{Error, ErrorKind};
use crate::topic::{Name, Retention, Topic};
use crate::transport::Depth;

/// One topic as its broker holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicInfo {
    /// The topic.
    pub topic: Topic,
    /// Partitions (1 for a single log: Redis, memory, Pulsar unpartitioned).
    pub partitions: u32,
    /// Messages retained now, where the broker counts them (Kafka: the sum
    /// of each partition's high less low watermark, which counts aborted
    /// and compacted records too).
    pub messages: Option<u64>,
    /// The retention the broker applies, where it records one.
    pub retention: Option<Retention>,
    /// The consumer groups subscribed to the topic, sorted by name.
    pub groups: Vec<GroupInfo>,
}

impl TopicInfo {
    /// A topic of `partitions` partitions with nothing else known yet.
    pub fn new(topic: Topic, partitions: u32) -> Self {
        TopicInfo {
            topic,
            partitions,
            messages: None,
            retention: None,
            groups: Vec::new(),
        }
    }

    /// Set [`TopicInfo::messages`].
    pub fn with_messages(mut self, n: Option<u64>) -> Self {
        self.messages = n;
        self
    }

    /// Set [`TopicInfo::retention`].
    pub fn with_retention(mut self, r: Option<Retention>) -> Self {
        self.retention = r;
        self
    }

    /// Set [`TopicInfo::groups`] (sorted here by name).
    pub fn with_groups(mut self, mut groups: Vec<GroupInfo>) -> Self {
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        self.groups = groups;
        self
    }

    /// The group named `group`, if it is subscribed.
    pub fn group(&self, group: &Name) -> Option<&GroupInfo> {
        self.groups.iter().find(|g| &g.group == group)
    }
}

/// One consumer group on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group.
    pub group: Name,
    /// Its consumers connected now (Kafka: the members of the whole group,
    /// which may read other topics too).
    pub members: Vec<Member>,
    /// What it has not settled yet, as [`crate::Transport::depth`] tells it.
    pub depth: Option<Depth>,
}

impl GroupInfo {
    /// A group with no members and no depth known.
    pub fn new(group: Name) -> Self {
        GroupInfo {
            group,
            members: Vec::new(),
            depth: None,
        }
    }

    /// Set [`GroupInfo::members`] (sorted here by name).
    pub fn with_members(mut self, mut members: Vec<Member>) -> Self {
        members.sort_by(|a, b| a.name.cmp(&b.name));
        self.members = members;
        self
    }

    /// Set [`GroupInfo::depth`].
    pub fn with_depth(mut self, depth: Option<Depth>) -> Self {
        self.depth = depth;
        self
    }
}

/// One consumer of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Member {
    /// The consumer's name (Redis consumer, Kafka member id, Pulsar
    /// consumer name).
    pub name: String,
    /// Where it connects from, where the broker tells.
    pub address: Option<String>,
    /// Messages it holds unsettled, where the broker tells.
    pub pending: Option<u64>,
}

impl Member {
    /// A member known by name only.
    pub fn new(name: impl Into<String>) -> Self {
        Member {
            name: name.into(),
            address: None,
            pending: None,
        }
    }

    /// Set [`Member::address`].
    pub fn with_address(mut self, address: Option<String>) -> Self {
        self.address = address;
        self
    }

    /// Set [`Member::pending`].
    pub fn with_pending(mut self, pending: Option<u64>) -> Self {
        self.pending = pending;
        self
    }
}

/// The `NotFound` error of a topic the broker does not hold.
pub fn topic_not_found(topic: &Topic) -> Error {
    Error::new(ErrorKind::NotFound, format!("topic {topic} does not exist"))
}

/// The `NotFound` error of a group that never subscribed to a topic.
pub fn group_not_found(topic: &Topic, group: &Name) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("group {group} has not subscribed to {topic}"),
    )
}

/// The temporary error of a group deleted while `live` consumers of it
/// still read.
pub fn group_busy(group: &Name, live: usize) -> Error {
    Error::new(
        ErrorKind::Broker,
        format!("group {group} has {live} consumers reading: close them first"),
    )
    .set_temporary(true)
}

/// Delete `group`'s subscription to `topic` once its consumers have let
/// go: a temporary error (a consumer just closed, the broker not yet
/// told) is tried again every 250 ms for up to `within`. A group that is
/// already gone is not an error. For groups a process made for itself (a
/// CLI reader, a reducer's run), so the broker keeps nothing for them.
pub async fn delete_group_within(
    transport: &dyn crate::Transport,
    topic: &Topic,
    group: &Name,
    within: std::time::Duration,
) -> crate::Result<()> {
    let until = tokio::time::Instant::now() + within;
    loop {
        match transport.delete_group(topic, group).await {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.is_temporary() && tokio::time::Instant::now() < until => {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await
            }
            Err(e) => return Err(e),
        }
    }
}

/// The `Unsupported` error of a transport without the admin calls.
pub(crate) fn unsupported(transport: &str, what: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("the {transport} transport cannot {what}"),
    )
}
