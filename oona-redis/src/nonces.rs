//! The record of event ids seen by a consumer group (replay protection,
//! `oona_core::security::ReplayLayer`), kept in Redis so every consumer of
//! the group shares it: one key per id, `<prefix>nonce:<group>:<event id>`,
//! holding the position it was first delivered at, set with
//! `SET ... NX PX <ttl> GET` (Redis 7.0 or later) and expiring by itself.

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
        let key = format!("{}nonce:{group}:{event_id}", self.prefix);
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(&key)
            .arg(position)
            .arg("NX")
            .arg("PX")
            .arg(ms)
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "record a seen event id (SET NX PX GET)"))
    }
}
