//! Trainer backends. A backend is data plus a few functions with no I/O
//! beyond reading the trainer's output folder: check the settings, render the
//! input files and the argv, parse output lines (and webhook bodies), find
//! the newest *complete* checkpoint, say how to ask the trainer to save and
//! stop, name the final adapter, and classify a failure. The worker's run
//! loop (`trainyard-worker`'s `train` module) does all the I/O around them,
//! the same way for every trainer.
//!
//! Checkpoints are described by files relative to the run's output folder,
//! so the worker can upload them and, on another machine, put them back in
//! the same place before a resumed run.
//!
//! A new trainer is a module here plus one row of [`REGISTRY`].

pub mod ai_toolkit;
pub mod common;
pub mod diffusion_pipe;
pub mod kohya;
pub mod reference;
mod registry;
pub mod simpletuner;
pub mod trl;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use trainyard_core::process::CommandSpec;
use trainyard_models::ModelFamily;
use trainyard_proto::v1::{ExtraValue, JobError, TrainingSettings, extra_value::Kind};

pub use common::video::ClipNeed;
pub use common::{classify_common, error};
pub use registry::{
    BACKENDS, BackendEntry, REGISTRY, Tool, Tools, by_name, entry, installed, not_installed,
};

// The fixtures the integration tests use, under the name they use them by.
#[cfg(test)]
extern crate self as trainyard_backends;
#[cfg(test)]
#[path = "../tests/support/mod.rs"]
mod test_support;

/// A base model on local disk: its family and the paths of its parts
/// (`trainyard_models::part`), files or folders.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFiles {
    /// The reference as the job gave it.
    pub reference: String,
    pub family: ModelFamily,
    pub parts: BTreeMap<String, PathBuf>,
}

impl ModelFiles {
    pub fn part(&self, role: &str) -> Result<&Path, BackendError> {
        self.parts.get(role).map(PathBuf::as_path).ok_or_else(|| {
            BackendError::InvalidSettings(format!(
                "base_model: {} has no {role} part, which this backend needs for {}",
                self.reference, self.family
            ))
        })
    }
}

/// A checkpoint being continued from, already restored under `output_dir`.
#[derive(Clone, Debug, PartialEq)]
pub struct Resume {
    pub step: u32,
    /// The restored files, relative to `output_dir`.
    pub files: Vec<PathBuf>,
}

/// Everything a backend needs to render a run, all local paths.
#[derive(Clone, Debug)]
pub struct TrainInputs {
    pub job_id: String,
    /// Images with `<stem>.txt` captions, or `train.jsonl` for text models.
    pub dataset_dir: PathBuf,
    pub model: ModelFiles,
    /// The run's own folder: config files go here; the trainer's cwd.
    pub run_dir: PathBuf,
    /// Where the trainer writes checkpoints and the final adapter. Empty at
    /// the start of a run except for a restored checkpoint.
    pub output_dir: PathBuf,
    /// File stem of the adapter (kohya's `--output_name`, ai-toolkit's `name`).
    pub output_name: String,
    pub settings: TrainingSettings,
    pub trigger_word: String,
    pub resume: Option<Resume>,
    /// A loopback URL that turns POSTed JSON into `OutputParser::webhook`
    /// calls, when the backend asked for one.
    pub webhook_url: Option<String>,
    /// Which of the worker's concurrent runs this is, and its GPUs.
    pub slot: Slot,
}

/// A run's share of the worker: the worker runs up to `[worker]
/// concurrency` trainings at once, each in a slot of its own, so two runs
/// never share a GPU or a launcher's rendezvous port.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slot {
    /// From 0; no two runs on one worker hold the same index at once.
    pub index: u16,
    /// The device indices this run may use; empty when the worker does not
    /// know its GPUs (then every device stays visible, as without slots).
    pub gpus: Vec<u32>,
}

