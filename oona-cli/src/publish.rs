//! `oona publish`: JSON from an argument or stdin.

use std::io::Read as _;

use indicatif::ProgressBar;
use oona::{Bus, Envelope, Priority, Topic};
use serde_json::json;

use crate::exit::{Code, Context as _, Failure};
use crate::out::{say, Out};

/// Publish JSON messages to a topic.
///
/// The message is the JSON argument, or stdin when it is left out; with
/// --lines each non-empty line of stdin is one message (NDJSON). With
/// --envelope each document is an envelope in Oona's JSON wire form (as
/// `oona tail --json` prints them), published as it is to TOPIC.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  oona publish telemetry.seed.health '{\"layer\": 3, \"loss\": 0.12}' --key layer-3
  echo '{\"blueprint_id\": \"b1\"}' | oona publish compilation.blueprint.submitted
  oona publish control.kasmina.commands --lines < commands.ndjson
  oona tail a.b.c --from earliest --json --idle 2s | oona publish a.b.copy --lines --envelope")]
pub struct Args {
    /// The topic (`<plane>.<subsystem>.<event>`).
    topic: String,
    /// The JSON message; read from stdin when left out.
    message: Option<String>,
    /// The message key (messages of one key keep their order).
    #[arg(long)]
    key: Option<String>,
    /// A header, NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// low, normal, high or emergency.
    #[arg(long, default_value = "normal", value_parser = parse_priority)]
    priority: Priority,
    /// The schema id (`<schema>/<version>`).
    #[arg(long)]
    schema_id: Option<String>,
    /// The correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Each non-empty line of stdin is one message.
    #[arg(long)]
    lines: bool,
    /// The documents are envelopes in Oona's JSON wire form (published as
    /// they are: the envelope options do not apply).
    #[arg(long, conflicts_with_all = ["key", "headers", "priority", "schema_id", "correlation_id"])]
    envelope: bool,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?}: expected NAME=VALUE"))
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    Priority::parse(s).map_err(|e| e.message().to_string())
}

pub async fn run(bus: &Bus, out: &Out, a: Args) -> Result<(), Failure> {
    let topic = Topic::new(&a.topic).ctx("topic")?;
    let docs = documents(&a)?;
    // Every line is checked before the first is published: a bad line 500
    // must not leave 499 published.
    let envelopes: Vec<Envelope> = docs
        .iter()
        .enumerate()
        .map(|(line, doc)| envelope(bus, &a, &topic, doc).map_err(|e| at_line(&docs, line, e)))
        .collect::<Result<_, _>>()?;
    let bar = if envelopes.len() > 1 {
        ProgressBar::new(envelopes.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    let total = envelopes.len();
    let (mut sent, mut failed, mut last_error) = (0u64, 0u64, None);
    for (line, env) in envelopes.into_iter().enumerate() {
        match bus.publish_envelope(env).await {
            Ok(r) => {
                sent += 1;
                let pos = r.position.clone().unwrap_or_default();
                if out.json {
                    let v = json!({"event_id": r.event_id.to_string(), "topic": r.topic.as_str(), "position": r.position});
                    bar.suspend(|| out.json_line(&v));
                } else {
                    bar.suspend(|| {
                        say!("published {} to {} {}", r.event_id, r.topic, out.dim(&pos))
                    });
                }
            }
            // A broker failure skips the message and goes on, counted.
            Err(e) => {
                failed += 1;
                bar.suspend(|| eprintln!("oona: message {}: {e}", line + 1));
                last_error = Some(e);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    match last_error {
        Some(e) if sent == 0 => Err(Failure::new(crate::exit::code_of(&e), e.to_string())),
        Some(_) => Err(Failure::new(
            Code::Partial,
            format!("{failed} of {total} messages not published ({sent} were)"),
        )),
        None => Ok(()),
    }
}

fn at_line(docs: &[String], line: usize, f: Failure) -> Failure {
    if docs.len() == 1 {
        return f;
    }
    Failure::new(f.code, format!("line {}: {}", line + 1, f.message))
}

/// The documents to publish, as given.
fn documents(a: &Args) -> Result<Vec<String>, Failure> {
    if let Some(m) = &a.message {
        if a.lines {
            return Err(Failure::usage(
                "--lines reads stdin: leave out the message argument",
            ));
        }
        return Ok(vec![m.clone()]);
    }
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| Failure::usage(format!("reading stdin: {e}")))?;
    if a.lines {
        return Ok(input
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect());
    }
    if input.trim().is_empty() {
        return Err(Failure::usage(
            "no message: give one as an argument or on stdin",
        ));
    }
    Ok(vec![input])
}

fn envelope(bus: &Bus, a: &Args, topic: &Topic, doc: &str) -> Result<Envelope, Failure> {
    if a.envelope {
        let mut env = oona::wire::json::decode_on(topic, doc.as_bytes()).ctx("envelope")?;
        env.topic = topic.clone();
        return Ok(env);
    }
    let value: serde_json::Value = serde_json::from_str(doc)
        .map_err(|e| Failure::usage(format!("the message is not JSON: {e}")))?;
    let mut b = bus.message(topic.clone(), &value).priority(a.priority);
    if let Some(k) = &a.key {
        b = b.key(k.clone());
    }
    if let Some(s) = &a.schema_id {
        b = b.schema_id(s.clone());
    }
    if let Some(c) = &a.correlation_id {
        b = b.correlation_id(c.clone());
    }
    for (k, v) in &a.headers {
        b = b.header(k.clone(), v.clone());
    }
    b.build().ctx("message")
}
