//! The two TOML files a diffusion-pipe run reads, serialised from structs,
//! and the extras allow-list with where each key goes.

use super::NAME;
use crate::{BackendError, Extra, ExtraType, SettingProblem, TrainInputs, typed_extras};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::TrainingSettings;

/// Training-state checkpoint period unless extras say otherwise.
pub const DEFAULT_CHECKPOINT_MINUTES: f64 = 10.0;
/// `utils/common.py` `DTYPE_MAP`: the dtype names every dtype key accepts.
const DTYPES: &[&str] = &[
    "float32",
    "float16",
    "bfloat16",
    "float8",
    "float8_e4m3fn",
    "float8_e5m2",
];

/// Which file and table an extra goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    /// The top level of the main config.
    Main,
    /// `[model]` of the main config.
    Model,
    /// `[optimizer]` of the main config.
    Optimizer,
    /// The top level of the dataset TOML.
    Dataset,
}

/// One allowed extra: its name in `training.extras`, the diffusion-pipe key
/// it sets, where, and for which families (empty: all).
struct Tunable {
    name: &'static str,
    key: &'static str,
    ty: ExtraType,
    section: Section,
    families: &'static [ModelFamily],
}

const fn tunable(
    name: &'static str,
    ty: ExtraType,
    section: Section,
    families: &'static [ModelFamily],
) -> Tunable {
    Tunable {
        name,
        key: name,
        ty,
        section,
        families,
    }
}

/// The extras this backend accepts, all real diffusion-pipe keys. Each goes
/// to the key of the same name in the section given, except
/// `optimizer_type`, which is `[optimizer] type`, and `frame_buckets`, text
/// such as `"1, 33"` written as the dataset TOML's list (see
/// [`super::video`]). Main config:
/// `gradient_accumulation_steps`, `gradient_clipping`, `warmup_steps`,
/// `blocks_to_swap`, `activation_checkpointing` (default true),
/// `save_dtype`, `caching_batch_size`, `map_num_proc`, `compile`,
/// `checkpoint_every_n_minutes` (default [`DEFAULT_CHECKPOINT_MINUTES`]) or
/// `checkpoint_every_n_epochs` (replaces the minutes). `[model]`:
/// `transformer_dtype`, `diffusion_model_dtype` (Z-Image), `timestep_sample_method`,
/// `flux_shift`, `shift`, `min_t`/`max_t` (Wan), `bypass_guidance_embedding`
/// (Flux), `v_pred`/`min_snr_gamma`/`debiased_estimation_loss` (SDXL).
/// `[optimizer]`: `optimizer_type` (default `adamw_optimi`), `weight_decay`
/// (0.01), `eps` (1e-8; not for `sgd` and `automagic`, which get neither
/// `eps` nor `betas`). Dataset TOML: `min_ar` (0.5), `max_ar` (2.0),
/// `num_ar_buckets` (7).
///
/// `lr_scheduler` is left out on purpose: its `linear` decay runs over
/// `epochs × steps per epoch`, which with `max_steps` ending the run is
/// longer than the run.
#[rustfmt::skip]
const TUNABLES: &[Tunable] = {
    use ExtraType::{Flag, Float, Int, Text};
    use ModelFamily::{Flux, QwenImage, Sdxl, Wan, ZImage};
    use Section::{Dataset, Main, Model, Optimizer};
    const ALL: &[ModelFamily] = &[];
    const NOT_SDXL: &[ModelFamily] = &[Flux, Wan, QwenImage, ZImage];
    &[
        tunable("gradient_accumulation_steps", Int, Main, ALL),
        tunable("gradient_clipping", Float, Main, ALL),
        tunable("warmup_steps", Int, Main, ALL),
        tunable("blocks_to_swap", Int, Main, NOT_SDXL),
        tunable("activation_checkpointing", Flag, Main, ALL),
        tunable("save_dtype", Text, Main, ALL),
        tunable("caching_batch_size", Int, Main, ALL),
        tunable("map_num_proc", Int, Main, ALL),
        tunable("compile", Flag, Main, ALL),
        tunable("checkpoint_every_n_minutes", Float, Main, ALL),
        tunable("checkpoint_every_n_epochs", Int, Main, ALL),
        tunable("transformer_dtype", Text, Model, &[Flux, Wan, QwenImage]),
        tunable("diffusion_model_dtype", Text, Model, &[ZImage]),
        tunable("timestep_sample_method", Text, Model, NOT_SDXL),
        tunable("flux_shift", Flag, Model, &[Flux, ZImage]),
        tunable("shift", Float, Model, &[ZImage]),
        tunable("min_t", Float, Model, &[Wan]),
        tunable("max_t", Float, Model, &[Wan]),
        tunable("bypass_guidance_embedding", Flag, Model, &[Flux]),
        tunable("v_pred", Flag, Model, &[Sdxl]),
        tunable("min_snr_gamma", Float, Model, &[Sdxl]),
        tunable("debiased_estimation_loss", Flag, Model, &[Sdxl]),
        Tunable { name: "optimizer_type", key: "type", ty: Text, section: Optimizer, families: ALL },
        tunable("weight_decay", Float, Optimizer, ALL),
        tunable("eps", Float, Optimizer, ALL),
        tunable("min_ar", Float, Dataset, ALL),
        tunable("max_ar", Float, Dataset, ALL),
        tunable("num_ar_buckets", Int, Dataset, ALL),
        tunable("frame_buckets", Text, Dataset, &[Wan]),
        tunable("video_clip_mode", Text, Dataset, &[Wan]),
    ]
};

