//! The Pulsar admin REST API: topic retention and topic deletion.

use std::sync::Arc;
use std::time::Duration;

use oona_core::{Error, ErrorKind, Name, Result, Retention, Topic};
use serde::{Deserialize, Serialize};

use crate::config::PulsarConfig;
use crate::NAME;

/// Pulsar's `RetentionPolicies` document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RetentionPolicies {
    /// Minutes to keep acknowledged messages; -1 forever.
    pub retention_time_in_minutes: i64,
    /// Megabytes to keep; -1 without a size limit.
    #[serde(rename = "retentionSizeInMB")]
    pub retention_size_in_mb: i64,
}

impl RetentionPolicies {
    /// The policy of an Oona retention: time-bounded (rounded up to whole
    /// minutes), never size-bounded.
    pub(crate) fn of(r: Retention) -> Self {
        let minutes = match r {
            Retention::Indefinite => -1,
            Retention::For(d) => i64::try_from(d.as_secs().div_ceil(60)).unwrap_or(i64::MAX),
        };
        RetentionPolicies {
            retention_time_in_minutes: minutes,
            retention_size_in_mb: -1,
        }
    }

    /// Back to an Oona retention (size limits are not an Oona concept).
    pub(crate) fn retention(self) -> Retention {
        if self.retention_time_in_minutes < 0 {
            Retention::Indefinite
        } else {
            Retention::For(Duration::from_secs(
                u64::try_from(self.retention_time_in_minutes).unwrap_or(0) * 60,
            ))
        }
    }
}

/// A client of the admin REST API.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    http: reqwest::Client,
    base: String,
    config: Arc<PulsarConfig>,
}

fn admin_err(kind: ErrorKind, what: impl Into<String>) -> Error {
    Error::new(kind, what).with_transport(NAME)
}

impl Admin {
    /// `None` when no `admin_url` was configured.
    pub(crate) fn new(config: Arc<PulsarConfig>) -> Result<Option<Self>> {
        let Some(base) = config.admin_url.clone() else {
            return Ok(None);
        };
        let mut b = reqwest::Client::builder()
            .timeout(config.operation_timeout)
            .use_rustls_tls();
        if let Some(path) = &config.tls_ca_file {
            for cert in crate::tls::read_pem(path)? {
                let c = reqwest::Certificate::from_der(&cert).map_err(|e| {
                    admin_err(
                        ErrorKind::ConfigInvalid,
                        format!("query parameter `tls_ca_file`: {e}"),
                    )
                })?;
                b = b.add_root_certificate(c);
            }
        }
        let http = b
            .build()
            .map_err(|e| admin_err(ErrorKind::ConfigInvalid, format!("admin HTTP client: {e}")))?;
        Ok(Some(Admin { http, base, config }))
    }

    fn namespace_url(&self) -> String {
        format!(
            "{}/admin/v2/persistent/{}/{}",
            self.base, self.config.tenant, self.config.namespace
        )
    }

