//! The error every public prepare entry point returns.
//!
//! The stage runtime turns it into a retry (nak with a delay) or a
//! permanent failure, so each variant answers [`PrepareError::is_retryable`]
//! and, where a server asked for it, [`PrepareError::retry_after`]. Messages
//! are shown to users as the job's failure reason: they are lowercase, have
//! no trailing period, name the offending file(s) or setting, and include the
//! wrapped error's message inline (the wrapped error is kept in a public
//! field, not as `source()`, so the text is not repeated in error chains).

use std::path::PathBuf;
use std::time::Duration;

use crate::caption::{CaptionError, CaptionFailed};
use crate::fetch::FetchError;
use crate::unpack::UnpackError;
use trainyard_core::runtime::StageError;
use trainyard_proto::v1::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("dataset input {path} does not exist")]
    InputNotFound { path: PathBuf },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("could not unpack {archive}: {error}")]
    Unpack { archive: String, error: UnpackError },
    #[error("dataset has more than {limit} files (limits.max_files)")]
    TooManyFiles { limit: usize },
    #[error("downloaded dataset exceeds {limit} bytes (limits.max_total_bytes)")]
    InputTooLarge { limit: u64 },
    #[error("{}", no_usable_images_message(bad))]
    NoUsableImages {
        /// Every image or clip that failed to decode, was too small or over a
        /// clip limit, by its name relative to the dataset root.
        bad: Vec<String>,
    },
    /// `ffprobe` cannot be started, so the dataset's clips cannot be read.
    #[error(
        "cannot run {} to read the dataset's video clips: {error}; install Debian's ffmpeg \
         package (scripts/install-ffmpeg) or set captioner.video.ffprobe",
        program.display()
    )]
    NoProbe { program: PathBuf, error: String },
    #[error("dataset has {found} usable images, fewer than min_images ({required})")]
    TooFewImages { found: usize, required: usize },
    #[error("{}", no_text_dataset_message(found))]
    NoTextDataset {
        /// The files the dataset does hold, by name.
        found: Vec<String>,
    },
    #[error("captioning {file} failed: {error}")]
    Caption { file: String, error: CaptionError },
    #[error("invalid setting {field}: {reason}")]
    InvalidSettings { field: &'static str, reason: String },
    #[error("i/o error on {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("a background task was cancelled before it finished")]
    Interrupted,
}

impl From<CaptionFailed> for PrepareError {
    fn from(CaptionFailed { file, error }: CaptionFailed) -> Self {
        PrepareError::Caption { file, error }
    }
}

fn no_usable_images_message(bad: &[String]) -> String {
    if bad.is_empty() {
        "no usable images in the dataset: no image or video files found".to_owned()
    } else {
        format!(
            "no usable images in the dataset; unreadable, too small or over the clip limits: {}",
            crate::preflight::list_names(bad)
        )
    }
}

fn no_text_dataset_message(found: &[String]) -> String {
    let held = if found.is_empty() {
        "it holds no files".to_owned()
    } else {
        format!("it holds {}", crate::preflight::list_names(found))
    };
    format!("a language-model dataset is one train.jsonl (or a single .jsonl file); {held}")
}

impl PrepareError {
    /// True when the same input may prepare successfully later: network
    /// and server trouble, a captioning backend that is down, local disk
    /// errors, cancellation. A bad dataset or bad settings is final.
    pub fn is_retryable(&self) -> bool {
        match self {
            PrepareError::Fetch(e) => e.is_retryable(),
            PrepareError::Unpack { error, .. } => error.is_retryable(),
            PrepareError::Caption { error, .. } => error.is_retryable(),
            PrepareError::Io { .. } | PrepareError::Interrupted => true,
            PrepareError::InputNotFound { .. }
            | PrepareError::TooManyFiles { .. }
            | PrepareError::InputTooLarge { .. }
            | PrepareError::NoUsableImages { .. }
            | PrepareError::TooFewImages { .. }
            | PrepareError::NoTextDataset { .. }
            | PrepareError::InvalidSettings { .. }
            | PrepareError::NoProbe { .. } => false,
        }
    }

    /// How long a server asked us to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PrepareError::Fetch(e) => e.retry_after(),
            PrepareError::Caption { error, .. } => error.retry_after(),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> PrepareError {
        let path = path.into();
        move |error| PrepareError::Io { path, error }
    }
}

/// Why a dataset could not be prepared: a [`PrepareError`] (which knows
/// its retry intent and, for too few images, the count) or a stage error
/// from reading the artifact store.
#[derive(Debug)]
pub enum DatasetError {
    Prepare(PrepareError),
    Stage(StageError),
}

impl DatasetError {
    pub fn into_stage_error(self) -> StageError {
        match self {
            DatasetError::Prepare(e) => prepare_error(e),
            DatasetError::Stage(e) => e,
        }
    }
}

impl From<PrepareError> for DatasetError {
    fn from(error: PrepareError) -> Self {
        DatasetError::Prepare(error)
    }
}

impl From<StageError> for DatasetError {
    fn from(error: StageError) -> Self {
        DatasetError::Stage(error)
    }
}

fn prepare_error(error: PrepareError) -> StageError {
    let kind = match &error {
        PrepareError::Fetch(_) => ErrorKind::Fetch,
        PrepareError::InvalidSettings { .. } => ErrorKind::InvalidSpec,
        PrepareError::Io { .. } | PrepareError::Interrupted | PrepareError::NoProbe { .. } => {
            ErrorKind::Internal
        }
        _ => ErrorKind::BadDataset,
    };
    if error.is_retryable() {
        let delay = error.retry_after().unwrap_or_default();
        StageError::retry(kind, error.to_string(), delay)
    } else {
        StageError::fail(kind, error.to_string())
    }
}

/// Runs blocking work (file walks, decoding, hashing) on the blocking pool.
/// A panic in `f` is a bug and is re-raised; a cancelled task (runtime
/// shutting down) is [`PrepareError::Interrupted`].
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, PrepareError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => Ok(value),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(PrepareError::Interrupted),
    }
}
