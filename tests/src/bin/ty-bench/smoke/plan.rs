//! What the smoke run does with each selected backend, decided before the
//! fleet starts: skip it (its trainer is not installed, and what is
//! missing), or run it on the smallest preset of a family it trains, with
//! settings that reach a stored checkpoint and the final adapter in a few
//! steps.

use std::collections::HashMap;
use std::path::Path;
use trainyard_backends::{Tool, Tools, check_settings, entry, not_installed};
use trainyard_models::{ModelFamily, Preset, preset};
use trainyard_proto::v1::{ExtraValue, TrainingSettings, extra_value};

/// Every preset, smallest download first (what a smoke run fetches for
/// the family's parts, roughly): the reference model is generated; Qwen2.5
/// 0.5B ≈ 1 GB; Llama 3.2 1B ≈ 2.5 GB; SDXL ≈ 7 GB; Wan 2.1 1.3B ≈ 17 GB
/// (its T5 encoder is most of it); Z-Image Turbo ≈ 20 GB; FLUX.1 ≈ 34 GB;
/// Qwen-Image ≈ 58 GB; Wan 2.1 14B ≈ 70 GB. A test checks that every
/// preset is listed.
pub const BY_SIZE: &[&str] = &[
    "reference-denoiser-v1",
    "qwen2.5-0.5b-instruct",
    "llama-3.2-1b-instruct",
    "sdxl-base-1.0",
    "wan2.1-t2v-1.3b",
    "z-image-turbo",
    "flux1-schnell",
    "flux1-dev",
    "qwen-image",
    "wan2.1-t2v-14b",
];

/// Training resolution of the image backends' smoke runs (the sample is
/// scaled up to it).
pub const IMAGE_RESOLUTION: u32 = 512;

/// Steps the reference trainer runs at least. It takes milliseconds a
/// step, so in a few steps the run could end before the worker has seen the
/// half-way checkpoint (it stores none of the last step).
pub const REFERENCE_MIN_STEPS: u32 = 20;

/// What to do with one backend.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    Skip {
        backend: &'static str,
        reason: String,
    },
    Run {
        backend: &'static str,
        preset: &'static Preset,
        settings: TrainingSettings,
    },
}

/// Why `backend` cannot run here, or `None` when it can: the worker's own
/// check (every tool it needs is configured), then whether each configured
/// tool is really there (a folder that exists, a program that is a file or
/// on `PATH`).
pub fn missing(backend: &str, tools: &Tools) -> Option<String> {
    if let Some(reason) = not_installed(backend, tools) {
        return Some(reason);
    }
    let entry = entry(backend)?;
    let absent: Vec<String> = entry
        .needs
        .iter()
        .filter_map(|tool| {
            let path = tool.path(tools);
            let there = match tool {
                Tool::KohyaDir
                | Tool::DiffusionPipeDir
                | Tool::SimpletunerDir
                | Tool::AiToolkitDir => path.is_dir(),
                Tool::ReferenceTrainer | Tool::Python | Tool::Accelerate | Tool::Deepspeed => {
                    program_exists(path)
                }
            };
            (!there).then(|| format!("{} {} not found", key(*tool), path.display()))
        })
        .collect();
    (!absent.is_empty()).then(|| absent.join("; "))
}

/// The config key of a tool, in full.
pub fn key(tool: Tool) -> String {
    match tool {
        Tool::ReferenceTrainer => "worker.reference_trainer".into(),
        other => format!("worker.trainers.{}", other.key()),
    }
}

/// A file when the path has a folder in it; otherwise a file of that name
/// on `PATH`, as a child process would find it.
fn program_exists(path: &Path) -> bool {
    if path.components().count() > 1 {
        return path.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(path).is_file()))
}

/// The settings of a smoke run of `backend` on `family`: `steps` steps,
/// batch 1, a checkpoint every `steps / 2` steps (the worker stores only
/// checkpoints before the last step, so one is stored half-way); the
/// reference trainer runs at least [`REFERENCE_MIN_STEPS`].
pub fn settings(backend: &str, family: ModelFamily, steps: u32) -> TrainingSettings {
    let steps = if family == ModelFamily::Reference {
        steps.max(REFERENCE_MIN_STEPS)
    } else {
        steps
    };
    let mut extras = HashMap::new();
    if backend == "diffusion-pipe" {
        // Its resumable state is saved by time or epoch only, never by
        // step: every 0.6 s, so the first steps already leave one.
        extras.insert(
            "checkpoint_every_n_minutes".to_string(),
            ExtraValue {
                kind: Some(extra_value::Kind::Float(0.01)),
            },
        );
    }
    let (resolution, learning_rate) = match family {
        ModelFamily::Reference => (32, 0.002),
        ModelFamily::Llm => (0, 1e-4),
        _ => (IMAGE_RESOLUTION, 1e-4),
    };
    TrainingSettings {
        backend: backend.to_string(),
        steps,
        learning_rate,
        rank: 4,
        alpha: 4.0,
        resolution,
        batch_size: 1,
        repeats: 1,
        save_every: (steps / 2).max(1),
        seed: 42,
        extras,
        ..Default::default()
    }
}

