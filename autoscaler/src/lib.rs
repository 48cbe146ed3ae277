//! The autoscaler: sizes each stage's fleet (`prepare`, `deliver`, and
//! each training pool `train.<pool>`) from its backlog.
//!
//! - [`plan`]: the planner, pure — an observation of one pool (backlog in
//!   estimated seconds of work, its machines and what they do) and its
//!   policy in, a decision out (machines to start, idle ones to release,
//!   busy ones to drain, and why). `ty-sim` runs the same code.
//! - [`provider`]: where machines come from, behind one trait
//!   ([`provider::Provider`]): `local` child processes, `runpod` pods,
//!   `kubernetes` Deployment replicas.
//! - [`backlog`]: a pool's backlog read in band (consumer info, pending
//!   training tasks weighed in seconds of work); [`activity`]: what a
//!   machine does, from its provider and its registry entry; [`lease`]:
//!   the leader's lease and the pools' memory in `ty_autoscaler`;
//!   [`record`]: decisions as spans, metrics and `ty_fleet` entries;
//!   [`service`]: the passes.

pub mod activity;
pub mod backlog;
pub mod lease;
pub mod plan;
pub mod provider;
pub mod record;
pub mod service;
pub mod sim;

use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use trainyard_core::Config;
use trainyard_core::topology::permissions::Role;
use trainyard_core::topology::{AUTOSCALER_BUCKET, FLEET_BUCKET};

/// The provider `[autoscaler] provider` names.
pub async fn provider_of(config: &Config) -> anyhow::Result<Arc<dyn provider::Provider>> {
    let scaler = &config.autoscaler;
    match scaler.provider.as_str() {
        "local" => {
            let local = &scaler.local;
            let bin_dir = match &local.bin_dir {
                Some(dir) => dir.clone(),
                None => std::env::current_exe()?
                    .parent()
                    .map(|p| p.to_owned())
                    .unwrap_or_default(),
            };
            let state_dir = match &local.log_dir {
                Some(dir) => dir.join("machines"),
                None => std::env::temp_dir().join(format!("trainyard-{}", scaler.fleet_name)),
            };
            let config_file = local
                .config_file
                .clone()
                .or_else(|| std::env::var_os("TY_CONFIG").map(Into::into));
            Ok(Arc::new(provider::local::LocalProvider::new(
                bin_dir,
                config_file,
                state_dir,
                local.log_dir.clone(),
            )?))
        }
        "runpod" => Ok(Arc::new(provider::runpod::RunpodProvider::from_config(
            scaler,
        )?)),
        "kubernetes" => Ok(Arc::new(
            provider::kubernetes::KubernetesProvider::new(&scaler.kubernetes).await?,
        )),
        "" => anyhow::bail!("autoscaler.provider is empty (local, runpod or kubernetes)"),
        other => {
            anyhow::bail!("unknown autoscaler provider {other:?} (local, runpod or kubernetes)")
        }
    }
}

/// Runs the autoscaler until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let provider = provider_of(&config).await?;
    let Some((client, topo)) =
        trainyard_core::service::connect(&config, &Role::Autoscaler, &shutdown).await?
    else {
        return Ok(()); // stopped before NATS was ready
    };
    let js = topo.js.clone();
    let Some((state, fleet)) =
        trainyard_core::topology::until_ready("the autoscaler's buckets", &shutdown, || async {
            Ok::<_, async_nats::Error>((
                js.get_key_value(AUTOSCALER_BUCKET).await?,
                js.get_key_value(FLEET_BUCKET).await?,
            ))
        })
        .await
    else {
        return Ok(());
    };
    let holder = format!("autoscaler-{}", uuid::Uuid::now_v7().simple());
    tracing::info!(%holder, provider = provider.name(), pools = ?config.autoscaler.pools.keys().collect::<Vec<_>>(), "autoscaler started");
    let buckets = service::Buckets {
        nats: client,
        js,
        workers: topo.workers.clone(),
        state,
        fleet,
    };
    service::Autoscaler::new(config.autoscaler.clone(), provider, buckets, holder)
        .run(shutdown)
        .await;
    Ok(())
}

/// Polls `check` until it returns `Some` (tests; at most 10 s).
#[cfg(test)]
pub(crate) async fn test_wait<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
