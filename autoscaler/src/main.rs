//! `ty-autoscaler`: sizes each stage's and GPU pool's fleet from its backlog.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Trainyard autoscaler: starts and releases machines from the backlog"
)]
struct Args {
    #[command(flatten)]
    service: trainyard_core::service::ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some((config, telemetry)) = Args::parse().service.load("ty-autoscaler")? else {
        return Ok(());
    };
    let shutdown = trainyard_core::shutdown::on_signals();
    let result = trainyard_autoscaler::run(config, shutdown).await;
    telemetry.shutdown().await;
    result
}
