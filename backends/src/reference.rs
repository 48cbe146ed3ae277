//! The built-in reference trainer, `ty-reference-trainer`: a real LoRA
//! trainer on a CPU, launched like any other trainer. Its protocol is the
//! crate's README: a JSON config, `ty-progress`/`ty-checkpoint`/`ty-done`
//! lines on stdout, `ty-error kind=…` on stderr.

use super::{
    BackendError, ExtraType, FoundCheckpoint, Launch, LineEvent, OutputParser, StopRequest,
    TrainInputs, TrainerBackend, classify_common, error, typed_extras,
};
use crate::{Extra, SettingProblem};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use trainyard_core::process::CommandSpec;
use trainyard_models::ModelFamily;
use trainyard_proto::v1::{ErrorKind, JobError, TrainingSettings};

pub struct Reference {
    bin: PathBuf,
}

impl Reference {
    pub fn new(bin: PathBuf) -> Self {
        Self { bin }
    }
}

/// The trainer's config file, serialised from a struct (never string-built).
#[derive(Serialize)]
struct Config<'a> {
    dataset_dir: &'a Path,
    base_model: &'a Path,
    base_model_name: &'a str,
    output_dir: &'a Path,
    output_name: &'a str,
    steps: u64,
    learning_rate: f64,
    rank: usize,
    alpha: f64,
    resolution: usize,
    batch_size: usize,
    repeats: usize,
    save_every: u64,
    seed: u64,
    trigger_word: Option<&'a str>,
    resume_from: Option<&'a Path>,
    fault: Option<Fault>,
}

/// Test faults, from typed extras (`fault_crash_at_step` …).
#[derive(Serialize, Default)]
struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    crash_at_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hang_at_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_zero_without_output_at_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oom_at_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oom_min_batch_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chatter_bytes_per_step: Option<u64>,
}

/// Extras this backend accepts; anything else is refused by name.
pub const EXTRAS: &[(&str, ExtraType)] = &[
    ("fault_crash_at_step", ExtraType::Int),
    ("fault_hang_at_step", ExtraType::Int),
    ("fault_exit_zero_without_output_at_step", ExtraType::Int),
    ("fault_oom_at_step", ExtraType::Int),
    ("fault_oom_min_batch_size", ExtraType::Int),
    ("fault_chatter_bytes_per_step", ExtraType::Int),
];

const CHECKPOINT_FILES: &[&str] = &["adapter.safetensors", "optimizer.safetensors", "state.json"];

struct Parser;

fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

impl OutputParser for Parser {
    fn line(&mut self, line: &str) -> Vec<LineEvent> {
        parse(line).into_iter().collect()
    }
}

fn parse(line: &str) -> Option<LineEvent> {
    let num = |key: &str| kv(line, key).and_then(|v| v.parse::<f64>().ok());
    if line.starts_with("ty-progress ") {
        return Some(LineEvent::Progress {
            step: num("step")? as u32,
            total: num("total")? as u32,
            loss: num("loss").map(|v| v as f32),
            lr: num("lr"),
            samples_per_sec: num("samples_per_sec").map(|v| v as f32),
            epoch: num("epoch").map(|v| v as f32),
        });
    }
    if line.starts_with("ty-checkpoint ") {
        return Some(LineEvent::Saved {
            step: Some(num("step")? as u32),
        });
    }
    if line.starts_with("ty-resumed ") {
        return Some(LineEvent::Resumed {
            step: num("step")? as u32,
        });
    }
    if line.starts_with("ty-done ") {
        return Some(LineEvent::Done);
    }
    None
}

/// Where the trainer keeps the checkpoint of `step`.
fn checkpoint_dir(output_dir: &Path, step: u32) -> PathBuf {
    output_dir
        .join("checkpoints")
        .join(format!("step-{step:08}"))
}

fn libc_sigterm() -> i32 {
    15
}

