//! SimpleTuner (bghira/SimpleTuner), the trainers reference section 4.
//!
//! A run is `accelerate launch … <site-packages>/simpletuner/train.py` with
//! `CONFIG_BACKEND=json`: the options go in `config.json` (the CLI flag
//! names), the data in `multidatabackend.json` (one image backend with
//! `textfile` captions plus the `text_embeds` backend SimpleTuner requires).
//! The `simpletuner train` wrapper is never used: it starts its child in a
//! new session and orphans it on SIGTERM.
//!
//! The base model is the diffusers folder, with the `variant` its files
//! need and the VAE taken from that folder (`model`): nothing is fetched
//! from the Hub.
//!
//! Progress comes two ways: the tqdm bar on stderr (`Epoch 1/5, Steps: …`,
//! absolute steps) and the JSON events SimpleTuner POSTs to a `raw`
//! webhook, which the worker receives on loopback. Checkpoints are
//! `output_dir/checkpoint-<step>/`, complete once the `.guard` file that
//! SimpleTuner writes last is there; of the save's events only
//! `training.checkpoint` comes after it (`checkpoint_save completed` comes
//! before the sampler state, the manifest and the guard). A save is
//! requested by raising `manual_checkpoint` in the accelerate signal file;
//! training goes on.

use super::{
    BackendError, Extra, ExtraType, FoundCheckpoint, Launch, LineEvent, OutputParser,
    SettingProblem, StopRequest, Tools, TrainInputs, TrainerBackend, typed_extras,
};
use crate::common::{self, Signature, Signatures, classify_with, unclassified};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::LazyLock;
use trainyard_core::process::CommandSpec;
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{ErrorKind, JobError, TrainingSettings, extra_value::Kind};

mod model;

const NAME: &str = "simpletuner";

/// Extras: real SimpleTuner option names (`documentation/OPTIONS.md`) with
/// their types. They override the defaults below and go into `config.json`.
pub const EXTRAS: &[(&str, ExtraType)] = &[
    ("optimizer", ExtraType::Text),
    ("lr_scheduler", ExtraType::Text),
    ("lr_warmup_steps", ExtraType::Int),
    ("mixed_precision", ExtraType::Text),
    ("gradient_checkpointing", ExtraType::Flag),
    ("gradient_accumulation_steps", ExtraType::Int),
    ("base_model_precision", ExtraType::Text),
    ("text_encoder_1_precision", ExtraType::Text),
    ("quantize_via", ExtraType::Text),
    ("model_flavour", ExtraType::Text),
    ("flow_schedule_shift", ExtraType::Float),
    ("flow_schedule_auto_shift", ExtraType::Flag),
    ("flux_guidance_value", ExtraType::Float),
    ("max_grad_norm", ExtraType::Float),
    ("caption_dropout_probability", ExtraType::Float),
    ("noise_offset", ExtraType::Float),
    ("attention_mechanism", ExtraType::Text),
    ("offload_during_startup", ExtraType::Flag),
    ("vae_batch_size", ExtraType::Int),
    ("use_ema", ExtraType::Flag),
    ("checkpoints_total_limit", ExtraType::Int),
    ("checkpointing_use_tempdir", ExtraType::Flag),
    ("validation_disable", ExtraType::Flag),
];

/// `mixed_precision` is also accelerate's launch flag, so it is checked.
const MIXED_PRECISION: &[&str] = &["bf16", "fp16", "fp8", "no"];

/// Options a run gets unless an extra says otherwise.
fn default_options() -> BTreeMap<String, Extra> {
    let text = |s: &str| Extra::Text(s.to_string());
    BTreeMap::from([
        ("optimizer".into(), text("adamw_bf16")),
        ("lr_scheduler".into(), text("constant")),
        ("mixed_precision".into(), text("bf16")),
        ("gradient_checkpointing".into(), Extra::Flag(true)),
        ("validation_disable".into(), Extra::Flag(true)),
        // Old checkpoints are pruned before a save; keep a margin so the
        // worker can finish uploading the previous one.
        ("checkpoints_total_limit".into(), Extra::Int(3)),
    ])
}

/// `--model_family` for the families this backend trains.
fn model_family(family: ModelFamily) -> Option<&'static str> {
    match family {
        ModelFamily::Flux => Some("flux"),
        ModelFamily::Sdxl => Some("sdxl"),
        ModelFamily::Wan => Some("wan"),
        ModelFamily::QwenImage => Some("qwen_image"),
        _ => None,
    }
}

