//! The services' own sections: `[coordinator]`, `[captioner]`, `[worker]`, `[uploader]`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC listen address. One that is not loopback needs TLS
    /// (`tls_cert_file`, `tls_key_file`) or `insecure_plaintext`.
    pub grpc_addr: String,
    /// Client tokens: `"sha256:<hex of the token's SHA-256>" = "<tenant>"`
    /// (`yard token new --tenant T` prints a token and its line). Empty by
    /// default: the coordinator refuses to start without one, and no token
    /// works unless listed. Set by environment, the table replaces the
    /// file's: `TY_COORDINATOR__TOKENS='{ "sha256:…" = "acme" }'`.
    pub tokens: BTreeMap<String, String>,
    /// Failed authentications one peer (a gRPC client's address; a NATS
    /// API caller's reply inbox) may make per minute before every call of
    /// it is refused (RESOURCE_EXHAUSTED) for the rest of the minute.
    /// 0 turns the limit off.
    pub auth_failures_per_minute: u32,
    /// PEM certificate chain gRPC serves TLS with (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Serve plain gRPC on a non-loopback address (behind a proxy that
    /// terminates TLS). Off: such an address without TLS is refused.
    pub insecure_plaintext: bool,
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
    /// Largest job spec accepted, in bytes (protobuf-encoded); a larger
    /// one is refused with INVALID_ARGUMENT. The spec is copied into the
    /// job record and every task, so it stays well under NATS' payload
    /// limit (and a quarter of the server's `max_payload` is the ceiling
    /// whatever this says).
    pub max_spec_bytes: usize,
    /// How long the download URLs `Get`, `List` and the `job.completed`
    /// webhook hand out stay good, in seconds (1 to 604800). The uploader
    /// signs the URLs of copies written with a job's own keys for as long:
    /// the coordinator sets this on every deliver task, so it is set here
    /// only.
    pub download_url_ttl_secs: u64,
    /// The coordinator's address as clients reach it, for the download
    /// URLs of a local artifact store (`https://yard.example.com:50051`).
    /// Unset: the gRPC listener's own address (`https://` with TLS).
    pub public_url: Option<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50051".into(),
            tokens: BTreeMap::new(),
            auth_failures_per_minute: 10,
            tls_cert_file: None,
            tls_key_file: None,
            insecure_plaintext: false,
            reconcile_interval_secs: 60,
            stale_after_secs: 120,
            validate_timeout_secs: 300,
            backlog_interval_secs: 5,
            max_spec_bytes: 64 << 10,
            download_url_ttl_secs: 3600,
            public_url: None,
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
    /// The caption backends (`[captioner.caption]`).
    pub caption: super::CaptionConfig,
    /// Video clips in datasets (`[captioner.video]`).
    pub video: VideoConfig,
}

impl Default for CaptionerConfig {
    fn default() -> Self {
        Self {
            work_dir: ".trainyard/work/captioner".into(),
            concurrency: 2,
            allow_private_urls: false,
            max_dataset_bytes: 4 << 30,
            max_files: 20_000,
            caption: super::CaptionConfig::default(),
            video: VideoConfig::default(),
        }
    }
}

/// `[captioner.video]`: how clips (`.mp4`, `.webm`, `.mov`) are probed and
/// which are too big to train on. A clip over any limit is dropped by name,
/// like an unreadable image. The defaults suit Wan and HunyuanVideo LoRAs,
/// which train on a few seconds (33–129 frames) at 480p–720p: a minute of
/// 60 fps 4K is far past anything they use.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VideoConfig {
    /// The `ffprobe` program (Debian's `ffmpeg` package); a bare name is
    /// looked up on PATH.
    pub ffprobe: PathBuf,
    /// The `ffmpeg` program: an animated gif in a dataset for a video model
    /// becomes an mp4 clip with it.
    pub ffmpeg: PathBuf,
    /// Seconds one `ffprobe` (or gif conversion) run may take before it is killed and the clip
    /// counted unreadable.
    pub probe_timeout_secs: u64,
    /// Longest clip, in seconds.
    pub max_clip_seconds: f64,
    /// Most frames in one clip.
    pub max_clip_frames: u64,
    /// Largest clip file, in bytes.
    pub max_clip_bytes: u64,
    /// Longest side of a clip's picture, in pixels.
    pub max_clip_side: u32,
    /// Decode every clip once (`ffmpeg -xerror … -f null`) after its probe:
    /// ffprobe reads only the container's header, so a clip with a sound
    /// header and corrupt picture data would otherwise pass and fail the
    /// trainer later. Off saves the decode time on trusted datasets.
    pub decode_check: bool,
    /// Seconds one clip's decode check may take before it is killed and
    /// the clip counted unreadable.
    pub decode_timeout_secs: u64,
}

impl Default for VideoConfig {
    fn default() -> Self {
        Self {
            ffprobe: "ffprobe".into(),
            ffmpeg: "ffmpeg".into(),
            probe_timeout_secs: 30,
            max_clip_seconds: 60.0,
            max_clip_frames: 3_600,
            max_clip_bytes: 1 << 30,
            max_clip_side: 3_840,
            decode_check: true,
            decode_timeout_secs: 120,
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
    /// Bytes of trainer output one job may publish as `log` events, over
    /// all its attempts (the train stage's claim in `ty_claims` carries the
    /// count from run to run; a worker lost between two heartbeats may
    /// leave up to one heartbeat's worth uncounted); past it one event per
    /// run says the budget is spent and the rest is kept only in the
    /// attempts' log artifacts. 0: no budget.
    pub log_event_budget_bytes: u64,
    /// Bytes a second of trainer output published as `log` events (bursts
    /// of a few seconds' worth pass); lines over it are dropped and
    /// counted in a note. 0: no rate limit.
    pub log_event_bytes_per_sec: u64,
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
            log_event_budget_bytes: 8 << 20,
            log_event_bytes_per_sec: 64 << 10,
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
