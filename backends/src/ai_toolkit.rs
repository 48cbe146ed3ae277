//! ostris/ai-toolkit, the trainers reference section 5.
//!
//! A run is `python run.py <run_dir>/job.yaml` in the ai-toolkit checkout,
//! with one `sd_trainer` process rendered from structs. Everything lands in
//! `<training_folder>/<name>/`: `<name>_<step:09>.safetensors` per save,
//! `optimizer.pt` (overwritten at every save, after the weights) and
//! `<name>.safetensors` at the end. Resuming needs no flag: ai-toolkit loads
//! the newest `<name>*.safetensors` it finds, reads the step from its
//! metadata, and reloads `optimizer.pt`, so a restored checkpoint is just
//! those two files put back in place.
//!
//! The base model is the diffusers folder, except for SDXL: ai-toolkit
//! loads a folder with `from_pretrained` and no `variant` (it has no option
//! for one), so an SDXL folder fetched with only its fp16 files cannot
//! load; the single-file checkpoint goes through `from_single_file`
//! instead. diffusers then reads the pipeline's config files (a few KB) of
//! `stabilityai/stable-diffusion-xl-base-1.0` from the Hub or the HF cache.
//!
//! Wan trains on video clips and images from the dataset folder, with
//! `num_frames` fitted to the clips ([`video`]).
//!
//! ai-toolkit cannot be asked to save: SIGINT stops it with `Job stopped`
//! and exit status 0, without saving.

use super::{
    BackendError, Extra, ExtraType, FoundCheckpoint, Launch, OutputParser, SettingProblem,
    StopRequest, Tools, TrainInputs, TrainerBackend, classify_common, error, typed_extras,
};
use crate::common::{self, Signature, Signatures, unclassified};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::LazyLock;
use trainyard_core::process::CommandSpec;
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{ErrorKind, JobError, TrainingSettings};

mod output;
pub mod video;

const NAME: &str = "ai-toolkit";

/// Which section of the process config an extra belongs to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Section {
    Train,
    Model,
    Dataset,
    Save,
}

/// Extras: real ai-toolkit option names (`toolkit/config_modules.py`), the
/// section they go in and their type.
const OPTIONS: &[(&str, Section, ExtraType)] = &[
    ("optimizer", Section::Train, ExtraType::Text),
    ("lr_scheduler", Section::Train, ExtraType::Text),
    ("noise_scheduler", Section::Train, ExtraType::Text),
    ("timestep_type", Section::Train, ExtraType::Text),
    ("dtype", Section::Train, ExtraType::Text),
    ("gradient_checkpointing", Section::Train, ExtraType::Flag),
    (
        "gradient_accumulation_steps",
        Section::Train,
        ExtraType::Int,
    ),
    ("max_grad_norm", Section::Train, ExtraType::Float),
    ("cache_text_embeddings", Section::Train, ExtraType::Flag),
    ("unload_text_encoder", Section::Train, ExtraType::Flag),
    ("linear_timesteps", Section::Train, ExtraType::Flag),
    ("quantize", Section::Model, ExtraType::Flag),
    ("quantize_te", Section::Model, ExtraType::Flag),
    ("qtype", Section::Model, ExtraType::Text),
    ("low_vram", Section::Model, ExtraType::Flag),
    ("caption_dropout_rate", Section::Dataset, ExtraType::Float),
    ("shuffle_tokens", Section::Dataset, ExtraType::Flag),
    ("cache_latents_to_disk", Section::Dataset, ExtraType::Flag),
    // Wan only (`video::VIDEO_OPTIONS`).
    ("num_frames", Section::Dataset, ExtraType::Int),
    ("shrink_video_to_frames", Section::Dataset, ExtraType::Flag),
    ("max_step_saves_to_keep", Section::Save, ExtraType::Int),
];

/// The `(key, type)` allow-list `typed_extras` takes.
static EXTRAS: LazyLock<Vec<(&'static str, ExtraType)>> =
    LazyLock::new(|| OPTIONS.iter().map(|(k, _, t)| (*k, *t)).collect());

pub struct AiToolkit {
    python: PathBuf,
    dir: PathBuf,
}

impl AiToolkit {
    pub fn new(tools: &Tools) -> Self {
        Self {
            python: tools.trainers.python.clone(),
            dir: tools.trainers.ai_toolkit_dir.clone(),
        }
    }
}

/// The job file (`config/examples/train_lora_flux_24gb.yaml`).
#[derive(Serialize)]
struct JobFile<'a> {
    job: &'static str,
    config: JobConfig<'a>,
    meta: Meta,
}

