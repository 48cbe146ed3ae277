//! The trainer's single error type.
//!
//! The worker that launches us only sees an exit code and our stderr, so every
//! failure is classified into a small set of *kinds* that map onto the
//! `ty-error kind=<kind> message=...` line and onto the exit code (2 for
//! problems the user must fix in the job definition, 1 for everything else).

use std::path::Path;

/// Everything that can go wrong while making a base model or training.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// The config file is missing, malformed, or has invalid values.
    #[error("{0}")]
    Config(String),
    /// The dataset directory is missing or holds no usable image.
    #[error("{0}")]
    Dataset(String),
    /// The base model (or a checkpoint's tensors) cannot be read or does not fit.
    #[error("{0}")]
    Model(String),
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, including the path.
        context: String,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// Training itself failed (e.g. the loss diverged to NaN).
    #[error("{0}")]
    Training(String),
    /// A tensor operation failed (a bug, or an out-of-memory condition).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl TrainerError {
    /// Builds an [`TrainerError::Io`] error mentioning `path`.
    pub fn io(what: &str, path: &Path, source: std::io::Error) -> Self {
        TrainerError::Io {
            context: format!("{what} {}", path.display()),
            source,
        }
    }

    /// The `kind=` value printed on the `ty-error` line.
    pub fn kind(&self) -> &'static str {
        match self {
            TrainerError::Config(_) => "config",
            TrainerError::Dataset(_) => "dataset",
            TrainerError::Model(_) => "model",
            TrainerError::Io { .. } => "io",
            TrainerError::Training(_) | TrainerError::Tensor(_) => "internal",
        }
    }

    /// Process exit code: 2 for user-fixable input problems, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            TrainerError::Config(_) | TrainerError::Dataset(_) | TrainerError::Model(_) => 2,
            TrainerError::Io { .. } | TrainerError::Training(_) | TrainerError::Tensor(_) => 1,
        }
    }
}

/// Shorthand result type used across the crate.
pub type Result<T> = std::result::Result<T, TrainerError>;
