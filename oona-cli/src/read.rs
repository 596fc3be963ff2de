//! Reading a topic without disturbing it: `tail`, `replay` and the `dlq`
//! commands read through a group of their own (`oona-cli-<random>`),
//! which is deleted when they stop ([`oona::Transport::delete_group`]),
//! so the broker keeps nothing for them and the topic's groups never see
//! them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use oona::{
    Bus, Delivery, DeliveryStream, Envelope, Name, StartPosition, Subscription, Timestamp, Topic,
};
use tokio::sync::Notify;

use crate::exit::{Context as _, Failure};

/// Where the CLI's reading groups send entries they cannot decode (never
/// the topic's own dead-letter topic, which its real groups fill).
pub const CLI_DEAD_LETTERS: &str = "system.oona_cli.dlq";

/// Set once SIGINT or SIGTERM arrives: readers stop and clean up.
#[derive(Clone, Default)]
pub struct Stop(Arc<(AtomicBool, Notify)>);

impl Stop {
    /// Watch for SIGINT and SIGTERM; a second one exits at once (130).
    /// Only commands that check the token install it: the others keep the
    /// default, which ends the process.
    pub fn on_signals() -> Self {
        let stop = Stop::default();
        let s = stop.clone();
        tokio::spawn(async move {
            oona::node::shutdown_signal().await;
            s.0 .0.store(true, Ordering::SeqCst);
            s.0 .1.notify_waiters();
            oona::node::shutdown_signal().await;
            eprintln!("oona: stopped at once; a reading group may be left (`oona groups <topic>` shows it)");
            std::process::exit(130);
        });
        stop
    }

    pub fn is_stopped(&self) -> bool {
        self.0 .0.load(Ordering::SeqCst)
    }

    pub async fn stopped(&self) {
        let n = self.0 .1.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if self.is_stopped() {
            return;
        }
        n.await;
    }
}

/// Where to start: `earliest`, `latest`, an RFC 3339 time, or a duration
/// ago (`90s`, `10m`, `2h`, `7d`).
pub fn parse_start(s: &str) -> Result<StartPosition, String> {
    match s {
        "earliest" => return Ok(StartPosition::Earliest),
        "latest" => return Ok(StartPosition::Latest),
        _ => {}
    }
    if let Ok(t) = Timestamp::parse_rfc3339(s) {
        return Ok(StartPosition::At(t));
    }
    let ago = parse_duration(s).map_err(|_| {
        format!("{s:?} is not earliest, latest, an RFC 3339 time or a duration ago like 10m")
    })?;
    let now = Timestamp::now().unix_millis();
    let ms = u64::try_from(ago.as_millis()).unwrap_or(u64::MAX);
    Ok(StartPosition::At(Timestamp::from_unix_millis(
        now.saturating_sub(ms),
    )))
}

/// `500ms`, `90s`, `10m`, `2h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s"))?;
    let ms = match unit {
        "ms" => 1,
        "s" | "" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

/// A duration above zero (idle times, report intervals).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: must be above 0")),
        d => Ok(d),
    }
}

/// A header filter: `NAME=VALUE` (equal) or `NAME` (present).
#[derive(Debug, Clone)]
pub struct HeaderFilter {
    name: String,
    value: Option<String>,
}

pub fn parse_header_filter(s: &str) -> Result<HeaderFilter, String> {
    let (name, value) = match s.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (s, None),
    };
    if name.is_empty() {
        return Err(format!("{s:?}: expected NAME=VALUE or NAME"));
    }
    Ok(HeaderFilter {
        name: name.to_string(),
        value,
    })
}

/// Which messages to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub key: Option<String>,
    pub headers: Vec<HeaderFilter>,
}

impl Filter {
    pub fn matches(&self, env: &Envelope) -> bool {
        if self
            .key
            .as_ref()
            .is_some_and(|k| env.key.as_ref() != Some(k))
        {
            return false;
        }
        self.headers
            .iter()
            .all(|h| match (&h.value, env.header(&h.name)) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(want), Some(got)) => want == got,
            })
    }
}

