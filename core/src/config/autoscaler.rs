//! The `[autoscaler]` section, read by `ty-autoscaler`: which provider
//! starts machines, and each pool's policy. A pool is a stage's fleet:
//! `prepare`, `deliver`, or `train.<pool>` for a training pool.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The `[autoscaler]` section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscalerConfig {
    /// `local` (child processes on this machine), `runpod` or
    /// `kubernetes`; empty: the autoscaler refuses to start.
    pub provider: String,
    /// Milliseconds between two planning passes.
    pub interval_ms: u64,
    /// The name tag every machine of this fleet carries (`<fleet>-…`): the
    /// autoscaler lists, adopts and reaps only machines with it.
    pub fleet_name: String,
    /// The leader's lease in `ty_autoscaler` (milliseconds): several
    /// replicas may run, one plans at a time; a leader that stops renewing
    /// is replaced after this.
    pub lease_ms: u64,
    /// A running machine whose worker has not registered (or whose entry
    /// expired) this long is counted as vanished: released and replaced.
    pub vanished_after_ms: u64,
    /// A machine that vanished (preempted, or lost) makes its host and
    /// data centre avoided this long for new machines.
    pub avoid_host_secs: u64,
    /// A busy machine being drained is released once its service says it
    /// drained (taking nothing, running nothing), or after this many
    /// seconds anyway (recorded as the decision's error): more than a
    /// worker's drain grace, its trainer's stop grace and the upload of
    /// its last checkpoint.
    pub drain_timeout_secs: u64,
    /// The prior of a training step's duration, in seconds, per backend
    /// (`reference`, `kohya`, …) or per `backend/gpu type`; learnt from
    /// finished jobs' summaries as they come.
    pub seconds_per_step: BTreeMap<String, f64>,
    /// The prior for a backend with none above.
    pub default_seconds_per_step: f64,
    /// Each pool's policy, by pool (`prepare`, `deliver`, `train.<pool>`).
    pub pools: BTreeMap<String, PoolPolicy>,
    pub local: LocalProviderConfig,
    pub runpod: RunpodConfig,
    pub kubernetes: KubernetesConfig,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        Self {
            provider: String::new(),
            interval_ms: 2_000,
            fleet_name: "trainyard".into(),
            lease_ms: 10_000,
            vanished_after_ms: 10_000,
            avoid_host_secs: 1_800,
            drain_timeout_secs: 300,
            seconds_per_step: BTreeMap::new(),
            default_seconds_per_step: 1.5,
            pools: BTreeMap::new(),
            local: LocalProviderConfig::default(),
            runpod: RunpodConfig::default(),
            kubernetes: KubernetesConfig::default(),
        }
    }
}

