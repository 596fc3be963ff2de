//! `kafka://` URL options.

use std::borrow::Cow;
use std::time::Duration;

use oona_core::{ConnectUrl, Error, ErrorKind, Name, PolicySet, Result, Tenant, Topic};
use rdkafka::ClientConfig;

/// Everything the URL says, with defaults filled in. `Debug` shows secret
/// settings (the SASL password, the TLS key's password) as `***`.
#[derive(Clone)]
pub struct KafkaOptions {
    /// `host:port` list (bootstrap servers).
    pub brokers: Vec<String>,
    /// `client_id` (default `oona`).
    pub client_id: String,
    /// `partitions` of created topics (default 3).
    pub partitions: i32,
    /// `replication` factor of created topics (default 1).
    pub replication: i32,
    /// `linger` of the producer (default 0 ms: librdkafka still batches what
    /// queues up while a request is in flight).
    pub linger: Duration,
    /// `idempotence` of the producer (default true).
    pub idempotence: bool,
    /// `batch_messages`: most records in one produce batch (default 10000).
    pub batch_messages: u32,
    /// `group_protocol`: the consumer group protocol (default
    /// [`GroupProtocol::Classic`]; see the crate README for why not yet
    /// KIP-848's).
    pub group_protocol: GroupProtocol,
    /// `session_timeout` of consumer groups (default 10 s; classic
    /// protocol only).
    pub session_timeout: Duration,
    /// `heartbeat` interval (default a third of the session timeout;
    /// classic protocol only).
    pub heartbeat: Duration,
    /// `static_membership`: each subscription joins its group as a static
    /// member (KIP-345) whose `group.instance.id` is the subscription's
    /// consumer name (default false). A process restarted with the same
    /// consumer names takes its partitions back at once instead of after
    /// the session timeout; a member that closes does not leave the group
    /// (its partitions wait for the session timeout or its return).
    pub static_membership: bool,
    /// `fetch_wait`: longest a fetch waits for data (default 100 ms).
    pub fetch_wait: Duration,
    /// `commit_interval`: settled offsets are committed at most this often
    /// (default 100 ms), and always on revoke and close.
    pub commit_interval: Duration,
    /// `timeout` of admin calls and publishes (default 30 s).
    pub timeout: Duration,
    /// Security settings passed to librdkafka.
    pub security: Vec<(&'static str, String)>,
    /// Retention and payload limits by plane.
    pub policies: PolicySet,
    /// `tenant`: its topics (retry and dead-letter topics too) and group
    /// ids are prefixed `<tenant>.__.`, so they never meet another
    /// tenant's.
    pub tenant: Option<Tenant>,
}

/// The consumer group protocol of subscriptions (`group_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupProtocol {
    /// `classic`: JoinGroup/SyncGroup with client-side assignment; session
    /// timeout and heartbeat set by the client. Every Kafka broker has it.
    #[default]
    Classic,
    /// `consumer`: KIP-848's broker-driven, incremental protocol (Kafka 4.0
    /// and later, librdkafka 2.12): a member joining or leaving moves only
    /// the partitions that change owner, and the others keep consuming.
    /// Session timeout and heartbeat are the broker's
    /// (`group.consumer.session.timeout.ms`, 45 s by default).
    Consumer,
}

impl GroupProtocol {
    /// librdkafka's `group.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

impl std::fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let security: Vec<(&str, &str)> = self
            .security
            .iter()
            .map(|(k, v)| {
                let v = if oona_core::config::is_secret(k) {
                    oona_core::config::REDACTED
                } else {
                    v.as_str()
                };
                (*k, v)
            })
            .collect();
        f.debug_struct("KafkaOptions")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("linger", &self.linger)
            .field("idempotence", &self.idempotence)
            .field("batch_messages", &self.batch_messages)
            .field("group_protocol", &self.group_protocol)
            .field("session_timeout", &self.session_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("static_membership", &self.static_membership)
            .field("fetch_wait", &self.fetch_wait)
            .field("commit_interval", &self.commit_interval)
            .field("timeout", &self.timeout)
            .field("security", &security)
            .field("policies", &self.policies)
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            brokers: vec!["127.0.0.1:9092".into()],
            client_id: "oona".into(),
            partitions: 3,
            replication: 1,
            linger: Duration::ZERO,
            idempotence: true,
            batch_messages: 10_000,
            group_protocol: GroupProtocol::default(),
            session_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_millis(3333),
            static_membership: false,
            fetch_wait: Duration::from_millis(100),
            commit_interval: Duration::from_millis(100),
            timeout: Duration::from_secs(30),
            security: Vec::new(),
            policies: PolicySet::default(),
            tenant: None,
        }
    }
}

