//! Fixtures shared by every backend test, the crate's own unit tests
//! (`crate::test_support`) and the integration tests (`mod support`) alike:
//! a captioned dataset, safetensors files, a diffusers folder, run inputs,
//! restoring a checkpoint's files, and a rendered command as argv.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use trainyard_backends::{FoundCheckpoint, Launch, ModelFiles, Resume, TrainInputs};
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::TrainingSettings;

/// A 1×1 RGB PNG.
pub const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53,
    0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0x00,
    0x00, 0x03, 0x01, 0x01, 0x00, 0xc9, 0xfe, 0x92, 0xef, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

/// The stand-in trainers shipped in the test tree (`tests/standins`).
pub fn standins() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/standins")
}

/// A prepared dataset in `dir`: `<stem>.png` and `<stem>.txt` per image,
/// and the manifest.
pub fn captioned_dataset<S: AsRef<str>>(dir: &Path, images: impl IntoIterator<Item = (S, String)>) {
    std::fs::create_dir_all(dir).unwrap();
    for (stem, caption) in images {
        let stem = stem.as_ref();
        std::fs::write(dir.join(format!("{stem}.png")), PNG).unwrap();
        std::fs::write(dir.join(format!("{stem}.txt")), caption).unwrap();
    }
    std::fs::write(dir.join("manifest.json"), "{}").unwrap();
}

/// A prepared dataset folder's manifest listing `images` and `clips`
/// (name, frames), each with its `<stem>.txt` caption file, as the
/// captioner writes it (the files themselves are not written).
pub fn manifest_with_clips(dir: &Path, images: &[&str], clips: &[(&str, u64)]) {
    let caption = |file: &str| {
        let stem = Path::new(file).file_stem().unwrap().to_str().unwrap();
        format!("{stem}.txt")
    };
    let mut entries: Vec<serde_json::Value> = images
        .iter()
        .map(|file| serde_json::json!({"file": file, "caption_file": caption(file), "media": "image"}))
        .collect();
    entries.extend(clips.iter().map(|(file, frames)| {
        serde_json::json!({"file": file, "caption_file": caption(file), "media": "video",
            "video": {"duration_ms": 1000, "fps_milli": 16000, "frames": frames, "codec": "h264"}})
    }));
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::json!({ "images": entries }).to_string(),
    )
    .unwrap();
}

/// An empty but well-formed safetensors file (8-byte header length + `{}`
/// padded to 8 bytes).
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

/// A Flux pipeline in diffusers layout at `dir`.
pub fn diffusers_folder(dir: &Path) {
    std::fs::create_dir_all(dir.join("transformer")).unwrap();
    std::fs::write(
        dir.join("model_index.json"),
        r#"{"_class_name": "FluxPipeline"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("transformer/config.json"), "{}").unwrap();
}

/// A base model that is one diffusers folder.
pub fn diffusers_model(
    reference: &str,
    family: ModelFamily,
    dir: impl Into<PathBuf>,
) -> ModelFiles {
    ModelFiles {
        reference: reference.into(),
        family,
        parts: [(part::DIFFUSERS.to_string(), dir.into())].into(),
    }
}

/// The inputs of a fresh run: the adapter named after the job, trigger
/// word `ohwx`, no resume, no webhook, the default slot. Tests change
/// what they need with struct update syntax.
pub fn run_inputs(
    job_id: &str,
    dataset_dir: impl Into<PathBuf>,
    run_dir: impl Into<PathBuf>,
    output_dir: impl Into<PathBuf>,
    model: ModelFiles,
    settings: TrainingSettings,
) -> TrainInputs {
    TrainInputs {
        job_id: job_id.into(),
        dataset_dir: dataset_dir.into(),
        model,
        run_dir: run_dir.into(),
        output_dir: output_dir.into(),
        output_name: job_id.into(),
        settings,
        trigger_word: "ohwx".into(),
        resume: None,
        webhook_url: None,
        slot: Default::default(),
    }
}

/// Settings for a short stand-in run: rank 4, 512 px, one image a step.
pub fn small_run(backend: &str, steps: u32, save_every: u32) -> TrainingSettings {
    TrainingSettings {
        backend: backend.into(),
        steps,
        learning_rate: 1e-4,
        rank: 4,
        alpha: 4.0,
        resolution: 512,
        batch_size: 1,
        repeats: 1,
        save_every,
        seed: 7,
        ..Default::default()
    }
}

/// The run the SimpleTuner and ai-toolkit unit tests render: fixed paths
/// under `/job`, a diffusers model, 2000 steps saved every 250.
pub fn diffusers_run(backend: &str, family: ModelFamily) -> TrainInputs {
    run_inputs(
        "job123",
        "/job/img",
        "/job",
        "/job/out",
        diffusers_model("preset", family, "/models/diffusers"),
        TrainingSettings {
            backend: backend.into(),
            steps: 2000,
            learning_rate: 1e-4,
            rank: 16,
            alpha: 0.0,
            resolution: 1024,
            batch_size: 1,
            repeats: 10,
            save_every: 250,
            seed: 42,
            ..Default::default()
        },
    )
}

/// Copies a checkpoint's files (and nothing else) from one output folder
/// to another, as the worker restores a stored checkpoint.
pub fn restore(found: &FoundCheckpoint, from: &Path, to: &Path) -> Resume {
    for file in &found.files {
        let target = to.join(file);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(from.join(file), target).unwrap();
    }
    Resume {
        step: found.step,
        files: found.files.clone(),
    }
}

/// The rendered command as argv: the program, then the arguments.
pub fn argv(launch: &Launch) -> Vec<String> {
    let c = &launch.command;
    std::iter::once(c.program.to_string_lossy().into_owned())
        .chain(c.args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect()
}
