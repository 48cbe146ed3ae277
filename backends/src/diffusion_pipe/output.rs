//! Reading a diffusion-pipe run: its output lines (DeepSpeed's step line and
//! diffusion-pipe's own) and, when it fails, why.

use super::NAME;
use crate::common::{NUM, Signature, Signatures, num, unclassified};
use crate::{LineEvent, OutputParser, classify_common, error};
use regex::Regex;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::LazyLock;
use trainyard_proto::v1::{ErrorKind, JobError};

/// diffusion-pipe's own failures (trainers reference §3(f)), checked before
/// the shared table.
static SIGNATURES: Signatures = Signatures::new(&[
    Signature {
        pattern: r"This script forces alpha=rank",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "diffusion-pipe rejects an [adapter] alpha",
    },
    Signature {
        pattern: r"(?:Model|Adapter) type \S+ is not implemented",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "diffusion-pipe does not support this configuration",
    },
    Signature {
        pattern: r"Directory .* had no images/videos!",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "no usable training data",
    },
    Signature {
        pattern: r"RuntimeError: Invalid path: ",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "dataset folder missing",
    },
    Signature {
        // diffusers given a local folder that is missing or incomplete.
        pattern: r"HFValidationError|Error no file named \S+ found in directory",
        kind: ErrorKind::Model,
        retryable: true,
        what: "base model folder missing or incomplete",
    },
    Signature {
        // torch.distributed's TCPStore (`deepspeed.init_distributed`) could
        // not bind `--master_port`: another process on the machine holds it.
        pattern: r"The server socket has failed to listen.*EADDRINUSE",
        kind: ErrorKind::Trainer,
        retryable: true,
        what: "the rendezvous port (--master_port) is taken by another process",
    },
    Signature {
        pattern: r"Checkpoint directory .* does not exist|Unable to find latest file at",
        kind: ErrorKind::Trainer,
        retryable: true,
        what: "the restored checkpoint is incomplete",
    },
]);

/// The single-node runner's report of its child: `exits with return code = -9`
/// when the child died by a signal (the runner itself then exits 1).
static LAUNCHER_EXIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"exits with return code = (-?\d+)").expect("launcher regex"));

/// A Python exception line: `AssertionError`, `KeyError: 'dtype'`, `torch.X: …`.
static EXCEPTION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)\b").expect("exception regex")
});

pub(super) fn classify(status: ExitStatus, tail: &[String]) -> JobError {
    if let Some(known) = SIGNATURES.find(tail) {
        return known;
    }
    // Anything raised while reading the config (the bare `assert` for a
    // missing save_every_n_* key, a KeyError for a missing dtype) is ours.
    if let Some(at) = tail
        .iter()
        .rposition(|l| l.contains("in set_config_defaults"))
    {
        let raised = tail[at..]
            .iter()
            .map(|l| l.trim())
            .find(|l| EXCEPTION.is_match(l))
            .unwrap_or("AssertionError");
        return error(
            ErrorKind::InvalidSpec,
            format!(
                "diffusion-pipe rejected its config in set_config_defaults (every run needs a save_every_n_* key, a [model] dtype, …): {raised}"
            ),
            false,
        );
    }
    // The runner exits 1 when its child was killed; its line has the signal.
    let child = tail
        .iter()
        .rev()
        .find_map(|l| LAUNCHER_EXIT.captures(l)?[1].parse::<i32>().ok());
    let effective = match child {
        Some(code) if code < 0 => ExitStatus::from_raw(-code),
        _ => status,
    };
    if let Some(known) = classify_common(effective, tail) {
        return known;
    }
    let own: Vec<String> = tail
        .iter()
        .filter(|l| !LAUNCHER_EXIT.is_match(l))
        .cloned()
        .collect();
    unclassified(NAME, effective, &own)
}

pub(super) struct Parser {
    total: u32,
    epoch: Option<f32>,
}

impl Parser {
    pub(super) fn new(total: u32, resumed: bool) -> Self {
        // A fresh run starts in epoch 1; a resumed one says where it is.
        Self {
            total,
            epoch: (!resumed).then_some(1.0),
        }
    }
}

/// DeepSpeed's PipelineEngine line (`runtime/pipe/engine.py`), with any
/// additional named losses between `loss` and `iter time`.
static STEP: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"^steps: (?P<step>\d+) loss: (?P<loss>{NUM}) (?P<extra>(?:\S+: {NUM} )*)iter time \(s\): (?P<it>{NUM}) samples/sec: (?P<sps>{NUM})"
    ))
    .expect("step regex")
});
static EXTRA_LOSS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"(?P<k>\S+): (?P<v>{NUM}) ")).expect("extra regex"));
static EPOCH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Started new epoch: (\d+)").expect("epoch regex"));
static SAVED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^Saving model to directory (?:step(\d+)|\S+)").expect("saved regex")
});
static RESUMED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^Resuming training from checkpoint\. Resuming at epoch: (\d+), step: (\d+)")
        .expect("resumed regex")
});

impl OutputParser for Parser {
    fn line(&mut self, line: &str) -> Vec<LineEvent> {
        if let Some(c) = STEP.captures(line) {
            let Ok(step) = c["step"].parse::<u32>() else {
                return Vec::new();
            };
            let mut events = vec![LineEvent::Progress {
                step,
                total: self.total,
                loss: num(&c["loss"]).map(|v| v as f32),
                lr: None,
                samples_per_sec: num(&c["sps"]).map(|v| v as f32),
                epoch: self.epoch,
            }];
            events.extend(EXTRA_LOSS.captures_iter(&c["extra"]).filter_map(|m| {
                Some(LineEvent::Metric {
                    name: m["k"].to_string(),
                    value: num(&m["v"])?,
                    step,
                })
            }));
            return events;
        }
        if let Some(c) = EPOCH.captures(line) {
            self.epoch = c[1].parse::<f32>().ok();
            return Vec::new();
        }
        if let Some(c) = SAVED.captures(line) {
            return vec![LineEvent::Saved {
                step: c.get(1).and_then(|m| m.as_str().parse().ok()),
            }];
        }
        if let Some(c) = RESUMED.captures(line) {
            self.epoch = c[1].parse::<f32>().ok();
            // It prints the step it is about to run; the checkpoint is the one before.
            return match c[2].parse::<u32>() {
                Ok(next) => vec![LineEvent::Resumed {
                    step: next.saturating_sub(1),
                }],
                Err(_) => Vec::new(),
            };
        }
        if line.trim_end() == "TRAINING COMPLETE!" {
            return vec![LineEvent::Done];
        }
        // `caching latents: …`, `caching text embeddings: …`, DeepSpeed's
        // INFO lines: nothing the run loop acts on.
        Vec::new()
    }
}