impl Slot {
    /// `CUDA_VISIBLE_DEVICES` for the run (`1` or `2,3`), when it has GPUs of its own.
    pub fn visible_devices(&self) -> Option<String> {
        (!self.gpus.is_empty()).then(|| {
            self.gpus
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
    }

    /// The environment that confines the trainer to the slot's GPUs.
    pub fn env(&self) -> Vec<(String, String)> {
        self.visible_devices()
            .map(|devices| ("CUDA_VISIBLE_DEVICES".to_string(), devices))
            .into_iter()
            .collect()
    }

    /// A rendezvous port of this slot's own: `base + index`.
    pub fn port(&self, base: u16) -> u16 {
        base.saturating_add(self.index)
    }
}

/// A rendered run: files to write and links to make, then the command.
#[derive(Clone, Debug)]
pub struct Launch {
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// Symbolic links `(link, target)` to make before the run, replacing
    /// whatever is at `link`: a trainer that must see part of the dataset
    /// folder as a folder of its own (SimpleTuner's image and video
    /// datasets, which must not share a folder) gets one of links to the
    /// dataset's files rather than copies of them.
    pub links: Vec<(PathBuf, PathBuf)>,
    pub command: CommandSpec,
}

/// What an output line (or webhook body) meant.
#[derive(Clone, Debug, PartialEq)]
pub enum LineEvent {
    /// `step` is absolute: a resumed run continues its count.
    Progress {
        step: u32,
        total: u32,
        loss: Option<f32>,
        lr: Option<f64>,
        samples_per_sec: Option<f32>,
        epoch: Option<f32>,
    },
    /// Any other scalar the trainer reports (`grad_norm`, `rewards/margins`, …).
    Metric { name: String, value: f64, step: u32 },
    /// The trainer says it saved (a hint: the run loop then looks for a
    /// complete checkpoint with `latest_checkpoint`).
    Saved { step: Option<u32> },
    /// The trainer loaded a checkpoint and continues from `step`.
    Resumed { step: u32 },
    /// The trainer says it finished.
    Done,
}

/// A complete checkpoint found in the output folder.
#[derive(Clone, Debug, PartialEq)]
pub struct FoundCheckpoint {
    pub step: u32,
    /// Relative to `output_dir`; together, everything a resume needs.
    pub files: Vec<PathBuf>,
}

/// How to ask a running trainer to save before it is stopped.
#[derive(Clone, Debug, PartialEq)]
pub enum StopRequest {
    /// Write the file; the trainer saves and exits by itself.
    SaveAndExit { path: PathBuf, body: Vec<u8> },
    /// Write the file; the trainer saves and goes on, so the worker stops it
    /// once a newer complete checkpoint is there.
    SaveAndContinue { path: PathBuf, body: Vec<u8> },
    /// Signal the process group; the trainer saves and exits.
    Signal(i32),
    /// The trainer cannot save on demand: it is terminated and work since
    /// its last checkpoint is lost.
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    InvalidSettings(String),
}

impl BackendError {
    /// Settings problems found while rendering, as one error.
    pub fn invalid(problems: &[SettingProblem]) -> Self {
        Self::InvalidSettings(joined(problems))
    }
}

/// Turns a run's output into events. One per run, so it may keep state
/// (a step offset after a resume, the name of the run, …).
pub trait OutputParser: Send {
    fn line(&mut self, line: &str) -> Vec<LineEvent>;
    /// A JSON body POSTed to `TrainInputs::webhook_url`.
    fn webhook(&mut self, _body: &serde_json::Value) -> Vec<LineEvent> {
        Vec::new()
    }
}

pub trait TrainerBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Model families this backend trains.
    fn families(&self) -> &'static [ModelFamily];
    /// The model parts a run of `family` needs (the cache fetches only these).
    fn parts(&self, family: ModelFamily) -> &'static [&'static str];
    /// Every problem with the settings for this family, before any file is
    /// fetched (extras against the allow-list, unsupported combinations).
    fn check(&self, settings: &TrainingSettings, family: ModelFamily) -> Vec<SettingProblem>;
    /// Whether this backend trains `family` on video clips (a dataset with
    /// clips is refused by preflight otherwise).
    fn trains_video(&self, _family: ModelFamily) -> bool {
        false
    }
    /// What a run with `settings` needs of every clip of a dataset whose
    /// clips have `clip_frames` frames: the same numbers `render` writes,
    /// for preflight to name the clips the trainer would skip or stretch.
    /// `None` when it takes clips of any length, or there are none.
    fn clip_need(
        &self,
        _settings: &TrainingSettings,
        _family: ModelFamily,
        _clip_frames: &[u64],
    ) -> Option<ClipNeed> {
        None
    }
    /// Whether the run wants a loopback webhook URL.
    fn wants_webhook(&self) -> bool {
        false
    }
    fn render(&self, inputs: &TrainInputs) -> Result<Launch, BackendError>;
    fn parser(&self, inputs: &TrainInputs) -> Box<dyn OutputParser>;
    /// The newest complete checkpoint under `inputs.output_dir`.
    fn latest_checkpoint(&self, inputs: &TrainInputs) -> Option<FoundCheckpoint>;
    fn stop_request(&self, inputs: &TrainInputs) -> StopRequest;
    /// The final adapter, if the run produced it.
    fn final_adapter(&self, inputs: &TrainInputs) -> Option<PathBuf>;
    /// Why a run that did not finish failed, from its exit and last lines.
    fn classify(&self, status: ExitStatus, tail: &[String]) -> JobError;
    /// Settings that need less memory than `settings`, for the attempt after
    /// an out-of-memory failure, with a note of what changed ("batch_size 4
    /// → 2"); `None` when nothing lighter is left to try. The default halves
    /// the batch size down to 1.
    fn lighter(
        &self,
        settings: &TrainingSettings,
        _family: ModelFamily,
    ) -> Option<(TrainingSettings, String)> {
        halve_batch(settings)
    }
}

