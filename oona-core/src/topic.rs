//! Topic names, consumer group names and per-topic policy.
//!
//! # Topic grammar
//!
//! ```text
//! topic   = segment 1*7("." segment)        ; 2 to 8 segments
//! segment = lower *( lower / digit / "_" / "-" )
//! lower   = %x61-7A                           ; a-z
//! digit   = %x30-39                           ; 0-9
//! ```
//!
//! The first segment is the **plane** (`telemetry`, `control`, `system`,
//! `innovation`, `compilation`, `oona`, ...), which decides retention. The
//! usual shape is `<plane>.<subsystem>.<event>`; two segments
//! (`innovation.field_reports`) are allowed because the platform uses them.
//! A whole name is at most [`Topic::MAX_LEN`] (200) bytes: Kafka's limit is
//! 249 and Redis keys and Pulsar names need room for a prefix, a tenant and a
//! namespace. Every character of the grammar is legal in a Kafka topic, a
//! Pulsar topic and a Redis key, so a topic maps to each broker unchanged.
//!
//! The final segment `dlq` is reserved for dead-letter topics
//! ([`Topic::dead_letter`]), and `lane-high` and `lane-emergency` for
//! priority lanes ([`crate::priority`]).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// A validated topic name, `<plane>.<subsystem>.<event>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Topic(Arc<str>);

impl Topic {
    /// Longest accepted topic name, in bytes.
    pub const MAX_LEN: usize = 200;
    /// Most segments in a topic name.
    pub const MAX_SEGMENTS: usize = 8;
    /// The reserved last segment of dead-letter topics.
    pub const DEAD_LETTER_SUFFIX: &'static str = "dlq";

    /// Validate `name` against the grammar in the module docs.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        validate_topic(&name)?;
        Ok(Topic(name.into()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The plane: the first segment.
    pub fn plane(&self) -> &str {
        self.0.split('.').next().unwrap_or(&self.0)
    }

    /// The segments of the name.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }

    /// Whether this is a dead-letter topic (last segment `dlq`).
    pub fn is_dead_letter(&self) -> bool {
        self.0
            .rsplit('.')
            .next()
            .is_some_and(|s| s == Self::DEAD_LETTER_SUFFIX)
    }

    /// The default dead-letter topic of this topic: `<topic>.dlq`.
    ///
    /// A dead-letter topic is its own dead-letter topic, so dead letters never
    /// cascade into `x.dlq.dlq`.
    pub fn dead_letter(&self) -> Topic {
        if self.is_dead_letter() {
            return self.clone();
        }
        // The grammar allows the suffix unless the name is at its limits; in
        // that case replace the last segment so the result stays valid.
        let candidate = format!("{}.{}", self.0, Self::DEAD_LETTER_SUFFIX);
        if validate_topic(&candidate).is_ok() {
            return Topic(candidate.into());
        }
        let mut parts: Vec<&str> = self.0.split('.').collect();
        parts.pop();
        let mut base = parts.join(".");
        base.truncate(Self::MAX_LEN - Self::DEAD_LETTER_SUFFIX.len() - 1);
        Topic(format!("{base}.{}", Self::DEAD_LETTER_SUFFIX).into())
    }

    /// Convert into the owned name.
    pub fn into_string(self) -> String {
        self.0.to_string()
    }
}

fn invalid(name: &str, why: impl fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidTopic,
        format!("invalid topic name {name:?}: {why} (expected <plane>.<subsystem>.<event>: 2 to 8 dot-separated segments of a-z, 0-9, '_' or '-', each starting with a letter, at most 200 bytes)"),
    )
}

fn validate_topic(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(invalid(name, "it is empty"));
    }
    if name.len() > Topic::MAX_LEN {
        return Err(invalid(
            name,
            format!("it is {} bytes long, over {}", name.len(), Topic::MAX_LEN),
        ));
    }
    let segments: Vec<&str> = name.split('.').collect();
    if segments.len() < 2 {
        return Err(invalid(
            name,
            "it has one segment; a plane and at least one more segment are required",
        ));
    }
    if segments.len() > Topic::MAX_SEGMENTS {
        return Err(invalid(
            name,
            format!(
                "it has {} segments, over {}",
                segments.len(),
                Topic::MAX_SEGMENTS
            ),
        ));
    }
    for (i, seg) in segments.iter().enumerate() {
        let which = if i == 0 {
            "the plane".to_string()
        } else {
            format!("segment {}", i + 1)
        };
        let Some(first) = seg.chars().next() else {
            return Err(invalid(name, format!("{which} is empty")));
        };
        if !first.is_ascii_lowercase() {
            return Err(invalid(
                name,
                format!("{which} {seg:?} starts with {first:?}, not a lower-case letter"),
            ));
        }
        if let Some(bad) = seg
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
        {
            return Err(invalid(name, format!("{which} {seg:?} contains {bad:?}")));
        }
    }
    Ok(())
}

