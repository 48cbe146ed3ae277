//! SimpleTuner (bghira/SimpleTuner), the trainers reference section 4.
//!
//! A run is `accelerate launch … <site-packages>/simpletuner/train.py` with
//! `CONFIG_BACKEND=json`: the options go in `config.json` (the CLI flag
//! names), the data in `multidatabackend.json` (one image backend with
//! `textfile` captions plus the `text_embeds` backend SimpleTuner requires;
//! for Wan, a video dataset for the clips, [`video`]).
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
    BackendError, Extra, ExtraType, FoundCheckpoint, Launch, OutputParser, SettingProblem,
    StopRequest, Tools, TrainInputs, TrainerBackend, typed_extras,
};
use crate::common::{self, Signature, Signatures, classify_with, unclassified};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use trainyard_core::process::CommandSpec;
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{ErrorKind, JobError, TrainingSettings, extra_value::Kind};

mod model;
mod output;
pub mod video;

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

/// Extras that go to the video dataset's `video` block, not `config.json`
/// (Wan only, [`video`]).
pub const VIDEO_EXTRAS: &[(&str, ExtraType)] = &[("num_frames", ExtraType::Int)];

/// Every extra this backend takes.
fn all_extras() -> Vec<(&'static str, ExtraType)> {
    EXTRAS.iter().chain(VIDEO_EXTRAS).copied().collect()
}

/// The `num_frames` extra, when given.
fn num_frames_extra(settings: &TrainingSettings) -> Option<i64> {
    match settings.extras.get("num_frames")?.kind.as_ref()? {
        Kind::Int(n) => Some(*n),
        _ => None,
    }
}

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

/// An image or video dataset (`documentation/DATALOADER.md`).
#[derive(Serialize)]
struct MediaBackend<'a> {
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
    /// A video dataset's frame counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    video: Option<video::VideoBlock>,
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

fn to_value(value: &impl Serialize) -> Result<Value, BackendError> {
    serde_json::to_value(value).map_err(|e| BackendError::InvalidSettings(e.to_string()))
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
        if let Err(bad) = typed_extras(NAME, &settings.extras, &all_extras()) {
            problems.extend(bad);
        }
        if let Some(n) = num_frames_extra(settings) {
            if !video::trains_video(family) {
                problems.push(SettingProblem::extra(
                    "num_frames",
                    format!("{NAME} trains {family} on images only; only wan takes num_frames"),
                ));
            } else if n < 1 {
                // factory.py refuses `num_frames` below 1.
                problems.push(SettingProblem::extra("num_frames", "must be at least 1"));
            }
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

    fn trains_video(&self, family: ModelFamily) -> bool {
        video::trains_video(family)
    }

    fn clip_need(
        &self,
        settings: &TrainingSettings,
        family: ModelFamily,
        clip_frames: &[u64],
    ) -> Option<crate::ClipNeed> {
        video::trains_video(family)
            .then(|| video::need(num_frames_extra(settings), clip_frames))
            .flatten()
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
        options.extend(typed_extras(NAME, &s.extras, &all_extras()).unwrap_or_default());
        for (key, _) in VIDEO_EXTRAS {
            options.remove(*key);
        }
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
        let layout = video::layout(inputs, num_frames_extra(s))?;
        let media = |id, dataset_type, dir, cache_dir_vae, video| MediaBackend {
            id,
            kind: "local",
            dataset_type,
            instance_data_dir: dir,
            caption_strategy: "textfile",
            resolution: s.resolution,
            resolution_type: "pixel_area",
            repeats: s.repeats.max(1) - 1,
            crop: false,
            cache_dir_vae,
            metadata_backend: "discovery",
            video,
        };
        let mut backends: Vec<Value> = Vec::new();
        if let Some(dir) = &layout.images {
            backends.push(to_value(&media(
                "subject",
                "image",
                dir,
                cache.join("vae"),
                None,
            ))?);
        }
        if let Some((dir, block)) = &layout.clips {
            backends.push(to_value(&media(
                "clips",
                "video",
                dir,
                cache.join("vae-clips"),
                Some(block.clone()),
            ))?);
        }
        backends.push(to_value(&TextEmbedsBackend {
            id: "text-embeds",
            kind: "local",
            dataset_type: "text_embeds",
            default: true,
            cache_dir: cache.join("text"),
        })?);
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
            links: layout.links,
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
        Box::new(output::Parser::new(inputs.settings.batch_size.max(1)))
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
