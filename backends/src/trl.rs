//! TRL (SFT, DPO, ORPO) LoRA runs on a transformers-layout language model
//! (trainers reference, section 6).
//!
//! The `trl sft` / `trl dpo` commands cannot resume and ORPO has none, so the
//! crate ships its own driver (`drivers/trl_train.py`, embedded here and
//! written into the run folder): it builds the method's Config and Trainer
//! from a JSON config, resumes from the newest `checkpoint-N` in the output
//! folder, saves and exits when `<run_dir>/stop` appears, and saves the
//! final adapter to the output folder. It also fills in what the libraries
//! would otherwise get wrong on the machine at hand: `bf16`/`fp16` when the
//! job leaves them unset (TRL defaults `bf16` to true, which transformers
//! refuses without a bf16 GPU), and a pad token for ORPO (which, unlike SFT
//! and DPO, sets none); and it refuses an empty dataset file, on which
//! `load_dataset` dies with a bare `StopIteration`.
//!
//! Progress comes from transformers' `ProgressCallback`: the logs dict, one
//! per step (`logging_steps` is fixed at 1), on stdout, and a tqdm bar with
//! no description on stderr. The two pipes are read separately, so their
//! lines interleave arbitrarily: the step is counted from the dict lines
//! (from the resumed checkpoint's step on), never read off the bar, which
//! only gives the total and the rate.

mod jsonl;
mod output;
#[cfg(test)]
mod tests;

pub use jsonl::{JsonlFormat, JsonlStats, check_jsonl};

use output::{Parser, classify};

use crate::{
    BackendError, Extra, ExtraType, FoundCheckpoint, Launch, OutputParser, SettingProblem,
    StopRequest, TrainInputs, TrainerBackend, typed_extras,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use trainyard_core::process::CommandSpec;
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{JobError, TrainingSettings};

/// The driver, written into the run folder at every render.
pub const DRIVER: &str = include_str!("../drivers/trl_train.py");
const DRIVER_FILE: &str = "trl_train.py";
const CONFIG_FILE: &str = "trl.json";
/// The sentinel the driver's callback watches; its appearance means "save and exit".
const STOP_FILE: &str = "stop";
const ADAPTER: &str = "adapter_model.safetensors";

/// The training method (`TrainingSettings.method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Sft,
    Dpo,
    Orpo,
}

impl Method {
    /// `""` means SFT.
    pub fn parse(name: &str) -> Option<Method> {
        match name {
            "" | "sft" => Some(Method::Sft),
            "dpo" => Some(Method::Dpo),
            "orpo" => Some(Method::Orpo),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Orpo => "orpo",
        }
    }

    /// Extras this method accepts: real `TrainingArguments` / `SFTConfig` /
    /// `DPOConfig` / `ORPOConfig` field names (transformers 5, TRL 1), plus
    /// the LoRA ones. Not `save_total_limit`: pruning would delete
    /// checkpoints the worker may still be uploading. Not `warmup_ratio`:
    /// transformers 5 dropped it (a `warmup_steps` below 1 is the ratio).
    pub fn extras(self) -> Vec<(&'static str, ExtraType)> {
        let mut allowed = vec![
            ("gradient_accumulation_steps", ExtraType::Int),
            ("lr_scheduler_type", ExtraType::Text),
            ("warmup_steps", ExtraType::Float),
            ("weight_decay", ExtraType::Float),
            ("max_grad_norm", ExtraType::Float),
            ("optim", ExtraType::Text),
            ("bf16", ExtraType::Flag),
            ("fp16", ExtraType::Flag),
            ("gradient_checkpointing", ExtraType::Flag),
            ("max_length", ExtraType::Int),
            ("lora_dropout", ExtraType::Float),
            ("lora_target_modules", ExtraType::Text),
        ];
        allowed.extend_from_slice(match self {
            Method::Sft => &[
                ("packing", ExtraType::Flag),
                ("assistant_only_loss", ExtraType::Flag),
                ("completion_only_loss", ExtraType::Flag),
                ("loss_type", ExtraType::Text),
            ][..],
            Method::Dpo => &[("beta", ExtraType::Float), ("loss_type", ExtraType::Text)][..],
            Method::Orpo => &[("beta", ExtraType::Float)][..],
        });
        allowed
    }
}