/// Topics named by a pattern: a topic name matches itself; `a.*` and
/// `a.b.*` match the topics below them (`a.b.c`, `a.b.c.d`); `*` matches
/// every topic. For policies that a user turns on for some topics.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TopicPattern(Arc<str>);

impl TopicPattern {
    /// Validate `pattern`: a topic name, or segments followed by `.*`, or
    /// `*`.
    pub fn new(pattern: impl Into<String>) -> Result<Self> {
        let p: String = pattern.into();
        let valid = match p.strip_suffix('*') {
            Some("") => true,
            Some(prefix) => prefix.ends_with('.') && validate_topic(&format!("{prefix}x")).is_ok(),
            None => validate_topic(&p).is_ok(),
        };
        if !valid {
            return Err(Error::new(
                ErrorKind::InvalidTopic,
                format!(
                    "invalid topic pattern {p:?}: use a topic name, segments followed by `.*` \
                     (`telemetry.*`, `telemetry.seed.*`), or `*`"
                ),
            ));
        }
        Ok(TopicPattern(p.into()))
    }

    /// Whether `topic` is one of the pattern's topics.
    pub fn matches(&self, topic: &Topic) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => topic.as_str().starts_with(prefix),
            None => topic.as_str() == &*self.0,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicPattern({})", self.0)
    }
}

impl FromStr for TopicPattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TopicPattern::new(s)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({})", self.0)
    }
}

impl FromStr for Topic {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Topic::new(s)
    }
}

impl TryFrom<String> for Topic {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Topic::new(s)
    }
}

impl TryFrom<&str> for Topic {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Topic::new(s)
    }
}

impl From<Topic> for String {
    fn from(t: Topic) -> String {
        t.0.to_string()
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A validated consumer group or consumer name: 1 to 128 bytes of ASCII
/// letters, digits, `.`, `_` and `-` (legal in every broker's naming).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(Arc<str>);

impl Name {
    /// Longest accepted name.
    pub const MAX_LEN: usize = 128;

    /// Validate a group or consumer name.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if name.is_empty() || name.len() > Self::MAX_LEN {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!(
                    "invalid name {name:?}: must be 1 to {} bytes",
                    Self::MAX_LEN
                ),
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!("invalid name {name:?}: contains {bad:?} (allowed: A-Z a-z 0-9 . _ -)"),
            ));
        }
        Ok(Name(name.into()))
    }

    /// A unique name with the given prefix, e.g. for anonymous consumers.
    pub fn unique(prefix: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Name::new(format!("{prefix}-{}", &id[..12]))
            .unwrap_or_else(|_| Name(format!("consumer-{}", &id[..12]).into()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({})", self.0)
    }
}

impl FromStr for Name {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Name::new(s)
    }
}

impl TryFrom<String> for Name {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Name::new(s)
    }
}

impl TryFrom<&str> for Name {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Name::new(s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0.to_string()
    }
}

/// How long a topic keeps messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retention {
    /// Keep messages for this long after publication.
    For(Duration),
    /// Keep messages forever (the event-sourcing log).
    Indefinite,
}

impl Retention {
    /// The retention as a duration; `None` when indefinite.
    pub fn duration(self) -> Option<Duration> {
        match self {
            Retention::For(d) => Some(d),
            Retention::Indefinite => None,
        }
    }

