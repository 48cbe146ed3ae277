//! What every service binary does before its own work: the common flags,
//! loading the config, starting telemetry, connecting to NATS and making
//! sure the topology exists. Keeps each `main.rs` a few lines long.

use crate::config::Config;
use crate::topology::permissions::Role;
use crate::topology::{self, Topology};
use std::path::PathBuf;

/// Flags shared by every service binary.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServiceArgs {
    /// TOML config file (see deploy/trainyard.toml).
    #[arg(long, env = "TY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. --set nats.url=nats://10.0.0.5:4222 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl ServiceArgs {
    /// Loads the config and starts telemetry; `None` when `--print-config`
    /// printed it. Keep the [`Telemetry`](crate::telemetry::Telemetry) for
    /// the life of the service and `shutdown().await` it at the end, so the
    /// last spans and metrics are exported.
    pub fn load(
        &self,
        service: &str,
    ) -> anyhow::Result<Option<(Config, crate::telemetry::Telemetry)>> {
        let config = Config::load(self.config.as_deref(), &self.overrides)?;
        if self.print_config {
            print!("{}", config.to_toml());
            return Ok(None);
        }
        let telemetry = crate::telemetry::init(service, &config.telemetry)
            .map_err(|e| anyhow::anyhow!("cannot start telemetry: {e}"))?;
        Ok(Some((config, telemetry)))
    }
}

/// How long one start-up attempt waits for the first connection.
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Connects as `role` (see [`crate::nats::connect`]) and makes sure the
/// streams and buckets exist, retrying (with backoff, each failure logged)
/// until they do: the server may not be up yet, or a fresh cluster may not
/// yet place R3 streams. The coordinator creates them; on a bus with
/// identities the other roles only bind to them (waiting for the
/// coordinator), and on an open dev bus every service creates them, so
/// start order does not matter. `None` when `shutdown` came first.
pub async fn connect(
    config: &Config,
    role: &Role,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<(async_nats::Client, Topology)>> {
    let client = crate::nats::connect(&config.nats, role).await?;
    let js = async_nats::jetstream::new(client.clone());
    // Each attempt waits for the connection; an open bus ends the wait
    // with the refusal instead of another try.
    let ready = topology::until_ready("NATS streams and buckets", shutdown, || async {
        if client.try_server_info().is_none() {
            // Connecting in the background: give it a moment first.
            let _ = tokio::time::timeout(CONNECT_WAIT, client.flush()).await;
        }
        let Some(info) = client.try_server_info() else {
            return Err(async_nats::Error::from("not connected to nats yet"));
        };
        if let Err(refused) = crate::nats::require_auth(&info, &config.nats) {
            return Ok(Err(refused));
        }
        let topo = if role.creates_topology() || !info.auth_required {
            topology::ensure(&js, &config.nats).await?
        } else {
            topology::bind(&js).await?
        };
        Ok(Ok(topo))
    })
    .await;
    match ready {
        None => Ok(None),
        Some(Err(refused)) => Err(refused.into()),
        Some(Ok(topo)) => Ok(Some((client, topo))),
    }
}

/// Runs a stage with the shared runtime until `shutdown`.
pub async fn run_stage<H: crate::runtime::StageHandler>(
    client: async_nats::Client,
    topo: Topology,
    runner: crate::runtime::RunnerConfig,
    handler: H,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    crate::runtime::run_stage(client, topo, runner, std::sync::Arc::new(handler), shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("stage runtime failed: {e}"))
}
