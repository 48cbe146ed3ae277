//! Fleets sized by the autoscaler: the coordinator, captioner and uploader
//! in-process, the training pool's workers started as real `ty-worker`
//! processes by the `local` provider of autoscaler replicas running
//! in-process, each of which can be stopped cleanly or crash (its task
//! aborted, its lease left to expire).

use crate::Fleet;
use crate::chaos::procs::bin_dir;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use trainyard_core::Config;
use trainyard_core::config::PoolPolicy;

/// The training pool the suites scale.
pub const POOL: &str = "train.default";

/// Where the local provider keeps its machines' state files and logs.
pub struct Machines {
    pub log_dir: PathBuf,
}

impl Machines {
    pub fn state_dir(&self) -> PathBuf {
        self.log_dir.join("machines")
    }

    /// Every machine ever launched (each has its log file), by name.
    pub fn launched(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.log_dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".log")
                    .map(String::from)
            })
            .collect();
        names.sort();
        names
    }

    /// Machines not released yet (their state files), by name and pid.
    pub fn current(&self) -> Vec<(String, i32)> {
        let mut found: Vec<(String, i32)> = std::fs::read_dir(self.state_dir())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
                let json: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                Some((name, json["pid"].as_i64()? as i32))
            })
            .collect();
        found.sort();
        found
    }

    /// What every machine wrote.
    pub fn logs(&self) -> String {
        self.launched()
            .iter()
            .map(|name| {
                std::fs::read_to_string(self.log_dir.join(format!("{name}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Machines {
    /// No worker outlives its test.
    fn drop(&mut self) {
        for (_, pid) in self.current() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A fleet's config for autoscaler replicas with the local provider and
/// `policy` for [`POOL`]; the workers' config file is written beside.
pub fn autoscaler_config(fleet: &Fleet, policy: PoolPolicy) -> (Config, Machines) {
    let log_dir = fleet.dir.path().join("machines");
    let children = fleet.dir.path().join("worker.toml");
    std::fs::write(&children, fleet.worker_config().to_toml()).expect("worker config");
    // Its own identity on a secured fleet.
    let mut config = fleet.config_as(&trainyard_core::topology::permissions::Role::Autoscaler);
    let scaler = &mut config.autoscaler;
    scaler.provider = "local".into();
    scaler.interval_ms = 200;
    scaler.lease_ms = 1_500;
    scaler.vanished_after_ms = 8_000;
    scaler.fleet_name = "it".into();
    scaler.default_seconds_per_step = 0.05;
    scaler.pools = [(POOL.to_string(), policy)].into();
    scaler.local.bin_dir = Some(bin_dir());
    scaler.local.config_file = Some(children);
    scaler.local.log_dir = Some(log_dir.clone());
    (config, Machines { log_dir })
}

/// One autoscaler replica running in-process.
pub struct Replica {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Replica {
    pub fn start(config: &Config) -> Replica {
        let stop = CancellationToken::new();
        let (c, s) = (config.clone(), stop.clone());
        let task = tokio::spawn(async move {
            trainyard_autoscaler::run(c, s).await.expect("autoscaler");
        });
        Replica { stop, task }
    }

    /// A crash: the replica stops at once, its lease left to expire.
    pub fn crash(self) {
        self.task.abort();
    }

    /// A clean stop (the lease given up).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The lease's holder now, if any.
pub async fn leader(js: &async_nats::jetstream::Context) -> Option<String> {
    let kv = js
        .get_key_value(trainyard_core::topology::AUTOSCALER_BUCKET)
        .await
        .ok()?;
    let value = kv
        .get(trainyard_autoscaler::lease::LEADER_KEY)
        .await
        .ok()??;
    let lease: trainyard_autoscaler::lease::LeaseValue = serde_json::from_slice(&value).ok()?;
    Some(lease.holder)
}