pub struct SimpleTuner {
    accelerate: PathBuf,
    dir: PathBuf,
}

impl SimpleTuner {
    pub fn new(tools: &Tools) -> Self {
        Self {
            accelerate: tools.trainers.accelerate.clone(),
            dir: tools.trainers.simpletuner_dir.clone(),
        }
    }
}

/// `config.json`: CLI flag names as keys.
#[derive(Serialize)]
struct Config<'a> {
    model_family: &'static str,
    model_type: &'static str,
    pretrained_model_name_or_path: &'a Path,
    /// The weight files' infix (`fp16`) when the folder lacks the plain ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    /// The base model's own VAE: SimpleTuner's default for SDXL is a Hub id.
    pretrained_vae_model_name_or_path: &'a Path,
    output_dir: &'a Path,
    data_backend_config: PathBuf,
    max_train_steps: u32,
    /// 0: the step count decides.
    num_train_epochs: u32,
    #[serde(skip_serializing_if = "is_zero")]
    checkpoint_step_interval: u32,
    resume_from_checkpoint: &'static str,
    train_batch_size: u32,
    learning_rate: f64,
    lora_rank: u32,
    lora_alpha: f64,
    seed: u64,
    report_to: &'static str,
    disable_benchmark: bool,
    /// A JSON list, as `--webhook_config` takes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_config: Option<String>,
    #[serde(flatten)]
    options: BTreeMap<String, Extra>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct Webhook<'a> {
    webhook_type: &'static str,
    callback_url: &'a str,
    log_level: &'static str,
}

/// The image dataset (`documentation/DATALOADER.md`).
#[derive(Serialize)]
struct ImageBackend<'a> {
    id: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    dataset_type: &'static str,
    instance_data_dir: &'a Path,
    caption_strategy: &'static str,
    resolution: u32,
    resolution_type: &'static str,
    /// SimpleTuner counts extra passes: 0 means each image once.
    repeats: u32,
    crop: bool,
    cache_dir_vae: PathBuf,
    metadata_backend: &'static str,
}

/// The text-embedding cache SimpleTuner refuses to start without.
#[derive(Serialize)]
struct TextEmbedsBackend {
    id: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    dataset_type: &'static str,
    default: bool,
    cache_dir: PathBuf,
}

/// The accelerate signal file's body (`train.py::_build_signal_consumer`
/// acts on an increase of the count).
#[derive(Serialize, Deserialize)]
struct Signals {
    #[serde(skip_serializing_if = "Option::is_none")]
    manual_checkpoint: Option<u32>,
}

fn signal_file(inputs: &TrainInputs) -> PathBuf {
    inputs.run_dir.join("signal.json")
}

fn utf8(path: &Path) -> Result<&str, BackendError> {
    path.to_str().ok_or_else(|| {
        BackendError::InvalidSettings(format!("{}: not a UTF-8 path", path.display()))
    })
}

fn json(value: &impl Serialize) -> Result<Vec<u8>, BackendError> {
    serde_json::to_vec_pretty(value).map_err(|e| BackendError::InvalidSettings(e.to_string()))
}

