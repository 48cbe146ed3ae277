//! The whole fleet in one process, for `yard dev` and `yard demo`: a NATS
//! server (an existing one, or a nats-server we start and own), then the
//! coordinator, captioner, worker and uploader as tasks on this runtime
//! with one shared cancellation token.
//!
//! Each service runs until the token is cancelled. A service that returns
//! before that — with an error or without — has failed, and the caller
//! stops the rest ([`Fleet::failed`]); [`Fleet::stop`] drains every service
//! within a grace period, then stops the NATS server last, so no service
//! loses its connection while it drains.

use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use trainyard_core::Config;
use trainyard_natsd::{self as natsd, NatsServer};

/// How long services get to drain after the fleet is told to stop.
const DRAIN_GRACE: Duration = Duration::from_secs(20);
/// How long the coordinator may take to bind its port.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Which NATS server the fleet uses.
#[derive(Clone, Debug)]
pub enum NatsChoice {
    /// This URL if a server answers there; otherwise start one on its port
    /// (only for a loopback URL).
    UseOrStart(String),
    /// This URL, which must answer.
    External(String),
    /// A server of our own on a port it picks.
    Private,
}

pub struct FleetOptions {
    /// Holds `nats/`, `store/`, `work/` and `cache/` unless the config says otherwise.
    pub data_dir: PathBuf,
    pub nats: NatsChoice,
    /// Replaces `coordinator.grpc_addr` (e.g. `127.0.0.1:0`).
    pub grpc_addr: Option<String>,
    /// The autoscaler (local provider) starts the stage services as
    /// processes instead of one of each running in-process.
    pub autoscale: bool,
}

/// The autoscaler's settings for `yard dev --autoscale`: the local
/// provider, the services' config (this fleet's, written under
/// `<data_dir>/autoscale/`) and, unless configured, one captioner and one
/// uploader kept, and up to one worker of the configured pool.
fn autoscaled(config: &mut Config, data_dir: &Path) -> anyhow::Result<()> {
    let dir = data_dir.join("autoscale");
    std::fs::create_dir_all(&dir)?;
    let scaler = &mut config.autoscaler;
    if scaler.provider.is_empty() {
        scaler.provider = "local".into();
    }
    if scaler.pools.is_empty() {
        let kept = trainyard_core::config::PoolPolicy {
            min_workers: 1,
            max_workers: 1,
            ..Default::default()
        };
        let gpu = trainyard_core::config::PoolPolicy {
            max_workers: 1,
            idle_secs: 120,
            ..Default::default()
        };
        scaler.pools = [
            ("prepare".to_string(), kept.clone()),
            ("deliver".to_string(), kept),
            (format!("train.{}", config.worker.pool), gpu),
        ]
        .into();
    }
    if config.autoscaler.local.log_dir.is_none() {
        config.autoscaler.local.log_dir = Some(dir.join("logs"));
    }
    if config.autoscaler.local.config_file.is_none() {
        let file = dir.join("services.toml");
        std::fs::write(&file, config.to_toml())?;
        config.autoscaler.local.config_file = Some(file);
    }
    Ok(())
}

type ServiceResult = (&'static str, anyhow::Result<()>);

pub struct Fleet {
    pub config: Config,
    /// Where the coordinator's gRPC server listens.
    pub grpc_addr: SocketAddr,
    /// The NATS server we started, if we did.
    nats: Option<NatsServer>,
    stop: CancellationToken,
    services: JoinSet<ServiceResult>,
}

/// Puts every default local path under `data_dir`; paths the config file,
/// environment or `--set` changed are kept.
pub fn rebase_on_data_dir(config: &mut Config, data_dir: &Path) {
    let defaults = Config::default();
    let under = |rel: &str| data_dir.join(rel);
    if config.store.uri == defaults.store.uri {
        config.store.uri = under("store").to_string_lossy().into_owned();
    }
    if config.captioner.work_dir == defaults.captioner.work_dir {
        config.captioner.work_dir = under("work/captioner");
    }
    if config.worker.work_dir == defaults.worker.work_dir {
        config.worker.work_dir = under("work/worker");
    }
    if config.worker.model_cache_dir == defaults.worker.model_cache_dir {
        config.worker.model_cache_dir = under("cache/models");
    }
    if config.uploader.work_dir == defaults.uploader.work_dir {
        config.uploader.work_dir = under("work/uploader");
    }
    // A local fleet may deliver to its own outputs folder (where `yard
    // demo` sends its adapter), unless the config lists roots of its own.
    if config.uploader.allowed_local_roots.is_empty() {
        config.uploader.allowed_local_roots = vec![under("outputs")];
    }
}

fn is_loopback_url(url: &str) -> bool {
    let host = url.split("://").nth(1).unwrap_or(url);
    ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|h| host.starts_with(&format!("{h}:")) || host == *h)
}

