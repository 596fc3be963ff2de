//! The record of event ids seen by a consumer group (replay protection,
//! `oona_core::security::ReplayLayer`; de-duplication,
//! `oona_core::dedup::DedupLayer`), kept in Redis so every consumer of the
//! group shares it: one key per id, `<prefix>nonce:<group>:<event id>`,
//! holding its value (the position it was first delivered at; `claim` or
//! `done`), set with `SET ... NX PX <ttl> GET` (Redis 7.0 or later) or
//! `SET ... PX <ttl>`, removed with `DEL`, and expiring by itself.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use oona_core::security::NonceStore;
use oona_core::{EventId, Name, Result};

use crate::redis_error;

/// A [`NonceStore`] in Redis.
pub(crate) struct RedisNonces {
    pub(crate) conn: ConnectionManager,
    pub(crate) prefix: String,
}

#[async_trait]
impl NonceStore for RedisNonces {
    async fn check_in(
        &self,
        group: &Name,
        event_id: &EventId,
        position: &str,
        ttl: Duration,
    ) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key(group, event_id))
            .arg(position)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "record a seen event id (SET NX PX GET)"))
    }

    async fn mark(
        &self,
        group: &Name,
        event_id: &EventId,
        value: &str,
        ttl: Duration,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key(group, event_id))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl))
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error(e, "mark an event id (SET PX)"))
    }

    async fn forget(&self, group: &Name, event_id: &EventId) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(self.key(group, event_id))
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error(e, "forget an event id (DEL)"))
    }
}

impl RedisNonces {
    fn key(&self, group: &Name, event_id: &EventId) -> String {
        format!("{}nonce:{group}:{event_id}", self.prefix)
    }
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}
