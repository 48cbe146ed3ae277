//! Layered configuration, loaded and validated once at start-up:
//! built-in defaults → a TOML file → `TY_<SECTION>__<KEY>` environment
//! variables → `--set section.key=value` flags (a nested key:
//! `TY_STORE__S3__REGION`, `--set store.s3.region=…`). Unknown keys are errors, so
//! a typo never silently falls back to a default.
//!
//! One file configures every service; each reads its own section plus
//! `nats`, `store` and `telemetry`. `deploy/trainyard.toml` documents every key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid toml: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("override {0:?} is not of the form section.key=value")]
    BadOverride(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub store: StoreConfig,
    pub coordinator: CoordinatorConfig,
    pub captioner: CaptionerConfig,
    pub worker: WorkerConfig,
    pub uploader: UploaderConfig,
    pub retry: RetryConfig,
    pub telemetry: TelemetryConfig,
    pub webhooks: WebhooksConfig,
    pub destinations: DestinationsConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Seconds a task may go without an ack or in-progress ack before redelivery.
    pub ack_wait_secs: u64,
    /// Ceiling on deliveries of one task: no retry policy (`[retry.*]` or a
    /// job's) goes past it. The cap itself is the policy's `max_attempts`.
    pub max_deliver: u32,
    /// Replicas of every stream and bucket (3 on a cluster).
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub dedup_window_secs: u64,
    /// How long job events are kept.
    pub event_max_age_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            ack_wait_secs: 30,
            max_deliver: 5,
            replicas: 1,
            dedup_window_secs: 600,
            event_max_age_secs: 7 * 24 * 3600,
        }
    }
}

impl NatsConfig {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs.max(1))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The artifact store: `file:///abs/dir`, a local path, or `s3://bucket/prefix`.
    pub uri: String,
    /// How `s3://` URIs are reached: the artifact store's and the uploader's
    /// destinations alike.
    pub s3: S3Options,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            uri: ".trainyard/store".into(),
            s3: S3Options::default(),
        }
    }
}

/// The `[store.s3]` table. Every field is optional: an unset one falls back
/// to the standard `AWS_*` environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`,
/// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`, …), then to `object_store`'s defaults.
/// Debug output and `--print-config` never show the secret.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Options {
    /// Endpoint URL of an S3-compatible server, e.g. `http://127.0.0.1:9000`
    /// (MinIO, moto, Ceph…). Unset: AWS itself, or `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Region, e.g. `eu-west-1`. Unset: `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Access key id. Unset: `AWS_ACCESS_KEY_ID`, else the instance's role.
    pub access_key_id: Option<String>,
    /// Secret access key (redacted when printed). Unset: `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// Allow plain `http://` endpoints. Unset: `AWS_ALLOW_HTTP`, else true
    /// exactly when the endpoint starts with `http://`.
    pub allow_http: Option<bool>,
    /// Address buckets as `https://<bucket>.<endpoint>` instead of
    /// `https://<endpoint>/<bucket>`. Unset: `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`,
    /// else path style.
    pub virtual_hosted_style: Option<bool>,
}

/// What a secret is printed as.
pub const REDACTED: &str = "[redacted]";

