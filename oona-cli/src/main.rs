#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod bench;
mod dlq;
mod exit;
mod out;
mod publish;
mod read;
mod tail;
mod topics;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use oona::Bus;

use crate::exit::{Context as _, Failure};
use crate::out::{say, ColorChoice, Out};
use crate::read::Stop;

const EXIT_CODES: &str = "\
Exit codes:
  0    done
  1    the operation failed (a broker error)
  2    bad usage: arguments, topic name, JSON, URL or configuration
  3    the topic or group does not exist
  4    the broker is unreachable or timed out (a retry may succeed)
  5    done in part (some messages failed; health degraded)
  6    the broker refused the credentials
  130  SIGINT or SIGTERM stopped replay, dlq inspect, dlq requeue or bench before it finished";

/// The operator CLI of the Oona message bus: publish, tail, replay, dead
/// letters, topics, groups, health, bench and AsyncAPI, on every broker.
#[derive(Debug, Parser)]
#[command(name = "oona", version, after_help = EXIT_CODES)]
struct Cli {
    /// The broker: redis://, kafka://, pulsar:// (see the oona README for
    /// every parameter).
    #[arg(long, env = "OONA_URL", global = true)]
    url: Option<String>,

    /// Print JSON (one document per line) instead of tables.
    #[arg(long, global = true)]
    json: bool,

    /// When to colour the output.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, global = true)]
    color: ColorChoice,

    /// The sender id of what the CLI publishes.
    #[arg(long, default_value = "oona-cli", global = true)]
    sender: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Publish(publish::Args),
    Tail(tail::TailArgs),
    Replay(tail::ReplayArgs),
    #[command(subcommand)]
    Dlq(dlq::Dlq),
    #[command(subcommand)]
    Topics(topics::Topics),
    Groups(topics::GroupsArgs),
    Health(HealthArgs),
    Bench(bench::Args),
    Asyncapi(AsyncapiArgs),
}

/// Check the broker answers: status, round trip; exit 0 up, 5 degraded, 4
/// down.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  oona health --url redis://127.0.0.1:6379/0")]
struct HealthArgs {}

/// Print an AsyncAPI 3 document of the platform's topics and contracts
/// (oona-contracts).
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  oona asyncapi > esper.asyncapi.json")]
struct AsyncapiArgs {
    /// Write to this file instead of stdout.
    #[arg(long, short)]
    output: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("oona: cannot start the runtime: {e}");
            return ExitCode::from(exit::Code::Failed as u8);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("oona: {f}");
            f.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let out = Out::new(cli.json, cli.color);
    if let Command::Asyncapi(a) = &cli.command {
        return asyncapi(a, cli.json);
    }
    let url = cli.url.as_deref().ok_or_else(|| {
        Failure::usage("no broker: pass --url or set OONA_URL (redis://, kafka://, pulsar://)")
    })?;
    let transport = oona::connect(url).await.ctx("connecting")?;
    let bus = Bus::new(transport).with_sender_id(cli.sender.clone());
    // Commands that clean up after themselves watch for signals; the
    // others keep the default (the process ends).
    let stop = match &cli.command {
        Command::Tail(_) | Command::Replay(_) | Command::Dlq(_) | Command::Bench(_) => {
            Stop::on_signals()
        }
        _ => Stop::default(),
    };
    let result = match cli.command {
        Command::Publish(a) => publish::run(&bus, &out, a).await,
        Command::Tail(a) => tail::tail(&bus, &out, &stop, a).await,
        Command::Replay(a) => tail::replay(&bus, &out, &stop, a).await,
        Command::Dlq(d) => dlq::run(&bus, &out, &stop, d).await,
        Command::Topics(t) => topics::run(&bus, &out, t).await,
        Command::Groups(g) => topics::groups(&bus, &out, g).await,
        Command::Health(_) => health(&bus, &out).await,
        Command::Bench(a) => bench::run(&bus, &out, &stop, a).await,
        Command::Asyncapi(_) => Ok(()),
    };
    if let Err(e) = bus.close().await {
        eprintln!("oona: closing the connection: {e}");
    }
    result
}

async fn health(bus: &Bus, out: &Out) -> Result<(), Failure> {
    let snap = bus.health_snapshot().await;
    if out.json {
        let v = serde_json::to_value(&snap)
            .map_err(|e| Failure::new(exit::Code::Failed, format!("health as JSON: {e}")))?;
        out.json_line(&v);
    } else {
        let status = match snap.status.as_str() {
            "up" => out.good("up"),
            "degraded" => out.warn("degraded"),
            s => out.bad(s),
        };
        let rtt = snap
            .round_trip_ms
            .map(|ms| format!(" in {ms:.2} ms"))
            .unwrap_or_default();
        say!("{} {status}{rtt}: {}", snap.transport, snap.detail);
    }
    match snap.status.as_str() {
        "up" => Ok(()),
        "degraded" => Err(Failure::new(exit::Code::Partial, "the broker is degraded")),
        _ => Err(Failure::new(exit::Code::Unavailable, "the broker is down")),
    }
}

fn asyncapi(a: &AsyncapiArgs, json: bool) -> Result<(), Failure> {
    let doc = oona::oona_contracts::asyncapi::document();
    // Pretty for people; one line with --json.
    let text = if json {
        serde_json::to_string(&doc)
    } else {
        serde_json::to_string_pretty(&doc)
    }
    .map_err(|e| Failure::new(exit::Code::Failed, format!("AsyncAPI as JSON: {e}")))?;
    match &a.output {
        None => say!("{text}"),
        Some(path) => std::fs::write(path, text + "\n").map_err(|e| {
            Failure::new(
                exit::Code::Failed,
                format!("writing {}: {e}", path.display()),
            )
        })?,
    }
    Ok(())
}
