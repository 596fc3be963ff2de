//! The outage check of the degradation path, the same on every broker: a
//! publisher process publishes through a spool
//! ([`oona_core::degrade::Spooled`]) while the broker is away for 60 s;
//! mid-outage it is SIGKILLed and a second publisher starts on its spool
//! (connecting while the broker is still away); when the broker is back
//! every publish that returned `Ok` is on it, in order per key.
//!
//! Each transport's test supplies the outage ([`Outage`]: a broker
//! stopped and started, or a proxy cut and restored), a child test
//! function that calls [`publisher_child`] with its way of connecting, and
//! a transport that reads the broker directly.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use oona_core::degrade::{BreakerConfig, Connect, SpoolConfig, Spooled};
use oona_core::{
    ConnectUrl, Driver, Envelope, Name, StartPosition, Subscription, Topic, Transport,
};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

/// Set in a publisher child's environment:
/// `<spool dir>;<topic>;<child number>;<count, 0: until killed>`.
pub const CHILD_ENV: &str = "OONA_OUTAGE_PUBLISHER";
/// Set in a publisher child's environment: the URL it publishes to.
pub const URL_ENV: &str = "OONA_OUTAGE_URL";

/// How long the broker is away.
pub const OUTAGE: Duration = Duration::from_secs(60);
/// When, into the outage, the first publisher is SIGKILLed.
pub const KILL_AT: Duration = Duration::from_secs(20);
const KEYS: usize = 4;
const SECOND_COUNT: usize = 3000;

/// Takes the broker away and brings it back.
#[async_trait]
pub trait Outage: Send {
    /// The broker becomes unreachable (stopped, or every connection cut
    /// and new ones refused).
    async fn begin(&mut self);
    /// The broker is reachable again.
    async fn end(&mut self);
}

/// A cut of every connection through the proxy (new ones refused).
#[async_trait]
impl Outage for crate::proxy::TcpProxy {
    async fn begin(&mut self) {
        self.cut().await.expect("cut the proxy");
    }
    async fn end(&mut self) {
        self.restore().await.expect("restore the proxy");
    }
}

/// What the check saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// Publishes that returned `Ok`.
    pub published: usize,
    /// Of them, before the outage.
    pub before: usize,
    /// By the first publisher during the outage (before its kill).
    pub by_first: usize,
    /// By the second publisher.
    pub by_second: usize,
    /// Deliveries read back (a new group, from the earliest).
    pub deliveries: usize,
    /// Events read more than once.
    pub duplicates: usize,
    /// The second publisher's summary line.
    pub second: String,
    /// From the broker's return to the second publisher's drained spool.
    pub drain_time: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} Ok'd publishes ({} before the outage, {} by the first publisher in it, {} by the \
             second), {} deliveries, lost 0, duplicates {}, spool drained {:.1?} after the broker \
             came back; second publisher: {}",
            self.published,
            self.before,
            self.by_first,
            self.by_second,
            self.deliveries,
            self.duplicates,
            self.drain_time,
            self.second
        )
    }
}

fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "OUTAGE {line}");
    let _ = out.flush();
}

