//! `yard`: the Trainyard command line. Parse the flags, run one command,
//! print any error as `error: …` and exit non-zero; never a panic.

mod args;
mod client;
mod fleet;
mod jobs;
mod local;
mod submit;
mod transfer;
mod view;
mod watch;
mod webhooks;

use args::{Cli, Command};
use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = run(cli).await;
    client::shutdown_telemetry().await;
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", client::describe(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (server, token) = (cli.server, cli.token);
    match cli.command {
        Command::Dev(args) => local::dev(args, &token).await,
        Command::Demo(args) => local::demo(args, &token).await,
        Command::Submit(args) => jobs::submit(&server, &token, *args).await,
        Command::Validate(args) => jobs::validate(&server, &token, *args).await,
        Command::Watch(args) => {
            jobs::watch_cmd(&mut client::connect(&server, &token).await?, args).await
        }
        Command::List(args) => jobs::list(&mut client::connect(&server, &token).await?, args).await,
        Command::Get(args) => jobs::get(&mut client::connect(&server, &token).await?, args).await,
        Command::Cancel(args) => {
            jobs::cancel(&mut client::connect(&server, &token).await?, args).await
        }
        Command::Fetch(args) => {
            jobs::fetch(&mut client::connect(&server, &token).await?, args).await
        }
        Command::Metrics(args) => {
            jobs::metrics(&mut client::connect(&server, &token).await?, args).await
        }
        Command::Webhooks(command) => {
            webhooks::run(&mut client::connect(&server, &token).await?, command).await
        }
    }
}
