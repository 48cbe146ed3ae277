//! Preflight: every check a job must pass before a GPU is held, run on the
//! prepared dataset and the job's spec.
//!
//! A trainer that finds a problem finds it after the job waited for a GPU,
//! downloaded a base model and cached latents; the same problem found here
//! costs seconds. So the prepare stage runs these checks once the dataset is
//! captioned (the access checks alongside fetching), and fails the job with
//! *every* problem listed; the `Validate` API runs the same checks without
//! a job ([`crate::preflight_server`]).
//!
//! - [`images`]: the prepared image dataset against the backend and the
//!   settings: enough images, image sizes against the resolution, caption
//!   coverage, the trigger word, and the step estimate;
//! - [`video`]: the dataset's clips against the backend: one that trains
//!   the model family on images only cannot use them, and the run's frame
//!   counts (frame buckets, `num_frames`) must not skip or stretch any;
//! - [`text`]: a language model's `train.jsonl` against the method, and the
//!   step estimate in examples;
//! - [`access`]: the base model is there and readable with the job's token,
//!   and each destination is writable now.
//!
//! A [`Report`] keeps problems (each with the check it came from and the
//! [`ErrorKind`] a job failing on it gets), warnings, checks that could not
//! run now (network trouble: worth a retry, not a verdict), and the
//! estimate. New checks add problems; nothing else needs to change.

pub mod access;
pub mod images;
pub mod text;
pub mod video;

pub use access::AccessChecks;

use crate::error::{DatasetError, PrepareError};
use crate::prepare::PreparedDataset;
use std::fmt::Write as _;
use std::time::Duration;
use trainyard_core::runtime::StageError;
use trainyard_models::ModelFamily;
use trainyard_proto::v1::{
    self, ErrorKind, JobSpec, StepEstimate, TrainingSettings, ValidateReply, extra_value,
};

/// Names of the checks, as they appear in problems.
pub mod check {
    pub const IMAGES: &str = "dataset.images";
    pub const RESOLUTION: &str = "dataset.resolution";
    pub const CAPTIONS: &str = "dataset.captions";
    pub const TRIGGER_WORD: &str = "dataset.trigger_word";
    pub const VIDEOS: &str = super::video::VIDEOS;
    pub const CLIP_FRAMES: &str = super::video::CLIP_FRAMES;
    pub const JSONL: &str = "dataset.jsonl";
    pub const DATASET: &str = "dataset";
    pub const BASE_MODEL: &str = "base_model";
    pub const DESTINATIONS: &str = "destinations";
}

/// Names shown in a problem before the rest are counted.
pub const LISTED_FILES: usize = 10;

/// One problem: which check found it, what is wrong, and the kind of
/// failure a job stopped by it reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub check: String,
    pub message: String,
    pub kind: ErrorKind,
}

impl Problem {
    pub fn new(check: &str, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            check: check.to_owned(),
            message: message.into(),
            kind,
        }
    }
}

/// A check that could not run now (the Hub or a bucket did not answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unchecked {
    pub check: String,
    pub message: String,
}

/// Everything preflight found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub problems: Vec<Problem>,
    pub warnings: Vec<String>,
    pub unchecked: Vec<Unchecked>,
    pub estimate: Option<StepEstimate>,
}

impl Report {
    pub fn problem(&mut self, check: &str, kind: ErrorKind, message: impl Into<String>) {
        self.problems.push(Problem::new(check, kind, message));
    }

    pub fn unchecked(&mut self, check: &str, message: impl Into<String>) {
        self.unchecked.push(Unchecked {
            check: check.to_owned(),
            message: message.into(),
        });
    }

    /// Appends `other`'s findings after this report's.
    pub fn merge(&mut self, other: Report) {
        self.problems.extend(other.problems);
        self.warnings.extend(other.warnings);
        self.unchecked.extend(other.unchecked);
        if other.estimate.is_some() {
            self.estimate = other.estimate;
        }
    }