fn port_of(url: &str) -> u16 {
    url.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or(4222)
}

/// Whether a NATS server answers at `url` within a second.
async fn answers(url: &str) -> bool {
    let connect = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(url);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), connect).await,
        Ok(Ok(_))
    )
}

async fn start_nats(store_dir: PathBuf, port: Option<u16>) -> anyhow::Result<NatsServer> {
    let server = tokio::task::spawn_blocking(move || -> Result<NatsServer, natsd::NatsdError> {
        let binary = natsd::find_or_install(Path::new("."))?;
        match port {
            Some(port) => NatsServer::start_on_port(&binary, &store_dir, port),
            None => NatsServer::start(&binary, &store_dir),
        }
    })
    .await??;
    Ok(server)
}

impl Fleet {
    /// Connects to or starts NATS, then starts the four services and waits
    /// until the coordinator listens.
    pub async fn start(mut config: Config, options: FleetOptions) -> anyhow::Result<Fleet> {
        let data_dir = std::path::absolute(&options.data_dir)?;
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
        rebase_on_data_dir(&mut config, &data_dir);
        if let Some(addr) = options.grpc_addr {
            config.coordinator.grpc_addr = addr;
        }
        if trainyard_worker::models::find_trainer(config.worker.reference_trainer.as_deref())
            .is_none()
        {
            bail!(
                "ty-reference-trainer not found beside yard or on PATH; build it with \
                 `cargo build -p trainyard-reference-trainer` (same target dir) or set worker.reference_trainer"
            );
        }
        if trainyard_worker::models::find_program(trainyard_core::guard::BINARY).is_none() {
            bail!(
                "{} not found beside yard or on PATH; build it with `cargo build -p trainyard-worker` (same target dir)",
                trainyard_core::guard::BINARY
            );
        }

        let nats_store = data_dir.join("nats");
        let nats = match options.nats {
            NatsChoice::External(url) => {
                if !answers(&url).await {
                    bail!("no NATS server answers at {url}");
                }
                config.nats.url = url;
                None
            }
            NatsChoice::UseOrStart(url) if answers(&url).await => {
                config.nats.url = url;
                None
            }
            NatsChoice::UseOrStart(url) => {
                if !is_loopback_url(&url) {
                    bail!(
                        "no NATS server answers at {url}, and yard starts one only on this machine"
                    );
                }
                Some(start_nats(nats_store, Some(port_of(&url))).await?)
            }
            NatsChoice::Private => Some(start_nats(nats_store, None).await?),
        };
        if let Some(server) = &nats {
            config.nats.url = server.url();
        }
        // A dev fleet on this machine may use an open bus; one elsewhere
        // must present the identities its config names.
        if is_loopback_url(&config.nats.url) {
            config.nats.insecure_dev = true;
        }

        let stop = CancellationToken::new();
        let mut services = JoinSet::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        // Every service runs until `stop`; returning earlier is a failure the
        // caller sees through `failed()`.
        {
            let (c, s) = (config.clone(), stop.child_token());
            services.spawn(async move {
                (
                    "coordinator",
                    trainyard_coordinator::run(c, s, Some(ready_tx)).await,
                )
            });
        }
        if options.autoscale {
            autoscaled(&mut config, &data_dir)?;
            let (c, s) = (config.clone(), stop.child_token());
            services.spawn(async move { ("autoscaler", trainyard_autoscaler::run(c, s).await) });
        } else {
            {
                let (c, s) = (config.clone(), stop.child_token());
                services.spawn(async move { ("captioner", trainyard_captioner::run(c, s).await) });
            }
            {
                let (c, s) = (config.clone(), stop.child_token());
                services.spawn(async move { ("worker", trainyard_worker::run(c, s).await) });
            }
            {
                let (c, s) = (config.clone(), stop.child_token());
                services.spawn(async move { ("uploader", trainyard_uploader::run(c, s).await) });
            }
        }
        let mut fleet = Fleet {
            config,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            nats,
            stop,
            services,
        };
        let ready = tokio::select! {
            addr = ready_rx => addr.map_err(|_| anyhow::anyhow!("the coordinator stopped before listening")),
            error = fleet.failed() => Err(error),
            _ = tokio::time::sleep(READY_TIMEOUT) => Err(anyhow::anyhow!("the coordinator did not listen within {READY_TIMEOUT:?}")),
        };
        match ready {
            Ok(addr) => {
                fleet.grpc_addr = addr;
                Ok(fleet)
            }
            Err(error) => {
                let _ = fleet.stop().await;
                Err(error)
            }
        }
    }

