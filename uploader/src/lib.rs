//! The uploader: the deliver stage. Copies a job's outputs to every
//! destination in its spec and to the artifact store's `jobs/<job>/output/`,
//! verifies each copy's sha256 by reading it back, and writes a
//! `manifest.json` (files, sizes, sha256, a summary of the spec, final
//! metrics) beside them. An `hf://` destination gets all of it in one
//! commit, with a model card ([`hub`]).

pub mod attributes;
pub mod deliver;
pub mod fault;
pub mod hub;

use trainyard_core::Config;
use trainyard_core::runtime::RunnerConfig;
use trainyard_proto::v1::Stage;

/// Runs the deliver stage until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let stage = deliver::DeliverStage::new(&config)?;
    let Some((client, topo)) = trainyard_core::service::connect(
        &config,
        &trainyard_core::topology::permissions::Role::Uploader,
        &shutdown,
    )
    .await?
    else {
        return Ok(()); // stopped before NATS was ready
    };
    let mut runner = RunnerConfig::for_service(Stage::Deliver, &config);
    runner.concurrency = config.uploader.concurrency;
    let heartbeat = trainyard_core::registry::Heartbeat::for_runner(topo.workers.clone(), &runner);
    let result = trainyard_core::service::run_stage(client, topo, runner, stage, shutdown).await;
    heartbeat.stop().await;
    result
}