#[derive(Serialize)]
struct JobConfig<'a> {
    /// Folder and file stem of everything the run writes.
    name: &'a str,
    process: [Process<'a>; 1],
}

#[derive(Serialize)]
struct Process<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    training_folder: &'a Path,
    device: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trigger_word: Option<&'a str>,
    network: Network,
    save: Save,
    datasets: [Dataset<'a>; 1],
    train: Train,
    model: Model<'a>,
}

#[derive(Serialize)]
struct Network {
    #[serde(rename = "type")]
    kind: &'static str,
    linear: u32,
    linear_alpha: f64,
}

#[derive(Serialize)]
struct Save {
    dtype: &'static str,
    /// 0: no intermediate saves.
    save_every: u32,
    #[serde(flatten)]
    options: BTreeMap<String, Extra>,
}

#[derive(Serialize)]
struct Dataset<'a> {
    folder_path: &'a Path,
    caption_ext: &'static str,
    resolution: [u32; 1],
    num_repeats: u32,
    #[serde(flatten)]
    options: BTreeMap<String, Extra>,
}

#[derive(Serialize)]
struct Train {
    batch_size: u32,
    steps: u32,
    lr: f64,
    train_unet: bool,
    train_text_encoder: bool,
    disable_sampling: bool,
    #[serde(flatten)]
    options: BTreeMap<String, Extra>,
}

#[derive(Serialize)]
struct Model<'a> {
    name_or_path: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_flux: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_xl: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arch: Option<&'static str>,
    #[serde(flatten)]
    options: BTreeMap<String, Extra>,
}

#[derive(Serialize)]
struct Meta {
    name: &'static str,
    version: &'static str,
}

/// The model parts a family loads: SDXL as one checkpoint file.
fn model_parts(family: ModelFamily) -> &'static [&'static str] {
    match family {
        ModelFamily::Sdxl => &[part::CHECKPOINT],
        _ => common::DIFFUSERS_PARTS,
    }
}

/// The model block's family flag: `is_flux`/`is_xl`, or `arch`.
fn model_flag(family: ModelFamily) -> Option<(Option<bool>, Option<bool>, Option<&'static str>)> {
    match family {
        ModelFamily::Flux => Some((Some(true), None, None)),
        ModelFamily::Sdxl => Some((None, Some(true), None)),
        ModelFamily::Wan => Some((None, None, Some("wan21"))),
        ModelFamily::QwenImage => Some((None, None, Some("qwen_image"))),
        _ => None,
    }
}

