//! The worker: the training stage, on a GPU machine (or a CPU for the
//! reference trainer). [`train`] is the stage, [`models`] the base-model
//! cache, [`registry`] this worker's entry in the worker registry,
//! [`progress_receiver`] the loopback receiver for trainers that report
//! their progress over HTTP. The trainers it drives are `trainyard-backends`.

pub mod gpu;
pub mod log_budget;
pub mod logs;
pub mod models;
pub mod progress_receiver;
pub mod registry;
pub mod throttle;
pub mod train;
pub mod trainer_log;

use std::time::Duration;
use trainyard_core::Config;
use trainyard_core::runtime::RunnerConfig;
use trainyard_core::store::ArtifactStore;
use trainyard_proto::v1::Stage;

/// Runs the training stage for `worker.pool` until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let trainer_bin = models::find_trainer(config.worker.reference_trainer.as_deref()).ok_or_else(|| {
        anyhow::anyhow!("ty-reference-trainer not found beside this program or on PATH; set worker.reference_trainer")
    })?;
    let guard = models::find_program(trainyard_core::guard::BINARY).ok_or_else(|| {
        anyhow::anyhow!(
            "{} not found beside this program or on PATH; it is built and shipped with ty-worker",
            trainyard_core::guard::BINARY
        )
    })?;
    let store = ArtifactStore::open_config(&config.store)?.for_stage("train");
    std::fs::create_dir_all(&config.worker.work_dir)?;
    // Held for the process's life: no other worker writes this folder.
    let cache_folder = models::claim::claim(&config.worker.model_cache_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot claim the model cache folder {}: {e}",
            config.worker.model_cache_dir.display()
        )
    })?;
    if cache_folder.dir != config.worker.model_cache_dir {
        tracing::info!(
            folder = %cache_folder.dir.display(),
            "the configured model cache folder is another worker's; using a sibling"
        );
    }
    // Loading NVML may take a while where a driver is present.
    let gpus = tokio::task::spawn_blocking(gpu::Gpus::probe)
        .await
        .unwrap_or_default();
    let slots = gpu::Slots::new(gpu::Slots::devices(
        config
            .worker
            .trainers
            .env
            .get("CUDA_VISIBLE_DEVICES")
            .map(String::as_str),
        &gpus,
    ));
    let stage = train::TrainStage {
        models: models::Models::new(
            store.clone(),
            std::fs::canonicalize(&cache_folder.dir)?,
            trainer_bin.clone(),
            &config.worker.hf_endpoint,
            config.worker.model_cache_max_bytes,
        )?,
        store,
        work_root: std::fs::canonicalize(&config.worker.work_dir)?,
        tools: tools(&config.worker.trainers, trainer_bin),
        stop_grace: Duration::from_secs(config.worker.stop_grace_secs),
        guard: Some(trainyard_core::process::Guard {
            program: guard,
            grace: train::ORPHAN_GRACE,
        }),
        progress_interval: Duration::from_millis(config.worker.progress_interval_ms),
        checkpoint_scan: Duration::from_millis(config.worker.checkpoint_scan_ms.max(50)),
        nan_loss_steps: config.worker.nan_loss_steps,
        stuck: config.worker.stuck.clone(),
        trainer_log_max_bytes: config.worker.trainer_log_max_bytes,
        metric_events_per_second: config.worker.metric_events_per_second,
        secrets: trainyard_core::secrets::Keyring::from_config(&config.secrets)?,
        log_limits: log_budget::LogLimits {
            budget_bytes: config.worker.log_event_budget_bytes,
            bytes_per_sec: config.worker.log_event_bytes_per_sec,
        },
        max_model_bytes: config.store.max_model_bytes,
        gpus: gpus.clone(),
        slots,
        trainer_env: config
            .worker
            .trainers
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let Some((client, topo)) = trainyard_core::service::connect(
        &config,
        &trainyard_core::topology::permissions::Role::Worker {
            pool: config.worker.pool.clone(),
        },
        &shutdown,
    )
    .await?
    else {
        return Ok(()); // stopped before NATS was ready
    };
    let mut runner = RunnerConfig::for_service(Stage::Train, &config);
    runner.pool = config.worker.pool.clone();
    runner.concurrency = config.worker.concurrency;
    // The trainer gets its own grace after SIGTERM; the runtime waits a bit longer.
    runner.drain_grace = Duration::from_secs(1);
    let heartbeat = registry::Heartbeat::for_stage(topo.workers.clone(), &runner, &stage);
    let sampling = shutdown.child_token();
    let sampler = gpu::sampler(
        &gpus,
        Duration::from_millis(config.worker.gpu_sample_ms),
        |reading| trainyard_core::telemetry::metrics().set_gpus(reading),
        sampling.clone(),
    );
    let result = trainyard_core::service::run_stage(client, topo, runner, stage, shutdown).await;
    sampling.cancel();
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    heartbeat.stop().await;
    drop(cache_folder);
    result
}

/// The backends' view of `[worker.trainers]`.
pub fn tools(
    paths: &trainyard_core::config::TrainerPaths,
    reference: std::path::PathBuf,
) -> trainyard_backends::Tools {
    trainyard_backends::Tools {
        reference,
        trainers: paths.clone(),
    }
}
