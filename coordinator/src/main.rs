//! `ty-coordinator`: parse flags, load config, start telemetry, run.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Trainyard coordinator: job API and state")]
struct Args {
    #[command(flatten)]
    service: trainyard_core::service::ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some((config, telemetry)) = Args::parse().service.load("ty-coordinator")? else {
        return Ok(());
    };
    let shutdown = trainyard_core::shutdown::on_signals();
    let result = trainyard_coordinator::run(config, shutdown, None).await;
    telemetry.shutdown().await;
    result
}
