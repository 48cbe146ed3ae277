//! The `train --config <file.json>` contract between the worker and this
//! trainer. Unknown fields are rejected so a typo in a job definition fails
//! loudly (exit 2) instead of silently training with a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainerError};

/// A training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Directory of training images (png/jpg/jpeg/webp, not recursive) with
    /// optional `<stem>.txt` captions beside them.
    pub dataset_dir: PathBuf,
    /// Base model file written by `ty-reference-trainer make-base`.
    pub base_model: PathBuf,
    /// Human name of the base model; goes into `ss_base_model_version`.
    pub base_model_name: String,
    /// Where checkpoints and the final adapter go (created if missing).
    pub output_dir: PathBuf,
    /// Final adapter is `<output_dir>/<output_name>.safetensors`; a plain file
    /// name without path separators.
    pub output_name: String,
    /// Total optimizer steps (>= 1).
    pub steps: u64,
    /// Constant AdamW learning rate (> 0).
    pub learning_rate: f64,
    /// LoRA rank (>= 1, at most the smallest layer dimension of the base).
    pub rank: usize,
    /// LoRA alpha (> 0); adapters are scaled by `alpha / rank`.
    pub alpha: f64,
    /// Training resolution; must equal the base model's resolution.
    pub resolution: usize,
    /// Images per step (1..=64).
    pub batch_size: usize,
    /// How many times each image appears per epoch (>= 1).
    pub repeats: usize,
    /// Save a checkpoint every this many steps; 0 disables periodic
    /// checkpoints (an interrupt still saves one).
    pub save_every: u64,
    /// Seed of every random draw (LoRA init, shuffles, timesteps, noise).
    pub seed: u64,
    /// Trigger word recorded in the adapter metadata; null or absent for none.
    #[serde(default)]
    pub trigger_word: Option<String>,
    /// A checkpoint directory (`<output_dir>/checkpoints/step-XXXXXXXX`) to
    /// continue from; null or absent to start fresh.
    #[serde(default)]
    pub resume_from: Option<PathBuf>,
    /// Test hook making the trainer misbehave on purpose; null or absent normally.
    #[serde(default)]
    pub fault: Option<Fault>,
}

/// Deliberate misbehaviour for fault-injection tests. Each field names the
/// (1-based) step after whose progress line the fault fires; the first field
/// that matches a step wins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// `std::process::abort()` without saving anything.
    #[serde(default)]
    pub crash_at_step: Option<u64>,
    /// Stop printing and sleep until killed. SIGTERM/SIGINT are ignored
    /// (like a wedged trainer), so only SIGKILL ends it.
    #[serde(default)]
    pub hang_at_step: Option<u64>,
    /// Exit 0 without writing the final adapter or a `ty-done` line.
    #[serde(default)]
    pub exit_zero_without_output_at_step: Option<u64>,
    /// Print a PyTorch-style CUDA OOM message on stderr and exit 1.
    #[serde(default)]
    pub oom_at_step: Option<u64>,
    /// Limits `oom_at_step` to runs whose `batch_size` is at least this, as
    /// memory would: a lighter retry then gets past the step.
    #[serde(default)]
    pub oom_min_batch_size: Option<usize>,
    /// Print about this many bytes of noise on stdout after every step
    /// (a chatty trainer, for the log budget's tests).
    #[serde(default)]
    pub chatter_bytes_per_step: Option<u64>,
}

/// What a [`Fault`] asks for at a given step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// See [`Fault::crash_at_step`].
    Crash,
    /// See [`Fault::hang_at_step`].
    Hang,
    /// See [`Fault::exit_zero_without_output_at_step`].
    ExitZero,
    /// See [`Fault::oom_at_step`].
    Oom,
}

impl Fault {
    /// The fault to trigger right after `step` of a run with `batch_size`, if any.
    pub fn at(&self, step: u64, batch_size: usize) -> Option<FaultAction> {
        let oom_at = self
            .oom_at_step
            .filter(|_| self.oom_min_batch_size.is_none_or(|min| batch_size >= min));
        [
            (self.crash_at_step, FaultAction::Crash),
            (self.hang_at_step, FaultAction::Hang),
            (self.exit_zero_without_output_at_step, FaultAction::ExitZero),
            (oom_at, FaultAction::Oom),
        ]
        .into_iter()
        .find_map(|(s, a)| (s == Some(step)).then_some(a))
    }
}

/// The fields that determine what a checkpoint means; a checkpoint may only
/// be resumed by a config with the same hash. `steps`, `save_every`, paths,
/// names and the fault hook are deliberately excluded so a run can be
/// extended or moved, and `batch_size` so a run can continue lighter after
/// running out of memory (as real trainers can; the data order continues
/// where it stopped); the base model and dataset are checked by content
/// (sha256 / fingerprint) instead of by path.
#[derive(Serialize)]
struct Hashed {
    learning_rate: f64,
    rank: usize,
    alpha: f64,
    resolution: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_size: Option<usize>,
    repeats: usize,
    seed: u64,
}

