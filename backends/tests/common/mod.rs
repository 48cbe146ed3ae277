//! Fixtures shared by the kohya tests: a tiny captioned dataset, small but
//! valid model files, and the inputs of a run inside a temporary folder.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use trainyard_backends::{ModelFiles, Resume, Tools, TrainInputs};
use trainyard_core::models::{ModelFamily, part};
use trainyard_proto::v1::{ExtraValue, TrainingSettings};

/// A 1×1 RGB PNG.
pub const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53,
    0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0x00,
    0x00, 0x03, 0x01, 0x01, 0x00, 0xc9, 0xfe, 0x92, 0xef, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

/// The stand-ins shipped in the test tree.
pub fn standin_tools() -> Tools {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/standins");
    Tools {
        accelerate: root.join("bin/accelerate"),
        kohya_dir: root.join("kohya"),
        ..Tools::default()
    }
}

/// An empty but well-formed safetensors file (8-byte header length + `{}`).
pub fn write_safetensors(path: &Path) {
    let header = b"{}      ";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(path, bytes).unwrap();
}

/// The JSON header of a safetensors file.
pub fn safetensors_header(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

pub struct Fixture {
    pub root: tempfile::TempDir,
}

impl Fixture {
    /// A dataset of `images` captioned PNGs and the model files of `family`.
    pub fn new(family: ModelFamily, images: usize) -> Self {
        let root = tempfile::tempdir().unwrap();
        let dataset = root.path().join("dataset");
        std::fs::create_dir_all(&dataset).unwrap();
        for i in 0..images {
            std::fs::write(dataset.join(format!("img{i}.png")), PNG).unwrap();
            std::fs::write(
                dataset.join(format!("img{i}.txt")),
                format!("tyzx photo {i}\n"),
            )
            .unwrap();
        }
        std::fs::write(dataset.join("manifest.json"), "{}").unwrap();
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
        TrainInputs {
            job_id: "job123".into(),
            dataset_dir: self.path("dataset"),
            model: ModelFiles {
                reference: if family == ModelFamily::Flux {
                    "flux1-dev"
                } else {
                    "sdxl-base-1.0"
                }
                .into(),
                family,
                parts,
            },
            run_dir: self.path("run"),
            output_dir: self.path("out"),
            output_name: "job123".into(),
            settings,
            trigger_word: "tyzx".into(),
            resume: None,
            webhook_url: None,
            slot: Default::default(),
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
