//! kohya-ss/sd-scripts: `flux_train_network.py` (FLUX.1) and
//! `sdxl_train_network.py` (SDXL) LoRA training under `accelerate launch`
//! (the trainers reference, sections 1 and 2).
//!
//! A run is two files in the run folder, both serialised from structs: the
//! dataset TOML (`--dataset_config`) and every training argument as a
//! `--config_file` TOML, which kohya merges into its argparse namespace. The
//! argv only names the script and that file.
//!
//! Checkpoints are kohya's step saves with `--save_state`:
//! `<name>-stepNNNNNNNN.safetensors` and the accelerate state folder
//! `<name>-stepNNNNNNNN-state/`, complete once `random_states_0.pkl` (written
//! last) is there. A resumed run gets `--resume <that folder>` and
//! `--skip_until_initial_step`.
//!
//! kohya's resume is exact only inside the first epoch: when it skips whole
//! epochs it sets `global_step` to the step *within* the epoch (upstream
//! `train_network.py`: `global_step = initial_step` after subtracting the
//! skipped epochs), so later saves get wrong, colliding step numbers and
//! `max_train_steps` is no longer honoured. The backend therefore renders the
//! run as a single epoch: the subset's `num_repeats` is raised until one
//! epoch holds every step. With `max_train_steps` fixed, repeats only set the
//! epoch length; every image is still seen equally often.

mod options;
mod parse;

use crate::common::{Signature, Signatures, classify_with, unclassified};
use crate::{
    BackendError, FoundCheckpoint, Launch, OutputParser, SettingProblem, StopRequest, TrainInputs,
    TrainerBackend,
};
use options::Opt;
use regex::Regex;
use serde::Serialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::LazyLock;
use trainyard_core::process::CommandSpec;
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{ErrorKind, ExtraValue, JobError, TrainingSettings, extra_value::Kind};

pub struct Kohya {
    accelerate: PathBuf,
    kohya_dir: PathBuf,
}

impl Kohya {
    pub fn new(accelerate: PathBuf, kohya_dir: PathBuf) -> Self {
        Self {
            accelerate,
            kohya_dir,
        }
    }
}

/// The file accelerate writes last into a state folder.
const STATE_COMPLETE: &str = "random_states_0.pkl";
/// Whether the state's last file is there and written to its end, not just
/// opened: accelerate writes it with `torch.save` (a zip archive, ending
/// with its end-of-central-directory record) or, in older versions and
/// plain `pickle` writers, as a pickle stream (ending with the STOP opcode
/// `.`). A folder scanned while the file is being written, or left by a
/// trainer killed in the middle of it, is not a checkpoint.
fn written_whole(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 64 * 1024 + 22;
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return false;
    };
    let start = len.saturating_sub(TAIL);
    let mut tail = Vec::new();
    if len == 0
        || file.seek(SeekFrom::Start(start)).is_err()
        || file.read_to_end(&mut tail).is_err()
    {
        return false;
    }
    tail.last() == Some(&b'.') || tail.windows(4).any(|w| w == b"PK\x05\x06")
}

/// The extensions of the dataset contract that kohya's `glob_images` finds.
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];
const ARGS_FILE: &str = "kohya-args.toml";
const DATASET_FILE: &str = "kohya-dataset.toml";

/// `--dataset_config` (`library/config_util.py`).
#[derive(Serialize)]
struct DatasetConfig<'a> {
    general: General,
    datasets: Vec<Dataset<'a>>,
}

#[derive(Serialize)]
struct General {
    shuffle_caption: bool,
    /// kohya's default is `.caption`; the dataset has `<stem>.txt`.
    caption_extension: &'static str,
    keep_tokens: u32,
}

#[derive(Serialize)]
struct Dataset<'a> {
    resolution: u32,
    batch_size: u32,
    enable_bucket: bool,
    min_bucket_reso: u32,
    max_bucket_reso: u32,
    subsets: Vec<Subset<'a>>,
}