impl TrainerBackend for SimpleTuner {
    fn name(&self) -> &'static str {
        NAME
    }

    fn families(&self) -> &'static [ModelFamily] {
        common::DIFFUSERS_FAMILIES
    }

    fn parts(&self, _family: ModelFamily) -> &'static [&'static str] {
        common::DIFFUSERS_PARTS
    }

    fn check(&self, settings: &TrainingSettings, family: ModelFamily) -> Vec<SettingProblem> {
        let mut problems = Vec::new();
        if model_family(family).is_none() {
            problems.push(SettingProblem::new(
                "base_model",
                format!("{NAME} does not train {family} models"),
            ));
        }
        if let Err(bad) = typed_extras(NAME, &settings.extras, EXTRAS) {
            problems.extend(bad);
        }
        if let Some(Kind::Text(mp)) = settings
            .extras
            .get("mixed_precision")
            .and_then(|v| v.kind.as_ref())
            && !MIXED_PRECISION.contains(&mp.as_str())
        {
            problems.push(SettingProblem::extra(
                "mixed_precision",
                format!("{mp:?} is not one of {}", MIXED_PRECISION.join(", ")),
            ));
        }
        problems
    }

    fn wants_webhook(&self) -> bool {
        true
    }

    fn render(&self, inputs: &TrainInputs) -> Result<Launch, BackendError> {
        let s = &inputs.settings;
        let problems = self.check(s, inputs.model.family);
        if !problems.is_empty() {
            return Err(BackendError::invalid(&problems));
        }
        let family = model_family(inputs.model.family).unwrap_or_default();
        let mut options = default_options();
        options.extend(typed_extras(NAME, &s.extras, EXTRAS).unwrap_or_default());
        let mixed_precision = match options.get("mixed_precision") {
            Some(Extra::Text(mp)) => mp.clone(),
            _ => "bf16".into(),
        };
        let webhook_config = match &inputs.webhook_url {
            Some(url) => Some(
                serde_json::to_string(&[Webhook {
                    webhook_type: "raw",
                    callback_url: url,
                    log_level: "info",
                }])
                .map_err(|e| BackendError::InvalidSettings(e.to_string()))?,
            ),
            None => None,
        };
        let config_path = inputs.run_dir.join("config.json");
        let backends_path = inputs.run_dir.join("multidatabackend.json");
        let base = inputs.model.part(part::DIFFUSERS)?;
        let config = Config {
            model_family: family,
            model_type: "lora",
            pretrained_model_name_or_path: base,
            variant: model::variant(base, inputs.model.family),
            pretrained_vae_model_name_or_path: base,
            output_dir: &inputs.output_dir,
            data_backend_config: backends_path.clone(),
            max_train_steps: s.steps,
            num_train_epochs: 0,
            checkpoint_step_interval: s.save_every,
            resume_from_checkpoint: "latest",
            train_batch_size: s.batch_size.max(1),
            learning_rate: s.learning_rate,
            lora_rank: s.rank,
            lora_alpha: if s.alpha > 0.0 {
                s.alpha
            } else {
                f64::from(s.rank)
            },
            seed: s.seed,
            report_to: "none",
            disable_benchmark: true,
            webhook_config,
            options,
        };
        let cache = inputs.run_dir.join("cache");
        let backends = (
            ImageBackend {
                id: "subject",
                kind: "local",
                dataset_type: "image",
                instance_data_dir: &inputs.dataset_dir,
                caption_strategy: "textfile",
                resolution: s.resolution,
                resolution_type: "pixel_area",
                repeats: s.repeats.max(1) - 1,
                crop: false,
                cache_dir_vae: cache.join("vae"),
                metadata_backend: "discovery",
            },
            TextEmbedsBackend {
                id: "text-embeds",
                kind: "local",
                dataset_type: "text_embeds",
                default: true,
                cache_dir: cache.join("text"),
            },
        );
        // A fresh signal file: the trainer acts on counts above the ones it
        // has seen, starting from zero, so a stale count must not carry over.
        let signals = Signals {
            manual_checkpoint: None,
        };
        let env = [
            ("CONFIG_BACKEND", "json"),
            ("CONFIG_PATH", utf8(&config_path)?),
            ("SIMPLETUNER_JOB_ID", inputs.job_id.as_str()),
            (
                "SIMPLETUNER_ACCELERATE_SIGNAL_FILE",
                utf8(&signal_file(inputs))?,
            ),
            ("SIMPLETUNER_LOG_LEVEL", "INFO"),
            ("TOKENIZERS_PARALLELISM", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(inputs.slot.env())
        .collect();
        Ok(Launch {
            files: vec![
                (config_path.clone(), json(&config)?),
                (backends_path, json(&backends)?),
                (signal_file(inputs), json(&signals)?),
            ],
            command: CommandSpec {
                program: self.accelerate.clone(),
                args: vec![
                    "launch".into(),
                    format!("--mixed_precision={mixed_precision}").into(),
                    "--num_processes=1".into(),
                    "--num_machines=1".into(),
                    "--dynamo_backend=no".into(),
                    self.dir.join("train.py").into(),
                ],
                cwd: inputs.run_dir.clone(),
                env,
            },
        })
    }

    fn parser(&self, inputs: &TrainInputs) -> Box<dyn OutputParser> {
        Box::new(Parser {
            batch_size: inputs.settings.batch_size.max(1),
            resumed: None,
            saved: None,
        })
    }

    fn latest_checkpoint(&self, inputs: &TrainInputs) -> Option<FoundCheckpoint> {
        let (step, dir) = std::fs::read_dir(&inputs.output_dir)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().to_str()?.to_string();
                // `checkpoint-<step>` only: not `-tmp` (being written) nor `-rolling`.
                let step = name.strip_prefix("checkpoint-")?.parse::<u32>().ok()?;
                entry
                    .path()
                    .join(".guard")
                    .is_file()
                    .then_some((step, name))
            })
            .max_by_key(|(step, _)| *step)?;
        let mut files = Vec::new();
        collect_files(&inputs.output_dir, Path::new(&dir), &mut files).ok()?;
        files.sort();
        Some(FoundCheckpoint { step, files })
    }

    /// One more than the count in the signal file. SimpleTuner saves once
    /// per rise above the highest count it has read, and the file holds the
    /// last count written to this run (render starts it empty), so each
    /// request rises, whichever worker writes it.
    fn stop_request(&self, inputs: &TrainInputs) -> StopRequest {
        let path = signal_file(inputs);
        let last = std::fs::read(&path)
            .ok()
            .and_then(|body| serde_json::from_slice::<Signals>(&body).ok())
            .and_then(|signals| signals.manual_checkpoint)
            .unwrap_or(0);
        let body = serde_json::to_vec(&Signals {
            manual_checkpoint: Some(last.saturating_add(1)),
        })
        .unwrap_or_default();
        StopRequest::SaveAndContinue { path, body }
    }

    fn final_adapter(&self, inputs: &TrainInputs) -> Option<PathBuf> {
        let path = inputs.output_dir.join("pytorch_lora_weights.safetensors");
        path.is_file().then_some(path)
    }

    fn classify(&self, status: ExitStatus, tail: &[String]) -> JobError {
        classify(status, tail)
    }
}