    /// The URL of the topic with local name `local` (an Oona topic, or a
    /// marks topic of one).
    fn topic_url(&self, local: &str) -> String {
        format!("{}/{local}", self.namespace_url())
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn send(&self, what: &str, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = self.auth(rb).send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                ErrorKind::Timeout
            } else {
                ErrorKind::Connection
            };
            admin_err(kind, format!("admin API {what}: {e}"))
        })?;
        Ok(resp)
    }

    async fn check(what: &str, resp: reqwest::Response) -> Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let kind = match status.as_u16() {
            401 | 403 => ErrorKind::Unauthenticated,
            429 | 503 => ErrorKind::Connection,
            _ => ErrorKind::Broker,
        };
        Err(admin_err(
            kind,
            format!("admin API {what}: HTTP {status}: {body}"),
        ))
    }

    /// Apply `retention` to `topic` (a topic-level policy).
    pub(crate) async fn set_retention(&self, topic: &Topic, retention: Retention) -> Result<()> {
        let what = format!("set retention of {topic}");
        let rb = self
            .http
            .post(format!("{}/retention", self.topic_url(topic.as_str())))
            .json(&RetentionPolicies::of(retention));
        Self::check(&what, self.send(&what, rb).await?).await?;
        Ok(())
    }

    /// The topic-level retention of `topic`, if one is set.
    pub(crate) async fn retention(&self, topic: &Topic) -> Result<Option<Retention>> {
        let what = format!("get retention of {topic}");
        let rb = self
            .http
            .get(format!("{}/retention", self.topic_url(topic.as_str())));
        let resp = Self::check(&what, self.send(&what, rb).await?).await?;
        let text = resp
            .text()
            .await
            .map_err(|e| admin_err(ErrorKind::Connection, format!("admin API {what}: {e}")))?;
        if text.trim().is_empty() || text.trim() == "null" {
            return Ok(None);
        }
        let p: RetentionPolicies = serde_json::from_str(&text).map_err(|e| {
            admin_err(
                ErrorKind::Decode,
                format!("admin API {what}: unexpected answer {text:?}: {e}"),
            )
        })?;
        Ok(Some(p.retention()))
    }

    /// Create subscription `group` on `topic` at the earliest message;
    /// `false` when it exists already.
    pub(crate) async fn create_subscription(&self, topic: &Topic, group: &Name) -> Result<bool> {
        let what = format!("create subscription {group} on {topic}");
        let rb = self
            .http
            .put(format!(
                "{}/subscription/{group}",
                self.topic_url(topic.as_str())
            ))
            .json(&"earliest");
        let resp = self.send(&what, rb).await?;
        if resp.status().as_u16() == 409 {
            return Ok(false);
        }
        Self::check(&what, resp).await?;
        Ok(true)
    }

    /// `(msgBacklog, unackedMessages)` of subscription `group` on
    /// `topic` (the backlog counted precisely); `None` when the topic or
    /// the subscription does not exist.
    pub(crate) async fn subscription_counts(
        &self,
        topic: &Topic,
        group: &Name,
    ) -> Result<Option<(u64, u64)>> {
        let what = format!("stats of {topic}");
        let rb = self
            .http
            .get(format!("{}/stats", self.topic_url(topic.as_str())))
            .query(&[("getPreciseBacklog", "true")]);
        let resp = self.send(&what, rb).await?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        let stats: serde_json::Value = Self::check(&what, resp)
            .await?
            .json()
            .await
            .map_err(|e| admin_err(ErrorKind::Decode, format!("admin API {what}: {e}")))?;
        let Some(sub) = stats.pointer(&format!("/subscriptions/{group}")) else {
            return Ok(None);
        };
        let count = |field: &str| {
            sub.get(field)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        Ok(Some((count("msgBacklog"), count("unackedMessages"))))
    }

    /// Move subscription `group` of `topic` to the first message published
    /// at or after `unix_ms`.
    pub(crate) async fn reset_cursor(
        &self,
        topic: &Topic,
        group: &Name,
        unix_ms: u64,
    ) -> Result<()> {
        let what = format!("reset subscription {group} on {topic} to {unix_ms}");
        let rb = self.http.post(format!(
            "{}/subscription/{group}/resetcursor/{unix_ms}",
            self.topic_url(topic.as_str())
        ));
        Self::check(&what, self.send(&what, rb).await?).await?;
        Ok(())
    }

    /// Let the broker compact the topic `local` once `bytes` are written
    /// since the last compaction (a topic-level policy).
    pub(crate) async fn set_compaction_threshold(&self, local: &str, bytes: u64) -> Result<()> {
        let what = format!("set the compaction threshold of {local}");
        let rb = self
            .http
            .post(format!("{}/compactionThreshold", self.topic_url(local)))
            .json(&bytes);
        Self::check(&what, self.send(&what, rb).await?).await?;
        Ok(())
    }

    /// Delete `topic` with its subscriptions and the marks topics of its
    /// groups (see `crate::marks`); a missing topic is fine.
    pub(crate) async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        for marks in self.marks_topics(topic).await? {
            self.delete_local(&marks).await?;
        }
        self.delete_local(topic.as_str()).await
    }

    /// The local names of the marks topics of `topic`'s groups.
    async fn marks_topics(&self, topic: &Topic) -> Result<Vec<String>> {
        let what = format!(
            "list the topics of {}/{}",
            self.config.tenant, self.config.namespace
        );
        let resp = Self::check(
            &what,
            self.send(&what, self.http.get(self.namespace_url()))
                .await?,
        )
        .await?;
        let names: Vec<String> = resp
            .json()
            .await
            .map_err(|e| admin_err(ErrorKind::Broker, format!("admin API {what}: {e}")))?;
        let prefix = crate::marks::prefix(topic.as_str());
        Ok(names
            .iter()
            .filter_map(|n| n.rsplit('/').next())
            .filter(|local| local.starts_with(prefix.as_str()))
            .map(str::to_string)
            .collect())
    }

    async fn delete_local(&self, local: &str) -> Result<()> {
        let what = format!("delete {local}");
        let rb = self
            .http
            .delete(self.topic_url(local))
            .query(&[("force", "true")]);
        let resp = self.send(&what, rb).await?;
        if resp.status().as_u16() == 404 {
            return Ok(());
        }
        Self::check(&what, resp).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_documents() {
        let p = RetentionPolicies::of(Retention::For(Duration::from_secs(72 * 3600)));
        assert_eq!(p.retention_time_in_minutes, 72 * 60);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"retentionTimeInMinutes":4320,"retentionSizeInMB":-1}"#
        );
        assert_eq!(
            p.retention(),
            Retention::For(Duration::from_secs(72 * 3600))
        );
        let i = RetentionPolicies::of(Retention::Indefinite);
        assert_eq!(i.retention_time_in_minutes, -1);
        assert_eq!(i.retention(), Retention::Indefinite);
        // Seconds round up to a whole minute: never keep less than asked.
        let p = RetentionPolicies::of(Retention::For(Duration::from_secs(61)));
        assert_eq!(p.retention_time_in_minutes, 2);
    }
}