/// Defaults per section, overridden by extras.
fn defaults(family: ModelFamily, section: Section) -> BTreeMap<String, Extra> {
    let text = |s: &str| Extra::Text(s.to_string());
    let entries: Vec<(&str, Extra)> = match section {
        Section::Train => vec![
            ("gradient_checkpointing", Extra::Flag(true)),
            (
                "noise_scheduler",
                text(if family == ModelFamily::Sdxl {
                    "ddpm"
                } else {
                    "flowmatch"
                }),
            ),
            ("optimizer", text("adamw8bit")),
            ("dtype", text("bf16")),
        ],
        // 8-bit base weights for the large transformers, as the examples do.
        Section::Model => vec![("quantize", Extra::Flag(family != ModelFamily::Sdxl))],
        Section::Dataset => vec![("cache_latents_to_disk", Extra::Flag(true))],
        // Older step files are pruned; keep a margin for the upload.
        Section::Save => vec![("max_step_saves_to_keep", Extra::Int(3))],
    };
    entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn section_options(
    family: ModelFamily,
    section: Section,
    extras: &BTreeMap<String, Extra>,
) -> BTreeMap<String, Extra> {
    let mut options = defaults(family, section);
    for (key, value) in extras {
        if OPTIONS.iter().any(|(k, s, _)| k == key && *s == section) {
            options.insert(key.clone(), value.clone());
        }
    }
    options
}

/// `<output_dir>/<name>`, ai-toolkit's `save_root`.
fn save_root(inputs: &TrainInputs) -> PathBuf {
    inputs.output_dir.join(&inputs.output_name)
}

impl TrainerBackend for AiToolkit {
    fn name(&self) -> &'static str {
        NAME
    }

    fn families(&self) -> &'static [ModelFamily] {
        common::DIFFUSERS_FAMILIES
    }

    fn parts(&self, family: ModelFamily) -> &'static [&'static str] {
        model_parts(family)
    }

    fn check(&self, settings: &TrainingSettings, family: ModelFamily) -> Vec<SettingProblem> {
        let mut problems = Vec::new();
        if model_flag(family).is_none() {
            problems.push(SettingProblem::new(
                "base_model",
                format!("{NAME} does not train {family} models"),
            ));
        }
        match typed_extras(NAME, &settings.extras, &EXTRAS) {
            Ok(extras) => problems.extend(video::problems(&extras, family)),
            Err(bad) => problems.extend(bad),
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
        let extras = typed_extras(NAME, &settings.extras, &EXTRAS).ok()?;
        video::trains_video(family)
            .then(|| video::need(&extras, clip_frames))
            .flatten()
    }

    fn render(&self, inputs: &TrainInputs) -> Result<Launch, BackendError> {
        let s = &inputs.settings;
        let family = inputs.model.family;
        let problems = self.check(s, family);
        if !problems.is_empty() {
            return Err(BackendError::invalid(&problems));
        }
        let (is_flux, is_xl, arch) = model_flag(family).unwrap_or_default();
        if inputs.output_name.is_empty() || inputs.output_name.contains('/') {
            return Err(BackendError::InvalidSettings(format!(
                "output name {:?} is not a file stem",
                inputs.output_name
            )));
        }
        let extras = typed_extras(NAME, &s.extras, &EXTRAS).unwrap_or_default();
        let options = |section| section_options(family, section, &extras);
        let clips = common::video::clips_in(&inputs.dataset_dir);
        if !clips.is_empty() && !video::trains_video(family) {
            return Err(common::video::images_only(clips.len(), NAME, family));
        }
        let frames: Vec<u64> = clips.iter().map(|(_, frames)| *frames).collect();
        let mut dataset_options = options(Section::Dataset);
        dataset_options.extend(video::dataset_options(&extras, &frames));
        let job = JobFile {
            job: "extension",
            config: JobConfig {
                name: &inputs.output_name,
                process: [Process {
                    kind: "sd_trainer",
                    training_folder: &inputs.output_dir,
                    device: "cuda:0",
                    trigger_word: (!inputs.trigger_word.is_empty())
                        .then_some(inputs.trigger_word.as_str()),
                    network: Network {
                        kind: "lora",
                        linear: s.rank,
                        linear_alpha: if s.alpha > 0.0 {
                            s.alpha
                        } else {
                            f64::from(s.rank)
                        },
                    },
                    save: Save {
                        dtype: "float16",
                        save_every: s.save_every,
                        options: options(Section::Save),
                    },
                    datasets: [Dataset {
                        folder_path: &inputs.dataset_dir,
                        caption_ext: "txt",
                        resolution: [s.resolution],
                        num_repeats: s.repeats.max(1),
                        options: dataset_options,
                    }],
                    train: Train {
                        batch_size: s.batch_size.max(1),
                        steps: s.steps,
                        lr: s.learning_rate,
                        train_unet: true,
                        train_text_encoder: false,
                        disable_sampling: true,
                        options: options(Section::Train),
                    },
                    model: Model {
                        name_or_path: inputs.model.part(model_parts(family)[0])?,
                        is_flux,
                        is_xl,
                        arch,
                        options: options(Section::Model),
                    },
                }],
            },
            meta: Meta {
                name: "[name]",
                version: "1.0",
            },
        };
        let path = inputs.run_dir.join("job.yaml");
        let body = serde_yaml::to_string(&job)
            .map_err(|e| BackendError::InvalidSettings(e.to_string()))?;
        Ok(Launch {
            files: vec![(path.clone(), body.into_bytes())],
            links: Vec::new(),
            command: CommandSpec {
                program: self.python.clone(),
                args: vec!["run.py".into(), path.into()],
                cwd: self.dir.clone(),
                // run.py seeds torch, numpy and random from `SEED`.
                env: [("SEED".into(), s.seed.to_string())]
                    .into_iter()
                    .chain(inputs.slot.env())
                    .collect(),
            },
        })
    }

    fn parser(&self, inputs: &TrainInputs) -> Box<dyn OutputParser> {
        Box::new(output::Parser::new(
            inputs.output_name.clone(),
            inputs.settings.batch_size.max(1),
        ))
    }

    fn latest_checkpoint(&self, inputs: &TrainInputs) -> Option<FoundCheckpoint> {
        let root = save_root(inputs);
        let prefix = format!("{}_", inputs.output_name);
        let (step, weights) = std::fs::read_dir(&root)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().to_str()?.to_string();
                let digits = name.strip_prefix(&prefix)?.strip_suffix(".safetensors")?;
                let step = (digits.len() == 9 && digits.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| digits.parse::<u32>().ok())??;
                Some((step, name))
            })
            .max_by_key(|(step, _)| *step)?;
        // The optimizer state is written after the weights and overwritten
        // at every save: it belongs to the newest step only once it is
        // complete and no older than that step's weights.
        let optimizer = root.join("optimizer.pt");
        let weights_path = root.join(&weights);
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let in_step = modified(&optimizer)? >= modified(&weights_path)?;
        (in_step && safetensors_complete(&weights_path) && zip_complete(&optimizer)).then(|| {
            let dir = PathBuf::from(&inputs.output_name);
            FoundCheckpoint {
                step,
                files: vec![dir.join(weights), dir.join("optimizer.pt")],
            }
        })
    }

    fn stop_request(&self, _inputs: &TrainInputs) -> StopRequest {
        StopRequest::Unsupported
    }

    fn final_adapter(&self, inputs: &TrainInputs) -> Option<PathBuf> {
        let path = save_root(inputs).join(format!("{}.safetensors", inputs.output_name));
        (path.is_file() && safetensors_complete(&path)).then_some(path)
    }

    fn classify(&self, status: ExitStatus, tail: &[String]) -> JobError {
        classify(status, tail)
    }
}

