//! `ty-uploader`: the deliver stage service.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Trainyard uploader: delivers outputs to their destinations"
)]
struct Args {
    #[command(flatten)]
    service: trainyard_core::service::ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some((config, telemetry)) = Args::parse().service.load("ty-uploader")? else {
        return Ok(());
    };
    let shutdown = trainyard_core::shutdown::on_signals();
    let result = trainyard_uploader::run(config, shutdown).await;
    telemetry.shutdown().await;
    result
}