/// A broker position as receipts and `--json` print them (Redis
/// `1700000000000-0`, Kafka `partition/offset`, Pulsar
/// `ledger:entry[:batch]`): an optional partition and the numbers that order
/// positions within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    partition: Option<u64>,
    order: Vec<u64>,
}

pub fn parse_position(s: &str) -> Result<Position, String> {
    let bad = || {
        format!("{s:?} is not a position as receipts print them (1700000000000-0, 3/1200, 17:4)")
    };
    let (partition, rest) = match s.split_once('/') {
        Some((p, r)) => (Some(p.parse().map_err(|_| bad())?), r),
        None => (None, s),
    };
    let order = rest
        .split(['-', ':'])
        .map(|n| n.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Position { partition, order })
}

impl Position {
    /// Whether a delivery at `pos` is at or after this position: always on
    /// another partition (each is ordered on its own; on Kafka the other
    /// partitions are read from their start), and when the broker gives no
    /// position. Missing trailing numbers count as 0 (Pulsar's `17:4` is
    /// `17:4:0` in a batch). A position of another form than the broker's
    /// (a partition where it has none, or none where it has one) is an
    /// error.
    pub fn admits(&self, pos: Option<&str>) -> Result<bool, String> {
        let Some(text) = pos else { return Ok(true) };
        let p = parse_position(text)?;
        if p.partition.is_some() != self.partition.is_some() {
            return Err(format!(
                "--position is not of this broker's form: its positions look like {text}"
            ));
        }
        if p.partition != self.partition {
            return Ok(true);
        }
        let n = p.order.len().max(self.order.len());
        let pad = |v: &[u64]| {
            let mut v = v.to_vec();
            v.resize(n, 0);
            v
        };
        Ok(pad(&p.order) >= pad(&self.order))
    }
}

/// A reading group on one topic, deleted on [`Reader::close`].
pub struct Reader {
    bus: Bus,
    topic: Topic,
    group: Name,
    stream: Option<DeliveryStream>,
    stop: Stop,
}

/// Why [`Reader::next`] returned no delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Nothing arrived for the idle time.
    Idle,
    /// SIGINT or SIGTERM.
    Signal,
    /// The stream ended (the transport closed).
    Closed,
}

impl Reader {
    pub async fn open(
        bus: &Bus,
        topic: &Topic,
        start: StartPosition,
        stop: &Stop,
    ) -> Result<Self, Failure> {
        // Reading never creates a topic, and needs the group deleted after.
        let t = bus.transport();
        if !t.capabilities().admin {
            return Err(Failure::usage(format!(
                "the {} transport cannot delete a reading group afterwards (on Pulsar, add admin_url to the URL)",
                t.name()
            )));
        }
        t.describe_topic(topic).await.ctx(topic.as_str())?;
        let group = Name::unique("oona-cli");
        let dlq = Topic::new(CLI_DEAD_LETTERS).ctx("the CLI's dead-letter topic")?;
        let sub = Subscription::new(topic.clone(), group.clone())
            .start(start)
            .dead_letter(dlq)
            .ack_deadline(Duration::from_secs(60));
        let stream = bus
            .subscribe_raw(sub)
            .await
            .ctx(&format!("subscribing to {topic}"))?;
        Ok(Reader {
            bus: bus.clone(),
            topic: topic.clone(),
            group,
            stream: Some(stream),
            stop: stop.clone(),
        })
    }