impl S3Options {
    /// A copy safe to show: the secret, when set, is replaced by [`REDACTED`].
    pub fn redacted(&self) -> S3Options {
        let mut shown = self.clone();
        if shown.secret_access_key.is_some() {
            shown.secret_access_key = Some(REDACTED.into());
        }
        shown
    }
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("S3Options")
            .field("endpoint", &shown.endpoint)
            .field("region", &shown.region)
            .field("access_key_id", &shown.access_key_id)
            .field("secret_access_key", &shown.secret_access_key)
            .field("allow_http", &shown.allow_http)
            .field("virtual_hosted_style", &shown.virtual_hosted_style)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC listen address.
    pub grpc_addr: String,
    /// Bearer token → tenant. The default holds one development token.
    pub tokens: BTreeMap<String, String>,
    /// Seconds between reconciler passes.
    pub reconcile_interval_secs: u64,
    /// A running job whose record has not changed for this long, with no task
    /// in flight, gets its task published again.
    pub stale_after_secs: u64,
    /// How long `Validate` waits for a captioner to fetch the dataset and
    /// run the checks before answering UNAVAILABLE.
    pub validate_timeout_secs: u64,
    /// Seconds between reads of the stage backlogs and the dead-letter
    /// depth (JetStream consumer and stream info) for the metrics.
    pub backlog_interval_secs: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50051".into(),
            tokens: [("dev-token".to_string(), "dev".to_string())].into(),
            reconcile_interval_secs: 60,
            stale_after_secs: 120,
            validate_timeout_secs: 300,
            backlog_interval_secs: 5,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionerConfig {
    pub work_dir: PathBuf,
    /// Tasks prepared at once.
    pub concurrency: usize,
    /// Allow dataset URLs on private and loopback addresses (development only).
    pub allow_private_urls: bool,
    /// Largest dataset download or unpacked size, in bytes.
    pub max_dataset_bytes: u64,
    /// Most files in one dataset archive.
    pub max_files: usize,
}

impl Default for CaptionerConfig {
    fn default() -> Self {
        Self {
            work_dir: ".trainyard/work/captioner".into(),
            concurrency: 2,
            allow_private_urls: false,
            max_dataset_bytes: 4 << 30,
            max_files: 20_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub work_dir: PathBuf,
    /// The GPU pool this worker takes tasks from (`ty.task.train.<pool>`).
    pub pool: String,
    /// Local cache of base models.
    pub model_cache_dir: PathBuf,
    /// Path of `ty-reference-trainer`; found beside this executable or on PATH when empty.
    pub reference_trainer: Option<PathBuf>,
    /// Trainings at once (one per GPU).
    pub concurrency: usize,
    /// Seconds a trainer gets, when the worker stops, to save (by its
    /// backend's stop file or signal) and exit before its group is killed.
    pub stop_grace_secs: u64,
    /// Least milliseconds between two progress events of one job.
    pub progress_interval_ms: u64,
    /// Largest size of the model cache in bytes; least recently used models
    /// that no run holds are evicted past it. 0 means no limit.
    pub model_cache_max_bytes: u64,
    /// The Hugging Face Hub (or a mirror) that `hf://` references and presets resolve against.
    pub hf_endpoint: String,
    /// Milliseconds between two looks for new complete checkpoints in a run's output folder.
    pub checkpoint_scan_ms: u64,
    /// Consecutive NaN losses after which a run is stopped as diverged.
    pub nan_loss_steps: u32,
    /// Where the trainers are installed.
    pub trainers: TrainerPaths,
    /// When a trainer counts as stuck (killed, the task retried).
    pub stuck: StuckConfig,
    /// Bytes of a trainer's output kept as the log artifact of an attempt
    /// (the last ones when it wrote more); 0 keeps none.
    pub trainer_log_max_bytes: u64,
    /// Most `metric` events per second per metric (loss, learning rate, …)
    /// of one run; the latest value wins. 0: every step's value.
    pub metric_events_per_second: u32,
    /// Milliseconds between two GPU readings for the metrics (NVML, where
    /// a driver is present); 0 turns the readings off.
    pub gpu_sample_ms: u64,
}

/// When the worker declares a trainer stuck: no new step for
/// `stuck_after_secs` (the first step may take `first_step_secs`, while
/// models load), no output line at all for `silent_secs`, or, where NVML
/// is present, its GPUs at 0% for `gpu_idle_secs` after the first step
/// (the reference backend trains on the CPU: off for it). 0 turns a
/// check off. `backends` overrides any of them per backend name
/// (`[worker.stuck.backends.kohya] first_step_secs = 3600`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StuckConfig {
    pub stuck_after_secs: u64,
    pub first_step_secs: u64,
    pub silent_secs: u64,
    pub gpu_idle_secs: u64,
    pub backends: BTreeMap<String, StuckOverride>,
}

/// Per-backend values of [`StuckConfig`]; absent fields keep the defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StuckOverride {
    pub stuck_after_secs: Option<u64>,
    pub first_step_secs: Option<u64>,
    pub silent_secs: Option<u64>,
    pub gpu_idle_secs: Option<u64>,
}

/// The stuck limits of one backend; `None` is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StuckLimits {
    pub step: Option<Duration>,
    pub first_step: Option<Duration>,
    pub silent: Option<Duration>,
    pub gpu_idle: Option<Duration>,
}