fn allowed(family: ModelFamily) -> Vec<(&'static str, ExtraType)> {
    TUNABLES
        .iter()
        .filter(|t| t.families.is_empty() || t.families.contains(&family))
        .map(|t| (t.name, t.ty))
        .collect()
}

/// diffusion-pipe's `[model] type` for a family (the dispatch in `train.py`).
fn model_type(family: ModelFamily) -> &'static str {
    match family {
        ModelFamily::Flux => "flux",
        ModelFamily::Sdxl => "sdxl",
        ModelFamily::Wan => "wan",
        ModelFamily::QwenImage => "qwen_image",
        ModelFamily::ZImage => "z_image",
        ModelFamily::Reference | ModelFamily::Llm => "unsupported",
    }
}

#[derive(Serialize)]
struct MainConfig<'a> {
    output_dir: &'a Path,
    dataset: PathBuf,
    epochs: u64,
    max_steps: u32,
    micro_batch_size_per_gpu: u32,
    pipeline_stages: u32,
    save_every_n_steps: u32,
    steps_per_print: u32,
    /// Defaults and extras for the top level, by key.
    #[serde(flatten)]
    tuning: BTreeMap<&'static str, Extra>,
    model: ModelTable<'a>,
    adapter: Adapter,
    optimizer: Optimizer,
}

#[derive(Serialize)]
struct ModelTable<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    diffusers_path: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transformer_path: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_path: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ckpt_path: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    diffusion_model: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vae: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text_encoders: Option<Vec<TextEncoder<'a>>>,
    /// LoRA files merged into the weights before training (ComfyUI-based
    /// models: `ComfyPipeline.load_diffusion_model`).
    #[serde(skip_serializing_if = "Option::is_none")]
    merge_adapters: Option<Vec<&'a Path>>,
    dtype: &'static str,
    #[serde(flatten)]
    tuning: BTreeMap<&'static str, Extra>,
}

#[derive(Serialize)]
struct TextEncoder<'a> {
    path: &'a Path,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Adapter {
    #[serde(rename = "type")]
    kind: &'static str,
    rank: u32,
    dtype: &'static str,
}