/// How one pool is sized (`[autoscaler.pools.<pool>]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolPolicy {
    /// Machines kept even when idle.
    pub min_workers: u32,
    /// Machines at most.
    pub max_workers: u32,
    /// Tasks one machine runs at once (the stage's concurrency there).
    pub tasks_per_worker: u32,
    /// The backlog should drain within this many seconds: machines wanted
    /// = estimated seconds of work / this (at least one per task out).
    pub target_drain_secs: u64,
    /// Seconds of work one task of a CPU stage is counted as (training
    /// tasks are weighed by their steps instead).
    pub seconds_per_task: f64,
    /// Machines started at most in one pass.
    pub scale_up_step: u32,
    /// Seconds after a scale-up before the next one (scale from zero does
    /// not wait).
    pub scale_up_cooldown_secs: u64,
    /// Seconds after any scale change before machines are released.
    pub scale_down_cooldown_secs: u64,
    /// A machine idle this long may be released (to `min_workers`, zero
    /// by default).
    pub idle_secs: u64,
    /// Machines are released only once the want is more than this
    /// fraction below what runs (0.25: four machines shrink when two or
    /// fewer are wanted), or zero with no task left.
    pub hysteresis: f64,
    /// Dollars an hour this pool may cost at most (0: no cap); scale-up
    /// stops at it.
    pub max_dollars_per_hour: f64,
    /// GPU types, in order of preference (provider ids, opaque strings
    /// such as `NVIDIA GeForce RTX 4090`); the next is tried when one is
    /// out of stock. Empty for CPU pools.
    pub gpu_types: Vec<String>,
    /// GPUs per machine.
    pub gpu_count: u32,
    /// Interruptible (spot) machines, bid at `bid_per_gpu` dollars an hour
    /// (0: the type's minimum bid).
    pub interruptible: bool,
    pub bid_per_gpu: f64,
    /// A GPU type dearer than this (dollars per GPU-hour) is not taken
    /// (0: any price).
    pub max_price_per_gpu: f64,
    /// Extra environment of the pool's machines.
    pub env: BTreeMap<String, String>,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        Self {
            min_workers: 0,
            max_workers: 1,
            tasks_per_worker: 1,
            target_drain_secs: 900,
            seconds_per_task: 60.0,
            scale_up_step: 4,
            scale_up_cooldown_secs: 30,
            scale_down_cooldown_secs: 60,
            idle_secs: 300,
            hysteresis: 0.2,
            max_dollars_per_hour: 0.0,
            gpu_types: Vec::new(),
            gpu_count: 1,
            interruptible: false,
            bid_per_gpu: 0.0,
            max_price_per_gpu: 0.0,
            env: BTreeMap::new(),
        }
    }
}

/// `[autoscaler.local]`: services as child processes of the autoscaler.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalProviderConfig {
    /// Where `ty-worker`, `ty-captioner` and `ty-uploader` are; empty: next
    /// to the autoscaler's own binary.
    pub bin_dir: Option<PathBuf>,
    /// The config file the children read (`--config`); empty: the
    /// autoscaler's own.
    pub config_file: Option<PathBuf>,
    /// Where each child's output goes (`<name>.log`); empty: inherited.
    pub log_dir: Option<PathBuf>,
}

/// `[autoscaler.runpod]`: pods through RunPod's API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunpodConfig {
    /// The GraphQL endpoint.
    pub graphql_url: String,
    /// The REST (v2) endpoint.
    pub rest_url: String,
    /// A file holding the API key (never the key itself in the config).
    pub api_key_file: Option<PathBuf>,
    /// The worker image.
    pub image: String,
    /// `SECURE` or `COMMUNITY`.
    pub cloud_type: String,
    /// A network volume for the model cache, mounted at `volume_mount_path`.
    pub network_volume_id: String,
    pub volume_mount_path: String,
    pub container_disk_gb: u32,
    /// Data centres machines may run in (empty: any).
    pub data_center_ids: Vec<String>,
    /// Environment every pod gets (the fleet's NATS URL, store, …); each
    /// pool's role credentials are added by the autoscaler.
    pub env: BTreeMap<String, String>,
}

impl Default for RunpodConfig {
    fn default() -> Self {
        Self {
            graphql_url: "https://api.runpod.io/graphql".into(),
            rest_url: "https://api.runpod.io/v2".into(),
            api_key_file: None,
            image: String::new(),
            cloud_type: "SECURE".into(),
            network_volume_id: String::new(),
            volume_mount_path: "/models".into(),
            container_disk_gb: 50,
            data_center_ids: Vec::new(),
            env: BTreeMap::new(),
        }
    }
}

/// `[autoscaler.kubernetes]`: a Deployment's replicas per pool.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// The API server; empty: in-cluster (`KUBERNETES_SERVICE_HOST`).
    pub api_url: String,
    pub namespace: String,
    /// The service account token and the API server's CA; empty: the
    /// in-cluster files.
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// The Deployment of each pool, by pool.
    pub deployments: BTreeMap<String, String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            api_url: String::new(),
            namespace: "trainyard".into(),
            token_file: None,
            ca_file: None,
            deployments: BTreeMap::new(),
        }
    }
}