impl Default for StuckConfig {
    fn default() -> Self {
        Self {
            stuck_after_secs: 30 * 60,
            first_step_secs: 2 * 60 * 60,
            silent_secs: 60 * 60,
            gpu_idle_secs: 15 * 60,
            backends: [(
                "reference".to_string(),
                StuckOverride {
                    gpu_idle_secs: Some(0),
                    ..Default::default()
                },
            )]
            .into(),
        }
    }
}

impl StuckConfig {
    pub fn limits(&self, backend: &str) -> StuckLimits {
        let o = self.backends.get(backend).cloned().unwrap_or_default();
        let secs = |v: u64| (v > 0).then(|| Duration::from_secs(v));
        StuckLimits {
            step: secs(o.stuck_after_secs.unwrap_or(self.stuck_after_secs)),
            first_step: secs(o.first_step_secs.unwrap_or(self.first_step_secs)),
            silent: secs(o.silent_secs.unwrap_or(self.silent_secs)),
            gpu_idle: secs(o.gpu_idle_secs.unwrap_or(self.gpu_idle_secs)),
        }
    }
}

/// Where each trainer is installed on a worker; a backend whose path is
/// empty is not offered by that worker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerPaths {
    /// The Python that runs trainer scripts.
    pub python: PathBuf,
    /// `accelerate` (kohya, SimpleTuner).
    pub accelerate: PathBuf,
    /// `deepspeed` (diffusion-pipe).
    pub deepspeed: PathBuf,
    /// A kohya-ss/sd-scripts checkout.
    pub kohya_dir: PathBuf,
    /// A tdrussell/diffusion-pipe checkout.
    pub diffusion_pipe_dir: PathBuf,
    /// The folder holding SimpleTuner's `train.py` (`<site-packages>/simpletuner`).
    pub simpletuner_dir: PathBuf,
    /// An ostris/ai-toolkit checkout.
    pub ai_toolkit_dir: PathBuf,
    /// Environment added to every trainer (`CUDA_VISIBLE_DEVICES`, `HF_HOME`, …).
    pub env: std::collections::BTreeMap<String, String>,
}

impl Default for TrainerPaths {
    fn default() -> Self {
        Self {
            python: "python3".into(),
            accelerate: "accelerate".into(),
            deepspeed: "deepspeed".into(),
            kohya_dir: PathBuf::new(),
            diffusion_pipe_dir: PathBuf::new(),
            simpletuner_dir: PathBuf::new(),
            ai_toolkit_dir: PathBuf::new(),
            env: Default::default(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            work_dir: ".trainyard/work/worker".into(),
            pool: "default".into(),
            model_cache_dir: ".trainyard/cache/models".into(),
            reference_trainer: None,
            concurrency: 1,
            stop_grace_secs: 5,
            progress_interval_ms: 200,
            model_cache_max_bytes: 0,
            hf_endpoint: "https://huggingface.co".into(),
            checkpoint_scan_ms: 1000,
            nan_loss_steps: 20,
            trainers: TrainerPaths::default(),
            stuck: StuckConfig::default(),
            trainer_log_max_bytes: 64 << 20,
            metric_events_per_second: 5,
            gpu_sample_ms: 5000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploaderConfig {
    pub work_dir: PathBuf,
    pub concurrency: usize,
    /// Local folders a job may deliver to (and preflight may probe); a
    /// destination must lie inside one after symlinks and `..` are
    /// resolved. Empty allows no local destination.
    pub allowed_local_roots: Vec<PathBuf>,
}

impl Default for UploaderConfig {
    fn default() -> Self {
        Self {
            work_dir: ".trainyard/work/uploader".into(),
            concurrency: 4,
            allowed_local_roots: Vec::new(),
        }
    }
}

/// The `[destinations]` section: fleet-held credentials for `s3://`
/// destinations. A destination never uses `[store.s3]`; it uses the keys
/// its job supplies in `secrets.values`, or one of these, named in its URI
/// (`s3://bucket/prefix?credential=<name>`) by a tenant listed in it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationsConfig {
    pub credentials: BTreeMap<String, DestinationCredential>,
    /// Let a job's own S3 endpoint (`AWS_ENDPOINT_URL`) be a private,
    /// loopback or link-local address. Off: the address guard refuses them.
    pub allow_private_endpoints: bool,
}

/// One `[destinations.credentials.<name>]` table.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationCredential {
    /// Tenants whose jobs may use it.
    pub tenants: Vec<String>,
    pub access_key_id: String,
    /// Redacted when printed.
    pub secret_access_key: String,
    /// Redacted when printed.
    pub session_token: Option<String>,
    /// Endpoint of an S3-compatible server; unset: AWS.
    pub endpoint: Option<String>,
    /// Unset: `us-east-1`.
    pub region: Option<String>,
    /// Unset: true exactly when the endpoint starts with `http://`.
    pub allow_http: Option<bool>,
    pub virtual_hosted_style: Option<bool>,
}

impl DestinationCredential {
    /// A copy safe to show: secrets replaced by [`REDACTED`].
    pub fn redacted(&self) -> DestinationCredential {
        let mut shown = self.clone();
        if !shown.secret_access_key.is_empty() {
            shown.secret_access_key = REDACTED.into();
        }
        if shown.session_token.is_some() {
            shown.session_token = Some(REDACTED.into());
        }
        shown
    }
}

impl std::fmt::Debug for DestinationCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("DestinationCredential")
            .field("tenants", &shown.tenants)
            .field("access_key_id", &shown.access_key_id)
            .field("secret_access_key", &shown.secret_access_key)
            .field("session_token", &shown.session_token)
            .field("endpoint", &shown.endpoint)
            .field("region", &shown.region)
            .field("allow_http", &shown.allow_http)
            .field("virtual_hosted_style", &shown.virtual_hosted_style)
            .finish()
    }
}

