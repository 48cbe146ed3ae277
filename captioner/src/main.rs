//! `ty-captioner`: the prepare stage service.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Trainyard captioner: fetch, unpack, validate and caption datasets"
)]
struct Args {
    #[command(flatten)]
    service: trainyard_core::service::ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some((config, telemetry)) = Args::parse().service.load("ty-captioner")? else {
        return Ok(());
    };
    let shutdown = trainyard_core::shutdown::on_signals();
    let result = trainyard_captioner::run(config, shutdown).await;
    telemetry.shutdown().await;
    result
}