/// transformers' `SchedulerType` values that run with what a job can set.
const SCHEDULERS: &[&str] = &[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
];

/// The other `SchedulerType` values: each needs an eval set
/// (`reduce_lr_on_plateau`, `greedy`) or `lr_scheduler_kwargs` (the rest),
/// neither of which a trl job has, so transformers would refuse them.
const SCHEDULERS_NEEDING_MORE: &[&str] = &[
    "reduce_lr_on_plateau",
    "greedy",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
];

/// `SFTConfig.loss_type` values (`SFTTrainer` refuses others).
const SFT_LOSSES: &[&str] = &["nll", "dft"];

/// `DPOConfig.loss_type` values (`DPOTrainer` refuses others, at the first step).
const DPO_LOSSES: &[&str] = &[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
];

pub struct Trl {
    python: PathBuf,
}

impl Trl {
    pub fn new(python: PathBuf) -> Self {
        Self { python }
    }
}

/// The driver's config.
#[derive(Serialize)]
struct DriverConfig<'a> {
    method: &'static str,
    model: &'a Path,
    dataset: PathBuf,
    output_dir: &'a Path,
    stop_file: PathBuf,
    /// Keyword arguments of the method's Config class.
    args: Args,
    /// Keyword arguments of `peft.LoraConfig`.
    lora: Lora,
}

#[derive(Serialize)]
struct Args {
    max_steps: u32,
    learning_rate: f64,
    per_device_train_batch_size: u32,
    save_strategy: &'static str,
    save_steps: u32,
    seed: u64,
    /// Fixed: the parser counts one logs dict per step.
    logging_steps: u32,
    report_to: &'static str,
    disable_tqdm: bool,
    #[serde(flatten)]
    extras: BTreeMap<String, Extra>,
}

#[derive(Serialize)]
struct Lora {
    r: u32,
    lora_alpha: serde_json::Number,
    lora_dropout: f64,
    /// `"all-linear"` or module names.
    target_modules: serde_json::Value,
    task_type: &'static str,
    bias: &'static str,
}

/// Steps between checkpoints: `save_every`, or about ten per run when 0.
fn save_steps(settings: &TrainingSettings) -> u32 {
    match settings.save_every {
        0 => settings.steps.div_ceil(10).max(1),
        n => n,
    }
}

fn target_modules(extras: &BTreeMap<String, Extra>) -> serde_json::Value {
    match extras.get("lora_target_modules") {
        Some(Extra::Text(list)) => list
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| serde_json::Value::String(m.into()))
            .collect(),
        _ => "all-linear".into(),
    }
}

/// Whole numbers as JSON integers (`lora_alpha: 16`, as PEFT writes it).
fn number(x: f64) -> serde_json::Number {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::Number::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).unwrap_or_else(|| serde_json::Number::from(0))
    }
}