/// The `[retry]` section: how each stage tries a failed task again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub prepare: RetryPolicyConfig,
    pub train: RetryPolicyConfig,
    pub deliver: RetryPolicyConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            prepare: RetryPolicyConfig {
                initial_delay_ms: 2_000,
                multiplier: 2.0,
                max_delay_ms: 60_000,
                max_attempts: 5,
                jitter: 0.2,
                non_retryable: fatal_kinds(),
            },
            train: RetryPolicyConfig {
                initial_delay_ms: 10_000,
                multiplier: 2.0,
                max_delay_ms: 300_000,
                max_attempts: 5,
                jitter: 0.2,
                non_retryable: fatal_kinds(),
            },
            deliver: RetryPolicyConfig {
                initial_delay_ms: 5_000,
                multiplier: 2.0,
                max_delay_ms: 120_000,
                max_attempts: 5,
                jitter: 0.2,
                non_retryable: fatal_kinds(),
            },
        }
    }
}

fn fatal_kinds() -> Vec<String> {
    ["invalid_spec", "auth", "poison"]
        .map(String::from)
        .to_vec()
}

impl RetryConfig {
    pub fn for_stage(&self, stage: trainyard_proto::v1::Stage) -> &RetryPolicyConfig {
        use trainyard_proto::v1::Stage;
        match stage {
            Stage::Train => &self.train,
            Stage::Deliver => &self.deliver,
            _ => &self.prepare,
        }
    }
}

/// One stage's retry policy (`[retry.prepare]`, `[retry.train]`,
/// `[retry.deliver]`); see [`crate::retry`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicyConfig {
    /// Delay before the second delivery, in milliseconds.
    pub initial_delay_ms: u64,
    /// Each further delay is the previous one times this.
    pub multiplier: f64,
    /// No delay is longer than this, in milliseconds.
    pub max_delay_ms: u64,
    /// Deliveries of one task, the first included, before the job fails.
    pub max_attempts: u32,
    /// Fraction (0..1) by which each delay is spread at random.
    pub jitter: f64,
    /// Error kinds that fail the job at once even when the stage called the
    /// error transient: invalid_spec, bad_dataset, fetch, model, trainer,
    /// oom, storage, poison, auth, deadline_exceeded, internal. Errors the
    /// stage called permanent (a bad dataset, an unknown model, a refused
    /// token) are fatal whatever this lists.
    pub non_retryable: Vec<String>,
}

impl Default for RetryPolicyConfig {
    fn default() -> Self {
        RetryConfig::default().prepare
    }
}