    /// The next delivery, or why there is none.
    pub async fn next(&mut self, idle: Option<Duration>) -> Result<Result<Delivery, End>, Failure> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(Err(End::Closed));
        };
        loop {
            let wait = async {
                match idle {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.stop.stopped() => return Ok(Err(End::Signal)),
                _ = wait => return Ok(Err(End::Idle)),
                d = stream.next() => match d {
                    None => return Ok(Err(End::Closed)),
                    Some(Ok(d)) => return Ok(Ok(d)),
                    // Reconnecting: the stream goes on.
                    Some(Err(e)) if e.is_temporary() => {
                        eprintln!("oona: {e} (retrying)");
                    }
                    Some(Err(e)) => return Err(e.into()),
                },
            }
        }
    }

    /// Stop reading and delete the group. A group left behind is reported
    /// with its name, so an operator can delete it.
    pub async fn close(mut self) {
        if let Some(s) = self.stream.take() {
            s.close().await;
        }
        let t = self.bus.transport().as_ref();
        let within = Duration::from_secs(15);
        if let Err(e) = oona::admin::delete_group_within(t, &self.topic, &self.group, within).await
        {
            eprintln!(
                "oona: could not delete the reading group {} on {}: {e}",
                self.group, self.topic
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_parse() {
        assert_eq!(parse_start("earliest"), Ok(StartPosition::Earliest));
        assert_eq!(parse_start("latest"), Ok(StartPosition::Latest));
        let at = parse_start("2026-01-02T03:04:05Z").unwrap();
        assert_eq!(
            at,
            StartPosition::At(Timestamp::parse_rfc3339("2026-01-02T03:04:05Z").unwrap())
        );
        let StartPosition::At(t) = parse_start("10m").unwrap() else {
            panic!("10m ago is a time");
        };
        let ago = Timestamp::now().unix_millis() - t.unix_millis();
        assert!((599_000..=601_000).contains(&ago), "{ago}");
        assert!(parse_start("yesterday").is_err());
        assert!(parse_duration("5x").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn positions_order_within_their_partition() {
        let redis = parse_position("1700000000000-5").unwrap();
        assert_eq!(redis.admits(Some("1700000000000-5")), Ok(true));
        assert_eq!(redis.admits(Some("1700000000001-0")), Ok(true));
        assert_eq!(redis.admits(Some("1700000000000-4")), Ok(false));
        assert_eq!(redis.admits(None), Ok(true));
        let ms_only = parse_position("1700000000001").unwrap();
        assert_eq!(ms_only.admits(Some("1700000000000-9")), Ok(false));
        assert_eq!(ms_only.admits(Some("1700000000001-0")), Ok(true));
        let kafka = parse_position("2/100").unwrap();
        assert_eq!(kafka.admits(Some("2/99")), Ok(false));
        assert_eq!(kafka.admits(Some("2/100")), Ok(true));
        assert_eq!(kafka.admits(Some("0/3")), Ok(true), "another partition");
        assert!(kafka.admits(Some("17:4")).is_err(), "not Kafka's form");
        assert!(parse_position("100").unwrap().admits(Some("0/3")).is_err());
        let pulsar = parse_position("17:4").unwrap();
        assert_eq!(pulsar.admits(Some("16:900:0")), Ok(false), "batched");
        assert_eq!(pulsar.admits(Some("17:4:0")), Ok(true));
        assert_eq!(pulsar.admits(Some("18:0")), Ok(true));
        assert!(parse_position("x-1").is_err());
    }

    #[test]
    fn filters_match_key_and_headers() {
        let t = Topic::new("a.b.c").unwrap();
        let env = Envelope::builder(t, "{}")
            .key("k1")
            .header("region", "eu")
            .build();
        let f = |key: Option<&str>, h: &[&str]| Filter {
            key: key.map(str::to_string),
            headers: h.iter().map(|s| parse_header_filter(s).unwrap()).collect(),
        };
        assert!(f(None, &[]).matches(&env));
        assert!(f(Some("k1"), &["region=eu"]).matches(&env));
        assert!(f(None, &["region"]).matches(&env));
        assert!(!f(Some("k2"), &[]).matches(&env));
        assert!(!f(None, &["region=us"]).matches(&env));
        assert!(!f(None, &["zone"]).matches(&env));
    }
}
