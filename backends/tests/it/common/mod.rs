//! Fixtures of the kohya tests: a tiny captioned dataset, small but valid
//! model files, and the inputs of a run inside a temporary folder (built
//! from `support`).

use crate::support::{captioned_dataset, run_inputs, standins, write_safetensors};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use trainyard_backends::{ModelFiles, Resume, Tools, TrainInputs};
use trainyard_core::config::TrainerPaths;
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{ExtraValue, TrainingSettings};

/// The stand-ins shipped in the test tree.
pub fn standin_tools() -> Tools {
    Tools {
        trainers: TrainerPaths {
            accelerate: standins().join("bin/accelerate"),
            kohya_dir: standins().join("kohya"),
            ..Tools::default().trainers
        },
        ..Tools::default()
    }
}

pub struct Fixture {
    pub root: tempfile::TempDir,
}

impl Fixture {
    /// A dataset of `images` captioned PNGs and the model files of `family`.
    pub fn new(family: ModelFamily, images: usize) -> Self {
        let root = tempfile::tempdir().unwrap();
        captioned_dataset(
            &root.path().join("dataset"),
            (0..images).map(|i| (format!("img{i}"), format!("tyzx photo {i}\n"))),
        );
        let models = root.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        for (_, file) in model_parts(family) {
            write_safetensors(&models.join(file));
        }
        for dir in ["run", "out"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        Fixture { root }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    pub fn inputs(&self, family: ModelFamily, settings: TrainingSettings) -> TrainInputs {
        let parts: BTreeMap<String, PathBuf> = model_parts(family)
            .into_iter()
            .map(|(role, file)| (role.to_string(), self.path("models").join(file)))
            .collect();
        let model = ModelFiles {
            reference: if family == ModelFamily::Flux {
                "flux1-dev"
            } else {
                "sdxl-base-1.0"
            }
            .into(),
            family,
            parts,
        };
        TrainInputs {
            trigger_word: "tyzx".into(),
            ..run_inputs(
                "job123",
                self.path("dataset"),
                self.path("run"),
                self.path("out"),
                model,
                settings,
            )
        }
    }
}

fn model_parts(family: ModelFamily) -> Vec<(&'static str, &'static str)> {
    match family {
        ModelFamily::Flux => vec![
            (part::TRANSFORMER, "flux1-dev.safetensors"),
            (part::CLIP_L, "clip_l.safetensors"),
            (part::T5XXL, "t5xxl_fp16.safetensors"),
            (part::AE, "ae.safetensors"),
        ],
        _ => vec![(part::CHECKPOINT, "sd_xl_base_1.0.safetensors")],
    }
}

pub fn settings(
    steps: u32,
    save_every: u32,
    extras: HashMap<String, ExtraValue>,
) -> TrainingSettings {
    TrainingSettings {
        backend: "kohya".into(),
        steps,
        learning_rate: 1e-4,
        rank: 16,
        alpha: 16.0,
        resolution: 1024,
        batch_size: 1,
        repeats: 10,
        save_every,
        seed: 42,
        extras,
        method: String::new(),
    }
}

pub fn resume(step: u32, files: Vec<PathBuf>) -> Option<Resume> {
    Some(Resume { step, files })
}