/// Value checks on top of the allow-list.
fn check_values(method: Method, extras: &BTreeMap<String, Extra>) -> Vec<SettingProblem> {
    let mut problems = Vec::new();
    let mut bad = |key: &str, what: &str| problems.push(SettingProblem::extra(key, what));
    let losses = match method {
        Method::Sft => SFT_LOSSES,
        Method::Dpo => DPO_LOSSES,
        Method::Orpo => &[],
    };
    for (key, value) in extras {
        match (key.as_str(), value) {
            ("gradient_accumulation_steps" | "max_length", Extra::Int(n)) if *n < 1 => {
                bad(key, "must be at least 1")
            }
            ("warmup_steps", Extra::Float(x)) if !(x.is_finite() && *x >= 0.0) => bad(
                key,
                "must be a number of steps, or a fraction below 1 of the run",
            ),
            ("warmup_steps", Extra::Float(x)) if *x >= 1.0 && x.fract() != 0.0 => bad(
                key,
                "must be a whole number of steps, or a fraction below 1 of the run",
            ),
            ("lora_dropout", Extra::Float(x)) if !(0.0..1.0).contains(x) => {
                bad(key, "must be at least 0 and below 1")
            }
            ("beta" | "max_grad_norm" | "weight_decay", Extra::Float(x))
                if !(x.is_finite() && *x >= 0.0) =>
            {
                bad(key, "must be a non-negative number")
            }
            ("lr_scheduler_type", Extra::Text(s))
                if SCHEDULERS_NEEDING_MORE.contains(&s.as_str()) =>
            {
                bad(
                    key,
                    &format!(
                        "scheduler {s:?} needs an eval set or lr_scheduler_kwargs, which trl jobs \
                         cannot set; use one of: {}",
                        SCHEDULERS.join(", ")
                    ),
                )
            }
            ("lr_scheduler_type", Extra::Text(s)) if !SCHEDULERS.contains(&s.as_str()) => bad(
                key,
                &format!("unknown scheduler {s:?}; known: {}", SCHEDULERS.join(", ")),
            ),
            ("loss_type", Extra::Text(s)) if !losses.contains(&s.as_str()) => bad(
                key,
                &format!(
                    "unknown loss type {s:?} for trl {}; known: {}",
                    method.name(),
                    losses.join(", ")
                ),
            ),
            ("lora_target_modules", Extra::Text(s))
                if s.split(',').all(|m| m.trim().is_empty()) =>
            {
                bad(key, "must name at least one module (comma separated)")
            }
            _ => {}
        }
    }
    if extras.get("bf16") == Some(&Extra::Flag(true))
        && extras.get("fp16") == Some(&Extra::Flag(true))
    {
        problems.push(SettingProblem::new(
            "training.extras",
            "bf16 and fp16 cannot both be true",
        ));
    }
    problems
}

fn method_of(settings: &TrainingSettings) -> Result<Method, SettingProblem> {
    Method::parse(&settings.method).ok_or_else(|| {
        SettingProblem::new(
            "training.method",
            format!(
                "unknown method {:?} for trl; known: sft, dpo, orpo",
                settings.method
            ),
        )
    })
}

fn checked_extras(
    settings: &TrainingSettings,
) -> Result<(Method, BTreeMap<String, Extra>), Vec<SettingProblem>> {
    let method = method_of(settings).map_err(|p| vec![p])?;
    let backend = format!("trl {}", method.name());
    let allowed = method.extras();
    // Key by key, so the values of the good keys are checked too.
    let mut keys: Vec<_> = settings.extras.iter().collect();
    keys.sort_by_key(|(k, _)| *k);
    let mut extras = BTreeMap::new();
    let mut problems = Vec::new();
    for (key, value) in keys {
        if key == "warmup_ratio" {
            problems.push(SettingProblem::extra(
                key,
                "transformers 5 has no warmup_ratio; set warmup_steps to a fraction below 1 \
                 (e.g. 0.1) for a ratio of the run",
            ));
            continue;
        }
        let one = HashMap::from([(key.clone(), value.clone())]);
        match typed_extras(&backend, &one, &allowed) {
            Ok(typed) => extras.extend(typed),
            Err(p) => problems.extend(p),
        }
    }
    problems.extend(check_values(method, &extras));
    if problems.is_empty() {
        Ok((method, extras))
    } else {
        Err(problems)
    }
}

