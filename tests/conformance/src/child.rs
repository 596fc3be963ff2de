//! Consumer child processes, for the cases that kill a consumer or let it
//! exit: the test binary runs itself with [`ENV`] set, and instead of the
//! suite it consumes one subscription through the fixture, printing one
//! line per event on stdout (`acked <event id> <attempt>`, `crash`,
//! `hung`, `flushed`).

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use oona_core::{Name, Subscription, Topic};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::Fixture;

/// Set in a child's environment to what it should do ([`Spec`]).
pub const ENV: &str = "OONA_CONFORMANCE_CHILD";

/// The payload that makes a consuming child abort (a message that kills
/// its consumer).
pub(crate) const CRASH: &[u8] = b"crash";

/// What a child does.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub topic: Topic,
    pub group: Name,
    /// The consumer name; `None`: a unique one. Children with one name
    /// are one consumer restarted (as a pod of a stateful set is).
    pub consumer: Option<Name>,
    pub prefetch: usize,
    pub ack_deadline: Duration,
    pub max_attempts: u32,
    /// `None`: consume until killed (aborting on [`CRASH`]); `Some(n)`:
    /// ack `n`, close the stream, flush, exit 0 without closing.
    pub exit_after: Option<usize>,
    /// `Some(n)`: after `n` acks, hang with the next first delivery
    /// (attempt 1; saying `hung`) until killed. A kill then lands mid-batch at a known
    /// point: every ack the child made has been reported, none is in
    /// flight (a kill racing an ack would leave an ack at the broker that
    /// the parent never heard of).
    pub hang_after: Option<usize>,
}

fn opt(n: Option<usize>) -> String {
    n.map_or(String::new(), |n| n.to_string())
}

fn parse_opt(s: &str) -> Option<Option<usize>> {
    if s.is_empty() {
        Some(None)
    } else {
        s.parse().ok().map(Some)
    }
}

impl Spec {
    fn encode(&self) -> String {
        format!(
            "{};{};{};{};{};{};{};{}",
            self.topic,
            self.group,
            self.consumer.as_ref().map_or("", |c| c.as_str()),
            self.prefetch,
            self.ack_deadline.as_millis(),
            self.max_attempts,
            opt(self.exit_after),
            opt(self.hang_after)
        )
    }

    fn parse(s: &str) -> Option<Spec> {
        let p: Vec<&str> = s.split(';').collect();
        let [topic, group, consumer, prefetch, deadline, max, exit, hang] = p.as_slice() else {
            return None;
        };
        Some(Spec {
            topic: Topic::new(*topic).ok()?,
            group: Name::new(*group).ok()?,
            consumer: if consumer.is_empty() {
                None
            } else {
                Some(Name::new(*consumer).ok()?)
            },
            prefetch: prefetch.parse().ok()?,
            ack_deadline: Duration::from_millis(deadline.parse().ok()?),
            max_attempts: max.parse().ok()?,
            exit_after: parse_opt(exit)?,
            hang_after: parse_opt(hang)?,
        })
    }
}

/// The child's main, when [`ENV`] is set.
pub(crate) fn main(
    fixture: Arc<dyn Fixture>,
    rt: &tokio::runtime::Runtime,
    spec: &str,
) -> ExitCode {
    let Some(spec) = Spec::parse(spec) else {
        eprintln!("child: cannot read {ENV}={spec:?}");
        return ExitCode::from(2);
    };
    rt.block_on(async move {
        match consume(fixture, spec).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("child: {e}");
                ExitCode::from(3)
            }
        }
    })
}

fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn consume(fixture: Arc<dyn Fixture>, spec: Spec) -> oona_core::Result<()> {
    let t = fixture.connect().await?;
    let mut sub = Subscription::new(spec.topic.clone(), spec.group.clone());
    if let Some(c) = spec.consumer.clone() {
        sub = sub.consumer(c);
    }
    let sub = sub
        .prefetch(spec.prefetch)
        .ack_deadline(spec.ack_deadline)
        .max_attempts(spec.max_attempts);
    let mut stream = t.subscribe(sub).await?;
    say("ready");
    let mut acked = 0;
    while let Some(d) = stream.next().await {
        let Ok(d) = d else { continue };
        if d.envelope().payload.as_ref() == CRASH {
            say("crash");
            std::process::abort();
        }
        // A first delivery: the kill is charged to a message no earlier
        // kill was (so only the crashing message counts many).
        if spec.hang_after.is_some_and(|n| acked >= n) && d.attempt() == 1 {
            // Its acks are on the broker: the kill takes only what it
            // holds (else batched acks lost with it would put the same
            // record under the next kill again and again).
            t.flush().await?;
            say("hung");
            std::future::pending::<()>().await;
        }
        // Handling takes a moment, so a kill lands mid-batch.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (id, attempt) = (d.envelope().event_id.to_string(), d.attempt());
        d.ack().await?;
        say(&format!("acked {id} {attempt}"));
        acked += 1;
        if spec.exit_after.is_some_and(|n| acked >= n) {
            // What a service does after its runner's shutdown: the
            // stream gives back what it read ahead, settlements are
            // flushed, and the process exits without closing anything.
            stream.close().await;
            t.flush().await?;
            say("flushed");
            std::process::exit(0);
        }
    }
    Ok(())
}

/// A running child, as the parent sees it.
pub(crate) struct Child {
    process: tokio::process::Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Child {
    /// Start this test binary as a child doing `spec`.
    pub(crate) fn spawn(spec: &Spec) -> std::io::Result<Child> {
        let exe = std::env::current_exe()?;
        let mut process = Command::new(exe)
            .env(ENV, spec.encode())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = process
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("child without stdout"))?;
        Ok(Child {
            process,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next line, `None` at the end of its output (it exited) or
    /// after `within`.
    pub(crate) async fn line(&mut self, within: Duration) -> Option<String> {
        match tokio::time::timeout(within, self.lines.next_line()).await {
            Ok(Ok(l)) => l,
            _ => None,
        }
    }

    /// SIGKILL it and reap it.
    pub(crate) async fn kill(mut self) {
        let _ = self.process.kill().await;
    }

    /// Wait for it to exit; its exit code.
    pub(crate) async fn wait(mut self, within: Duration) -> Option<i32> {
        match tokio::time::timeout(within, self.process.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                let _ = self.process.kill().await;
                None
            }
        }
    }
}