#[derive(Serialize)]
struct Subset<'a> {
    image_dir: &'a Path,
    /// Used by kohya only for an image without a caption file.
    #[serde(skip_serializing_if = "Option::is_none")]
    class_tokens: Option<&'a str>,
    num_repeats: u32,
}

/// `--config_file`: training arguments by their argparse names.
#[derive(Serialize)]
struct Args<'a> {
    pretrained_model_name_or_path: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    clip_l: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    t5xxl: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ae: Option<&'a Path>,
    dataset_config: PathBuf,
    output_dir: &'a Path,
    output_name: &'a str,
    save_model_as: &'static str,
    network_module: &'static str,
    network_dim: u32,
    network_alpha: f64,
    learning_rate: f64,
    max_train_steps: u32,
    seed: u32,
    save_every_n_steps: u32,
    save_state: bool,
    console_log_simple: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    resume: Option<PathBuf>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    skip_until_initial_step: bool,
    /// Defaults and the job's extras; never one of the fields above.
    #[serde(flatten)]
    options: BTreeMap<String, Opt>,
}

/// The script, model parts and LoRA module of a family.
struct Family {
    script: &'static str,
    network_module: &'static str,
    parts: &'static [&'static str],
}

fn family(f: ModelFamily) -> Option<Family> {
    match f {
        ModelFamily::Flux => Some(Family {
            script: "flux_train_network.py",
            network_module: "networks.lora_flux",
            parts: &[part::TRANSFORMER, part::CLIP_L, part::T5XXL, part::AE],
        }),
        ModelFamily::Sdxl => Some(Family {
            script: "sdxl_train_network.py",
            network_module: "networks.lora",
            parts: &[part::CHECKPOINT],
        }),
        _ => None,
    }
}

/// Checks of the plain settings that kohya (or this backend) needs.
fn settings_problems(s: &TrainingSettings) -> Vec<SettingProblem> {
    let mut problems = Vec::new();
    if !s.resolution.is_multiple_of(64) || s.resolution < 256 {
        problems.push(SettingProblem::new(
            "training.resolution",
            format!(
                "kohya buckets images in steps of 64 pixels; {} must be a multiple of 64 of at least 256",
                s.resolution
            ),
        ));
    }
    if u32::try_from(s.seed).is_err() {
        problems.push(SettingProblem::new(
            "training.seed",
            format!(
                "kohya seeds numpy, which needs a seed below 4294967296, not {}",
                s.seed
            ),
        ));
    }
    problems
}

/// Steps between checkpoints: the job's `save_every`, or a tenth of the run
/// when it asks for none, so that a lost worker never costs more than a
/// tenth of the run.
fn save_every_n_steps(s: &TrainingSettings) -> u32 {
    if s.save_every > 0 {
        s.save_every
    } else {
        (s.steps / 10).max(1)
    }
}

/// The subset's `num_repeats`: the job's repeats, raised until one epoch of
/// `images` holds every step (see the module docs).
fn single_epoch_repeats(s: &TrainingSettings, images: usize) -> u32 {
    let repeats = s.repeats.max(1);
    if images == 0 {
        return repeats;
    }
    let samples = u64::from(s.steps) * u64::from(s.batch_size.max(1));
    let needed = samples.div_ceil(images as u64);
    repeats.max(u32::try_from(needed).unwrap_or(u32::MAX))
}

/// Images kohya will find in the dataset folder (a directory listing).
fn count_images(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let path = e.path();
            let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
            IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()) && path.is_file()
        })
        .count()
}

/// kohya's `STEP_STATE_NAME`: `{name}-step{step:08}-state`.
fn state_dir_name(name: &str, step: u32) -> String {
    format!("{name}-step{step:08}-state")
}

fn invalid(problems: Vec<SettingProblem>) -> BackendError {
    BackendError::invalid(&problems)
}

