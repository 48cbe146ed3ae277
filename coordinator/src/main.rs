//! `ty-coordinator`: parse flags, load config, start telemetry, run.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "Trainyard coordinator: job API and state")]
struct Args {
    /// TOML config file.
    #[arg(long, env = "TY_CONFIG")]
    config: Option<PathBuf>,
    /// Override one key: --set coordinator.grpc_addr=0.0.0.0:50051
    #[arg(long = "set")]
    overrides: Vec<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = trainyard_core::Config::load(args.config.as_deref(), &args.overrides)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    trainyard_core::telemetry::init("ty-coordinator", &config.telemetry);
    let shutdown = trainyard_core::shutdown::on_signals();
    trainyard_coordinator::run(config, shutdown, None).await
}