/// `[optimizer]`: every key but `type` becomes a keyword argument of the
/// optimizer's constructor (`get_optimizer` in `train.py`), so only the ones
/// it takes are written.
#[derive(Serialize)]
struct Optimizer {
    #[serde(rename = "type")]
    kind: String,
    lr: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    betas: Option<[f64; 2]>,
    weight_decay: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    eps: Option<f64>,
}

/// Optimizer types whose constructor takes no `betas` and no single `eps`:
/// `torch.optim.SGD`, and `optimizers/automagic.py`'s Automagic (its `eps`
/// is a pair, its one beta `beta2`). `get_optimizer` matches types in
/// lower case.
const NO_BETAS_OR_EPS: &[&str] = &["sgd", "automagic"];

fn takes_betas_and_eps(optimizer_type: &str) -> bool {
    !NO_BETAS_OR_EPS.contains(&optimizer_type.to_ascii_lowercase().as_str())
}

#[derive(Serialize)]
struct DatasetConfig<'a> {
    resolutions: [u32; 1],
    enable_ar_bucket: bool,
    /// Set when the run has clips or the extra asks (see [`super::video`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    frame_buckets: Option<Vec<u32>>,
    /// `min_ar`, `max_ar`, `num_ar_buckets`: read without defaults when AR
    /// bucketing is on, so always written.
    #[serde(flatten)]
    tuning: BTreeMap<&'static str, Extra>,
    directory: [Directory<'a>; 1],
}

#[derive(Serialize)]
struct Directory<'a> {
    path: &'a Path,
    num_repeats: u32,
}

fn model_table<'a>(inputs: &'a TrainInputs) -> Result<ModelTable<'a>, BackendError> {
    let m = &inputs.model;
    let mut table = ModelTable {
        kind: model_type(m.family),
        diffusers_path: None,
        transformer_path: None,
        checkpoint_path: None,
        ckpt_path: None,
        diffusion_model: None,
        vae: None,
        text_encoders: None,
        merge_adapters: None,
        dtype: "bfloat16",
        tuning: BTreeMap::new(),
    };
    match m.family {
        ModelFamily::Flux => {
            table.diffusers_path = Some(m.part(part::DIFFUSERS)?);
            // A BFL-format transformer overrides the one in the diffusers folder.
            table.transformer_path = m.parts.get(part::TRANSFORMER).map(PathBuf::as_path);
        }
        ModelFamily::Sdxl => table.checkpoint_path = Some(m.part(part::CHECKPOINT)?),
        ModelFamily::Wan => table.ckpt_path = Some(m.part(part::CKPT_DIR)?),
        ModelFamily::QwenImage => table.diffusers_path = Some(m.part(part::DIFFUSERS)?),
        ModelFamily::ZImage => {
            table.diffusion_model = Some(m.part(part::TRANSFORMER)?);
            table.vae = Some(m.part(part::AE)?);
            table.text_encoders = Some(vec![TextEncoder {
                path: m.part(part::TEXT_ENCODER)?,
                kind: "lumina2",
            }]);
            // Turbo's de-distill adapter, when the preset has one.
            table.merge_adapters = m
                .parts
                .get(part::TRAINING_ADAPTER)
                .map(|adapter| vec![adapter.as_path()]);
        }
        other => {
            return Err(BackendError::InvalidSettings(format!(
                "base_model: {NAME} does not train {other} models"
            )));
        }
    }
    Ok(table)
}

fn extra_f64(extras: &BTreeMap<String, Extra>, key: &str) -> Option<f64> {
    match extras.get(key)? {
        Extra::Float(x) => Some(*x),
        Extra::Int(n) => Some(*n as f64),
        _ => None,
    }
}

fn extra_text<'a>(extras: &'a BTreeMap<String, Extra>, key: &str) -> Option<&'a str> {
    match extras.get(key)? {
        Extra::Text(s) => Some(s),
        _ => None,
    }
}

