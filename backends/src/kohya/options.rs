//! The kohya options a run sets besides the ones Trainyard derives from the
//! job (paths, rank, steps, …): the defaults this backend starts from, and
//! the allow-list of real sd-scripts option names a job may override through
//! `training.extras`, with their types and, where argparse has them, their
//! choices. Everything here ends up as keys of the `--config_file` TOML.

use crate::{Extra, ExtraType, SettingProblem, typed_extras};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use trainyard_models::ModelFamily;
use trainyard_proto::v1::TrainingSettings;

/// One option value as it is written to the args TOML.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub(crate) enum Opt {
    Text(String),
    Int(i64),
    Float(f64),
    Flag(bool),
    /// `nargs="*"` string options (`network_args`, `optimizer_args`).
    Texts(Vec<String>),
    /// `nargs="*"` float options (`text_encoder_lr`).
    Floats(Vec<f64>),
}

use ExtraType::{Flag, Float, Int, Text};

/// Options of `train_network.py` (and `library/train_util.py`) that both
/// scripts take.
const COMMON: &[(&str, ExtraType)] = &[
    ("optimizer_type", Text),
    // Whitespace-separated `key=value` items (`relative_step=False scale_parameter=False`).
    ("optimizer_args", Text),
    ("lr_scheduler", Text),
    ("lr_warmup_steps", Int),
    ("lr_scheduler_num_cycles", Int),
    ("lr_scheduler_power", Float),
    ("unet_lr", Float),
    ("text_encoder_lr", Float),
    ("max_grad_norm", Float),
    ("mixed_precision", Text),
    ("save_precision", Text),
    ("full_bf16", Flag),
    ("fp8_base", Flag),
    ("fp8_base_unet", Flag),
    ("gradient_checkpointing", Flag),
    ("sdpa", Flag),
    ("xformers", Flag),
    ("highvram", Flag),
    ("lowram", Flag),
    ("max_data_loader_n_workers", Int),
    ("persistent_data_loader_workers", Flag),
    ("cache_latents", Flag),
    ("cache_latents_to_disk", Flag),
    ("cache_text_encoder_outputs", Flag),
    ("cache_text_encoder_outputs_to_disk", Flag),
    ("network_train_unet_only", Flag),
    ("network_dropout", Float),
    // Whitespace-separated `key=value` items (`train_blocks=single`).
    ("network_args", Text),
    ("scale_weight_norms", Float),
    ("loss_type", Text),
    ("huber_c", Float),
];

/// `flux_train_network.py` only (`library/flux_train_utils.py`,
/// `train_util.add_dit_training_arguments`).
const FLUX: &[(&str, ExtraType)] = &[
    ("guidance_scale", Float),
    ("timestep_sampling", Text),
    ("sigmoid_scale", Float),
    ("discrete_flow_shift", Float),
    ("model_prediction_type", Text),
    ("apply_t5_attn_mask", Flag),
    ("t5xxl_max_token_length", Int),
    ("blocks_to_swap", Int),
    ("cpu_offload_checkpointing", Flag),
];

/// `sdxl_train_network.py` only (SD-family loss options and the SDXL VAE).
const SDXL: &[(&str, ExtraType)] = &[
    ("no_half_vae", Flag),
    ("min_snr_gamma", Float),
    ("noise_offset", Float),
];

/// Options argparse restricts to a set of values.
fn choices(key: &str) -> Option<&'static [&'static str]> {
    Some(match key {
        "mixed_precision" => &["no", "fp16", "bf16"],
        "save_precision" => &["float", "fp16", "bf16"],
        "timestep_sampling" => &["sigma", "uniform", "sigmoid", "shift", "flux_shift"],
        "model_prediction_type" => &["raw", "additive", "sigma_scaled"],
        "loss_type" => &["l1", "l2", "huber", "smooth_l1"],
        _ => return None,
    })
}

/// The allow-list for a family.
pub(crate) fn allowed(family: ModelFamily) -> Vec<(&'static str, ExtraType)> {
    let own = if family == ModelFamily::Flux {
        FLUX
    } else {
        SDXL
    };
    COMMON.iter().chain(own).copied().collect()
}