    /// The retention in milliseconds, `-1` when indefinite (Kafka's
    /// `retention.ms` convention).
    pub fn as_millis_or_minus_one(self) -> i64 {
        match self {
            Retention::For(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Retention::Indefinite => -1,
        }
    }
}

/// A validated tenant name: the isolation unit of a shared cluster (a
/// training run, a team, a test). Topics, consumer groups and dead letters
/// of one tenant never meet another's, though the topic names are the same.
///
/// 1 to [`Tenant::MAX_LEN`] bytes of `a-z`, `0-9`, `-` and `_`, starting
/// with a letter or digit: legal in a Pulsar tenant, a Kafka topic and a
/// Redis key. Each transport maps it onto its broker (the `tenant` URL key):
///
/// | transport | a tenant `run-42` holds |
/// |---|---|
/// | memory | a broker of its own (`memory://name?tenant=run-42`) |
/// | Redis | keys under `<prefix>run-42:` (`oona:run-42:telemetry.seed.health`) |
/// | Kafka | topics and group ids prefixed `run-42.__.` (`run-42.__.telemetry.seed.health`) |
/// | Pulsar | the Pulsar tenant `run-42`, one namespace per plane (`persistent://run-42/telemetry/telemetry.seed.health`) |
///
/// Envelopes carry the topic without the tenant, so a handler reads the
/// same topic names in every tenant.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tenant(Arc<str>);

impl Tenant {
    /// Longest accepted tenant name: room for it in front of a topic
    /// ([`Topic::MAX_LEN`]) within Kafka's 249 bytes.
    pub const MAX_LEN: usize = 40;

    /// Validate a tenant name.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let first_ok = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'));
        if !(first_ok && rest_ok && name.len() <= Self::MAX_LEN) {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!(
                    "invalid tenant {name:?}: 1 to {} of a-z 0-9 - _, starting with a letter or digit",
                    Self::MAX_LEN
                ),
            ));
        }
        Ok(Tenant(name.into()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tenant({})", self.0)
    }
}

impl FromStr for Tenant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Tenant::new(s)
    }
}

impl TryFrom<String> for Tenant {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Tenant::new(s)
    }
}

impl From<Tenant> for String {
    fn from(t: Tenant) -> String {
        t.0.to_string()
    }
}

/// What a topic promises: how long it keeps messages and how large one may be.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicPolicy {
    /// How long messages are kept.
    pub retention: Retention,
    /// Largest accepted payload, in bytes.
    pub max_payload_bytes: usize,
    /// Whether high and emergency messages travel in lanes of their own
    /// that consumers read first ([`crate::priority`]); off unless set.
    pub priority_lanes: bool,
    /// Most bytes a topic's unsettled backlog may hold before publishes are
    /// refused: a slow tenant fills its own quota, never the cluster's
    /// disk. `None` (the default): no limit but retention. Pulsar enforces
    /// it for a tenant with a namespace per plane (the plane's backlog
    /// quota, policy `producer_exception`, from the plane's policy); Kafka
    /// and Redis, and Pulsar in one namespace, bound a topic by retention
    /// only.
    pub backlog_limit_bytes: Option<u64>,
}

impl TopicPolicy {
    /// Default largest payload: 1 MiB (Kafka's default `message.max.bytes`
    /// is about 1 MB; larger payloads belong in a claim check).
    pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

    /// A policy with the given retention and the default payload limit.
    pub fn new(retention: Retention) -> Self {
        TopicPolicy {
            retention,
            max_payload_bytes: Self::DEFAULT_MAX_PAYLOAD,
            priority_lanes: false,
            backlog_limit_bytes: None,
        }
    }

    /// Set [`TopicPolicy::backlog_limit_bytes`].
    pub fn with_backlog_limit_bytes(mut self, bytes: Option<u64>) -> Self {
        self.backlog_limit_bytes = bytes;
        self
    }

    /// Turn priority lanes on or off ([`crate::priority`]). Publishers and
    /// consumers of a topic must agree: give every bus the same policies.
    pub fn with_priority_lanes(mut self, on: bool) -> Self {
        self.priority_lanes = on;
        self
    }

