//! The Pulsar admin REST API: tenants and namespaces with their policies,
//! topic retention, subscriptions, stats, listing and deletion.

use std::sync::Arc;
use std::time::Duration;

use oona_core::admin::{group_not_found, topic_not_found};
use oona_core::{
    Depth, Error, ErrorKind, GroupInfo, Member, Name, Result, Retention, Topic, TopicInfo,
    TopicPolicy,
};
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

    /// The URL of the topics of namespace `ns` of the tenant.
    fn namespace_url(&self, ns: &str) -> String {
        format!(
            "{}/admin/v2/persistent/{}/{ns}",
            self.base,
            self.config.pulsar_tenant()
        )
    }

    /// The URL of the topic with local name `local` (an Oona topic, or a
    /// marks topic of one).
    fn topic_url(&self, local: &str) -> String {
        format!(
            "{}/{local}",
            self.namespace_url(self.config.namespace_of(local))
        )
    }

    /// The URL of namespace `ns` of the tenant (its policies).
    fn policies_url(&self, ns: &str) -> String {
        format!(
            "{}/admin/v2/namespaces/{}/{ns}",
            self.base,
            self.config.pulsar_tenant()
        )
    }

    /// Create the tenant unless it exists, allowed on every cluster the
    /// broker knows. A role that may not create tenants gets an error that
    /// says what to ask for.
    pub(crate) async fn ensure_tenant(&self) -> Result<()> {
        let tenant = self.config.pulsar_tenant();
        let url = format!("{}/admin/v2/tenants/{tenant}", self.base);
        let what = format!("read tenant {tenant}");
        let resp = self.send(&what, self.http.get(&url)).await?;
        // Reading a tenant takes a super user: a role that may not is
        // given a tenant that exists; the namespaces tell otherwise.
        if resp.status().is_success() || matches!(resp.status().as_u16(), 401 | 403) {
            return Ok(());
        }
        if resp.status().as_u16() != 404 {
            Self::check(&what, resp).await?;
            return Ok(());
        }
        let what = "list the clusters";
        let clusters: Vec<String> = Self::decoded(
            what,
            self.send(
                what,
                self.http.get(format!("{}/admin/v2/clusters", self.base)),
            )
            .await?,
        )
        .await?;
        let what = format!("create tenant {tenant}");
        let body = serde_json::json!({ "allowedClusters": clusters, "adminRoles": [] });
        let resp = self.send(&what, self.http.put(&url).json(&body)).await?;
        match resp.status().as_u16() {
            409 => Ok(()),
            401 | 403 => Err(admin_err(
                ErrorKind::Unauthorized,
                format!(
                    "tenant {tenant} does not exist and this role may not create it: ask a Pulsar super user to create it (or use a `namespace` of an existing tenant)"
                ),
            )),
            _ => Self::check(&what, resp).await.map(drop),
        }
    }

    /// Create namespace `ns` of the tenant unless it exists, and give it
    /// `policy`: retention, a time to live of the same length (Pulsar keeps
    /// unread messages past retention otherwise; Kafka and Redis do not),
    /// and the backlog quota.
    pub(crate) async fn ensure_namespace(&self, ns: &str, policy: &TopicPolicy) -> Result<()> {
        let url = self.policies_url(ns);
        let what = format!("create namespace {}/{ns}", self.config.pulsar_tenant());
        let resp = self
            .send(&what, self.http.put(&url).json(&serde_json::json!({})))
            .await?;
        let existed = match resp.status().as_u16() {
            409 => true,
            401 | 403 => self.namespace_exists(ns).await,
            _ => {
                Self::check(&what, resp).await?;
                false
            }
        };
        match self.set_policies(ns, policy).await {
            // A role that may not administer the tenant uses its existing
            // namespaces as they are.
            Err(e) if existed && e.kind() == ErrorKind::Unauthenticated => {
                tracing::warn!(namespace = ns, error = %e, "pulsar: this role may not set the namespace's policies; using them as they are");
                Ok(())
            }
            other => other,
        }
    }

    /// Give namespace `ns` `policy` (see [`Admin::ensure_namespace`]).
    async fn set_policies(&self, ns: &str, policy: &TopicPolicy) -> Result<()> {
        self.post_policy(ns, "retention", &RetentionPolicies::of(policy.retention))
            .await?;
        let ttl = match policy.retention {
            Retention::Indefinite => 0, // no time to live
            Retention::For(d) => d.as_secs().max(1),
        };
        self.post_policy(ns, "messageTTL", &ttl).await?;
        // Oona's own evolution check is full: each version reads the one
        // before and is read by it.
        let what = format!(
            "set the schema compatibility of {}/{ns}",
            self.config.pulsar_tenant()
        );
        let rb = self
            .http
            .put(format!(
                "{}/schemaCompatibilityStrategy",
                self.policies_url(ns)
            ))
            .json(&"FULL");
        Self::check(&what, self.send(&what, rb).await?).await?;
        if let Some(limit) = policy.backlog_limit_bytes {
            let quota = serde_json::json!({
                "limitSize": limit, "limitTime": -1, "policy": "producer_exception"
            });
            self.post_policy(
                ns,
                "backlogQuota?backlogQuotaType=destination_storage",
                &quota,
            )
            .await?;
        }
        match &self.config.offload {
            Some(o) if policy.retention == Retention::Indefinite => {
                self.post_policy(ns, "offloadPolicies", &offload_document(o))
                    .await
            }
            _ => Ok(()),
        }
    }

    /// Offload the closed ledgers of `topic` (all but the one being
    /// written) to its namespace's tiered storage, and wait until the
    /// broker reports the offload done.
    pub(crate) async fn offload(&self, topic: &Topic) -> Result<()> {
        let url = format!("{}/offload", self.topic_url(topic.as_str()));
        let what = format!("read the last message id of {topic}");
        let last: serde_json::Value = Self::decoded(
            &what,
            self.send(
                &what,
                self.http
                    .get(format!("{}/lastMessageId", self.topic_url(topic.as_str()))),
            )
            .await?,
        )
        .await?;
        let upto = serde_json::json!({
            "ledgerId": last["ledgerId"], "entryId": last["entryId"], "partitionIndex": -1
        });
        let what = format!("offload {topic}");
        Self::check(
            &what,
            self.send(&what, self.http.put(&url).json(&upto)).await?,
        )
        .await?;
        let deadline = tokio::time::Instant::now() + self.config.operation_timeout;
        loop {
            let status: serde_json::Value =
                Self::decoded(&what, self.send(&what, self.http.get(&url)).await?).await?;
            match status["status"].as_str() {
                Some("SUCCESS") => return Ok(()),
                Some("ERROR") => {
                    return Err(admin_err(
                        ErrorKind::Broker,
                        format!("{what}: the broker reports {}", status["lastError"]),
                    ))
                }
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(admin_err(
                        ErrorKind::Timeout,
                        format!(
                            "{what}: not done within {:?}: {status}",
                            self.config.operation_timeout
                        ),
                    )
                    .set_temporary(true))
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The ledgers of `topic`: (ledger id, offloaded), oldest first.
    pub(crate) async fn ledgers(&self, topic: &Topic) -> Result<Vec<(u64, bool)>> {
        let what = format!("internal stats of {topic}");
        let url = format!("{}/internalStats", self.topic_url(topic.as_str()));
        let stats: serde_json::Value =
            Self::decoded(&what, self.send(&what, self.http.get(url)).await?).await?;
        Ok(stats["ledgers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| {
                Some((
                    l.get("ledgerId")?.as_u64()?,
                    l.get("offloaded").and_then(serde_json::Value::as_bool) == Some(true),
                ))
            })
            .collect())
    }

    /// Whether namespace `ns` of the tenant exists (as far as this role can
    /// tell by listing its topics).
    async fn namespace_exists(&self, ns: &str) -> bool {
        let what = format!("list the topics of {}/{ns}", self.config.pulsar_tenant());
        match self
            .send(&what, self.http.get(self.namespace_url(ns)))
            .await
        {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }

    /// POST a policy document to `<namespace>/<what>`.
    async fn post_policy(&self, ns: &str, what: &str, body: &impl Serialize) -> Result<()> {
        let desc = format!(
            "set {what} of namespace {}/{ns}",
            self.config.pulsar_tenant()
        );
        let rb = self
            .http
            .post(format!("{}/{what}", self.policies_url(ns)))
            .json(body);
        Self::check(&desc, self.send(&desc, rb).await?).await?;
        Ok(())
    }

    /// The latest schema of `topic` in the registry; `None` when it has
    /// none.
    pub(crate) async fn latest_schema(
        &self,
        topic: &Topic,
    ) -> Result<Option<crate::schema::Latest>> {
        let what = format!("read the schema of {topic}");
        let url = format!(
            "{}/admin/v2/schemas/{}/{}/{topic}/schema",
            self.base,
            self.config.pulsar_tenant(),
            self.config.namespace_of(topic.as_str())
        );
        let resp = self.send(&what, self.http.get(url)).await?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        let doc: serde_json::Value = Self::decoded(&what, resp).await?;
        Ok(Some(crate::schema::Latest {
            version: doc["version"].as_u64().unwrap_or(0),
            kind: doc["type"].as_str().unwrap_or("").to_string(),
            data: doc["data"].as_str().unwrap_or("").to_string(),
        }))
    }

    /// The policies of namespace `ns` as the broker reads them back.
    pub(crate) async fn namespace_policies(&self, ns: &str) -> Result<NamespacePolicies> {
        let what = format!("read namespace {}/{ns}", self.config.pulsar_tenant());
        let resp = self
            .send(&what, self.http.get(self.policies_url(ns)))
            .await?;
        let doc: serde_json::Value = Self::decoded(&what, resp).await?;
        Ok(NamespacePolicies::of(doc))
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

    /// The JSON of a successful answer ([`Admin::check`], then decoded).
    async fn decoded<T: serde::de::DeserializeOwned>(
        what: &str,
        resp: reqwest::Response,
    ) -> Result<T> {
        Self::check(what, resp)
            .await?
            .json()
            .await
            .map_err(|e| admin_err(ErrorKind::Decode, format!("admin API {what}: {e}")))
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

    /// The retention in force on `topic`, from whichever level sets it.
    async fn applied_retention(&self, topic: &Topic) -> Result<Option<Retention>> {
        let what = format!("get the applied retention of {topic}");
        let rb = self
            .http
            .get(format!("{}/retention", self.topic_url(topic.as_str())))
            .query(&[("applied", "true")]);
        let resp = Self::check(&what, self.send(&what, rb).await?).await?;
        let p: Option<RetentionPolicies> = resp
            .json()
            .await
            .map_err(|e| admin_err(ErrorKind::Decode, format!("admin API {what}: {e}")))?;
        Ok(p.map(RetentionPolicies::retention))
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

    /// The depth of subscription `group` on `topic` (the backlog counted
    /// precisely); `None` when the topic or the subscription does not
    /// exist.
    pub(crate) async fn subscription_depth(
        &self,
        topic: &Topic,
        group: &Name,
    ) -> Result<Option<Depth>> {
        let Some(stats) = self.stats(topic).await? else {
            return Ok(None);
        };
        let Some(sub) = stats.pointer(&format!("/subscriptions/{group}")) else {
            return Ok(None);
        };
        Ok(Some(subscription_depth(sub)))
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
        let prefix = crate::marks::prefix(topic.as_str());
        Ok(self
            .local_names()
            .await?
            .into_iter()
            .filter(|local| local.starts_with(prefix.as_str()))
            .collect())
    }

    /// The namespaces (without the tenant) that hold this transport's
    /// topics: each plane's, or the one of the URL.
    async fn namespaces(&self) -> Result<Vec<String>> {
        if !self.config.namespace_per_plane() {
            return Ok(vec![self.config.namespace_of("").to_string()]);
        }
        let tenant = self.config.pulsar_tenant();
        let what = format!("list the namespaces of {tenant}");
        let rb = self
            .http
            .get(format!("{}/admin/v2/namespaces/{tenant}", self.base));
        let resp = self.send(&what, rb).await?;
        if resp.status().as_u16() == 404 {
            return Ok(Vec::new()); // no tenant yet: no topics
        }
        let names: Vec<String> = Self::decoded(&what, resp).await?;
        Ok(names
            .iter()
            .filter_map(|n| n.rsplit('/').next())
            .map(str::to_string)
            .collect())
    }

    /// The local names of every persistent topic of the namespaces.
    async fn local_names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for ns in self.namespaces().await? {
            let what = format!("list the topics of {}/{ns}", self.config.pulsar_tenant());
            let resp = Self::check(
                &what,
                self.send(&what, self.http.get(self.namespace_url(&ns)))
                    .await?,
            )
            .await?;
            let names: Vec<String> = resp
                .json()
                .await
                .map_err(|e| admin_err(ErrorKind::Broker, format!("admin API {what}: {e}")))?;
            out.extend(
                names
                    .iter()
                    .filter_map(|n| n.rsplit('/').next())
                    .map(str::to_string),
            );
        }
        Ok(out)
    }

    /// The Oona topics of the namespace, sorted (marks topics, whose names
    /// are no topics, left out).
    pub(crate) async fn list_topics(&self) -> Result<Vec<Topic>> {
        let topics: std::collections::BTreeSet<Topic> = self
            .local_names()
            .await?
            .iter()
            .filter_map(|n| Topic::new(n).ok())
            .collect();
        Ok(topics.into_iter().collect())
    }

    /// The topic's subscriptions with their consumers and depths, from its
    /// stats, and its topic-level retention.
    pub(crate) async fn describe_topic(&self, topic: &Topic) -> Result<TopicInfo> {
        let stats = self
            .stats(topic)
            .await?
            .ok_or_else(|| topic_not_found(topic).with_transport(NAME))?;
        let groups = stats
            .pointer("/subscriptions")
            .and_then(serde_json::Value::as_object)
            .into_iter()
            .flatten()
            // Readers' non-durable subscriptions are no groups.
            .filter(|(_, sub)| {
                sub.get("isDurable").and_then(serde_json::Value::as_bool) != Some(false)
            })
            .filter_map(|(name, sub)| Some(group_info(Name::new(name).ok()?, sub)));
        let info = TopicInfo::new(topic.clone(), 1).with_groups(groups.collect());
        // The retention in force (topic, namespace or broker level); a
        // broker without topic policies leaves it unknown.
        Ok(info.with_retention(self.applied_retention(topic).await.ok().flatten()))
    }

    /// Delete subscription `group` of `topic` and its marks topic; a
    /// temporary error while it has consumers (412), which would subscribe
    /// again.
    pub(crate) async fn delete_subscription(&self, topic: &Topic, group: &Name) -> Result<()> {
        let what = format!("delete subscription {group} of {topic}");
        let rb = self.http.delete(format!(
            "{}/subscription/{group}",
            self.topic_url(topic.as_str())
        ));
        let resp = self.send(&what, rb).await?;
        let marks = format!("{}{group}", crate::marks::prefix(topic.as_str()));
        match resp.status().as_u16() {
            // The marks topic may outlive a failed delete before: gone too.
            404 => {
                self.delete_local(&marks).await?;
                return Err(group_not_found(topic, group).with_transport(NAME));
            }
            412 => {
                return Err(Error::new(
                    ErrorKind::Broker,
                    format!("group {group} has consumers reading: close them first"),
                )
                .with_transport(NAME)
                .set_temporary(true))
            }
            _ => {}
        }
        Self::check(&what, resp).await?;
        self.delete_local(&marks).await
    }

    /// The topic's stats (backlogs counted precisely); `None` when the
    /// topic does not exist.
    async fn stats(&self, topic: &Topic) -> Result<Option<serde_json::Value>> {
        let what = format!("stats of {topic}");
        let rb = self
            .http
            .get(format!("{}/stats", self.topic_url(topic.as_str())))
            .query(&[("getPreciseBacklog", "true")]);
        let resp = self.send(&what, rb).await?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        let stats = Self::decoded(&what, resp).await?;
        Ok(Some(stats))
    }

    async fn delete_local(&self, local: &str) -> Result<()> {
        let what = format!("delete {local}");
        // A forced delete racing the broker's own work on the topic (a
        // compaction reading its last message id) fails with a 5xx that
        // the next try does not meet: try up to three times.
        let mut tries = 0;
        loop {
            tries += 1;
            let rb = self
                .http
                .delete(self.topic_url(local))
                .query(&[("force", "true")]);
            let resp = self.send(&what, rb).await?;
            let status = resp.status().as_u16();
            if status == 404 {
                return Ok(());
            }
            if status >= 500 && tries < 3 {
                tracing::debug!(
                    topic = local,
                    status,
                    "pulsar: delete refused by the broker; trying again"
                );
                tokio::time::sleep(std::time::Duration::from_millis(250 * tries)).await;
                continue;
            }
            Self::check(&what, resp).await?;
            return Ok(());
        }
    }
}

/// Pulsar's `OffloadPolicies` document of `o` (what is not set falls back
/// to the broker's configuration).
fn offload_document(o: &crate::Offload) -> serde_json::Value {
    let mut doc = serde_json::json!({ "managedLedgerOffloadDriver": o.driver });
    if let Some(t) = o.threshold_bytes {
        doc["managedLedgerOffloadThresholdInBytes"] = t.into();
    }
    if let Some(lag) = o.deletion_lag {
        doc["managedLedgerOffloadDeletionLagInMillis"] =
            u64::try_from(lag.as_millis()).unwrap_or(u64::MAX).into();
    }
    doc
}

/// A namespace's policies as the broker reads them back (the part Oona
/// sets).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NamespacePolicies {
    /// Retention of acknowledged messages; `None` when unset.
    pub retention: Option<Retention>,
    /// Time to live of unread messages; `None` when unset or 0 (none).
    pub message_ttl: Option<Duration>,
    /// Backlog quota of the topics (bytes) and its policy, where set.
    pub backlog_quota: Option<(u64, String)>,
    /// The offloader of tiered storage, where one is set.
    pub offload_driver: Option<String>,
    /// The schema compatibility strategy (`FULL`, ...).
    pub schema_compatibility: Option<String>,
    /// The whole document the broker answered.
    pub raw: serde_json::Value,
}

impl NamespacePolicies {
    fn of(doc: serde_json::Value) -> Self {
        let retention = doc
            .get("retention_policies")
            .and_then(|r| serde_json::from_value::<RetentionPolicies>(r.clone()).ok())
            .map(RetentionPolicies::retention);
        let message_ttl = doc
            .get("message_ttl_in_seconds")
            .and_then(serde_json::Value::as_u64)
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let backlog_quota = doc
            .pointer("/backlog_quota_map/destination_storage")
            .and_then(|q| {
                let size = q.get("limitSize")?.as_u64()?;
                let policy = q.get("policy")?.as_str()?.to_string();
                Some((size, policy))
            });
        let offload_driver = doc
            .pointer("/offload_policies/managedLedgerOffloadDriver")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        let schema_compatibility = doc
            .get("schema_compatibility_strategy")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        NamespacePolicies {
            retention,
            message_ttl,
            backlog_quota,
            offload_driver,
            schema_compatibility,
            raw: doc,
        }
    }
}

/// A subscription's depth from its stats: `unackedMessages` is pending,
/// the rest of `msgBacklog` (which counts them too) the backlog.
fn subscription_depth(sub: &serde_json::Value) -> Depth {
    let count = |field: &str| {
        sub.get(field)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let (backlog, unacked) = (count("msgBacklog"), count("unackedMessages"));
    Depth::new(backlog.saturating_sub(unacked), unacked)
}

/// A subscription of a topic's stats as a group.
fn group_info(name: Name, sub: &serde_json::Value) -> GroupInfo {
    let consumers = sub
        .get("consumers")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten();
    let members = consumers.map(|c| {
        let text = |f: &str| {
            c.get(f)
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        Member::new(text("consumerName").unwrap_or_default())
            .with_address(text("address"))
            .with_pending(c.get("unackedMessages").and_then(serde_json::Value::as_u64))
    });
    GroupInfo::new(name)
        .with_members(members.collect())
        .with_depth(Some(subscription_depth(sub)))
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