/// Between a tenant and the names of its topics and groups.
const TENANT_SEPARATOR: &str = ".__.";

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::ConfigInvalid, msg)
}

impl KafkaOptions {
    /// The Kafka topic of `topic`: `<tenant>.__.<topic>` in a tenant, the
    /// topic's own name otherwise. No topic has a segment `__` (segments
    /// start with a letter), so a tenant's names never read as topics of
    /// a client without one, nor as another tenant's (a tenant named like
    /// a plane included).
    pub fn kafka_topic<'a>(&self, topic: &'a Topic) -> Cow<'a, str> {
        match &self.tenant {
            Some(t) => Cow::Owned(format!("{t}{TENANT_SEPARATOR}{topic}")),
            None => Cow::Borrowed(topic.as_str()),
        }
    }

    /// The group id of `group`: `<tenant>.__.<group>` in a tenant.
    pub fn group_id<'a>(&self, group: &'a Name) -> Cow<'a, str> {
        match &self.tenant {
            Some(t) => Cow::Owned(format!("{t}{TENANT_SEPARATOR}{group}")),
            None => Cow::Borrowed(group.as_str()),
        }
    }

    /// A Kafka topic name or group id without this tenant's prefix;
    /// `None` when it is not this tenant's (with a tenant, only names with
    /// its prefix are its own).
    pub fn strip_tenant<'a>(&self, name: &'a str) -> Option<&'a str> {
        match &self.tenant {
            Some(t) => name
                .strip_prefix(t.as_str())?
                .strip_prefix(TENANT_SEPARATOR),
            None => Some(name),
        }
    }

    /// Read a `kafka://host:port[,host:port]?key=value` URL. Unknown keys
    /// are an error naming them.
    ///
    /// Keys: `tenant`, `client_id`, `partitions`, `replication`, `linger`,
    /// `idempotence`, `batch_messages`, `group_protocol`, `session_timeout`, `heartbeat`,
    /// `static_membership`, `fetch_wait`,
    /// `commit_interval`, `timeout`, `tls`, `tls_ca`, `tls_cert`, `tls_key`,
    /// `tls_key_password`, `sasl_mechanism` (user and password from the
    /// URL's user info), `brokers` (more `host:port`s, comma-separated).
    pub fn from_url(mut url: ConnectUrl) -> Result<Self> {
        if url.scheme() != "kafka" {
            return Err(invalid(format!(
                "kafka transport: unsupported scheme {:?} (use kafka://)",
                url.scheme()
            )));
        }
        let mut o = KafkaOptions::default();
        let u = url.url().clone();
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("127.0.0.1");
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = u.port().unwrap_or(9092);
        o.brokers = vec![if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }];
        if let Some(more) = url.take::<String>("brokers")? {
            for b in more.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                if !b.contains(':') {
                    return Err(invalid(format!(
                        "query parameter `brokers`: {b:?} is not host:port"
                    )));
                }
                o.brokers.push(b.to_string());
            }
        }
        o.tenant = url.take::<Tenant>("tenant")?;
        if let Some(v) = url.take::<String>("client_id")? {
            o.client_id = v;
        }
        if let Some(v) = url.take::<i32>("partitions")? {
            if v < 1 {
                return Err(invalid(
                    "query parameter `partitions`: must be at least 1".into(),
                ));
            }
            o.partitions = v;
        }
        if let Some(v) = url.take::<i32>("replication")? {
            if v < 1 && v != -1 {
                return Err(invalid(
                    "query parameter `replication`: must be at least 1 (or -1 for the broker default)".into(),
                ));
            }
            o.replication = v;
        }
        if let Some(v) = url.take_duration("linger")? {
            o.linger = v;
        }
        if let Some(v) = url.take_bool("idempotence")? {
            o.idempotence = v;
        }
        if let Some(v) = url.take::<u32>("batch_messages")? {
            if v < 1 {
                return Err(invalid(
                    "query parameter `batch_messages`: must be at least 1".into(),
                ));
            }
            o.batch_messages = v;
        }
        if let Some(v) = url.take::<String>("group_protocol")? {
            o.group_protocol = match v.to_ascii_lowercase().as_str() {
                "classic" => GroupProtocol::Classic,
                "consumer" => GroupProtocol::Consumer,
                _ => {
                    return Err(invalid(format!(
                        "query parameter `group_protocol`: {v:?} (use classic or consumer)"
                    )))
                }
            };
        }
        let session_timeout = url.take_duration("session_timeout")?;
        let heartbeat = url.take_duration("heartbeat")?;
        if o.group_protocol == GroupProtocol::Consumer
            && (session_timeout.is_some() || heartbeat.is_some())
        {
            return Err(invalid(
                "query parameters `session_timeout` and `heartbeat` apply to \
                 group_protocol=classic; with group_protocol=consumer the broker sets them \
                 (group.consumer.session.timeout.ms, group.consumer.heartbeat.interval.ms)"
                    .into(),
            ));
        }
        if let Some(v) = session_timeout {
            o.session_timeout = v;
            o.heartbeat = v / 3;
        }
        if let Some(v) = heartbeat {
            o.heartbeat = v;
        }
        if let Some(v) = url.take_bool("static_membership")? {
            o.static_membership = v;
        }
        if let Some(v) = url.take_duration("fetch_wait")? {
            o.fetch_wait = v;
        }
        if let Some(v) = url.take_duration("commit_interval")? {
            o.commit_interval = v;
        }
        if let Some(v) = url.take_duration("timeout")? {
            o.timeout = v;
        }
        let tls = url.take_bool("tls")?;
        let mut tls_files = false;
        for (key, rd) in [
            ("tls_ca", "ssl.ca.location"),
            ("tls_cert", "ssl.certificate.location"),
            ("tls_key", "ssl.key.location"),
            ("tls_key_password", "ssl.key.password"),
        ] {
            if let Some(v) = url.take::<String>(key)? {
                // Named here: librdkafka's own error names neither.
                if key != "tls_key_password" {
                    std::fs::metadata(&v)
                        .map_err(|e| invalid(format!("query parameter `{key}`: {v}: {e}")))?;
                }
                tls_files = true;
                o.security.push((rd, v));
            }
        }
        let tls = match tls {
            Some(false) if tls_files => {
                return Err(invalid(
                    "query parameter `tls`: false, but TLS files are given".into(),
                ))
            }
            Some(t) => t,
            None => tls_files,
        };
        let mechanism = url.take::<String>("sasl_mechanism")?;
        let user = percent_decode(u.username());
        let password = u.password().map(percent_decode);
        let sasl = match (mechanism, user.is_empty()) {
            (Some(m), false) => {
                let m = m.to_ascii_uppercase();
                if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&m.as_str()) {
                    return Err(invalid(format!(
                        "query parameter `sasl_mechanism`: {m:?} (use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
                    )));
                }
                Some(m)
            }
            (None, false) => Some("PLAIN".to_string()),
            (Some(_), true) => {
                return Err(invalid(
                    "query parameter `sasl_mechanism` needs a user and password in the URL (kafka://user:password@host:port)".into(),
                ))
            }
            (None, true) => None,
        };
        let protocol = match (tls, sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        o.security.push(("security.protocol", protocol.into()));
        if let Some(m) = sasl {
            o.security.push(("sasl.mechanism", m));
            o.security.push(("sasl.username", user));
            o.security
                .push(("sasl.password", password.unwrap_or_default()));
        }
        url.finish()?;
        Ok(o)
    }

    /// Settings every client shares.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers.join(","))
            .set("client.id", &self.client_id)
            // librdkafka logs through its own channel; quiet below warnings.
            .set("log_level", "4")
            .set("socket.nagle.disable", "true")
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "1000");
        for (k, v) in &self.security {
            c.set(*k, v);
        }
        c
    }
}

