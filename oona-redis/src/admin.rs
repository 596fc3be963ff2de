//! The admin calls on Redis: topics from the prefix's topic set and the
//! streams under the prefix, groups and consumers from `XINFO`, retention
//! from the topic's policy record.

use std::collections::BTreeSet;
use std::time::Duration;

use oona_core::admin::{group_not_found, topic_not_found};
use oona_core::{Depth, GroupInfo, Member, Name, Result, Retention, Topic, TopicInfo};
use redis::Value;

use crate::{policy_field, redis_error, sub, Inner, LAG_COUNT_CAP, NAME};

/// A consumer counts as a member while it has read within three `block`
/// times and this margin (a running reader reads again after each
/// `block`). Redis keeps a group's consumers until they are deleted, so
/// those of stopped processes would otherwise be listed.
const LIVE_MARGIN: Duration = Duration::from_secs(1);

impl Inner {
    /// A group's depth from its `XINFO GROUPS` record: `lag` is the
    /// backlog and the PEL (parked nacks included) the pending. Where Redis
    /// cannot tell the lag (a group created at a time, entries deleted from
    /// the middle), the entries after the group's last delivered id are
    /// counted, up to [`LAG_COUNT_CAP`].
    pub(crate) async fn depth_of(&self, key: &str, g: &sub::GroupInfo) -> Result<Depth> {
        let backlog = match g.lag {
            Some(lag) => lag,
            None => {
                let mut conn = self.conn.clone();
                self.count_after
                    .key(key)
                    .arg(&g.last_delivered)
                    .arg(LAG_COUNT_CAP)
                    .invoke_async::<u64>(&mut conn)
                    .await
                    .map_err(|e| redis_error(e, "counting the entries after the group failed"))?
            }
        };
        Ok(Depth::new(backlog, g.pending))
    }

    /// The topics recorded under the prefix, and the streams under it whose
    /// names are topics (written by another producer, say).
    pub(crate) async fn list_topics(&self) -> Result<Vec<Topic>> {
        let mut conn = self.conn.clone();
        let recorded: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.topics_key())
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "SMEMBERS of the topic set failed"))?;
        let prefix = &self.cfg.prefix;
        let streams = self.scan(prefix, Some("stream")).await?;
        let names = recorded.iter().map(String::as_str).chain(
            streams
                .iter()
                .filter_map(|k| k.strip_prefix(prefix.as_str())),
        );
        let topics: BTreeSet<Topic> = names.filter_map(|n| Topic::new(n).ok()).collect();
        Ok(topics.into_iter().collect())
    }

    pub(crate) async fn describe_topic(&self, topic: &Topic) -> Result<TopicInfo> {
        let key = self.stream_key(topic);
        let mut conn = self.conn.clone();
        let (exists, recorded, len, retention): (bool, bool, u64, Option<i64>) = redis::pipe()
            .cmd("EXISTS")
            .arg(&key)
            .cmd("SISMEMBER")
            .arg(self.topics_key())
            .arg(topic.as_str())
            .cmd("XLEN")
            .arg(&key)
            .cmd("HGET")
            .arg(self.policy_key(topic))
            .arg(policy_field::RETENTION_MS)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "reading the topic failed"))?;
        if !exists && !recorded {
            return Err(topic_not_found(topic).with_transport(NAME));
        }
        let mut groups = Vec::new();
        for g in self.groups(&key).await? {
            let Ok(name) = Name::new(&g.name) else {
                continue; // a group another client made, not an Oona name
            };
            let members = self.members(&key, &g.name).await?;
            let depth = self.depth_of(&key, &g).await?;
            groups.push(
                GroupInfo::new(name)
                    .with_members(members)
                    .with_depth(Some(depth)),
            );
        }
        let retention = retention.map(|ms| match u64::try_from(ms) {
            Ok(ms) => Retention::For(Duration::from_millis(ms)),
            Err(_) => Retention::Indefinite,
        });
        Ok(TopicInfo::new(topic.clone(), 1)
            .with_messages(Some(len))
            .with_retention(retention)
            .with_groups(groups))
    }

    /// The live consumers of `group` (see [`LIVE_MARGIN`]); none when the
    /// group is gone (deleted meanwhile).
    async fn members(&self, key: &str, group: &str) -> Result<Vec<Member>> {
        let mut conn = self.conn.clone();
        let v: Value = match redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(key)
            .arg(group)
            .query_async(&mut conn)
            .await
        {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOGROUP") => return Ok(Vec::new()),
            Err(e) => return Err(redis_error(e, "XINFO CONSUMERS failed")),
        };
        let live = (self.cfg.block * 3 + LIVE_MARGIN).as_millis() as u64;
        Ok(sub::consumers(&v)
            .into_iter()
            .filter(|c| c.idle_ms <= live)
            .map(|c| Member::new(c.name).with_pending(Some(c.pending)))
            .collect())
    }

    /// `XGROUP DESTROY` with the group's parked nacks and key queues, in
    /// one transaction.
    pub(crate) async fn delete_group(&self, topic: &Topic, group: &Name) -> Result<()> {
        let key = self.stream_key(topic);
        // A running reader would recreate the group at the stream's start.
        let live = self.members(&key, group.as_str()).await?.len();
        if live > 0 {
            return Err(oona_core::admin::group_busy(group, live).with_transport(NAME));
        }
        let queues = self.key_queues(topic, group.as_str()).await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XGROUP")
            .arg("DESTROY")
            .arg(&key)
            .arg(group.as_str())
            .cmd("DEL")
            .arg(self.delayed_key(topic, group.as_str()))
            .ignore();
        for q in queues {
            pipe.cmd("DEL").arg(q).ignore();
        }
        let mut conn = self.conn.clone();
        let destroyed: (i64,) = match pipe.query_async(&mut conn).await {
            Ok(r) => r,
            // No such stream.
            Err(e) if e.kind() == redis::ErrorKind::ResponseError => (0,),
            Err(e) => return Err(redis_error(e, "XGROUP DESTROY failed")),
        };
        if destroyed.0 == 0 {
            return Err(group_not_found(topic, group).with_transport(NAME));
        }
        Ok(())
    }
}
