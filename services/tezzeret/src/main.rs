//! `tezzeret`: the blueprint compiler service. Configured by environment
//! (see the README); logs to stderr (`RUST_LOG`, default `info`).

use std::process::ExitCode;

use esper_tezzeret::{run, Config};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "tezzeret: bad configuration");
            return ExitCode::from(2);
        }
    };
    match run(config).await {
        Ok(summary) => {
            let total: oona::RunSummary = summary.runners.iter().cloned().sum();
            tracing::info!(
                compiled = total.acked,
                retried = total.nacked,
                dead_lettered = total.dead_lettered,
                not_drained = summary.not_drained,
                "tezzeret stopped"
            );
            if summary.not_drained > 0 {
                return ExitCode::from(5);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "tezzeret failed");
            ExitCode::FAILURE
        }
    }
}