/// Value checks the types alone do not catch.
fn value_problems(extras: &BTreeMap<String, Extra>) -> Vec<SettingProblem> {
    let mut problems = Vec::new();
    for key in ["transformer_dtype", "diffusion_model_dtype", "save_dtype"] {
        if let Some(v) = extra_text(extras, key)
            && !DTYPES.contains(&v)
        {
            problems.push(SettingProblem::extra(
                key,
                format!(
                    "{v:?} is not a dtype diffusion-pipe knows; use one of {}",
                    DTYPES.join(", ")
                ),
            ));
        }
    }
    if let Some(v) = extra_text(extras, "optimizer_type")
        && !takes_betas_and_eps(v)
        && extras.contains_key("eps")
    {
        problems.push(SettingProblem::extra(
            "eps",
            format!("optimizer {v} takes no single eps; remove eps"),
        ));
    }
    if let Some(v) = extra_text(extras, "timestep_sample_method")
        && !matches!(v, "logit_normal" | "uniform")
    {
        problems.push(SettingProblem::extra(
            "timestep_sample_method",
            format!("{v:?} must be logit_normal or uniform"),
        ));
    }
    if let Some(v) = extra_text(extras, "frame_buckets")
        && let Err(problem) = super::video::parse_frame_buckets(v)
    {
        problems.push(SettingProblem::extra("frame_buckets", problem));
    }
    if let Some(v) = extra_text(extras, "video_clip_mode")
        && !VIDEO_CLIP_MODES.contains(&v)
    {
        problems.push(SettingProblem::extra(
            "video_clip_mode",
            format!("{v:?} must be one of {}", VIDEO_CLIP_MODES.join(", ")),
        ));
    }
    if extras.contains_key("checkpoint_every_n_minutes")
        && extras.contains_key("checkpoint_every_n_epochs")
    {
        problems.push(SettingProblem::new(
            "training.extras",
            "set only one of checkpoint_every_n_minutes and checkpoint_every_n_epochs",
        ));
    }
    if let Some(m) = extra_f64(extras, "checkpoint_every_n_minutes")
        && !(m.is_finite() && m > 0.0)
    {
        problems.push(SettingProblem::extra(
            "checkpoint_every_n_minutes",
            "must be above 0",
        ));
    }
    for key in [
        "checkpoint_every_n_epochs",
        "gradient_accumulation_steps",
        "num_ar_buckets",
        "caching_batch_size",
        "map_num_proc",
    ] {
        if let Some(Extra::Int(n)) = extras.get(key)
            && *n < 1
        {
            problems.push(SettingProblem::extra(key, "must be at least 1"));
        }
    }
    for key in ["warmup_steps", "blocks_to_swap"] {
        if let Some(Extra::Int(n)) = extras.get(key)
            && *n < 0
        {
            problems.push(SettingProblem::extra(key, "must not be negative"));
        }
    }
    problems
}

/// How diffusion-pipe cuts a clip longer than its frame bucket.
const VIDEO_CLIP_MODES: &[&str] = &["single_beginning", "single_middle", "multiple_overlapping"];

fn invalid(problems: Vec<SettingProblem>) -> BackendError {
    BackendError::invalid(&problems)
}

fn toml_text<T: Serialize>(value: &T) -> Result<Vec<u8>, BackendError> {
    toml::to_string(value)
        .map(String::into_bytes)
        .map_err(|e| BackendError::InvalidSettings(format!("cannot write {NAME} config: {e}")))
}

/// Every problem with the settings for this family.
pub(super) fn check(settings: &TrainingSettings, family: ModelFamily) -> Vec<SettingProblem> {
    let mut problems = Vec::new();
    if settings.alpha != 0.0 && settings.alpha != f64::from(settings.rank) {
        problems.push(SettingProblem::new(
            "training.alpha",
            format!(
                "{NAME} forces alpha = rank ({}); got {}",
                settings.rank, settings.alpha
            ),
        ));
    }
    match typed_extras(NAME, &settings.extras, &allowed(family)) {
        Ok(extras) => problems.extend(value_problems(&extras)),
        Err(bad) => problems.extend(bad),
    }
    problems
}

