//! The adapter file's `__metadata__`: kohya `ss_*` keys (so UIs and merge
//! scripts recognise a LoRA), `modelspec.*` keys, and our own `ty_*` keys.
//! Nothing run-specific (timestamps, resume paths) goes in, so a resumed
//! run's adapter is byte-identical to an uninterrupted one.

use std::collections::BTreeMap;

use crate::config::TrainConfig;
use crate::data::Dataset;
use crate::optim;
use crate::stfile::Metadata;

/// Value of `ty_trainer`.
pub const TRAINER_ID: &str = "trainyard-reference";

/// Number of steps averaged for `loss_first` / `loss_last`:
/// `min(10, ceil(total / 4))`.
pub fn loss_window(total_steps: u64) -> usize {
    total_steps.div_ceil(4).clamp(1, 10) as usize
}

/// `(loss_first, loss_last)`: means over the first and last [`loss_window`]
/// entries of `history` (fewer if the history is shorter).
pub fn loss_summary(history: &[f32], total_steps: u64) -> (f64, f64) {
    let w = loss_window(total_steps).min(history.len());
    let mean = |s: &[f32]| {
        if s.is_empty() {
            f64::NAN
        } else {
            s.iter().map(|&v| f64::from(v)).sum::<f64>() / s.len() as f64
        }
    };
    (mean(&history[..w]), mean(&history[history.len() - w..]))
}

/// Everything the metadata is built from.
pub struct Inputs<'a> {
    /// The job.
    pub cfg: &'a TrainConfig,
    /// The dataset actually used.
    pub dataset: &'a Dataset,
    /// Steps completed.
    pub step: u64,
    /// 1-based epoch of the last completed step.
    pub epoch: u64,
    /// Loss per completed step.
    pub history: &'a [f32],
    /// sha256 of the base model file.
    pub base_sha256: &'a str,
}

/// Builds the adapter metadata (all values are strings, as safetensors requires).
pub fn adapter_metadata(i: &Inputs<'_>) -> Metadata {
    let cfg = i.cfg;
    let (first, last) = loss_summary(i.history, cfg.steps);
    let dir_name = cfg
        .dataset_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    let mut freq = BTreeMap::new();
    freq.insert(dir_name, &i.dataset.tag_frequency);
    let base_file = cfg
        .base_model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut m: Metadata = [
        ("ss_network_module", "networks.lora".to_owned()),
        ("ss_network_dim", cfg.rank.to_string()),
        ("ss_network_alpha", format!("{:?}", cfg.alpha)),
        ("ss_steps", i.step.to_string()),
        ("ss_max_train_steps", cfg.steps.to_string()),
        ("ss_epoch", i.epoch.to_string()),
        ("ss_base_model_version", cfg.base_model_name.clone()),
        ("ss_sd_model_name", base_file),
        ("ss_learning_rate", format!("{:?}", cfg.learning_rate)),
        ("ss_unet_lr", format!("{:?}", cfg.learning_rate)),
        ("ss_lr_scheduler", "constant".to_owned()),
        (
            "ss_optimizer",
            format!(
                "AdamW(weight_decay={},betas=({},{}),eps={:e})",
                optim::WEIGHT_DECAY,
                optim::BETA1,
                optim::BETA2,
                optim::EPS
            ),
        ),
        (
            "ss_resolution",
            format!("({}, {})", cfg.resolution, cfg.resolution),
        ),
        (
            "ss_num_train_images",
            (i.dataset.samples.len() * cfg.repeats).to_string(),
        ),
        ("ss_batch_size_per_device", cfg.batch_size.to_string()),
        ("ss_seed", cfg.seed.to_string()),
        (
            "ss_tag_frequency",
            serde_json::to_string(&freq).unwrap_or_else(|_| "{}".into()),
        ),
        ("ss_output_name", cfg.output_name.clone()),
        ("modelspec.sai_model_spec", "1.0.0".to_owned()),
        (
            "modelspec.architecture",
            format!("{}/lora", crate::model::MODEL_ID),
        ),
        ("modelspec.implementation", TRAINER_ID.to_owned()),
        ("modelspec.title", cfg.output_name.clone()),
        ("ty_trainer", TRAINER_ID.to_owned()),
        ("ty_base_model_sha256", i.base_sha256.to_owned()),
        ("ty_dataset_fingerprint", i.dataset.fingerprint.clone()),
        ("ty_config_hash", cfg.hash()),
        ("ty_loss_first", format!("{first:.6}")),
        ("ty_loss_last", format!("{last:.6}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(word) = cfg.trigger_word.as_deref().filter(|w| !w.is_empty()) {
        for key in [
            "ty_trigger_word",
            "ss_trigger_word",
            "modelspec.trigger_phrase",
        ] {
            m.insert(key.to_owned(), word.to_owned());
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_min_10_and_quarter_rounded_up() {
        assert_eq!(loss_window(1), 1);
        assert_eq!(loss_window(5), 2);
        assert_eq!(loss_window(40), 10);
        assert_eq!(loss_window(1000), 10);
        let h = [4.0, 2.0, 1.0, 1.0, 0.0];
        assert_eq!(loss_summary(&h, 5), (3.0, 0.5));
    }
}
