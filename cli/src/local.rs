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

fn describe_fleet(fleet: &Fleet, token_file: &Path) {
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
    println!(
        "coordinator  {}  (token in {})",
        fleet.server_url(),
        token_file.display()
    );
}

/// The local fleet's own token: kept in `<data_dir>/dev-token` (0600,
/// made on first use) and let in as tenant `dev`, beside any configured
/// tokens. There is no built-in token: this one is random per data dir.
/// Also the fleet's secrets key, `<data_dir>/secrets.key`, when none is set.
fn local_token(config: &mut Config, data_dir: &Path) -> anyhow::Result<String> {
    // The insecure development fallback for the secrets key: one made in
    // the data dir, unless the config names the fleet's.
    if config.secrets.key_file.is_none() {
        let path = data_dir.join("secrets.key");
        trainyard_core::secrets::dev_key_file(&path)
            .with_context(|| format!("cannot make the dev secrets key {}", path.display()))?;
        config.secrets.key_file = Some(path);
    }
    let path = data_dir.join(client::DEV_TOKEN_FILE);
    let token = trainyard_core::auth::token_file(&path)
        .with_context(|| format!("cannot read or write the dev token {}", path.display()))?;
    config
        .coordinator
        .tokens
        .insert(trainyard_core::auth::token_key(&token), "dev".into());
    Ok(token)
}

pub async fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    let Some(mut config) = load_config(&args.fleet.service, "yard-dev", false)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let data_dir = std::path::absolute(&args.fleet.data_dir)?;
    local_token(&mut config, &data_dir)?;
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
        autoscale: args.autoscale,
    };
    let mut fleet = Fleet::start(config, options).await?;
    describe_fleet(&fleet, &data_dir.join(client::DEV_TOKEN_FILE));
    if args.autoscale {
        println!(
            "autoscaler   local provider, services' logs in {}",
            data_dir.join("autoscale").display()
        );
    }
    if data_dir != std::path::absolute(".trainyard")? {
        println!(
            "clients: export TY_TOKEN=$(cat {})",
            data_dir.join(client::DEV_TOKEN_FILE).display()
        );
    }
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
            ..Default::default()
        }],
        labels: [(
            "source".to_string(),
            dataset_dir.to_string_lossy().into_owned(),
        )]
        .into(),
        ..Default::default()
    }
}

struct DemoRun {
    record: JobRecord,
    submitted: Instant,
    done: Instant,
    first_step_after: Option<Duration>,
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let FleetArgs {
        data_dir,
        nats_url,
        service,
    } = args.fleet;
    let Some(mut config) = load_config(&service, "yard-demo", true)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let data_dir = std::path::absolute(&data_dir)?;
    let signal = trainyard_core::shutdown::on_signals();
    let token = local_token(&mut config, &data_dir)?;
    let grpc_addr = (config.coordinator.grpc_addr == Config::default().coordinator.grpc_addr)
        .then(|| "127.0.0.1:0".to_string());
    let options = FleetOptions {
        data_dir: data_dir.clone(),
        nats: nats_url.map_or(NatsChoice::Private, NatsChoice::External),
        grpc_addr,
        autoscale: false,
    };
    let mut fleet = Fleet::start(config, options).await?;
    let fleet_ready = started.elapsed();
    describe_fleet(&fleet, &data_dir.join(client::DEV_TOKEN_FILE));
    println!("fleet up in {}", secs(fleet_ready));

    let run = run_demo_job(fleet.server_url(), &token, &data_dir, args.steps);
    let result = tokio::select! {
        result = run => result,
        error = fleet.failed() => Err(error),
        _ = signal.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    let stopped = fleet.stop().await;
    let mut run = result?;
    stopped?;

    // The demo's fleet has stopped: its download URLs (served by its
    // coordinator) would answer nothing, so the files' paths stand alone.
    for a in &mut run.record.artifacts {
        a.download_url.clear();
    }
    for d in &mut run.record.delivered {
        d.download_url.clear();
    }
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
    let target = client::Target {
        server: server_url,
        token: Some(token.to_string()),
        ca: None,
    };
    let mut client = client::connect(&target).await?;
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

/// `yard fleet init`: writes the fleet's keys, certificates and configs and
/// says what goes where.
pub fn fleet_init(args: crate::args::FleetInitArgs) -> anyhow::Result<std::process::ExitCode> {
    use trainyard_core::fleet;
    let spec = fleet::FleetSpec {
        pools: args.pools,
        hosts: args.hosts,
        url: args.url,
        store_dir: args.store_dir,
        mounted_at: args.mounted_at,
        ..Default::default()
    };
    let files = fleet::init(&args.dir, &spec)?;
    println!("wrote {}:", files.dir.display());
    println!("  nats.conf, auth.conf, server.pem, server-key.pem   for the NATS server");
    println!("  ca.pem                                             for every service");
    println!("  ca-key.pem                                         keep offline");
    for role in &files.roles {
        println!(
            "  {name}.nk, {name}.toml{pad}for the {name} role only",
            name = role.name(),
            pad = " ".repeat(40usize.saturating_sub(2 * role.name().len() + 9)),
        );
    }
    println!(
        "start NATS with `nats-server -c {}`, then add each role's <role>.toml [nats] keys to its config",
        files.nats_conf().display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