fn percent_decode(s: &str) -> String {
    // User info is percent-encoded in URLs; decode %XX sequences.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<KafkaOptions> {
        KafkaOptions::from_url(ConnectUrl::parse(s)?)
    }

    #[test]
    fn a_tenant_has_names_of_its_own() {
        let t = Topic::new("telemetry.seed.health").unwrap();
        let g = Name::new("tamiyo").unwrap();
        let root = parse("kafka://h:9092").unwrap();
        assert_eq!(root.kafka_topic(&t), "telemetry.seed.health");
        assert_eq!(root.strip_tenant("a.__.x.y"), Some("a.__.x.y"));
        // A tenant named like a plane: its names still never alias the
        // untenanted ones.
        let o = parse("kafka://h:9092?tenant=telemetry").unwrap();
        assert_eq!(o.kafka_topic(&t), "telemetry.__.telemetry.seed.health");
        assert_eq!(o.group_id(&g), "telemetry.__.tamiyo");
        assert_eq!(o.strip_tenant("telemetry.seed.health"), None);
        assert_eq!(
            o.strip_tenant("telemetry.__.telemetry.seed.health"),
            Some("telemetry.seed.health")
        );
        // What a tenant writes is no topic to a client without one.
        assert!(Topic::new(o.kafka_topic(&t).into_owned()).is_err());
        assert!(parse("kafka://h:9092?tenant=A").is_err());
    }

    #[test]
    fn defaults_and_hosts() {
        let o = parse("kafka://127.0.0.1:19092").unwrap();
        assert_eq!(o.brokers, vec!["127.0.0.1:19092"]);
        assert_eq!(o.partitions, 3);
        let o = parse("kafka://a:1?brokers=b:2,c:3&partitions=1&linger=5ms").unwrap();
        assert_eq!(o.brokers, vec!["a:1", "b:2", "c:3"]);
        assert_eq!(o.partitions, 1);
        assert_eq!(o.linger, Duration::from_millis(5));
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = parse("kafka://a:1?partitons=2").unwrap_err();
        assert!(e.to_string().contains("`partitons`"), "{e}");
        let e = parse("kafka://a:1?partitions=0").unwrap_err();
        assert!(e.to_string().contains("`partitions`"), "{e}");
        let e = parse("kafka://a:1?sasl_mechanism=PLAIN").unwrap_err();
        assert!(e.to_string().contains("user"), "{e}");
        let e = parse("kafka://u:p@a:1?sasl_mechanism=GSSAPI").unwrap_err();
        assert!(e.to_string().contains("`sasl_mechanism`"), "{e}");
    }

    #[test]
    fn group_protocol_and_its_timeouts() {
        assert_eq!(
            parse("kafka://a:1").unwrap().group_protocol,
            GroupProtocol::Classic
        );
        let o = parse("kafka://a:1?session_timeout=6s").unwrap();
        assert_eq!(o.group_protocol, GroupProtocol::Classic);
        assert_eq!(o.session_timeout, Duration::from_secs(6));
        assert_eq!(o.heartbeat, Duration::from_secs(2));
        // The broker owns them under KIP-848: asking for them is an error
        // that says so, not a setting silently ignored.
        let o = parse("kafka://a:1?group_protocol=consumer").unwrap();
        assert_eq!(o.group_protocol, GroupProtocol::Consumer);
        let e = parse("kafka://a:1?group_protocol=consumer&session_timeout=6s").unwrap_err();
        assert!(e.to_string().contains("group_protocol=classic"), "{e}");
        let e = parse("kafka://a:1?group_protocol=eager").unwrap_err();
        assert!(e.to_string().contains("`group_protocol`"), "{e}");
    }

    #[test]
    fn security_settings() {
        let o =
            parse("kafka://alice:s%40cret@a:1?sasl_mechanism=scram-sha-512&tls=true&client_id=x")
                .unwrap();
        let get = |k: &str| {
            o.security
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("security.protocol").as_deref(), Some("sasl_ssl"));
        assert_eq!(get("sasl.mechanism").as_deref(), Some("SCRAM-SHA-512"));
        assert_eq!(get("sasl.username").as_deref(), Some("alice"));
        assert_eq!(get("sasl.password").as_deref(), Some("s@cret"));
        assert_eq!(o.client_id, "x");
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("s@cret") && shown.contains("***"),
            "{shown}"
        );
        assert!(shown.contains("alice"), "the user is no secret: {shown}");
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let o = parse(&format!("kafka://a:1?tls_ca={ca}")).unwrap();
        assert!(o.security.contains(&("security.protocol", "ssl".into())));
        assert!(parse(&format!("kafka://a:1?tls=false&tls_ca={ca}")).is_err());
        let e = parse("kafka://a:1?tls_ca=/nonexistent/ca.pem").unwrap_err();
        assert!(
            e.to_string().contains("`tls_ca`: /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
