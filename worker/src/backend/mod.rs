//! Trainer backends. A backend is data plus a few pure functions: render the
//! input files and the argv from the job's training settings, parse one
//! output line, list complete checkpoints, name the final adapter, and
//! classify a failure. The worker's run loop ([`crate::train`]) does all the
//! I/O around them, the same way for every trainer.

pub mod reference;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use trainyard_core::process::CommandSpec;
use trainyard_proto::v1::{ErrorKind, JobError, TrainingSettings};

/// Everything a backend needs to render a run, all local paths.
#[derive(Clone, Debug)]
pub struct TrainInputs {
    pub dataset_dir: PathBuf,
    pub base_model: PathBuf,
    pub base_model_name: String,
    /// The run's own folder: config files go here.
    pub run_dir: PathBuf,
    /// Where the trainer writes checkpoints and the final adapter.
    pub output_dir: PathBuf,
    pub output_name: String,
    pub settings: TrainingSettings,
    pub trigger_word: String,
    /// A complete local checkpoint to continue from.
    pub resume_from: Option<PathBuf>,
}

/// A rendered run: files to write, then the command.
#[derive(Clone, Debug)]
pub struct Launch {
    pub files: Vec<(PathBuf, Vec<u8>)>,
    pub command: CommandSpec,
}

/// What one output line meant.
#[derive(Clone, Debug, PartialEq)]
pub enum LineEvent {
    Progress {
        step: u32,
        total: u32,
        loss: Option<f32>,
        lr: Option<f64>,
        samples_per_sec: Option<f32>,
    },
    /// A checkpoint is complete on disk.
    Checkpoint {
        step: u32,
        dir: PathBuf,
    },
    Resumed {
        step: u32,
    },
    Done {
        adapter: PathBuf,
        steps: u32,
        loss_first: f32,
        loss_last: f32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    InvalidSettings(String),
}

pub trait TrainerBackend: Send + Sync {
    fn name(&self) -> &'static str;
    fn render(&self, inputs: &TrainInputs) -> Result<Launch, BackendError>;
    fn parse_line(&self, line: &str) -> Option<LineEvent>;
    /// The newest complete checkpoint in the output folder.
    fn latest_checkpoint(&self, output_dir: &Path) -> Option<(u32, PathBuf)>;
    /// Where a checkpoint of `step` is restored to before a resumed run.
    fn checkpoint_dir(&self, output_dir: &Path, step: u32) -> PathBuf;
    /// The final adapter, if the run produced it.
    fn final_adapter(&self, inputs: &TrainInputs) -> Option<PathBuf>;
    /// Why a run that did not finish failed, from its exit and last lines.
    fn classify(&self, status: ExitStatus, tail: &[String]) -> JobError;
}

/// Looks a backend up by the name in the job spec.
pub fn by_name(name: &str, trainer_bin: &Path) -> Option<Box<dyn TrainerBackend>> {
    match name {
        "reference" => Some(Box::new(reference::Reference::new(trainer_bin.to_owned()))),
        _ => None,
    }
}

pub(crate) fn error(kind: ErrorKind, message: impl Into<String>, retryable: bool) -> JobError {
    trainyard_core::runtime::job_error(kind, message, retryable)
}

/// Failure signatures shared by every trainer (the reference file's section 0).
pub(crate) fn classify_common(status: ExitStatus, tail: &[String]) -> Option<JobError> {
    use std::os::unix::process::ExitStatusExt;
    let find = |needles: &[&str]| {
        tail.iter()
            .rev()
            .find(|line| needles.iter().any(|n| line.contains(n)))
            .cloned()
    };
    if let Some(line) = find(&["CUDA out of memory", "OutOfMemoryError"]) {
        return Some(error(
            ErrorKind::Oom,
            format!("out of GPU memory: {line}"),
            true,
        ));
    }
    if let Some(line) = find(&["No space left on device"]) {
        return Some(error(
            ErrorKind::Trainer,
            format!("disk full: {line}"),
            true,
        ));
    }
    if let Some(line) = find(&[
        "GatedRepoError",
        "401 Client Error",
        "RepositoryNotFoundError",
    ]) {
        return Some(error(
            ErrorKind::Auth,
            format!("model access denied: {line}"),
            false,
        ));
    }
    if let Some(line) = find(&["ModuleNotFoundError", "ImportError"]) {
        return Some(error(
            ErrorKind::Trainer,
            format!("trainer environment broken: {line}"),
            false,
        ));
    }
    if let Some(line) = find(&["SafetensorError: Error while deserializing header"]) {
        return Some(error(
            ErrorKind::Model,
            format!("corrupt weights: {line}"),
            true,
        ));
    }
    if status.signal() == Some(9) || status.code() == Some(137) {
        return Some(error(
            ErrorKind::Trainer,
            "trainer was killed (signal 9: out of host memory or killed by the system)",
            true,
        ));
    }
    None
}