impl TrainerBackend for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn families(&self) -> &'static [ModelFamily] {
        &[ModelFamily::Reference]
    }

    fn parts(&self, _family: ModelFamily) -> &'static [&'static str] {
        &[trainyard_models::part::FILE]
    }

    fn check(&self, settings: &TrainingSettings, _family: ModelFamily) -> Vec<SettingProblem> {
        typed_extras("reference", &settings.extras, EXTRAS)
            .err()
            .unwrap_or_default()
    }

    fn parser(&self, _inputs: &TrainInputs) -> Box<dyn OutputParser> {
        Box::new(Parser)
    }

    fn stop_request(&self, _inputs: &TrainInputs) -> StopRequest {
        // The reference trainer saves a checkpoint on SIGTERM and exits.
        StopRequest::Signal(libc_sigterm())
    }

    fn render(&self, inputs: &TrainInputs) -> Result<Launch, BackendError> {
        let s = &inputs.settings;
        let extras =
            typed_extras("reference", &s.extras, EXTRAS).map_err(|p| BackendError::invalid(&p))?;
        let mut fault = Fault::default();
        for (key, value) in &extras {
            let Extra::Int(n) = value else { continue };
            let n = Some((*n).max(0) as u64);
            match key.as_str() {
                "fault_crash_at_step" => fault.crash_at_step = n,
                "fault_hang_at_step" => fault.hang_at_step = n,
                "fault_exit_zero_without_output_at_step" => {
                    fault.exit_zero_without_output_at_step = n
                }
                "fault_oom_min_batch_size" => fault.oom_min_batch_size = n,
                "fault_chatter_bytes_per_step" => fault.chatter_bytes_per_step = n,
                _ => fault.oom_at_step = n,
            }
        }
        let any_fault = !extras.is_empty();
        let resume_from = inputs
            .resume
            .as_ref()
            .map(|r| checkpoint_dir(&inputs.output_dir, r.step));
        let config = Config {
            dataset_dir: &inputs.dataset_dir,
            base_model: inputs.model.part(trainyard_models::part::FILE)?,
            base_model_name: &inputs.model.reference,
            output_dir: &inputs.output_dir,
            output_name: &inputs.output_name,
            steps: u64::from(s.steps),
            learning_rate: s.learning_rate,
            rank: s.rank as usize,
            alpha: s.alpha,
            resolution: s.resolution as usize,
            batch_size: s.batch_size.max(1) as usize,
            repeats: s.repeats.max(1) as usize,
            save_every: u64::from(s.save_every),
            seed: s.seed,
            trigger_word: (!inputs.trigger_word.is_empty()).then_some(inputs.trigger_word.as_str()),
            resume_from: resume_from.as_deref(),
            fault: any_fault.then_some(fault),
        };
        let path = inputs.run_dir.join("reference.json");
        let body = serde_json::to_vec_pretty(&config)
            .map_err(|e| BackendError::InvalidSettings(e.to_string()))?;
        Ok(Launch {
            files: vec![(path.clone(), body)],
            links: Vec::new(),
            command: CommandSpec {
                program: self.bin.clone(),
                args: vec!["train".into(), "--config".into(), path.into()],
                cwd: inputs.run_dir.clone(),
                env: vec![],
            },
        })
    }

    fn latest_checkpoint(&self, inputs: &TrainInputs) -> Option<FoundCheckpoint> {
        let entries = std::fs::read_dir(inputs.output_dir.join("checkpoints")).ok()?;
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step = name.strip_prefix("step-")?.parse::<u32>().ok()?;
                // The trainer renames a finished checkpoint into place.
                e.path()
                    .join("state.json")
                    .exists()
                    .then(|| (step, e.path()))
            })
            .max_by_key(|(step, _)| *step)
            .map(|(step, _)| FoundCheckpoint {
                step,
                files: CHECKPOINT_FILES
                    .iter()
                    .map(|f| {
                        Path::new("checkpoints")
                            .join(format!("step-{step:08}"))
                            .join(f)
                    })
                    .collect(),
            })
    }

    fn final_adapter(&self, inputs: &TrainInputs) -> Option<PathBuf> {
        let path = inputs
            .output_dir
            .join(format!("{}.safetensors", inputs.output_name));
        path.exists().then_some(path)
    }

    fn classify(&self, status: ExitStatus, tail: &[String]) -> JobError {
        if let Some(line) = tail.iter().rev().find(|l| l.starts_with("ty-error ")) {
            let kind = kv(line, "kind").unwrap_or("internal");
            let message = line
                .split_once("message=")
                .map(|(_, m)| m.to_string())
                .unwrap_or_else(|| line.clone());
            return match kind {
                "config" => error(ErrorKind::InvalidSpec, message, false),
                "dataset" => error(ErrorKind::BadDataset, message, false),
                "model" => error(ErrorKind::Model, message, false),
                _ => error(ErrorKind::Trainer, message, true),
            };
        }
        if let Some(known) = classify_common(status, tail) {
            return known;
        }
        let last = tail.last().cloned().unwrap_or_default();
        error(
            ErrorKind::Trainer,
            format!("reference trainer exited with {status}; last line: {last}"),
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn backend() -> Reference {
        Reference::new("/bin/true".into())
    }

    #[test]
    fn parses_the_protocol_lines() {
        assert_eq!(
            parse(
                "ty-progress step=12 total=200 loss=0.501234 lr=0.002 samples_per_sec=120.50 epoch=3"
            ),
            Some(LineEvent::Progress {
                step: 12,
                total: 200,
                loss: Some(0.501234),
                lr: Some(0.002),
                samples_per_sec: Some(120.5),
                epoch: Some(3.0),
            })
        );
        assert_eq!(
            parse("ty-checkpoint step=50 dir=/w/out/checkpoints/step-00000050"),
            Some(LineEvent::Saved { step: Some(50) })
        );
        assert_eq!(
            parse("ty-resumed step=50"),
            Some(LineEvent::Resumed { step: 50 })
        );
        assert_eq!(parse("ty-progress step=nan"), None);
        assert_eq!(parse("random noise"), None);
        assert_eq!(
            parse("ty-done adapter=/o/lora.safetensors steps=200 loss_first=1.3 loss_last=0.7"),
            Some(LineEvent::Done)
        );
    }

    #[test]
    fn classifies_failures() {
        let b = backend();
        let status = ExitStatus::from_raw(2 << 8);
        let e = b.classify(
            status,
            &["ty-error kind=dataset message=no usable image".into()],
        );
        assert_eq!((e.kind(), e.retryable), (ErrorKind::BadDataset, false));
        let e = b.classify(
            ExitStatus::from_raw(1 << 8),
            &["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB".into()],
        );
        assert_eq!((e.kind(), e.retryable), (ErrorKind::Oom, true));
        let e = b.classify(ExitStatus::from_raw(9), &[]);
        assert!(e.retryable);
    }
}
