//! Checkpoint directories: `<output_dir>/checkpoints/step-XXXXXXXX/` with
//! `adapter.safetensors`, `optimizer.safetensors` and `state.json`.
//!
//! A checkpoint is assembled in a hidden temp directory beside its final
//! name and renamed into place, so a reader (or a resume after a crash)
//! sees either a complete checkpoint or none at all.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};
use crate::stfile::{self, Metadata, TensorMap};

/// File names inside a checkpoint directory.
pub const ADAPTER_FILE: &str = "adapter.safetensors";
/// See [`ADAPTER_FILE`].
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// See [`ADAPTER_FILE`].
pub const STATE_FILE: &str = "state.json";
/// Current `state.json` format version.
pub const STATE_FORMAT: u32 = 1;

/// Contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Format version ([`STATE_FORMAT`]).
    pub format: u32,
    /// Last completed (1-based) step.
    pub step: u64,
    /// `steps` of the run that wrote it (informational).
    pub total_steps: u64,
    /// The run's seed.
    pub seed: u64,
    /// How randomness is restored: all draws are derived from `(seed, step)`,
    /// so there is no generator state to save.
    pub rng: String,
    /// [`crate::config::TrainConfig::hash`] of the run; resume requires a match.
    pub config_hash: String,
    /// sha256 of the base model file; resume requires a match.
    pub base_model_sha256: String,
    /// Dataset fingerprint at the time of saving; a mismatch on resume warns.
    pub dataset_fingerprint: String,
    /// Number of AdamW updates applied.
    pub adam_step: u64,
    /// Loss of every step so far (index 0 = step 1), for the final summary.
    pub loss_history: Vec<f32>,
    /// Position in the data stream after `step`: where a resumed run takes
    /// its next sample, whatever its batch size. Absent in checkpoints
    /// written before it was recorded (then `step × batch_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_seen: Option<u64>,
}

/// A checkpoint read back from disk.
pub struct Loaded {
    /// `adapter.safetensors` tensors.
    pub adapter: TensorMap,
    /// `optimizer.safetensors` tensors.
    pub optimizer: TensorMap,
    /// `optimizer.safetensors` metadata.
    pub optimizer_meta: Metadata,
    /// `state.json`.
    pub state: State,
}

/// Directory name for a step.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint for `state.step` under `output_dir` and returns its path.
pub fn save(output_dir: &Path, adapter: &[u8], optimizer: &[u8], state: &State) -> Result<PathBuf> {
    let root = output_dir.join("checkpoints");
    let io = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |e| TrainerError::io(what, &p, e)
    };
    std::fs::create_dir_all(&root).map_err(io("cannot create", &root))?;
    let name = dir_name(state.step);
    let pid = std::process::id();
    let tmp = root.join(format!(".tmp-{name}-{pid}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io("cannot remove", &tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io("cannot create", &tmp))?;
    let state_json = serde_json::to_vec_pretty(state).map_err(|e| TrainerError::Io {
        context: "cannot encode state.json".into(),
        source: std::io::Error::other(e),
    })?;
    for (file, bytes) in [
        (ADAPTER_FILE, adapter),
        (OPTIMIZER_FILE, optimizer),
        (STATE_FILE, &state_json[..]),
    ] {
        write_synced(&tmp.join(file), bytes)?;
    }
    let dest = root.join(&name);
    if dest.exists() {
        // Re-saving the same step (e.g. a resumed run passing it again):
        // move the old one aside first, since rename cannot replace a non-empty dir.
        let old = root.join(format!(".old-{name}-{pid}"));
        std::fs::rename(&dest, &old).map_err(io("cannot move aside", &dest))?;
        std::fs::remove_dir_all(&old).map_err(io("cannot remove", &old))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io("cannot rename into", &dest))?;
    if let Ok(d) = std::fs::File::open(&root) {
        // Persist the rename itself; best effort (not all filesystems allow it).
        let _ = d.sync_all();
    }
    Ok(dest)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).map_err(|e| TrainerError::io("cannot create", path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| TrainerError::io("cannot write", path, e))
}

/// Reads a checkpoint directory; any problem is a `Config` error since the
/// directory came from the config's `resume_from`.
pub fn load(dir: &Path) -> Result<Loaded> {
    let cfg_err =
        |e: TrainerError| TrainerError::Config(format!("resume_from {}: {e}", dir.display()));
    if !dir.is_dir() {
        return Err(TrainerError::Config(format!(
            "resume_from {} is not a checkpoint directory",
            dir.display()
        )));
    }
    let (adapter, _) = stfile::read(&dir.join(ADAPTER_FILE)).map_err(cfg_err)?;
    let (optimizer, optimizer_meta) = stfile::read(&dir.join(OPTIMIZER_FILE)).map_err(cfg_err)?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| TrainerError::Config(format!("cannot read {}: {e}", state_path.display())))?;
    let state: State = serde_json::from_str(&text)
        .map_err(|e| TrainerError::Config(format!("invalid {}: {e}", state_path.display())))?;
    if state.format != STATE_FORMAT {
        return Err(TrainerError::Config(format!(
            "{} has format {}, this trainer reads {STATE_FORMAT}",
            state_path.display(),
            state.format
        )));
    }
    if state.loss_history.len() as u64 != state.step {
        return Err(TrainerError::Config(format!(
            "{} is inconsistent: step {} but {} losses",
            state_path.display(),
            state.step,
            state.loss_history.len()
        )));
    }
    Ok(Loaded {
        adapter,
        optimizer,
        optimizer_meta,
        state,
    })
}