/// Every file under `root/rel`, relative to `root`.
fn collect_files(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let path = rel.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

static EPOCH_DESC: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Epoch (\d+)/(\d+),? Steps$").expect("epoch regex"));
static STEPS_COMPLETED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s*- Steps completed: (\d+)\s*$").expect("steps regex"));
static RESUMING: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"Resuming from global_step (\d+)\.").expect("resume regex"));
static RESUMED_EVENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Resumed from global_step (\d+)").expect("resumed regex"));
static CHECKPOINT_DIR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"checkpoint-(\d+)/?$").expect("checkpoint regex"));

struct Parser {
    batch_size: u32,
    /// Resume and save hints arrive from the log and the webhook alike;
    /// each is reported once per step.
    resumed: Option<u32>,
    saved: Option<u32>,
}

impl Parser {
    fn resumed(&mut self, step: u32) -> Vec<LineEvent> {
        if step == 0 || self.resumed == Some(step) {
            return Vec::new();
        }
        self.resumed = Some(step);
        vec![LineEvent::Resumed { step }]
    }

    fn saved(&mut self, step: Option<u32>) -> Vec<LineEvent> {
        if step.is_some() && self.saved == step {
            return Vec::new();
        }
        self.saved = step.or(self.saved);
        vec![LineEvent::Saved { step }]
    }
}

fn capture_u32(regex: &Regex, text: &str) -> Option<u32> {
    regex.captures(text)?.get(1)?.as_str().parse().ok()
}

impl OutputParser for Parser {
    fn line(&mut self, line: &str) -> Vec<LineEvent> {
        if let Some(bar) = common::tqdm(line)
            && let Some(desc) = EPOCH_DESC.captures(bar.desc)
        {
            return vec![LineEvent::Progress {
                step: bar.n,
                total: bar.total,
                loss: common::postfix_value(bar.postfix, "step_loss").map(|v| v as f32),
                lr: common::postfix_value(bar.postfix, "lr"),
                samples_per_sec: bar.it_per_sec.map(|r| r * self.batch_size as f32),
                epoch: desc[1].parse().ok(),
            }];
        }
        if let Some(step) = capture_u32(&STEPS_COMPLETED, line).or(capture_u32(&RESUMING, line)) {
            return self.resumed(step);
        }
        Vec::new()
    }

