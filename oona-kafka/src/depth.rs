//! A group's depth on Kafka: the end offsets of the topic's partitions
//! less the group's committed offsets.
//!
//! Kafka keeps no count of what a group was handed: the whole difference
//! is the backlog (from the start of each partition where the group has
//! committed nothing yet), and records settled beyond a partition's committed
//! offset (out of order, carried in the commit's marks) still count, so
//! the figure is an upper bound of what the group has not settled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use oona_core::{Depth, Error, ErrorKind, Name, Result, Topic};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::util::Timeout;
use rdkafka::Offset;

use crate::consumer::{committed_offsets, offsets_client};
use crate::transport::{kafka_error, Inner, NAME};

/// One consumer client per group whose depth is read, kept for the next
/// read (it joins no group: it only asks the coordinator for offsets).
#[derive(Default)]
pub(crate) struct Readers(Mutex<HashMap<Name, Arc<BaseConsumer>>>);

impl Readers {
    fn get(&self, inner: &Inner, group: &Name) -> Result<Arc<BaseConsumer>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(group) {
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(offsets_client(inner, group)?);
        map.insert(group.clone(), Arc::clone(&c));
        Ok(c)
    }
}

/// The depth of `group` on `topic`. Blocking: run it off the runtime.
pub(crate) fn group_depth(inner: &Inner, topic: &Topic, group: &Name) -> Result<Depth> {
    let c = inner.depth_readers.get(inner, group)?;
    let timeout = Timeout::After(inner.opts.timeout);
    let name = topic.as_str();
    let (_, committed) = committed_offsets(inner, &c, name)?;
    let elements = committed.elements();
    let none_committed = elements
        .iter()
        .all(|e| !matches!(e.offset(), Offset::Offset(_)));
    if none_committed && !group_known(&c, group, timeout)? {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("group {group} has not subscribed to {topic}"),
        )
        .with_transport(NAME));
    }
    let mut backlog = 0u64;
    for e in elements {
        let (low, high) = c
            .fetch_watermarks(name, e.partition(), timeout)
            .map_err(|e| kafka_error("read end offsets", e))?;
        // Nothing committed yet: an earliest group reads from the start.
        let from = match e.offset() {
            Offset::Offset(at) => at.max(low),
            _ => low,
        };
        backlog += u64::try_from(high - from).unwrap_or(0);
    }
    Ok(Depth::new(backlog, 0))
}

/// Whether the broker knows `group` (members, or offsets kept): a group
/// whose members joined has committed nothing until its first settlement.
fn group_known(c: &BaseConsumer, group: &Name, timeout: Timeout) -> Result<bool> {
    let list = c
        .fetch_group_list(Some(group.as_str()), timeout)
        .map_err(|e| kafka_error("describe group", e))?;
    Ok(list
        .groups()
        .iter()
        .any(|g| g.name() == group.as_str() && !matches!(g.state(), "Dead" | "Unknown" | "")))
}