/// An error kind's config name (`ErrorKind::BadDataset` → `bad_dataset`).
pub fn error_kind_name(kind: trainyard_proto::v1::ErrorKind) -> String {
    kind.as_str_name()
        .trim_start_matches("ERROR_KIND_")
        .to_lowercase()
}

/// The error kind a config name stands for.
pub fn parse_error_kind(name: &str) -> Option<trainyard_proto::v1::ErrorKind> {
    trainyard_proto::v1::ErrorKind::from_str_name(&format!("ERROR_KIND_{}", name.to_uppercase()))
        .filter(|k| *k != trainyard_proto::v1::ErrorKind::Unspecified)
}

/// The `[webhooks]` table: whether and how the coordinators sign and post
/// job webhooks (`JobSpec.webhook`). Each tenant signs with its own secret,
/// made and kept by the coordinators (`GetWebhookSecret`); none is set here.
/// Debug output and `--print-config` never show the legacy `secret`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Post job webhooks. Off: a job asking for one is refused at submit.
    pub enabled: bool,
    /// No longer used: one fleet-wide secret let any tenant's webhooks be
    /// verified with (and so forged by) anyone holding it. Kept so older
    /// configs load; a non-empty value turns webhooks on, as it did, and the
    /// coordinator warns at start-up that the value itself is ignored.
    pub secret: String,
    /// Seconds a tenant's previous secret keeps signing after a rotation
    /// (both signatures are sent meanwhile), for receivers to switch.
    pub secret_overlap_secs: u64,
    /// Allow private, loopback and link-local webhook targets. Only for
    /// tests and fleets whose receivers are on a private network.
    pub allow_private_addresses: bool,
    /// Seconds one POST may take, connection included.
    pub timeout_secs: u64,
    /// POSTs of one webhook, the first included, before it is given up.
    pub max_attempts: u32,
    /// Delay before the second POST, in milliseconds; doubled for each
    /// further one. A receiver's `Retry-After` is a lower bound.
    pub initial_delay_ms: u64,
    /// No delay is longer than this, in milliseconds.
    pub max_delay_ms: u64,
    /// A webhook whose state change is older than this (seconds) is given
    /// up whatever the attempts left.
    pub max_age_secs: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            secret: String::new(),
            secret_overlap_secs: 86_400,
            allow_private_addresses: false,
            timeout_secs: 10,
            max_attempts: 8,
            initial_delay_ms: 30_000,
            max_delay_ms: 1_200_000,
            max_age_secs: 7200,
        }
    }
}

impl WebhooksConfig {
    /// Webhooks are on: `enabled`, or a legacy `secret` set.
    pub fn is_enabled(&self) -> bool {
        self.enabled || !self.secret.is_empty()
    }

    /// A copy safe to show: the secret, when set, is [`REDACTED`].
    pub fn redacted(&self) -> WebhooksConfig {
        let mut shown = self.clone();
        if !shown.secret.is_empty() {
            shown.secret = REDACTED.into();
        }
        shown
    }
}

impl std::fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("WebhooksConfig")
            .field("enabled", &shown.enabled)
            .field("secret", &shown.secret)
            .field("secret_overlap_secs", &shown.secret_overlap_secs)
            .field("allow_private_addresses", &shown.allow_private_addresses)
            .field("timeout_secs", &shown.timeout_secs)
            .field("max_attempts", &shown.max_attempts)
            .field("initial_delay_ms", &shown.initial_delay_ms)
            .field("max_delay_ms", &shown.max_delay_ms)
            .field("max_age_secs", &shown.max_age_secs)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// "text" or "json".
    pub log_format: String,
    /// A `tracing` filter, e.g. "info,trainyard_worker=debug".
    pub log_filter: String,
    /// OTLP/gRPC collector endpoint (e.g. "http://otel-collector:4317"); empty
    /// means no trace or metric export. `OTEL_EXPORTER_OTLP_ENDPOINT` overrides.
    pub otlp_endpoint: String,
    /// Port of the Prometheus scrape endpoint (`/metrics`); 0 = off.
    pub metrics_port: u16,
    /// Address the scrape endpoint listens on.
    pub metrics_host: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: "text".into(),
            log_filter: "info".into(),
            otlp_endpoint: String::new(),
            metrics_port: 0,
            metrics_host: "0.0.0.0".into(),
        }
    }
}

