//! `yard dev` and `yard demo`: the local fleet, and the guided first run.

use crate::args::{DemoArgs, DevArgs, FleetArgs};
use crate::client::{self, load_config};
use crate::fleet::{Fleet, FleetOptions, NatsChoice};
use crate::jobs::exit_code_of;
use crate::view::{display_uri, record_text, secs};
use crate::watch::{WatchOptions, watch};
use anyhow::Context;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use trainyard_captioner::sample::{SAMPLE_TRIGGER_WORD, write_sample_dataset};
use trainyard_core::Config;
use trainyard_proto::v1::{
    CaptionSettings, Destination, JobRecord, JobSpec, JobState, TrainingSettings,
};

fn describe_fleet(fleet: &Fleet, token: &str) {
    let nats = match fleet.nats_server() {
        Some(server) => format!(
            "{} (nats-server pid {}, store {})",
            fleet.config.nats.url,
            server.pid(),
            server.store_dir().display()
        ),
        None => format!("{} (existing server)", fleet.config.nats.url),
    };
    println!("nats         {nats}");
    println!("store        {}", fleet.config.store.uri);
    println!("coordinator  {}  (token {token})", fleet.server_url());
}

pub async fn dev(args: DevArgs, token: &str) -> anyhow::Result<ExitCode> {
    let Some(config) = load_config(&args.fleet.service, "yard-dev", false)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let signal = trainyard_core::shutdown::on_signals();
    let url = args
        .fleet
        .nats_url
        .clone()
        .unwrap_or_else(|| config.nats.url.clone());
    let options = FleetOptions {
        data_dir: args.fleet.data_dir.clone(),
        nats: NatsChoice::UseOrStart(url),
        grpc_addr: None,
    };
    let mut fleet = Fleet::start(config, options).await?;
    describe_fleet(&fleet, token);
    println!("fleet running; Ctrl-C stops it");
    let failure = tokio::select! {
        _ = signal.cancelled() => None,
        error = fleet.failed() => Some(error),
    };
    eprintln!("stopping the fleet");
    let stopped = fleet.stop().await;
    match failure {
        Some(error) => Err(error),
        None => stopped.map(|()| ExitCode::SUCCESS),
    }
}

/// Sensible settings for the bundled sample: the loss visibly falls.
fn demo_spec(steps: u32, dataset_dir: &Path, outputs: &Path) -> JobSpec {
    JobSpec {
        name: "yard demo".into(),
        caption: Some(CaptionSettings {
            trigger_word: SAMPLE_TRIGGER_WORD.into(),
            ..Default::default()
        }),
        training: Some(TrainingSettings {
            backend: "reference".into(),
            steps,
            learning_rate: 0.002,
            rank: 4,
            resolution: 32,
            batch_size: 2,
            save_every: 50.min(steps),
            ..Default::default()
        }),
        destinations: vec![Destination {
            uri: outputs.to_string_lossy().into_owned(),
        }],
        labels: [(
            "source".to_string(),
            dataset_dir.to_string_lossy().into_owned(),
        )]
        .into(),
        ..Default::default()
    }
}

/// The demo's token: the one given, when the config knows it, else the first configured.
fn demo_token(config: &Config, given: &str) -> String {
    if config.coordinator.tokens.contains_key(given) {
        return given.to_string();
    }
    config
        .coordinator
        .tokens
        .keys()
        .next()
        .cloned()
        .unwrap_or_else(|| given.to_string())
}

struct DemoRun {
    record: JobRecord,
    submitted: Instant,
    done: Instant,
    first_step_after: Option<Duration>,
}

pub async fn demo(args: DemoArgs, token: &str) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let FleetArgs {
        data_dir,
        nats_url,
        service,
    } = args.fleet;
    let Some(config) = load_config(&service, "yard-demo", true)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let data_dir = std::path::absolute(&data_dir)?;
    let signal = trainyard_core::shutdown::on_signals();
    let token = demo_token(&config, token);
    let grpc_addr = (config.coordinator.grpc_addr == Config::default().coordinator.grpc_addr)
        .then(|| "127.0.0.1:0".to_string());
    let options = FleetOptions {
        data_dir: data_dir.clone(),
        nats: nats_url.map_or(NatsChoice::Private, NatsChoice::External),
        grpc_addr,
    };
    let mut fleet = Fleet::start(config, options).await?;
    let fleet_ready = started.elapsed();
    describe_fleet(&fleet, &token);
    println!("fleet up in {}", secs(fleet_ready));

    let run = run_demo_job(fleet.server_url(), &token, &data_dir, args.steps);
    let result = tokio::select! {
        result = run => result,
        error = fleet.failed() => Err(error),
        _ = signal.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    let stopped = fleet.stop().await;
    let run = result?;
    stopped?;

    print!("{}", record_text(&run.record));
    if run.record.state() == JobState::Succeeded {
        // The copy in the demo's outputs folder, else any delivered adapter.
        let outputs = data_dir.join("outputs");
        let adapters = || {
            run.record
                .delivered
                .iter()
                .filter(|d| d.uri.ends_with(".safetensors") && !d.uri.contains("/checkpoints/"))
        };
        let lora = adapters()
            .find(|d| Path::new(display_uri(&d.uri)).starts_with(&outputs))
            .or_else(|| adapters().next())
            .or_else(|| run.record.delivered.first());
        match lora {
            Some(file) => println!("\nLoRA delivered to {}", display_uri(&file.uri)),
            None => println!("\nthe job succeeded but reports no delivered file"),
        }
    }
    println!(
        "wall time {} (fleet start {}, submit to {} {})",
        secs(started.elapsed()),
        secs(fleet_ready),
        crate::view::state_name(run.record.state()),
        secs(run.done - run.submitted),
    );
    match run.first_step_after {
        Some(d) => println!("submit to first training step {}", secs(d)),
        None => println!("no training step was reported"),
    }
    Ok(exit_code_of(&run.record))
}

async fn run_demo_job(
    server_url: String,
    token: &str,
    data_dir: &Path,
    steps: u32,
) -> anyhow::Result<DemoRun> {
    let sample = data_dir.join("sample");
    let outputs = data_dir.join("outputs");
    let target = sample.clone();
    tokio::task::spawn_blocking(move || write_sample_dataset(&target))
        .await?
        .with_context(|| format!("cannot write the sample dataset to {}", sample.display()))?;
    let mut spec = demo_spec(steps, &sample, &outputs);
    let mut client = client::connect(&server_url, token).await?;
    let dataset = crate::submit::DatasetArg::LocalDir(sample.clone());
    spec.dataset = Some(crate::submit::dataset_source(dataset, &mut client).await?);
    let submitted = Instant::now();
    let record = crate::submit::submit(&mut client, spec).await?;
    println!("submitted {} (sample: {})", record.job_id, sample.display());
    let outcome = watch(&mut client, &record.job_id, WatchOptions::default()).await?;
    let first_step_after = outcome
        .first_step_at_ms
        .filter(|at| *at >= record.created_at_ms && record.created_at_ms > 0)
        .map(|at| Duration::from_millis((at - record.created_at_ms) as u64));
    Ok(DemoRun {
        record: outcome.record,
        submitted,
        done: Instant::now(),
        first_step_after,
    })
}