impl TrainConfig {
    /// Reads and validates a config file; every problem is a `Config` error.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            TrainerError::Config(format!("cannot read config {}: {e}", path.display()))
        })?;
        let cfg: TrainConfig = serde_json::from_str(&text)
            .map_err(|e| TrainerError::Config(format!("invalid config {}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(TrainerError::Config(m));
        if self.steps == 0 {
            return fail("steps must be >= 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return fail(format!(
                "learning_rate must be a positive number, got {}",
                self.learning_rate
            ));
        }
        if self.rank == 0 {
            return fail("rank must be >= 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return fail(format!(
                "alpha must be a positive number, got {}",
                self.alpha
            ));
        }
        if !(1..=64).contains(&self.batch_size) {
            return fail(format!(
                "batch_size must be between 1 and 64, got {}",
                self.batch_size
            ));
        }
        if self.repeats == 0 {
            return fail("repeats must be >= 1".into());
        }
        let name = self.output_name.as_str();
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
            return fail(format!(
                "output_name must be a plain file name, got {name:?}"
            ));
        }
        if self.base_model_name.trim().is_empty() {
            return fail("base_model_name must not be empty".into());
        }
        for (field, p) in [
            ("dataset_dir", &self.dataset_dir),
            ("base_model", &self.base_model),
            ("output_dir", &self.output_dir),
        ] {
            if p.as_os_str().is_empty() {
                return fail(format!("{field} must not be empty"));
            }
        }
        if let Some(f) = &self.fault {
            let steps = [
                f.crash_at_step,
                f.hang_at_step,
                f.exit_zero_without_output_at_step,
                f.oom_at_step,
            ];
            if steps.contains(&Some(0)) {
                return fail("fault steps are 1-based and must be >= 1".into());
            }
        }
        Ok(())
    }

    /// Hex sha256 of the fields a resume must keep (see [`Hashed`]).
    pub fn hash(&self) -> String {
        self.hash_of(None)
    }

    /// The hash checkpoints were written with before `batch_size` was
    /// left out of it; they still resume with the batch size they had.
    pub fn hash_with_batch_size(&self) -> String {
        self.hash_of(Some(self.batch_size))
    }

    fn hash_of(&self, batch_size: Option<usize>) -> String {
        let h = Hashed {
            learning_rate: self.learning_rate,
            rank: self.rank,
            alpha: self.alpha,
            resolution: self.resolution,
            batch_size,
            repeats: self.repeats,
            seed: self.seed,
        };
        let json = serde_json::to_string(&h).unwrap_or_default();
        hex::encode(Sha256::digest(json.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "dataset_dir": "/d", "base_model": "/b.safetensors", "base_model_name": "reference-denoiser-v1",
            "output_dir": "/o", "output_name": "lora", "steps": 100, "learning_rate": 0.001,
            "rank": 4, "alpha": 4.0, "resolution": 32, "batch_size": 2, "repeats": 1,
            "save_every": 25, "seed": 42, "trigger_word": "tyzx", "resume_from": null, "fault": null
        })
    }

    #[test]
    fn parses_the_documented_example_and_rejects_unknown_fields() {
        let cfg: TrainConfig = serde_json::from_value(sample()).unwrap();
        cfg.validate().unwrap();
        let mut v = sample();
        v["learning_rat"] = 1.into();
        assert!(serde_json::from_value::<TrainConfig>(v).is_err());
        let mut v = sample();
        v["fault"] = serde_json::json!({"crash_at_step": 3, "nope": 1});
        assert!(serde_json::from_value::<TrainConfig>(v).is_err());
    }

    #[test]
    fn hash_ignores_steps_but_not_seed() {
        let a: TrainConfig = serde_json::from_value(sample()).unwrap();
        let mut b = a.clone();
        b.steps = 500;
        assert_eq!(a.hash(), b.hash());
        b.batch_size = 1;
        assert_eq!(a.hash(), b.hash(), "a lighter batch may resume");
        assert_ne!(a.hash_with_batch_size(), b.hash_with_batch_size());
        b.seed = 1;
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn fault_picks_the_matching_step() {
        let f = Fault {
            crash_at_step: Some(3),
            oom_at_step: Some(5),
            ..Fault::default()
        };
        assert_eq!(f.at(3, 1), Some(FaultAction::Crash));
        assert_eq!(f.at(5, 1), Some(FaultAction::Oom));
        assert_eq!(f.at(4, 1), None);
        let heavy_only = Fault {
            oom_min_batch_size: Some(4),
            ..f
        };
        assert_eq!(heavy_only.at(5, 4), Some(FaultAction::Oom));
        assert_eq!(heavy_only.at(5, 2), None);
    }
}