    /// The `raw` webhook bodies (`helpers/webhooks/events.py`): the event
    /// dict plus `type`, `job_id`, `severity` and `timestamp`. Failures
    /// (`error`, `training.status` failed) carry no event: `classify`
    /// reads the same failure from the output lines.
    fn webhook(&mut self, body: &Value) -> Vec<LineEvent> {
        let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
        match body.get("type").and_then(Value::as_str) {
            Some("training.status") => {
                let Some(progress) = body.get("progress") else {
                    return Vec::new();
                };
                let (Some(step), Some(total)) = (
                    progress.get("current").and_then(Value::as_f64),
                    progress.get("total").and_then(Value::as_f64),
                ) else {
                    return Vec::new();
                };
                let step = step as u32;
                let metrics = progress.get("metrics");
                let metric = |key: &str| metrics.and_then(|m| m.get(key)).and_then(Value::as_f64);
                // The startup status reports the loss accumulator, still 0.
                let startup = text(progress, "label").as_deref() == Some("Training initialisation");
                let mut events = vec![LineEvent::Progress {
                    step,
                    total: total as u32,
                    loss: metric("loss").filter(|_| !startup).map(|v| v as f32),
                    lr: metric("learning_rate"),
                    samples_per_sec: None,
                    epoch: metric("epoch").map(|v| v as f32),
                }];
                if let Some(value) = metric("grad_norm") {
                    events.push(LineEvent::Metric {
                        name: "grad_norm".into(),
                        value,
                        step,
                    });
                }
                events
            }
            Some("lifecycle.stage") => {
                let Some(stage) = body.get("stage") else {
                    return Vec::new();
                };
                let message = text(body, "message").unwrap_or_default();
                match (
                    text(stage, "key").as_deref(),
                    text(stage, "status").as_deref(),
                ) {
                    // `checkpoint_save completed` comes before the sampler
                    // state, the manifest and `.guard`: not saved yet.
                    (Some("training_complete"), Some("completed")) => vec![LineEvent::Done],
                    (Some("init_resume_checkpoint"), Some("completed")) => {
                        match capture_u32(&RESUMED_EVENT, &message) {
                            Some(step) => self.resumed(step),
                            None => Vec::new(),
                        }
                    }
                    _ => Vec::new(),
                }
            }
            // Sent once the folder is complete and renamed into place.
            Some("training.checkpoint") => {
                let path = body
                    .get("checkpoint")
                    .and_then(|c| text(c, "path"))
                    .unwrap_or_default();
                self.saved(capture_u32(&CHECKPOINT_DIR, &path))
            }
            _ => Vec::new(),
        }
    }
}

/// SimpleTuner's own failures, checked in order before the shared table.
/// An OOM comes before the circuit breaker: SimpleTuner trips the breaker
/// on any CUDA error, out-of-memory included (`gpu_circuit_breaker.py`).
static SIGNATURES: Signatures = Signatures::new(&[
    Signature {
        pattern: r"Non-finite training loss detected",
        kind: ErrorKind::Trainer,
        retryable: false,
        what: "training diverged (check the data and the learning rate)",
    },
    Signature {
        pattern: r"OutOfMemoryError|CUDA out of memory",
        kind: ErrorKind::Oom,
        retryable: true,
        what: "out of GPU memory",
    },
    Signature {
        pattern: r"GPU circuit breaker (?:triggered|OPEN)",
        kind: ErrorKind::Trainer,
        retryable: true,
        what: "GPU device error",
    },
    Signature {
        pattern: r"Failed to load data backends|no images detected in dataset|No images were discovered by the bucket manager|Dataset produced no usable samples",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "no usable training data",
    },
    Signature {
        pattern: r"Must provide at least one text embed backend|Backend configuration must have a non-empty 'id' field",
        kind: ErrorKind::Internal,
        retryable: false,
        what: "rendered data backend config rejected",
    },
    Signature {
        pattern: r"Error no file named .+ found in directory|HFValidationError: Repo id must be",
        kind: ErrorKind::Model,
        retryable: false,
        what: "base model not readable (a file the trainer loads is missing from the base_model's files)",
    },
    Signature {
        pattern: r"We couldn't connect to '[^']*' to load|LocalEntryNotFoundError|OfflineModeIsEnabled",
        kind: ErrorKind::Model,
        retryable: false,
        what: "the trainer asked the Hub for a model file the worker did not fetch (every model file must come from base_model's parts)",
    },
]);

fn classify(status: ExitStatus, tail: &[String]) -> JobError {
    classify_with(&SIGNATURES, status, tail).unwrap_or_else(|| unclassified(NAME, status, tail))
}

#[cfg(test)]
mod tests;