    /// No problems, and every check ran.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.unchecked.is_empty()
    }

    /// What a job does with this report: nothing when it passed; fail at
    /// once with every problem, one per line, when there are problems (the
    /// kind is the first problem's: dataset problems come first); retry when
    /// only some checks could not run.
    pub fn verdict(&self) -> Result<(), StageError> {
        if let Some(first) = self.problems.first() {
            let mut message = format!("preflight found {}:", count(self.problems.len(), "problem"));
            for p in &self.problems {
                let _ = write!(message, "\n{}: {}", p.check, p.message);
            }
            for u in &self.unchecked {
                let _ = write!(message, "\n{} (not checked): {}", u.check, u.message);
            }
            return Err(StageError::fail(first.kind, message));
        }
        if !self.unchecked.is_empty() {
            let message = self
                .unchecked
                .iter()
                .map(|u| format!("{}: {}", u.check, u.message))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(StageError::retry(
                ErrorKind::Fetch,
                format!("preflight could not finish: {message}"),
                Duration::from_secs(10),
            ));
        }
        Ok(())
    }

    /// The `Validate` answer: checks that could not run are problems there,
    /// since nothing could be said about them.
    pub fn to_reply(&self) -> ValidateReply {
        let mut problems: Vec<v1::Problem> = self
            .problems
            .iter()
            .map(|p| v1::Problem {
                check: p.check.clone(),
                message: p.message.clone(),
            })
            .collect();
        problems.extend(self.unchecked.iter().map(|u| v1::Problem {
            check: u.check.clone(),
            message: format!("could not be checked now: {}", u.message),
        }));
        ValidateReply {
            ok: problems.is_empty(),
            problems,
            warnings: self.warnings.clone(),
            estimate: self.estimate.clone(),
        }
    }
}

/// What preflight made of a job: the report, the prepared dataset when
/// there is one, and the error to retry with when the dataset could not be
/// prepared *now* (also listed in the report as not checked).
pub struct Checked {
    pub report: Report,
    pub prepared: Option<PreparedDataset>,
    pub retry: Option<StageError>,
}

/// Runs the dataset checks on a prepared dataset (or lists why there is
/// none) and merges the access checks after them. Only cancellation and
/// shutdown are errors.
pub async fn run(
    spec: &JobSpec,
    dataset: Result<PreparedDataset, DatasetError>,
    access: Report,
) -> Result<Checked, StageError> {
    let mut report = Report::default();
    let mut retry = None;
    let prepared = match dataset {
        Ok(prepared) => {
            report.merge(check_dataset(spec, &prepared).await);
            Some(prepared)
        }
        Err(error) => {
            match finding(error, spec) {
                Finding::Problem(problem) => report.problems.push(problem),
                Finding::Retry(error) => {
                    if let StageError::Retry { error, .. } = &error {
                        report.unchecked(check::DATASET, error.message.clone());
                    }
                    retry = Some(error);
                }
                Finding::Stop(error) => return Err(error),
            }
            None
        }
    };
    report.merge(access);
    Ok(Checked {
        report,
        prepared,
        retry,
    })
}

/// What a dataset error means for preflight.
pub enum Finding {
    /// A problem with the dataset itself: listed with the others.
    Problem(Problem),
    /// Could not be prepared now; the error keeps the retry delay.
    Retry(StageError),
    /// Cancelled or stopping: nothing to report.
    Stop(StageError),
}

/// Permanent failures become problems; too few images says how many
/// the backend needs and why.
pub fn finding(error: DatasetError, spec: &JobSpec) -> Finding {
    let too_few = match &error {
        DatasetError::Prepare(PrepareError::NoUsableImages { bad }) => {
            let detail = if bad.is_empty() {
                "no image or video files found".to_owned()
            } else {
                format!(
                    "unreadable, too small or over the clip limits: {}",
                    list_names(bad)
                )
            };
            Some((0, Some(detail)))
        }
        DatasetError::Prepare(PrepareError::TooFewImages { found, .. }) => {
            Some((*found as u32, None))
        }
        _ => None,
    };
    if let Some((found, detail)) = too_few
        && let Some(message) = images::too_few_images(spec, found, detail.as_deref())
    {
        return Finding::Problem(Problem::new(check::IMAGES, ErrorKind::BadDataset, message));
    }
    match error.into_stage_error() {
        StageError::Fail(e) => Finding::Problem(Problem::new(check::DATASET, e.kind(), e.message)),
        retry @ StageError::Retry { .. } => Finding::Retry(retry),
        stop => Finding::Stop(stop),
    }
}

/// Whether `spec` trains a language model on text (after normalisation,
/// `base_model.family` names the family).
pub fn is_text(spec: &JobSpec) -> bool {
    spec.base_model
        .as_ref()
        .and_then(|m| ModelFamily::from_name(&m.family))
        .is_some_and(ModelFamily::is_text)
}

/// The dataset checks that fit `spec`: images or text.
pub async fn check_dataset(spec: &JobSpec, dataset: &PreparedDataset) -> Report {
    if is_text(spec) {
        text::check(spec, dataset).await
    } else {
        let mut report = images::check(spec, dataset).await;
        report.merge(video::check(spec, &dataset.manifest));
        report
    }
}