impl Config {
    /// Loads the layers in order: defaults, `file`, the process environment,
    /// then `overrides` (`section.key=value`).
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env, overrides)
    }

    /// [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut layered = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            layered = text
                .parse::<toml::Table>()
                .map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source: Box::new(source),
                })?;
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("TY_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            set_path(
                &mut layered,
                &section.to_lowercase(),
                &key.to_lowercase().replace("__", "."),
                value,
            );
        }
        for item in overrides {
            let (path, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::BadOverride(item.clone()))?;
            let (section, key) = path
                .split_once('.')
                .ok_or_else(|| ConfigError::BadOverride(item.clone()))?;
            set_path(&mut layered, section, key, value);
        }
        let config: Config = toml::Value::Table(layered)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.nats.url.is_empty() {
            return bad("nats.url is empty");
        }
        if self.store.uri.is_empty() {
            return bad("store.uri is empty");
        }
        if self.coordinator.tokens.is_empty() {
            return bad("coordinator.tokens is empty: no client could authenticate");
        }
        for tenant in self.coordinator.tokens.values() {
            if trainyard_proto::TenantId::parse(tenant).is_err() {
                return bad("coordinator.tokens maps to a tenant that is not a valid id");
            }
        }
        if self.worker.pool.is_empty()
            || !self
                .worker
                .pool
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("worker.pool may hold only ascii letters, digits, '-' and '_'");
        }
        if self.nats.max_deliver == 0 {
            return bad("nats.max_deliver must be at least 1");
        }
        for (stage, policy) in [
            ("prepare", &self.retry.prepare),
            ("train", &self.retry.train),
            ("deliver", &self.retry.deliver),
        ] {
            if policy.max_attempts == 0 {
                return bad(&format!("retry.{stage}.max_attempts must be at least 1"));
            }
            if !(policy.multiplier >= 1.0 && policy.multiplier.is_finite()) {
                return bad(&format!("retry.{stage}.multiplier must be at least 1"));
            }
            if !(0.0..1.0).contains(&policy.jitter) {
                return bad(&format!("retry.{stage}.jitter must be in [0, 1)"));
            }
            if policy.max_delay_ms < policy.initial_delay_ms {
                return bad(&format!(
                    "retry.{stage}.max_delay_ms must not be below initial_delay_ms"
                ));
            }
            if let Some(kind) = policy
                .non_retryable
                .iter()
                .find(|k| parse_error_kind(k).is_none())
            {
                return bad(&format!(
                    "retry.{stage}.non_retryable: unknown error kind {kind:?}"
                ));
            }
        }
        let hooks = &self.webhooks;
        if hooks.timeout_secs == 0 || hooks.max_attempts == 0 {
            return bad("webhooks.timeout_secs and webhooks.max_attempts must be at least 1");
        }
        if hooks.max_delay_ms < hooks.initial_delay_ms {
            return bad("webhooks.max_delay_ms must not be below initial_delay_ms");
        }
        // A publish retried after a lost ack (a result after a redelivery, a
        // task republished by the reconciler) must still be deduplicated.
        if self.nats.dedup_window_secs <= self.nats.ack_wait_secs.max(1)
            || self.nats.dedup_window_secs <= self.coordinator.stale_after_secs
        {
            return bad(
                "nats.dedup_window_secs must be longer than nats.ack_wait_secs and coordinator.stale_after_secs",
            );
        }
        // NATS refuses a stream whose dedup window outlasts its messages.
        if self.nats.event_max_age_secs.max(60) < self.nats.dedup_window_secs {
            return bad("nats.event_max_age_secs must be at least nats.dedup_window_secs");
        }
        for (name, credential) in &self.destinations.credentials {
            if credential.access_key_id.is_empty() || credential.secret_access_key.is_empty() {
                return bad(&format!(
                    "destinations.credentials.{name} needs access_key_id and secret_access_key"
                ));
            }
            if credential
                .tenants
                .iter()
                .any(|t| trainyard_proto::TenantId::parse(t).is_err())
            {
                return bad(&format!(
                    "destinations.credentials.{name}.tenants holds a tenant that is not a valid id"
                ));
            }
        }
        if self
            .uploader
            .allowed_local_roots
            .iter()
            .any(|r| !r.is_absolute())
        {
            return bad("uploader.allowed_local_roots must be absolute paths");
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return bad("telemetry.log_format must be \"text\" or \"json\"");
        }
        Ok(())
    }

    /// The configuration as TOML, for `--print-config`, secrets redacted.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.store.s3 = shown.store.s3.redacted();
        shown.webhooks = shown.webhooks.redacted();
        for credential in shown.destinations.credentials.values_mut() {
            *credential = credential.redacted();
        }
        toml::to_string_pretty(&shown).unwrap_or_default()
    }
}