    /// The coordinator's URL for a client.
    pub fn server_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The NATS server we started, if any.
    pub fn nats_server(&self) -> Option<&NatsServer> {
        self.nats.as_ref()
    }

    /// Resolves when a service stops on its own, with why.
    pub async fn failed(&mut self) -> anyhow::Error {
        match self.services.join_next().await {
            Some(Ok((name, Ok(())))) => anyhow::anyhow!("{name} stopped unexpectedly"),
            Some(Ok((name, Err(error)))) => error.context(format!("{name} failed")),
            Some(Err(join)) => anyhow::anyhow!("a service panicked: {join}"),
            None => std::future::pending().await,
        }
    }

    /// Stops every service, waits for them to drain, then stops NATS.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let mut errors = Vec::new();
        let drained = tokio::time::timeout(DRAIN_GRACE, async {
            while let Some(joined) = self.services.join_next().await {
                match joined {
                    Ok((_, Ok(()))) => {}
                    Ok((name, Err(error))) => errors.push(format!("{name}: {error:#}")),
                    Err(join) => errors.push(format!("a service panicked: {join}")),
                }
            }
        })
        .await;
        if drained.is_err() {
            errors.push(format!(
                "services still running after {DRAIN_GRACE:?}; stopped hard"
            ));
            self.services.shutdown().await;
        }
        if let Some(server) = self.nats.take() {
            tokio::task::spawn_blocking(move || server.stop()).await?;
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("the fleet did not stop cleanly: {}", errors.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths_move_under_the_data_dir_and_set_ones_stay() {
        let mut config = Config::default();
        config.worker.work_dir = "/custom/worker".into();
        rebase_on_data_dir(&mut config, Path::new("/d"));
        assert_eq!(config.store.uri, "/d/store");
        assert_eq!(config.captioner.work_dir, Path::new("/d/work/captioner"));
        assert_eq!(config.worker.work_dir, Path::new("/custom/worker"));
        assert_eq!(config.worker.model_cache_dir, Path::new("/d/cache/models"));
        assert_eq!(
            config.uploader.allowed_local_roots,
            [Path::new("/d/outputs")]
        );
    }

    #[test]
    fn nats_urls_are_read() {
        assert!(is_loopback_url("nats://127.0.0.1:4222"));
        assert!(is_loopback_url("nats://localhost:5000"));
        assert!(!is_loopback_url("nats://10.0.0.5:4222"));
        assert_eq!(port_of("nats://127.0.0.1:5222"), 5222);
        assert_eq!(port_of("nats://localhost"), 4222);
    }
}