impl TrainerBackend for Trl {
    fn name(&self) -> &'static str {
        "trl"
    }

    fn families(&self) -> &'static [ModelFamily] {
        &[ModelFamily::Llm]
    }

    fn parts(&self, _family: ModelFamily) -> &'static [&'static str] {
        &[part::LLM]
    }

    fn check(&self, settings: &TrainingSettings, _family: ModelFamily) -> Vec<SettingProblem> {
        checked_extras(settings).err().unwrap_or_default()
    }

    fn render(&self, inputs: &TrainInputs) -> Result<Launch, BackendError> {
        let s = &inputs.settings;
        let (method, mut extras) = checked_extras(s).map_err(|p| BackendError::invalid(&p))?;
        let target_modules = target_modules(&extras);
        let lora_dropout = match extras.remove("lora_dropout") {
            Some(Extra::Float(x)) => x,
            _ => 0.05,
        };
        extras.remove("lora_target_modules");
        // A whole number of warmup steps as an integer, a ratio as a float.
        if let Some(Extra::Float(x)) = extras.get("warmup_steps")
            && x.fract() == 0.0
        {
            let steps = *x as i64;
            extras.insert("warmup_steps".into(), Extra::Int(steps));
        }
        let alpha = if s.alpha > 0.0 {
            s.alpha
        } else {
            f64::from(s.rank)
        };
        let config = DriverConfig {
            method: method.name(),
            model: inputs.model.part(part::LLM)?,
            dataset: inputs.dataset_dir.join("train.jsonl"),
            output_dir: &inputs.output_dir,
            stop_file: inputs.run_dir.join(STOP_FILE),
            args: Args {
                max_steps: s.steps,
                learning_rate: s.learning_rate,
                per_device_train_batch_size: s.batch_size.max(1),
                save_strategy: "steps",
                save_steps: save_steps(s),
                seed: s.seed,
                logging_steps: 1,
                report_to: "none",
                disable_tqdm: false,
                extras,
            },
            lora: Lora {
                r: s.rank,
                lora_alpha: number(alpha),
                lora_dropout,
                target_modules,
                task_type: "CAUSAL_LM",
                bias: "none",
            },
        };
        let config_path = inputs.run_dir.join(CONFIG_FILE);
        let driver_path = inputs.run_dir.join(DRIVER_FILE);
        let body = serde_json::to_vec_pretty(&config)
            .map_err(|e| BackendError::InvalidSettings(e.to_string()))?;
        Ok(Launch {
            files: vec![
                (config_path.clone(), body),
                (driver_path.clone(), DRIVER.as_bytes().to_vec()),
            ],
            links: Vec::new(),
            command: CommandSpec {
                program: self.python.clone(),
                args: vec![driver_path.into(), "--config".into(), config_path.into()],
                cwd: inputs.run_dir.clone(),
                env: vec![
                    ("TOKENIZERS_PARALLELISM".into(), "false".into()),
                    // Everything is local; never wait on the Hub.
                    ("HF_HUB_OFFLINE".into(), "1".into()),
                    (
                        "HF_DATASETS_CACHE".into(),
                        inputs
                            .run_dir
                            .join("datasets-cache")
                            .to_string_lossy()
                            .into_owned(),
                    ),
                ]
                .into_iter()
                .chain(inputs.slot.env())
                .collect(),
            },
        })
    }

    fn parser(&self, inputs: &TrainInputs) -> Box<dyn OutputParser> {
        let s = &inputs.settings;
        let accumulation = match s
            .extras
            .get("gradient_accumulation_steps")
            .and_then(|v| v.kind.as_ref())
        {
            Some(trainyard_proto::v1::extra_value::Kind::Int(n)) if *n > 0 => *n as f32,
            _ => 1.0,
        };
        Box::new(Parser::new(
            inputs.resume.as_ref().map_or(0, |r| r.step),
            s.steps,
            s.batch_size.max(1) as f32 * accumulation,
        ))
    }

    fn latest_checkpoint(&self, inputs: &TrainInputs) -> Option<FoundCheckpoint> {
        let (step, name) = std::fs::read_dir(&inputs.output_dir)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let digits = name.strip_prefix("checkpoint-")?;
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let step = digits.parse::<u32>().ok()?;
                let dir = entry.path();
                // transformers writes rng_state.pth, then trainer_state.json, last.
                let complete =
                    dir.join("trainer_state.json").is_file() && dir.join("rng_state.pth").is_file();
                complete.then_some((step, name))
            })
            .max_by_key(|(step, _)| *step)?;
        let mut files = Vec::new();
        list_files(&inputs.output_dir, Path::new(&name), &mut files);
        files.sort();
        Some(FoundCheckpoint { step, files })
    }

    fn stop_request(&self, inputs: &TrainInputs) -> StopRequest {
        StopRequest::SaveAndExit {
            path: inputs.run_dir.join(STOP_FILE),
            body: b"stop\n".to_vec(),
        }
    }

    fn final_adapter(&self, inputs: &TrainInputs) -> Option<PathBuf> {
        let path = inputs.output_dir.join(ADAPTER);
        path.is_file().then_some(path)
    }

    fn classify(&self, status: ExitStatus, tail: &[String]) -> JobError {
        classify(status, tail)
    }
}

/// Every regular file under `root/relative`, as paths relative to `root`.
fn list_files(root: &Path, relative: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root.join(relative)) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = relative.join(entry.file_name());
        match entry.file_type() {
            Ok(t) if t.is_dir() => list_files(root, &path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}