/// Samples per optimizer step: the batch times
/// `extras.gradient_accumulation_steps` when a backend takes it.
pub fn effective_batch(t: &TrainingSettings) -> u32 {
    let accumulation = match t
        .extras
        .get("gradient_accumulation_steps")
        .and_then(|v| v.kind.as_ref())
    {
        Some(extra_value::Kind::Int(n)) if *n > 0 => u32::try_from(*n).unwrap_or(u32::MAX),
        _ => 1,
    };
    t.batch_size.max(1).saturating_mul(accumulation)
}

/// The estimate for `items` images (or examples) at these settings.
pub fn estimate(items: u32, unit: &str, steps: u32, repeats: u32, batch_size: u32) -> StepEstimate {
    let repeats = repeats.max(1);
    let batch_size = batch_size.max(1);
    let samples = u64::from(items) * u64::from(repeats);
    let steps_per_epoch = samples
        .div_ceil(u64::from(batch_size))
        .min(u64::from(u32::MAX)) as u32;
    let epochs = if steps_per_epoch == 0 {
        0.0
    } else {
        f64::from(steps) / f64::from(steps_per_epoch)
    };
    StepEstimate {
        images: items,
        repeats,
        batch_size,
        steps_per_epoch,
        epochs,
        total_steps: steps,
        unit: unit.to_owned(),
    }
}

/// `12 images × 10 repeats ÷ batch 1 = 120 steps per epoch; 200 steps ≈ 1.7 epochs`.
pub fn describe(estimate: &StepEstimate) -> String {
    let unit = if estimate.unit.is_empty() {
        "images"
    } else {
        estimate.unit.as_str()
    };
    let repeats = if estimate.repeats > 1 || unit == "images" {
        format!(" × {} repeats", estimate.repeats)
    } else {
        String::new()
    };
    format!(
        "{} {unit}{repeats} ÷ batch {} = {} steps per epoch; {} steps ≈ {:.1} epochs",
        estimate.images,
        estimate.batch_size,
        estimate.steps_per_epoch,
        estimate.total_steps,
        estimate.epochs
    )
}

/// "1 problem", "3 problems".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `a.png, b.png and 3 more`: at most [`LISTED_FILES`] names.
pub fn list_names<S: AsRef<str>>(names: &[S]) -> String {
    let shown: Vec<&str> = names.iter().take(LISTED_FILES).map(AsRef::as_ref).collect();
    let mut text = shown.join(", ");
    if names.len() > LISTED_FILES {
        let _ = write!(text, " and {} more", names.len() - LISTED_FILES);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_rounds_steps_per_epoch_up() {
        let e = estimate(12, "images", 200, 10, 1);
        assert_eq!((e.steps_per_epoch, e.total_steps), (120, 200));
        assert_eq!(
            describe(&e),
            "12 images × 10 repeats ÷ batch 1 = 120 steps per epoch; 200 steps ≈ 1.7 epochs"
        );
        let e = estimate(7, "images", 10, 1, 2);
        assert_eq!(e.steps_per_epoch, 4);
        assert!((e.epochs - 2.5).abs() < 1e-9);
        let e = estimate(500, "examples", 250, 1, 4);
        assert_eq!(
            describe(&e),
            "500 examples ÷ batch 4 = 125 steps per epoch; 250 steps ≈ 2.0 epochs"
        );
    }

    #[test]
    fn a_failing_report_lists_every_problem_under_the_first_kind() {
        let mut report = Report::default();
        report.problem(check::IMAGES, ErrorKind::BadDataset, "too few");
        report.problem(check::DESTINATIONS, ErrorKind::Storage, "not writable");
        report.unchecked(check::BASE_MODEL, "the hub did not answer");
        let Err(StageError::Fail(error)) = report.verdict() else {
            panic!("expected a permanent failure");
        };
        assert_eq!(error.kind(), ErrorKind::BadDataset);
        assert!(!error.retryable);
        assert_eq!(
            error.message,
            "preflight found 2 problems:\ndataset.images: too few\ndestinations: not writable\nbase_model (not checked): the hub did not answer"
        );
        let reply = report.to_reply();
        assert!(!reply.ok);
        assert_eq!(reply.problems.len(), 3);

        let mut unsure = Report::default();
        unsure.unchecked(check::BASE_MODEL, "timeout");
        assert!(matches!(unsure.verdict(), Err(StageError::Retry { .. })));
        assert!(Report::default().verdict().is_ok());
    }

    #[test]
    fn long_lists_are_capped() {
        let names: Vec<String> = (1..=13).map(|i| format!("{i}.png")).collect();
        assert_eq!(
            list_names(&names),
            "1.png, 2.png, 3.png, 4.png, 5.png, 6.png, 7.png, 8.png, 9.png, 10.png and 3 more"
        );
    }
}
