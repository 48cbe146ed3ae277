//! `ty-worker`: the training stage service.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Trainyard worker: runs trainer backends")]
struct Args {
    #[command(flatten)]
    service: trainyard_core::service::ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some((config, telemetry)) = Args::parse().service.load("ty-worker")? else {
        return Ok(());
    };
    let shutdown = trainyard_core::shutdown::on_signals();
    let result = trainyard_worker::run(config, shutdown).await;
    telemetry.shutdown().await;
    result
}