/// In a publisher child (when [`CHILD_ENV`] is set): publish through a
/// spool, connecting with what `connect` makes of the URL it was given,
/// and return `true`; else `false` at once. Publishes `{"c":<child>,"i":<i>}` keyed `k<i mod 4>` every 5 ms,
/// saying `OUTAGE ok <i> <event id>` after each `Ok`; after `count` it
/// waits for the spool to drain and says `OUTAGE drained=<bool> ...`.
pub async fn publisher_child(connect: impl FnOnce(String) -> Connect) -> bool {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let connect = connect(std::env::var(URL_ENV).expect("the outage URL"));
    let parts: Vec<&str> = spec.split(';').collect();
    let [dir, topic, child, count] = parts.as_slice() else {
        panic!("{CHILD_ENV}={spec}");
    };
    let topic = Topic::new(*topic).expect("the outage topic");
    let count: usize = count.parse().expect("the count");
    let breaker = BreakerConfig::default().max_open_for(Duration::from_secs(2));
    let bus = Spooled::connect(connect, SpoolConfig::new(dir), breaker)
        .await
        .expect("a spooled transport, broker or not");
    for i in 0.. {
        if count > 0 && i == count {
            break;
        }
        let e = Envelope::builder(topic.clone(), format!("{{\"c\":{child},\"i\":{i}}}"))
            .sender_id("outage-publisher")
            .key(format!("k{}", i % KEYS))
            .build();
        let id = e.event_id.clone();
        bus.publish(e).await.expect("a publish through an outage");
        say(&format!("ok {i} {id}"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = bus.drained(Duration::from_secs(180)).await;
    let s = bus.stats();
    say(&format!(
        "drained={drained} direct={} spooled={} refused={} outages={} flushed={} left={}",
        s.direct, s.spooled, s.refused, s.outages, s.spool.flushed, s.spool.records
    ));
    bus.close().await.ok();
    true
}

/// What [`publisher_child`] connects with, for a transport's `DRIVER`.
pub fn by_driver(driver: Driver) -> impl FnOnce(String) -> Connect {
    move |url| {
        Box::new(move || {
            let url = url.clone();
            Box::pin(async move { (driver.connect)(ConnectUrl::parse(&url)?).await })
        })
    }
}

/// A proxy this test owns on a broker's `cut` listener (`scripts/brokers.sh`
/// sets `<prefix>_CUT_LISTEN`, where the broker advertises it, and
/// `<prefix>_CUT_UPSTREAM`, where it binds it): clients of the listen
/// address connect through the proxy. The proxy and its address.
pub fn cut_listener(prefix: &str) -> (crate::proxy::TcpProxy, String) {
    let var = |name: String| {
        std::env::var(&name).unwrap_or_else(|_| panic!("{name} is not set (scripts/brokers.sh)"))
    };
    let listen = var(format!("{prefix}_CUT_LISTEN"));
    let upstream = var(format!("{prefix}_CUT_UPSTREAM"));
    let addr = listen.parse().expect("a socket address");
    let proxy = crate::proxy::TcpProxy::start_on(addr, upstream).expect("the cut proxy");
    (proxy, listen)
}

/// A publisher child, as the parent sees it.
struct Publisher {
    process: tokio::process::Child,
    lines: Lines<BufReader<ChildStdout>>,
    number: u32,
}

impl Publisher {
    fn start(child: &Child<'_>, dir: &Path, topic: &Topic, number: u32, count: usize) -> Publisher {
        let mut process = Command::new(std::env::current_exe().expect("the test binary"))
            .args([child.test, "--exact", "--nocapture"])
            .env(URL_ENV, child.url)
            .env(
                CHILD_ENV,
                format!("{};{topic};{number};{count}", dir.display()),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("a publisher child");
        let stdout = process.stdout.take().expect("its stdout");
        Publisher {
            process,
            lines: BufReader::new(stdout).lines(),
            number,
        }
    }

    /// The next `OUTAGE` line within `until`, `None` at its end or then.
    async fn line(&mut self, until: tokio::time::Instant) -> Option<String> {
        loop {
            match tokio::time::timeout_at(until, self.lines.next_line()).await {
                Ok(Ok(Some(l))) => {
                    if let Some(rest) = l.strip_prefix("OUTAGE ") {
                        return Some(rest.to_string());
                    }
                }
                _ => return None,
            }
        }
    }

    /// Record its `ok` lines until `until`; the first other line.
    async fn read(&mut self, until: tokio::time::Instant, oks: &mut Vec<Ok1>) -> Option<String> {
        while let Some(line) = self.line(until).await {
            let mut p = line.split(' ');
            if p.next() != Some("ok") {
                return Some(line);
            }
            let (Some(i), Some(id)) = (p.next().and_then(|i| i.parse().ok()), p.next()) else {
                panic!("publisher {}: {line:?}", self.number);
            };
            oks.push(Ok1 {
                child: self.number,
                i,
                id: id.to_string(),
            });
        }
        None
    }
}

struct Ok1 {
    child: u32,
    i: usize,
    id: String,
}

fn after(d: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + d
}

/// The publisher children to start.
#[derive(Debug, Clone, Copy)]
pub struct Child<'a> {
    /// The name of the test function that calls [`publisher_child`].
    pub test: &'a str,
    /// The URL they publish to (through the outage).
    pub url: &'a str,
}

/// Run the check with publishers `child`; `reader` reads the broker
/// directly. Panics with what went wrong.
pub async fn publishers_lose_nothing(
    name: &str,
    child: Child<'_>,
    outage: &mut dyn Outage,
    reader: Arc<dyn Transport>,
) -> Report {
    let topic = Topic::new(format!(
        "telemetry.outage{}.t",
        crate::support::random_suffix()
    ))
    .expect("a topic");
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "oona-outage-spool-{name}-{}",
        crate::support::random_suffix()
    ));
    let mut oks = Vec::new();
    let mut first = Publisher::start(&child, &dir, &topic, 1, 0);
    first.read(after(Duration::from_secs(3)), &mut oks).await;
    let before = oks.len();
    assert!(
        before > 0,
        "[{name}] the publisher published before the outage"
    );
    outage.begin().await;
    let began = tokio::time::Instant::now();
    first.read(began + KILL_AT, &mut oks).await;
    let _ = first.process.kill().await; // SIGKILL, mid-outage
    first.read(after(Duration::from_secs(5)), &mut oks).await;
    let by_first = oks.len() - before;
    let mut second = Publisher::start(&child, &dir, &topic, 2, SECOND_COUNT);
    let summary = second.read(began + OUTAGE, &mut oks).await;
    outage.end().await;
    let back = tokio::time::Instant::now();
    let summary = match summary {
        Some(s) => s,
        None => second
            .read(after(Duration::from_secs(240)), &mut oks)
            .await
            .unwrap_or_else(|| panic!("[{name}] the second publisher never said it drained")),
    };
    let drain_time = back.elapsed();
    assert!(summary.starts_with("drained=true"), "[{name}] {summary}");
    let by_second = oks.len() - before - by_first;
    let (deliveries, duplicates) = read_back(name, &reader, &topic, &oks).await;
    reader.delete_topic(&topic).await.ok();
    let _ = std::fs::remove_dir_all(&dir);
    Report {
        published: oks.len(),
        before,
        by_first,
        by_second,
        deliveries,
        duplicates,
        second: summary,
        drain_time,
    }
}

/// Read the topic with a new group from the earliest until every Ok'd
/// publish was seen, checking order per key; deliveries and duplicates.
async fn read_back(
    name: &str,
    reader: &Arc<dyn Transport>,
    topic: &Topic,
    oks: &[Ok1],
) -> (usize, usize) {
    let sub = Subscription::new(topic.clone(), Name::unique("outage-reader"))
        .start(StartPosition::Earliest);
    // The reader's client saw the outage too: it may still be reconnecting.
    let until = after(Duration::from_secs(30));
    let mut s = loop {
        match reader.subscribe(sub.clone()).await {
            Ok(s) => break s,
            Err(e) if e.is_temporary() && tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("[{name}] the reader: {e}"),
        }
    };
    let mut missing: HashSet<&str> = oks.iter().map(|o| o.id.as_str()).collect();
    let order: HashMap<&str, (u32, usize)> = oks
        .iter()
        .map(|o| (o.id.as_str(), (o.child, o.i)))
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut last: HashMap<String, (u32, usize)> = HashMap::new();
    let mut deliveries = 0;
    while !missing.is_empty() {
        let item = tokio::time::timeout(Duration::from_secs(60), s.next())
            .await
            .unwrap_or_else(|_| panic!("[{name}] {} Ok'd publishes never arrived", missing.len()))
            .unwrap_or_else(|| panic!("[{name}] the reader's stream ended"));
        let Ok(d) = item else { continue };
        deliveries += 1;
        let env = d.envelope();
        let id = env.event_id.to_string();
        let n = seen.entry(id.clone()).or_default();
        *n += 1;
        // Order per key among first deliveries of Ok'd publishes (an
        // unreported publish of the killed child is delivered too).
        if *n == 1 {
            if let Some(at) = order.get(id.as_str()) {
                let key = env.key.clone().unwrap_or_default();
                if let Some(prev) = last.insert(key.clone(), *at) {
                    assert!(prev < *at, "[{name}] key {key}: {at:?} after {prev:?}");
                }
            }
        }
        missing.remove(id.as_str());
        d.ack().await.ok();
    }
    (deliveries, seen.values().filter(|n| **n > 1).count())
}