impl TrainerBackend for Kohya {
    fn name(&self) -> &'static str {
        "kohya"
    }

    fn families(&self) -> &'static [ModelFamily] {
        &[ModelFamily::Flux, ModelFamily::Sdxl]
    }

    fn parts(&self, f: ModelFamily) -> &'static [&'static str] {
        family(f).map(|f| f.parts).unwrap_or(&[])
    }

    fn check(&self, settings: &TrainingSettings, f: ModelFamily) -> Vec<SettingProblem> {
        let mut problems = options::resolve(settings, f).err().unwrap_or_default();
        problems.extend(settings_problems(settings));
        problems
    }

    fn render(&self, inputs: &TrainInputs) -> Result<Launch, BackendError> {
        let s = &inputs.settings;
        let fam = family(inputs.model.family).ok_or_else(|| {
            BackendError::InvalidSettings(format!(
                "kohya does not train {} models",
                inputs.model.family
            ))
        })?;
        let options = options::resolve(s, inputs.model.family).map_err(invalid)?;
        let problems = settings_problems(s);
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        if let Some(resume) = inputs.resume.as_ref().filter(|r| r.step >= s.steps) {
            // kohya asserts `max_train_steps should be greater than initial step`.
            return Err(BackendError::InvalidSettings(format!(
                "the checkpoint at step {} leaves nothing to train for steps = {}",
                resume.step, s.steps
            )));
        }
        let optional = |role: &str| {
            fam.parts
                .contains(&role)
                .then(|| inputs.model.part(role))
                .transpose()
        };
        let model = inputs.model.part(fam.parts[0])?;
        let mixed_precision = match options.get("mixed_precision") {
            Some(Opt::Text(p)) => p.clone(),
            _ => "no".into(),
        };
        let dataset_path = inputs.run_dir.join(DATASET_FILE);
        let args_path = inputs.run_dir.join(ARGS_FILE);
        let images = count_images(&inputs.dataset_dir);
        let dataset = DatasetConfig {
            general: General {
                shuffle_caption: false,
                caption_extension: ".txt",
                keep_tokens: 1,
            },
            datasets: vec![Dataset {
                resolution: s.resolution,
                batch_size: s.batch_size.max(1),
                enable_bucket: true,
                min_bucket_reso: 256,
                max_bucket_reso: s.resolution.max(1024),
                subsets: vec![Subset {
                    image_dir: &inputs.dataset_dir,
                    class_tokens: (!inputs.trigger_word.is_empty())
                        .then_some(inputs.trigger_word.as_str()),
                    num_repeats: single_epoch_repeats(s, images),
                }],
            }],
        };
        let args = Args {
            pretrained_model_name_or_path: model,
            clip_l: optional(part::CLIP_L)?,
            t5xxl: optional(part::T5XXL)?,
            ae: optional(part::AE)?,
            dataset_config: dataset_path.clone(),
            output_dir: &inputs.output_dir,
            output_name: &inputs.output_name,
            save_model_as: "safetensors",
            network_module: fam.network_module,
            network_dim: s.rank,
            network_alpha: if s.alpha > 0.0 {
                s.alpha
            } else {
                f64::from(s.rank)
            },
            learning_rate: s.learning_rate,
            max_train_steps: s.steps,
            seed: s.seed as u32,
            save_every_n_steps: save_every_n_steps(s),
            save_state: true,
            console_log_simple: true,
            resume: inputs.resume.as_ref().map(|r| {
                inputs
                    .output_dir
                    .join(state_dir_name(&inputs.output_name, r.step))
            }),
            skip_until_initial_step: inputs.resume.is_some(),
            options,
        };
        let files = vec![
            (dataset_path, to_toml(&dataset)?),
            (args_path.clone(), to_toml(&args)?),
        ];
        let mut argv: Vec<OsString> = [
            "launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            &mixed_precision,
            "--dynamo_backend",
            "no",
            "--num_cpu_threads_per_process",
            "1",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        argv.push(self.kohya_dir.join(fam.script).into());
        argv.push("--config_file".into());
        argv.push(args_path.into());
        Ok(Launch {
            files,
            links: Vec::new(),
            command: CommandSpec {
                program: self.accelerate.clone(),
                args: argv,
                cwd: inputs.run_dir.clone(),
                env: inputs.slot.env(),
            },
        })
    }

    fn parser(&self, inputs: &TrainInputs) -> Box<dyn OutputParser> {
        Box::new(parse::Parser::new(
            inputs.settings.steps,
            inputs.settings.batch_size,
        ))
    }

    fn latest_checkpoint(&self, inputs: &TrainInputs) -> Option<FoundCheckpoint> {
        static STATE: LazyLock<Regex> =
            LazyLock::new(|| Regex::new(r"^(?P<name>.+)-step(?P<s>\d{8})-state$").expect("regex"));
        let out = &inputs.output_dir;
        let (step, dir) = std::fs::read_dir(out)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file_name = e.file_name().to_string_lossy().into_owned();
                let c = STATE.captures(&file_name)?;
                if c["name"] != *inputs.output_name {
                    return None;
                }
                let step: u32 = c["s"].parse().ok()?;
                written_whole(&e.path().join(STATE_COMPLETE)).then(|| (step, file_name.clone()))
            })
            .max_by_key(|(step, _)| *step)?;
        let mut files = Vec::new();
        collect_files(out, Path::new(&dir), &mut files);
        let adapter = PathBuf::from(format!("{}-step{step:08}.safetensors", inputs.output_name));
        if out.join(&adapter).is_file() {
            files.push(adapter);
        }
        files.sort();
        Some(FoundCheckpoint { step, files })
    }

    fn stop_request(&self, _inputs: &TrainInputs) -> StopRequest {
        // No save-on-demand mechanism and no signal handler (reference §1(e)).
        StopRequest::Unsupported
    }

    fn final_adapter(&self, inputs: &TrainInputs) -> Option<PathBuf> {
        let path = inputs
            .output_dir
            .join(format!("{}.safetensors", inputs.output_name));
        path.is_file().then_some(path)
    }

    fn classify(&self, status: ExitStatus, tail: &[String]) -> JobError {
        classify_with(&SIGNATURES, status, tail)
            .unwrap_or_else(|| unclassified("kohya", status, tail))
    }

    /// Halves the batch size; at 1, turns gradient checkpointing back on if
    /// the job turned it off, then (FLUX) swaps more transformer blocks to
    /// the CPU: 8, 18, then kohya's most, 35.
    fn lighter(
        &self,
        settings: &TrainingSettings,
        family: ModelFamily,
    ) -> Option<(TrainingSettings, String)> {
        if let Some(halved) = crate::halve_batch(settings) {
            return Some(halved);
        }
        let flag = |key: &str| match settings.extras.get(key).and_then(|v| v.kind.as_ref()) {
            Some(Kind::Flag(on)) => Some(*on),
            _ => None,
        };
        let mut lighter = settings.clone();
        let mut set = |key: &str, kind: Kind| {
            lighter
                .extras
                .insert(key.into(), ExtraValue { kind: Some(kind) });
        };
        if flag("gradient_checkpointing") == Some(false) {
            set("gradient_checkpointing", Kind::Flag(true));
            return Some((lighter, "gradient_checkpointing on".into()));
        }
        if family != ModelFamily::Flux || flag("cpu_offload_checkpointing") == Some(true) {
            return None;
        }
        let swapped = match settings
            .extras
            .get("blocks_to_swap")
            .and_then(|v| v.kind.as_ref())
        {
            Some(Kind::Int(n)) => *n,
            _ => 0,
        };
        let next = [8i64, 18, 35].into_iter().find(|n| *n > swapped)?;
        set("blocks_to_swap", Kind::Int(next));
        Some((lighter, format!("blocks_to_swap {swapped} → {next}")))
    }
}