/// Sets `section.key` to `raw`, read as a TOML value when it parses as one
/// (numbers, booleans, arrays, inline tables) and as a string otherwise.
/// A dotted key reaches into a nested table (`store` + `s3.endpoint`).
fn set_path(table: &mut toml::Table, section: &str, key: &str, raw: &str) {
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts = std::iter::once(section).chain(key.split('.')).peekable();
    let mut current = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            current.insert(part.to_string(), value);
            return;
        }
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(inner) = entry else {
            return;
        };
        current = inner;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ty.toml");
        std::fs::write(
            &file,
            "[nats]\nurl = \"nats://file:1\"\nmax_deliver = 7\n[worker]\npool = \"a100\"\n",
        )
        .unwrap();
        let env = vec![("TY_NATS__URL".to_string(), "nats://env:2".to_string())];
        let config =
            Config::load_from(Some(&file), &env, &["worker.pool=h100".to_string()]).unwrap();
        assert_eq!(config.nats.url, "nats://env:2");
        assert_eq!(config.nats.max_deliver, 7);
        assert_eq!(config.worker.pool, "h100");
        assert_eq!(config.captioner.concurrency, 2);
    }

    #[test]
    fn stuck_limits_are_overridden_per_backend() {
        let mut stuck = StuckConfig {
            stuck_after_secs: 60,
            first_step_secs: 600,
            silent_secs: 0,
            ..Default::default()
        };
        stuck.backends.insert(
            "kohya".into(),
            StuckOverride {
                first_step_secs: Some(3600),
                ..Default::default()
            },
        );
        let kohya = stuck.limits("kohya");
        assert_eq!(kohya.first_step, Some(Duration::from_secs(3600)));
        assert_eq!(kohya.step, Some(Duration::from_secs(60)));
        assert_eq!(kohya.silent, None);
        assert_eq!(kohya.gpu_idle, Some(Duration::from_secs(15 * 60)));
        assert_eq!(StuckConfig::default().limits("reference").gpu_idle, None);
        assert_eq!(
            stuck.limits("trl").first_step,
            Some(Duration::from_secs(600))
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = Config::load_from(None, &[], &["nats.nope=1".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
        let err = Config::load_from(None, &[], &["worker.pool=a.b".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
        let err = Config::load_from(None, &[], &["nats".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::BadOverride(_)));
        let err =
            Config::load_from(None, &[], &["nats.dedup_window_secs=60".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
        let err =
            Config::load_from(None, &[], &["nats.event_max_age_secs=300".to_string()]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid(m) if m.contains("event_max_age_secs")),
            "{err}"
        );
    }

    #[test]
    fn the_documented_config_file_is_the_defaults() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/trainyard.toml");
        let documented = Config::load_from(Some(&file), &[], &[]).unwrap();
        assert_eq!(documented.to_toml(), Config::default().to_toml());
    }

    #[test]
    fn destination_credentials_are_checked_and_their_secrets_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("trainyard.toml");
        std::fs::write(
            &file,
            r#"
[uploader]
allowed_local_roots = ["/srv/deliveries"]
[destinations.credentials.deliveries]
tenants = ["acme"]
access_key_id = "AKIDDEST"
secret_access_key = "dest-s3cr3t"
session_token = "dest-t0ken"
"#,
        )
        .unwrap();
        let config = Config::load_from(Some(&file), &[], &[]).unwrap();
        let credential = &config.destinations.credentials["deliveries"];
        assert_eq!(credential.tenants, ["acme"]);
        for shown in [config.to_toml(), format!("{config:?}")] {
            assert!(!shown.contains("dest-s3cr3t") && !shown.contains("dest-t0ken"));
            assert!(shown.contains("AKIDDEST"));
        }
        for bad in [
            "destinations.credentials.x={ tenants = [\"acme\"], access_key_id = \"a\" }",
            "destinations.credentials.x={ tenants = [\"no such\"], access_key_id = \"a\", secret_access_key = \"b\" }",
            "uploader.allowed_local_roots=[\"relative\"]",
        ] {
            let err = Config::load_from(None, &[], &[bad.to_string()]).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn s3_options_layer_and_the_secret_is_never_shown() {
        let env = vec![
            (
                "TY_STORE__S3__ENDPOINT".to_string(),
                "http://127.0.0.1:9000".to_string(),
            ),
            (
                "TY_STORE__S3__SECRET_ACCESS_KEY".to_string(),
                "s3cr3t-value".to_string(),
            ),
        ];
        let config = Config::load_from(
            None,
            &env,
            &[
                "store.s3.allow_http=true".to_string(),
                "store.s3.access_key_id=AKIDEXAMPLE".to_string(),
            ],
        )
        .unwrap();
        let s3 = &config.store.s3;
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.secret_access_key.as_deref(), Some("s3cr3t-value"));
        assert_eq!(s3.access_key_id.as_deref(), Some("AKIDEXAMPLE"));
        assert_eq!(s3.allow_http, Some(true));
        assert_eq!(s3.region, None);
        assert!(!config.to_toml().contains("s3cr3t-value"));
        assert!(config.to_toml().contains(REDACTED));
        assert!(!format!("{config:?}").contains("s3cr3t-value"));
        assert!(format!("{config:?}").contains("AKIDEXAMPLE"));
        let err = Config::load_from(None, &[], &["store.s3.endpoit=x".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
    }

    #[test]
    fn the_webhook_secret_is_never_shown() {
        let env = vec![(
            "TY_WEBHOOKS__SECRET".to_string(),
            "whsec_c2VjcmV0LXNpZ25pbmcta2V5".to_string(),
        )];
        let config = Config::load_from(None, &env, &["webhooks.max_attempts=3".into()]).unwrap();
        assert_eq!(config.webhooks.secret, "whsec_c2VjcmV0LXNpZ25pbmcta2V5");
        assert_eq!(config.webhooks.max_attempts, 3);
        // A legacy fleet secret still turns webhooks on; it signs nothing.
        assert!(config.webhooks.is_enabled());
        assert!(!Config::default().webhooks.is_enabled());
        assert!(!config.to_toml().contains("c2VjcmV0LXNpZ25pbmcta2V5"));
        assert!(!format!("{config:?}").contains("c2VjcmV0LXNpZ25pbmcta2V5"));
        assert!(format!("{config:?}").contains(REDACTED));
    }

    #[test]
    fn retry_policies_layer_and_are_checked() {
        let config = Config::load_from(
            None,
            &[("TY_RETRY__TRAIN__MAX_ATTEMPTS".into(), "9".into())],
            &[
                "retry.prepare.initial_delay_ms=250".to_string(),
                "retry.deliver.non_retryable=[\"auth\"]".to_string(),
            ],
        )
        .unwrap();
        assert_eq!(config.retry.train.max_attempts, 9);
        assert_eq!(config.retry.prepare.initial_delay_ms, 250);
        assert_eq!(config.retry.deliver.non_retryable, vec!["auth".to_string()]);
        assert_eq!(config.retry.prepare.max_attempts, 5);
        assert_eq!(
            parse_error_kind("bad_dataset"),
            Some(trainyard_proto::v1::ErrorKind::BadDataset)
        );
        assert_eq!(
            error_kind_name(trainyard_proto::v1::ErrorKind::DeadlineExceeded),
            "deadline_exceeded"
        );
        for bad in [
            "retry.train.max_attempts=0",
            "retry.train.multiplier=0.5",
            "retry.train.jitter=1.5",
            "retry.train.max_delay_ms=1",
            "retry.train.non_retryable=[\"nope\"]",
            "retry.train.nope=1",
        ] {
            let err = Config::load_from(None, &[], &[bad.to_string()]).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}");
        }
    }

    #[test]
    fn printed_config_loads_back() {
        let config = Config::default();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ty.toml");
        std::fs::write(&file, config.to_toml()).unwrap();
        let again = Config::load_from(Some(&file), &[], &[]).unwrap();
        assert_eq!(again.to_toml(), config.to_toml());
    }
}
