//! `yard`: the Trainyard command line. Parse the flags, run one command,
//! print any error as `error: …` and exit non-zero; never a panic.

mod args;
mod captions;
mod client;
mod fleet;
mod fleet_status;
mod jobs;
mod local;
mod submit;
mod token;
mod transfer;
mod view;
mod watch;
mod webhooks;

use args::{Cli, Command, SecretsCommand, TokenCommand};
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
    let (server, token, ca) = (cli.server, cli.token, cli.ca);
    match cli.command {
        Command::Dev(args) => return local::dev(args).await,
        Command::Demo(args) => return local::demo(args).await,
        Command::Token(TokenCommand::New(args)) => return token::new(&args),
        Command::Secrets(SecretsCommand::Keygen(args)) => return token::keygen(&args),
        Command::Fleet(args::FleetCommand::Init(args)) => return local::fleet_init(args),
        Command::Fleet(args::FleetCommand::Status(args)) => return fleet_status::run(args).await,
        Command::Fleet(args::FleetCommand::Resume(args)) => {
            return fleet_status::resume(args).await;
        }
        _ => {}
    }
    let target = client::Target { server, token, ca };
    let connect = || client::connect(&target);
    match cli.command {
        Command::Dev(_)
        | Command::Demo(_)
        | Command::Token(_)
        | Command::Secrets(_)
        | Command::Fleet(_) => {
            unreachable!("handled above")
        }
        Command::Submit(args) => jobs::submit(&target, *args).await,
        Command::Validate(args) => jobs::validate(&target, *args).await,
        Command::Watch(args) => jobs::watch_cmd(&mut connect().await?, args).await,
        Command::List(args) => jobs::list(&mut connect().await?, args).await,
        Command::Get(args) => jobs::get(&mut connect().await?, args).await,
        Command::Cancel(args) => jobs::cancel(&mut connect().await?, args).await,
        Command::Captions(args) => captions::run(&mut connect().await?, args).await,
        Command::Approve(args) => captions::approve(&mut connect().await?, args).await,
        Command::Fetch(args) => jobs::fetch(&mut connect().await?, args).await,
        Command::Metrics(args) => jobs::metrics(&mut connect().await?, args).await,
        Command::Webhooks(command) => webhooks::run(&mut connect().await?, command).await,
    }
}