/// Every file under `out/rel`, as paths relative to `out`.
fn collect_files(out: &Path, rel: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(out.join(rel)) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let child = rel.join(e.file_name());
        match e.file_type() {
            Ok(t) if t.is_dir() => collect_files(out, &child, files),
            Ok(t) if t.is_file() => files.push(child),
            _ => {}
        }
    }
}

/// kohya's own failure signatures, checked before the shared table.
static SIGNATURES: Signatures = Signatures::new(&[
    Signature {
        pattern: r"not directory: ",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "dataset folder missing",
    },
    Signature {
        pattern: r"No data found\. Please verify arguments",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "no usable training images",
    },
    Signature {
        pattern: r"caption file is empty|illegal char in file \(not UTF-8\)",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "unreadable caption file",
    },
    Signature {
        pattern: r"NaN detected in latents",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "an image encodes to NaN latents (corrupt image or half-precision VAE)",
    },
    Signature {
        pattern: r"max_train_steps should be greater than initial step",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "the checkpoint resumed from is at or past the requested steps",
    },
    Signature {
        pattern: r"Unsupported fp8 model dtype",
        kind: ErrorKind::Model,
        retryable: false,
        what: "the base model is in an fp8 format kohya cannot train on",
    },
    Signature {
        pattern: r"error: unrecognized arguments|error: argument --",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "kohya rejected its arguments",
    },
]);