/// A safetensors file is complete when its length is the 8-byte header
/// length, the header, and the data the header describes.
fn safetensors_complete(path: &Path) -> bool {
    let check = || -> Option<bool> {
        let mut file = std::fs::File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).ok()?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > len {
            return Some(false);
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).ok()?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).ok()?;
        let end = header
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .unwrap_or(0);
        Some(len == 8 + n + end)
    };
    check().unwrap_or(false)
}

/// `torch.save` writes a zip archive; it is complete once the end of
/// central directory record (signature `PK\x05\x06`, then an optional
/// comment) closes the file.
fn zip_complete(path: &Path) -> bool {
    let check = || -> Option<bool> {
        let mut file = std::fs::File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let window = len.min(22 + 0xFFFF);
        if window < 22 {
            return Some(false);
        }
        file.seek(SeekFrom::Start(len - window)).ok()?;
        let mut tail = vec![0u8; window as usize];
        file.read_exact(&mut tail).ok()?;
        Some((0..=tail.len() - 22).rev().any(|i| {
            let comment = u16::from_le_bytes([tail[i + 20], tail[i + 21]]) as usize;
            tail[i..i + 4] == *b"PK\x05\x06" && i + 22 + comment == tail.len()
        }))
    };
    check().unwrap_or(false)
}

/// ai-toolkit's own failures, checked before the error line and the
/// shared table.
static SIGNATURES: Signatures = Signatures::new(&[
    Signature {
        pattern: r"OOM during training step 3 times in a row",
        kind: ErrorKind::Oom,
        retryable: true,
        what: "out of GPU memory",
    },
    Signature {
        pattern: r"^\s*Job stopped\s*$",
        kind: ErrorKind::Trainer,
        retryable: true,
        what: "interrupted: ai-toolkit stopped on SIGINT without saving",
    },
    Signature {
        pattern: r"no (?:images|videos) found in ",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "no usable training data",
    },
    Signature {
        pattern: r#"config file (?:error|is invalid)|Unknown process type"#,
        kind: ErrorKind::Internal,
        retryable: false,
        what: "rendered job file rejected",
    },
    Signature {
        pattern: r"Error no file named .+ found in directory|HFValidationError: Repo id must be|is not an SDXL base checkpoint",
        kind: ErrorKind::Model,
        retryable: false,
        what: "base model not readable (a file the trainer loads is missing from the base_model's files)",
    },
    Signature {
        pattern: r"We couldn't connect to '[^']*' to load|LocalEntryNotFoundError|OfflineModeIsEnabled",
        kind: ErrorKind::Model,
        retryable: false,
        what: "the trainer needs model files from the Hub, which it cannot reach (an SDXL checkpoint needs stabilityai/stable-diffusion-xl-base-1.0's config files: give the worker Hub access or put them in the trainer's HF_HOME cache)",
    },
]);

fn classify(status: ExitStatus, tail: &[String]) -> JobError {
    if let Some(known) = SIGNATURES.find(tail) {
        return known;
    }
    // run.py's own summary: `Error running job: <exception>` then ` - 1 failure`.
    let failed = tail.iter().any(|l| l.trim() == "- 1 failure");
    if let Some(line) = tail
        .iter()
        .rev()
        .find(|l| l.starts_with("Error running job: "))
        && failed
    {
        return classify_common(status, std::slice::from_ref(line)).unwrap_or_else(|| {
            error(
                ErrorKind::Trainer,
                format!("ai-toolkit job failed: {}", line.trim()),
                true,
            )
        });
    }
    classify_common(status, tail).unwrap_or_else(|| unclassified(NAME, status, tail))
}

#[cfg(test)]
mod tests;