    /// Set the largest accepted payload.
    pub fn with_max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// Check a payload size against the limit, before any I/O.
    pub fn check_payload(&self, topic: &Topic, len: usize) -> Result<()> {
        if len > self.max_payload_bytes {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "payload of {len} bytes for topic {topic} exceeds the limit of {} bytes",
                    self.max_payload_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// Retention by plane: the platform's policy table.
///
/// | plane | retention |
/// |---|---|
/// | `telemetry` | 72 hours |
/// | `control`, `system` | 30 days |
/// | `innovation` | indefinite |
/// | anything else | the configurable default (7 days) |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    planes: Vec<(String, TopicPolicy)>,
    default: TopicPolicy,
}

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

impl Default for PolicySet {
    fn default() -> Self {
        let p = |r| TopicPolicy::new(r);
        PolicySet {
            planes: vec![
                (
                    "telemetry".into(),
                    p(Retention::For(Duration::from_secs(72 * HOUR))),
                ),
                (
                    "control".into(),
                    p(Retention::For(Duration::from_secs(30 * DAY))),
                ),
                (
                    "system".into(),
                    p(Retention::For(Duration::from_secs(30 * DAY))),
                ),
                ("innovation".into(), p(Retention::Indefinite)),
            ],
            default: p(Retention::For(Duration::from_secs(7 * DAY))),
        }
    }
}

impl PolicySet {
    /// Set (or replace) the policy of one plane.
    pub fn with_plane(mut self, plane: &str, policy: TopicPolicy) -> Self {
        self.planes.retain(|(p, _)| p != plane);
        self.planes.push((plane.to_string(), policy));
        self
    }

    /// Set the policy of planes not listed.
    pub fn with_default(mut self, policy: TopicPolicy) -> Self {
        self.default = policy;
        self
    }

    /// Set the largest payload on every plane.
    pub fn with_max_payload_bytes(mut self, bytes: usize) -> Self {
        for (_, p) in &mut self.planes {
            p.max_payload_bytes = bytes;
        }
        self.default.max_payload_bytes = bytes;
        self
    }

    /// The policy that applies to `topic` (by its plane).
    pub fn for_topic(&self, topic: &Topic) -> &TopicPolicy {
        let plane = topic.plane();
        self.planes
            .iter()
            .find(|(p, _)| p == plane)
            .map(|(_, pol)| pol)
            .unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names() {
        for ok in ["run-42", "a", "42", "team_a", &"x".repeat(Tenant::MAX_LEN)] {
            assert_eq!(Tenant::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "-a",
            "_a",
            "Run",
            "a.b",
            "a:b",
            "a/b",
            &"x".repeat(Tenant::MAX_LEN + 1),
        ] {
            let e = Tenant::new(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidName, "{bad:?}");
            assert!(e.to_string().contains("tenant"), "{e}");
        }
        let t: Tenant = serde_json::from_str("\"run-1\"").unwrap();
        assert_eq!(t.to_string(), "run-1");
        assert!(serde_json::from_str::<Tenant>("\"A\"").is_err());
    }

    #[test]
    fn patterns_match_what_they_name() {
        let t = |s: &str| Topic::new(s).unwrap();
        let p = TopicPattern::new("telemetry.*").unwrap();
        assert!(p.matches(&t("telemetry.seed.health")));
        assert!(!p.matches(&t("telemetryx.seed.health")));
        assert!(!p.matches(&t("control.seed.health")));
        let exact = TopicPattern::new("control.a.b").unwrap();
        assert!(exact.matches(&t("control.a.b")) && !exact.matches(&t("control.a.bc")));
        assert!(TopicPattern::new("*").unwrap().matches(&t("a.b")));
        for bad in [
            "",
            "telemetry",
            "Telemetry.*",
            "telemetry*",
            "telemetry.*.x",
            ".*",
            "a..*",
        ] {
            let e = TopicPattern::new(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad:?}");
        }
    }

    #[test]
    fn accepts_every_topic_of_the_spec() {
        for t in [
            "compilation.blueprint.submitted",
            "telemetry.seed.health",
            "control.kasmina.commands",
            "innovation.field_reports",
            "innovation.candidates.submitted",
            "innovation.certification.results",
            "system.events.epoch",
            "system.events.rollback",
            "oona.kernels.requests",
            "oona.kernels.ready",
            "oona.kernels.errors",
        ] {
            let topic = Topic::new(t).unwrap();
            assert_eq!(topic.as_str(), t);
        }
    }

    #[test]
    fn errors_name_the_offending_part() {
        let cases = [
            ("", "empty"),
            ("telemetry", "one segment"),
            (
                "Telemetry.seed.health",
                "the plane \"Telemetry\" starts with 'T'",
            ),
            ("telemetry..health", "segment 2 is empty"),
            (
                "telemetry.seed.he alth",
                "segment 3 \"he alth\" contains ' '",
            ),
            ("telemetry.seed.health/x", "contains '/'"),
            (
                "telemetry.9seed.health",
                "segment 2 \"9seed\" starts with '9'",
            ),
            ("a.b.c.d.e.f.g.h.i", "9 segments"),
        ];
        for (name, why) in cases {
            let err = Topic::new(name).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidTopic);
            assert!(err.to_string().contains(why), "{name:?}: {err}");
        }
        let long = format!("telemetry.{}", "x".repeat(195));
        assert!(Topic::new(long)
            .unwrap_err()
            .to_string()
            .contains("over 200"));
    }

    #[test]
    fn plane_and_dead_letter() {
        let t = Topic::new("telemetry.seed.health").unwrap();
        assert_eq!(t.plane(), "telemetry");
        let d = t.dead_letter();
        assert_eq!(d.as_str(), "telemetry.seed.health.dlq");
        assert!(d.is_dead_letter());
        assert_eq!(d.dead_letter(), d);
        let full = Topic::new("a.b.c.d.e.f.g.h").unwrap();
        assert_eq!(full.dead_letter().as_str(), "a.b.c.d.e.f.g.dlq");
        let long = Topic::new(format!("telemetry.{}", "x".repeat(190))).unwrap();
        let dl = long.dead_letter();
        assert!(dl.as_str().len() <= Topic::MAX_LEN && dl.is_dead_letter());
    }

    #[test]
    fn serde_validates() {
        let t: Topic = serde_json::from_str("\"system.events.epoch\"").unwrap();
        assert_eq!(t.plane(), "system");
        assert!(serde_json::from_str::<Topic>("\"System\"").is_err());
    }

    #[test]
    fn names_are_validated() {
        assert!(Name::new("tamiyo-controller-1").is_ok());
        assert_eq!(Name::new("a b").unwrap_err().kind(), ErrorKind::InvalidName);
        assert!(Name::new("").is_err());
        assert!(Name::unique("worker").as_str().starts_with("worker-"));
    }

    #[test]
    fn retention_by_plane() {
        let p = PolicySet::default();
        let r = |t: &str| p.for_topic(&Topic::new(t).unwrap()).retention;
        assert_eq!(
            r("telemetry.seed.health"),
            Retention::For(Duration::from_secs(72 * 3600))
        );
        assert_eq!(
            r("control.kasmina.commands"),
            Retention::For(Duration::from_secs(30 * 86400))
        );
        assert_eq!(
            r("system.events.epoch"),
            Retention::For(Duration::from_secs(30 * 86400))
        );
        assert_eq!(r("innovation.field_reports"), Retention::Indefinite);
        assert_eq!(
            r("compilation.blueprint.submitted"),
            Retention::For(Duration::from_secs(7 * 86400))
        );
        let p = p.with_default(TopicPolicy::new(Retention::Indefinite));
        assert_eq!(
            p.for_topic(&Topic::new("oona.kernels.ready").unwrap())
                .retention,
            Retention::Indefinite
        );
        assert_eq!(Retention::Indefinite.as_millis_or_minus_one(), -1);
    }

    #[test]
    fn payload_limit() {
        let t = Topic::new("a.b").unwrap();
        let p = TopicPolicy::new(Retention::Indefinite).with_max_payload_bytes(10);
        assert!(p.check_payload(&t, 10).is_ok());
        let e = p.check_payload(&t, 11).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge);
        assert!(e.to_string().contains("11 bytes"));
    }
}