fn to_toml<T: Serialize>(value: &T) -> Result<Vec<u8>, BackendError> {
    toml::to_string(value)
        .map(String::into_bytes)
        .map_err(|e| BackendError::InvalidSettings(format!("kohya config: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrainerBackend;

    #[test]
    fn a_state_file_counts_only_once_written_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_COMPLETE);
        assert!(!written_whole(&path), "missing");
        std::fs::write(&path, b"").unwrap();
        assert!(!written_whole(&path), "opened, nothing written");
        // A pickle (protocol 4) cut before its STOP opcode, then whole.
        let pickle = b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x04step\x94K\x0as.";
        std::fs::write(&path, &pickle[..pickle.len() - 3]).unwrap();
        assert!(!written_whole(&path), "cut pickle");
        std::fs::write(&path, pickle).unwrap();
        assert!(written_whole(&path), "whole pickle");
        // torch.save's zip archive: whole once its end record is written.
        let mut zip = b"PK\x03\x04".to_vec();
        zip.extend(std::iter::repeat_n(7u8, 100_000));
        std::fs::write(&path, &zip).unwrap();
        assert!(!written_whole(&path), "zip without its end record");
        zip.extend(b"PK\x05\x06");
        zip.extend([0u8; 18]);
        std::fs::write(&path, &zip).unwrap();
        assert!(written_whole(&path), "whole zip");
    }

    #[test]
    fn lighter_settings_halve_the_batch_then_turn_on_memory_savers() {
        let kohya = Kohya::new("accelerate".into(), PathBuf::new());
        let mut settings = TrainingSettings {
            backend: "kohya".into(),
            steps: 10,
            learning_rate: 1e-4,
            rank: 4,
            resolution: 512,
            batch_size: 2,
            ..Default::default()
        };
        settings.extras.insert(
            "gradient_checkpointing".into(),
            ExtraValue {
                kind: Some(Kind::Flag(false)),
            },
        );
        let mut notes = Vec::new();
        while let Some((next, note)) = kohya.lighter(&settings, ModelFamily::Flux) {
            let problems = kohya.check(&next, ModelFamily::Flux);
            assert!(problems.is_empty(), "{note}: {problems:?}");
            notes.push(note);
            settings = next;
        }
        assert_eq!(
            notes,
            [
                "batch_size 2 → 1",
                "gradient_checkpointing on",
                "blocks_to_swap 0 → 8",
                "blocks_to_swap 8 → 18",
                "blocks_to_swap 18 → 35"
            ]
        );
        settings.extras.remove("blocks_to_swap");
        assert!(kohya.lighter(&settings, ModelFamily::Sdxl).is_none());
    }
}