/// The first preset of [`BY_SIZE`] that `backend` trains with the smoke
/// settings; gated presets only with a Hub token.
pub fn smallest_preset(
    backend: &str,
    steps: u32,
    have_token: bool,
) -> Result<(&'static Preset, TrainingSettings), String> {
    BY_SIZE
        .iter()
        .filter_map(|name| preset(name))
        .filter(|p| have_token || !p.gated)
        .find_map(|p| {
            let settings = settings(backend, p.family, steps);
            check_settings(&settings, p.family)
                .is_empty()
                .then_some((p, settings))
        })
        .ok_or_else(|| {
            format!(
                "no preset it trains is open{}",
                if have_token {
                    ""
                } else {
                    " without a Hub token (set HF_TOKEN)"
                }
            )
        })
}

/// The plan for each selected backend, in order.
pub fn plan(backends: &[&'static str], tools: &Tools, steps: u32, have_token: bool) -> Vec<Plan> {
    backends
        .iter()
        .map(|&backend| {
            if let Some(reason) = missing(backend, tools) {
                return Plan::Skip { backend, reason };
            }
            match smallest_preset(backend, steps, have_token) {
                Ok((preset, settings)) => Plan::Run {
                    backend,
                    preset,
                    settings,
                },
                Err(reason) => Plan::Skip { backend, reason },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_backends::BACKENDS;
    use trainyard_models::PRESETS;

    #[test]
    fn every_preset_has_a_place_in_the_size_order() {
        let mut listed: Vec<&str> = BY_SIZE.to_vec();
        let mut presets: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        listed.sort();
        presets.sort();
        assert_eq!(listed, presets);
    }

    #[test]
    fn each_backend_gets_its_smallest_open_preset() {
        let chosen: Vec<(&str, &str)> = BACKENDS
            .iter()
            .map(|b| (*b, smallest_preset(b, 4, false).unwrap().0.name))
            .collect();
        assert_eq!(
            chosen,
            [
                ("reference", "reference-denoiser-v1"),
                ("kohya", "sdxl-base-1.0"),
                ("diffusion-pipe", "sdxl-base-1.0"),
                ("simpletuner", "sdxl-base-1.0"),
                ("ai-toolkit", "sdxl-base-1.0"),
                ("trl", "qwen2.5-0.5b-instruct"),
            ]
        );
        let (_, s) = smallest_preset("kohya", 4, false).unwrap();
        assert_eq!((s.steps, s.save_every, s.batch_size), (4, 2, 1));
        let (_, s) = smallest_preset("reference", 4, false).unwrap();
        assert_eq!((s.steps, s.save_every), (REFERENCE_MIN_STEPS, 10));
    }

    #[test]
    fn a_backend_without_its_tools_is_skipped_with_what_is_missing() {
        let mut tools = Tools::default();
        tools.trainers.accelerate = "/nonexistent/accelerate".into();
        tools.trainers.kohya_dir = std::env::temp_dir();
        tools.trainers.python = "/nonexistent/python3".into();
        let plans = plan(&["kohya", "ai-toolkit"], &tools, 4, false);
        assert_eq!(
            plans,
            [
                Plan::Skip {
                    backend: "kohya",
                    reason: "worker.trainers.accelerate /nonexistent/accelerate not found".into(),
                },
                Plan::Skip {
                    backend: "ai-toolkit",
                    reason: "ai-toolkit is not installed on this worker: set \
                             worker.trainers.ai_toolkit_dir"
                        .into(),
                },
            ]
        );
        tools.trainers.accelerate = std::env::current_exe().unwrap();
        assert!(matches!(
            &plan(&["kohya"], &tools, 4, false)[0],
            Plan::Run { preset, .. } if preset.name == "sdxl-base-1.0"
        ));
    }
}