/// `settings` with the batch size halved (at least 1), or `None` at 1.
pub fn halve_batch(settings: &TrainingSettings) -> Option<(TrainingSettings, String)> {
    let batch = settings.batch_size.max(1);
    if batch <= 1 {
        return None;
    }
    let mut lighter = settings.clone();
    lighter.batch_size = batch / 2;
    let note = format!("batch_size {batch} → {}", lighter.batch_size);
    Some((lighter, note))
}

/// Settings checks that need no trainer installed: the family is one the
/// backend trains, and the backend's own checks. Used by submission,
/// preflight and the worker alike.
pub fn check_settings(settings: &TrainingSettings, family: ModelFamily) -> Vec<SettingProblem> {
    let Some(backend) = by_name(&settings.backend, &Tools::default()) else {
        return vec![SettingProblem::new(
            "training.backend",
            format!(
                "unknown backend {:?}; known: {}",
                settings.backend,
                BACKENDS.join(", ")
            ),
        )];
    };
    if !backend.families().contains(&family) {
        return vec![SettingProblem::new(
            "base_model",
            format!(
                "{} does not train {family} models; it trains {}",
                backend.name(),
                backend
                    .families()
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )];
    }
    backend.check(settings, family)
}

/// One problem with a job's training settings: the spec field it is about
/// (`training.extras.optimizer_type`, `base_model`) and what is wrong, so
/// submission can answer per field without parsing text. Shown as
/// `field: problem`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingProblem {
    pub field: String,
    pub problem: String,
}

impl SettingProblem {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// A problem with the extra `key` (`training.extras.{key}`).
    pub fn extra(key: &str, problem: impl Into<String>) -> Self {
        Self::new(format!("training.extras.{key}"), problem)
    }
}

impl std::fmt::Display for SettingProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// `problems` as one line, `; `-separated.
pub fn joined(problems: &[SettingProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The type of an allowed extra.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraType {
    Text,
    Int,
    Float,
    Flag,
}

impl ExtraType {
    fn name(self) -> &'static str {
        match self {
            ExtraType::Text => "text",
            ExtraType::Int => "integer",
            ExtraType::Float => "number",
            ExtraType::Flag => "boolean",
        }
    }
}

/// A typed extra value, as it goes into a config file.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Extra {
    Text(String),
    Int(i64),
    Float(f64),
    Flag(bool),
}