/// What a run starts from: the documented FLUX recipe (`docs/flux_train_network.md`,
/// fluxgym's 20 GB preset) and its SDXL counterpart. Every key is a real
/// option of the family's script.
fn defaults(family: ModelFamily) -> BTreeMap<String, Opt> {
    let text = |s: &str| Opt::Text(s.into());
    let mut d: Vec<(&str, Opt)> = vec![
        ("mixed_precision", text("bf16")),
        ("save_precision", text("bf16")),
        ("optimizer_type", text("adamw8bit")),
        ("lr_scheduler", text("constant")),
        ("network_train_unet_only", Opt::Flag(true)),
        ("gradient_checkpointing", Opt::Flag(true)),
        ("sdpa", Opt::Flag(true)),
        ("cache_latents", Opt::Flag(true)),
        ("cache_latents_to_disk", Opt::Flag(true)),
        ("cache_text_encoder_outputs", Opt::Flag(true)),
        ("cache_text_encoder_outputs_to_disk", Opt::Flag(true)),
        ("max_data_loader_n_workers", Opt::Int(2)),
    ];
    if family == ModelFamily::Flux {
        d.extend([
            ("fp8_base", Opt::Flag(true)),
            ("guidance_scale", Opt::Float(1.0)),
            ("timestep_sampling", text("shift")),
            ("discrete_flow_shift", Opt::Float(3.1582)),
            ("model_prediction_type", text("raw")),
        ]);
    } else {
        // The SDXL VAE overflows in half precision (`NaN detected in latents`).
        d.push(("no_half_vae", Opt::Flag(true)));
    }
    d.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The options of a run: the defaults with the job's extras on top. Returns
/// every problem with the extras (unknown keys, wrong types, values outside
/// argparse's choices, combinations the scripts refuse).
pub(crate) fn resolve(
    settings: &TrainingSettings,
    family: ModelFamily,
) -> Result<BTreeMap<String, Opt>, Vec<SettingProblem>> {
    let allowed = allowed(family);
    let (extras, mut problems) = match typed_extras("kohya", &settings.extras, &allowed) {
        Ok(extras) => (extras, Vec::new()),
        Err(problems) => {
            // Go on with the known keys, so that one call reports everything.
            let known: HashMap<_, _> = settings
                .extras
                .iter()
                .filter(|(k, _)| allowed.iter().any(|(a, _)| a == k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let extras = typed_extras("kohya", &known, &allowed).unwrap_or_default();
            (extras, problems)
        }
    };
    let mut options = defaults(family);
    // kohya turns `cache_X` back on when `cache_X_to_disk` is set, so turning
    // a cache off turns its disk variant off too unless the job set it.
    for (cache, to_disk) in [
        ("cache_latents", "cache_latents_to_disk"),
        (
            "cache_text_encoder_outputs",
            "cache_text_encoder_outputs_to_disk",
        ),
    ] {
        if extras.get(cache) == Some(&Extra::Flag(false)) && !extras.contains_key(to_disk) {
            options.insert(to_disk.into(), Opt::Flag(false));
        }
    }
    for (key, value) in extras {
        let opt = match (key.as_str(), value) {
            ("optimizer_args" | "network_args", Extra::Text(s)) => {
                let items: Vec<String> = s.split_whitespace().map(String::from).collect();
                if let Some(bad) = items.iter().find(|i| !i.contains('=')) {
                    problems.push(SettingProblem::extra(
                        &key,
                        format!("{bad:?} is not key=value (items are separated by spaces)"),
                    ));
                }
                Opt::Texts(items)
            }
            // `nargs="*"`: one value applies to every text encoder.
            ("text_encoder_lr", Extra::Float(x)) => Opt::Floats(vec![x]),
            (_, Extra::Text(s)) => {
                if let Some(allowed) = choices(&key).filter(|c| !c.contains(&s.as_str())) {
                    problems.push(SettingProblem::extra(
                        &key,
                        format!("{s:?} is not one of {}", allowed.join(", ")),
                    ));
                }
                Opt::Text(s)
            }
            (_, Extra::Int(n)) => {
                if n < 0 {
                    problems.push(SettingProblem::extra(&key, "must not be negative"));
                }
                Opt::Int(n)
            }
            (_, Extra::Float(x)) => {
                if !x.is_finite() {
                    problems.push(SettingProblem::extra(&key, "must be a finite number"));
                }
                Opt::Float(x)
            }
            (_, Extra::Flag(b)) => Opt::Flag(b),
        };
        options.insert(key, opt);
    }
    let flag = |k: &str| options.get(k) == Some(&Opt::Flag(true));
    let fp8 = flag("fp8_base") || flag("fp8_base_unet");
    if fp8 && options.get("mixed_precision") == Some(&Opt::Text("no".into())) {
        problems.push(SettingProblem::new(
            "training.extras",
            "fp8_base needs mixed_precision fp16 or bf16 (kohya asserts it)",
        ));
    }
    if matches!(options.get("blocks_to_swap"), Some(Opt::Int(n)) if *n > 0)
        && flag("cpu_offload_checkpointing")
    {
        problems.push(SettingProblem::new(
            "training.extras",
            "blocks_to_swap cannot be combined with cpu_offload_checkpointing",
        ));
    }
    let caches_te =
        flag("cache_text_encoder_outputs") || flag("cache_text_encoder_outputs_to_disk");
    if family == ModelFamily::Sdxl && !flag("network_train_unet_only") && caches_te {
        problems.push(SettingProblem::new(
            "training.extras",
            "training the SDXL text encoders (network_train_unet_only = false) \
             needs cache_text_encoder_outputs = false",
        ));
    }
    if problems.is_empty() {
        Ok(options)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::{ExtraValue, extra_value::Kind};

    fn settings(extras: &[(&str, Kind)]) -> TrainingSettings {
        let extras: HashMap<_, _> = extras
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    ExtraValue {
                        kind: Some(v.clone()),
                    },
                )
            })
            .collect();
        TrainingSettings {
            backend: "kohya".into(),
            extras,
            ..Default::default()
        }
    }

    #[test]
    fn extras_override_defaults_with_kohya_shapes() {
        let s = settings(&[
            ("optimizer_type", Kind::Text("adafactor".into())),
            (
                "optimizer_args",
                Kind::Text("relative_step=False  scale_parameter=False".into()),
            ),
            ("text_encoder_lr", Kind::Float(1e-5)),
            ("blocks_to_swap", Kind::Int(18)),
        ]);
        let o = resolve(&s, ModelFamily::Flux).unwrap();
        assert_eq!(o["optimizer_type"], Opt::Text("adafactor".into()));
        assert_eq!(
            o["optimizer_args"],
            Opt::Texts(vec![
                "relative_step=False".into(),
                "scale_parameter=False".into()
            ])
        );
        assert_eq!(o["text_encoder_lr"], Opt::Floats(vec![1e-5]));
        assert_eq!(o["blocks_to_swap"], Opt::Int(18));
        assert_eq!(o["timestep_sampling"], Opt::Text("shift".into()));
    }

    #[test]
    fn every_problem_is_reported() {
        let s = settings(&[
            ("blocks_to_swap", Kind::Int(4)),
            ("mixed_precision", Kind::Text("fp32".into())),
            ("network_args", Kind::Text("train_blocks".into())),
        ]);
        // blocks_to_swap is FLUX-only: SDXL refuses it by name, and still
        // checks the other keys.
        let problems = resolve(&s, ModelFamily::Sdxl).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(problems[0].field, "training.extras.blocks_to_swap");
        assert!(problems[0].problem.starts_with("unknown key for kohya"));
        let problems = resolve(&s, ModelFamily::Flux)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("\"fp32\" is not one of no, fp16, bf16"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("\"train_blocks\" is not key=value"))
        );
    }

    #[test]
    fn refused_combinations() {
        let s = settings(&[
            ("mixed_precision", Kind::Text("no".into())),
            ("blocks_to_swap", Kind::Int(8)),
            ("cpu_offload_checkpointing", Kind::Flag(true)),
        ]);
        assert_eq!(resolve(&s, ModelFamily::Flux).unwrap_err().len(), 2);
        let s = settings(&[("network_train_unet_only", Kind::Flag(false))]);
        assert!(
            resolve(&s, ModelFamily::Sdxl).unwrap_err()[0]
                .problem
                .contains("text encoders")
        );
        let s = settings(&[
            ("network_train_unet_only", Kind::Flag(false)),
            ("cache_text_encoder_outputs", Kind::Flag(false)),
        ]);
        let o = resolve(&s, ModelFamily::Sdxl).unwrap();
        assert_eq!(o["cache_text_encoder_outputs_to_disk"], Opt::Flag(false));
        let s = settings(&[
            ("network_train_unet_only", Kind::Flag(false)),
            ("cache_text_encoder_outputs", Kind::Flag(false)),
            ("cache_text_encoder_outputs_to_disk", Kind::Flag(true)),
        ]);
        assert!(resolve(&s, ModelFamily::Sdxl).is_err());
    }
}