/// The main config and the dataset TOML (to be written at `dataset_path`).
pub(super) fn render(
    inputs: &TrainInputs,
    dataset_path: &Path,
) -> Result<(Vec<u8>, Vec<u8>), BackendError> {
    let s = &inputs.settings;
    let family = inputs.model.family;
    let problems = check(s, family);
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let extras = typed_extras(NAME, &s.extras, &allowed(family)).map_err(invalid)?;

    let mut main = BTreeMap::from([("activation_checkpointing", Extra::Flag(true))]);
    if s.save_every > 0 && !extras.contains_key("checkpoint_every_n_epochs") {
        main.insert(
            "checkpoint_every_n_minutes",
            Extra::Float(DEFAULT_CHECKPOINT_MINUTES),
        );
    }
    let mut model = model_table(inputs)?;
    let mut optimizer = Optimizer {
        kind: "adamw_optimi".into(),
        lr: s.learning_rate,
        betas: Some([0.9, 0.99]),
        weight_decay: 0.01,
        eps: Some(1e-8),
    };
    let mut dataset = BTreeMap::from([
        ("min_ar", Extra::Float(0.5)),
        ("max_ar", Extra::Float(2.0)),
        ("num_ar_buckets", Extra::Int(7)),
    ]);
    for t in TUNABLES {
        let Some(value) = extras.get(t.name) else {
            continue;
        };
        match (t.section, value) {
            (Section::Main, _) => {
                main.insert(t.key, value.clone());
            }
            (Section::Model, _) => {
                model.tuning.insert(t.key, value.clone());
            }
            // A list in the TOML, not the extra's text.
            (Section::Dataset, _) if t.key == "frame_buckets" => {}
            (Section::Dataset, _) => {
                dataset.insert(t.key, value.clone());
            }
            (Section::Optimizer, Extra::Text(v)) => optimizer.kind = v.clone(),
            (Section::Optimizer, Extra::Float(x)) if t.key == "weight_decay" => {
                optimizer.weight_decay = *x
            }
            (Section::Optimizer, Extra::Float(x)) => optimizer.eps = Some(*x),
            (Section::Optimizer, _) => {}
        }
    }
    if !takes_betas_and_eps(&optimizer.kind) {
        optimizer.betas = None;
        optimizer.eps = None;
    }
    let accumulation = match main.get("gradient_accumulation_steps") {
        Some(Extra::Int(n)) => (*n).max(1) as u64,
        _ => 1,
    };
    let steps = s.steps.max(1);
    let config = MainConfig {
        output_dir: &inputs.output_dir,
        dataset: dataset_path.to_path_buf(),
        epochs: u64::from(steps) * accumulation,
        max_steps: steps,
        micro_batch_size_per_gpu: s.batch_size.max(1),
        pipeline_stages: 1,
        save_every_n_steps: if s.save_every > 0 {
            s.save_every
        } else {
            steps
        },
        steps_per_print: 1,
        tuning: main,
        model,
        adapter: Adapter {
            kind: "lora",
            rank: s.rank,
            dtype: "bfloat16",
        },
        optimizer,
    };
    let clips = crate::common::video::clips_in(&inputs.dataset_dir);
    if !clips.is_empty() && !super::trains_video(family) {
        return Err(crate::common::video::images_only(clips.len(), NAME, family));
    }
    let frames: Vec<u64> = clips.iter().map(|(_, frames)| *frames).collect();
    let frame_buckets = super::video::frame_buckets(extra_text(&extras, "frame_buckets"), &frames)
        .map_err(|problem| invalid(vec![SettingProblem::extra("frame_buckets", problem)]))?;
    let dataset = DatasetConfig {
        resolutions: [s.resolution],
        enable_ar_bucket: true,
        frame_buckets,
        tuning: dataset,
        directory: [Directory {
            path: &inputs.dataset_dir,
            num_repeats: s.repeats.max(1),
        }],
    };
    Ok((toml_text(&config)?, toml_text(&dataset)?))
}