/// Checks `extras` against an allow-list of `(key, type)`; an integer is
/// accepted where a number is expected. Returns the typed values, or one
/// message per bad key naming the allowed ones.
pub fn typed_extras(
    backend: &str,
    extras: &std::collections::HashMap<String, ExtraValue>,
    allowed: &[(&str, ExtraType)],
) -> Result<BTreeMap<String, Extra>, Vec<SettingProblem>> {
    let list = || {
        allowed
            .iter()
            .map(|(k, t)| format!("{k} ({})", t.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    let mut keys: Vec<_> = extras.keys().collect();
    keys.sort();
    for key in keys {
        let value = &extras[key];
        let Some((_, ty)) = allowed.iter().find(|(k, _)| k == key) else {
            problems.push(SettingProblem::extra(
                key,
                format!("unknown key for {backend}; allowed: {}", list()),
            ));
            continue;
        };
        let typed = match (ty, value.kind.as_ref()) {
            (ExtraType::Text, Some(Kind::Text(s))) => Some(Extra::Text(s.clone())),
            (ExtraType::Int, Some(Kind::Int(n))) => Some(Extra::Int(*n)),
            (ExtraType::Float, Some(Kind::Float(x))) => Some(Extra::Float(*x)),
            (ExtraType::Float, Some(Kind::Int(n))) => Some(Extra::Float(*n as f64)),
            (ExtraType::Flag, Some(Kind::Flag(b))) => Some(Extra::Flag(*b)),
            _ => None,
        };
        match typed {
            Some(v) => {
                out.insert(key.clone(), v);
            }
            None => problems.push(SettingProblem::extra(
                key,
                format!("must be a {} for {backend}", ty.name()),
            )),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn extra(kind: Kind) -> ExtraValue {
        ExtraValue { kind: Some(kind) }
    }

    #[test]
    fn extras_are_checked_against_the_allow_list() {
        let allowed = [
            ("optimizer_type", ExtraType::Text),
            ("max_grad_norm", ExtraType::Float),
        ];
        let mut extras = HashMap::new();
        extras.insert(
            "optimizer_type".into(),
            extra(Kind::Text("adamw8bit".into())),
        );
        extras.insert("max_grad_norm".into(), extra(Kind::Int(1)));
        let typed = typed_extras("kohya", &extras, &allowed).unwrap();
        assert_eq!(typed["max_grad_norm"], Extra::Float(1.0));
        extras.insert("optimiser".into(), extra(Kind::Text("x".into())));
        extras.insert("optimizer_type".into(), extra(Kind::Int(3)));
        let problems = typed_extras("kohya", &extras, &allowed).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].field, "training.extras.optimiser");
        assert!(
            problems[0]
                .to_string()
                .contains("optimiser: unknown key for kohya; allowed: optimizer_type (text)")
        );
        assert_eq!(problems[1].field, "training.extras.optimizer_type");
        assert!(problems[1].problem.contains("must be a text"));
    }

    #[test]
    fn the_default_lighter_setting_halves_the_batch_down_to_one() {
        let tools = Tools::default();
        let reference = by_name("reference", &tools).unwrap();
        let mut settings = TrainingSettings {
            batch_size: 5,
            ..Default::default()
        };
        let mut notes = Vec::new();
        while let Some((next, note)) = reference.lighter(&settings, ModelFamily::Reference) {
            notes.push(note);
            settings = next;
        }
        assert_eq!(notes, ["batch_size 5 → 2", "batch_size 2 → 1"]);
        assert_eq!(settings.batch_size, 1);
    }

    #[test]
    fn unknown_backends_and_families_are_named() {
        let settings = TrainingSettings {
            backend: "nope".into(),
            ..Default::default()
        };
        assert!(
            check_settings(&settings, ModelFamily::Flux)[0]
                .problem
                .contains("unknown backend")
        );
        let settings = TrainingSettings {
            backend: "reference".into(),
            ..Default::default()
        };
        assert!(
            check_settings(&settings, ModelFamily::Flux)[0]
                .to_string()
                .contains("base_model: reference does not train flux")
        );
    }
}
