//! A group's depth on Kafka: the end offsets of the topic's partitions
//! less the group's committed offsets.
//!
//! Kafka keeps no count of what a group was handed: the whole difference
//! is the backlog, the group's retry topic (nacked and expired records
//! waiting for redelivery) included. Records settled beyond a partition's
//! committed offset (out of order, carried in the commit's marks) still
//! count, so the figure is an upper bound of what the group has not
//! settled.

use std::sync::{Arc, Mutex};

use oona_core::{Depth, Error, ErrorKind, Name, Result, Topic};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::util::Timeout;
use rdkafka::Offset;

use crate::consumer::{committed_offsets, offsets_client, retry_topic};
use crate::transport::{kafka_error, Inner, NAME};

/// Offset clients kept for groups whose depth was read lately.
const KEPT: usize = 16;

/// One consumer client per group whose depth is read, the last [`KEPT`]
/// kept for the next read (they join no group: they only ask the
/// coordinator for offsets).
#[derive(Default)]
pub(crate) struct Readers(Mutex<Vec<(Name, Arc<BaseConsumer>)>>);

impl Readers {
    fn get(&self, inner: &Inner, group: &Name) -> Result<Arc<BaseConsumer>> {
        let mut kept = oona_core::sync::lock(&self.0);
        let c = match kept.iter().position(|(g, _)| g == group) {
            Some(i) => kept.remove(i).1,
            None => Arc::new(offsets_client(inner, group)?),
        };
        kept.insert(0, (group.clone(), Arc::clone(&c)));
        kept.truncate(KEPT);
        Ok(c)
    }
}

/// The depth of `group` on `topic`, its retry topic included (what waits
/// there for redelivery). Blocking: run it off the runtime.
pub(crate) fn group_depth(inner: &Inner, topic: &Topic, group: &Name) -> Result<Depth> {
    let c = inner.depth_readers.get(inner, group)?;
    let name = inner.opts.kafka_topic(topic);
    let Some(main) = unsettled(inner, &c, &name)? else {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("group {group} has not subscribed to {topic}"),
        )
        .with_transport(NAME));
    };
    let retry = unsettled(inner, &c, &retry_topic(&name, group))?.unwrap_or(0);
    Ok(Depth::new(main + retry, 0))
}

/// The records of `name` past the committed offsets of `c`'s group;
/// `None` when the group has committed nothing there (every member
/// commits the start of each partition it is given).
pub(crate) fn unsettled(inner: &Inner, c: &BaseConsumer, name: &str) -> Result<Option<u64>> {
    let timeout = Timeout::After(inner.opts.timeout);
    let (_, committed) = committed_offsets(inner, c, name)?;
    let mut total = None;
    for e in committed.elements() {
        let Offset::Offset(at) = e.offset() else {
            continue;
        };
        let (low, high) = c
            .fetch_watermarks(name, e.partition(), timeout)
            .map_err(|e| kafka_error("read end offsets", e))?;
        *total.get_or_insert(0) += u64::try_from(high - at.max(low)).unwrap_or(0);
    }
    Ok(total)
}
