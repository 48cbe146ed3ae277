//! The driver's output: progress, metrics and saves from its lines, and the
//! class of a failure from its last lines.

use super::ADAPTER;
use crate::common::{NUM, Signature, Signatures, error, num, unclassified};
use crate::{LineEvent, OutputParser, classify_common};
use regex::Regex;
use std::process::ExitStatus;
use std::sync::LazyLock;
use trainyard_proto::v1::{ErrorKind, JobError};

/// The training bar: no description, so it starts with the percentage.
static BAR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s+\[[\d:]+<[\d:?]+,\s*(?:(?P<rate>[\d.]+)|\?)(?P<unit>s/it|it/s)",
    )
    .expect("bar regex")
});

/// One `'key': value` pair of a logs dict, the value bare or quoted.
static PAIR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"'(?P<k>[\w/.\-]+)':\s*'?(?P<v>{NUM})'?\s*[,}}]")).expect("pair regex")
});

static RESUMED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^Resuming training from checkpoint: .*checkpoint-(?P<step>\d+)\s*$")
        .expect("resume regex")
});

static SAVED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^💾 Checkpoint saved to .*checkpoint-(?P<step>\d+)\.$").expect("saved regex")
});

pub(super) struct Parser {
    /// The last step logged (or resumed from).
    step: u32,
    pub(super) total: u32,
    samples_per_step: f32,
    it_per_sec: Option<f32>,
}

impl Parser {
    pub(super) fn new(resumed_step: u32, total: u32, samples_per_step: f32) -> Self {
        Self {
            step: resumed_step,
            total,
            samples_per_step,
            it_per_sec: None,
        }
    }

    fn logs(&mut self, line: &str) -> Vec<LineEvent> {
        let pairs: Vec<(&str, f64)> = PAIR
            .captures_iter(line)
            .filter_map(|c| Some((c.name("k")?.as_str(), num(c.name("v")?.as_str())?)))
            .collect();
        let value = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let mut events = Vec::new();
        let skip: &[&str] = if let Some(loss) = value("loss") {
            self.step += 1;
            events.push(LineEvent::Progress {
                step: self.step,
                total: self.total,
                loss: Some(loss as f32),
                lr: value("learning_rate"),
                samples_per_sec: self.it_per_sec.map(|r| r * self.samples_per_step),
                epoch: value("epoch").map(|e| e as f32),
            });
            &["loss", "learning_rate", "epoch"]
        } else if value("train_runtime").is_some() {
            &["epoch"]
        } else {
            return events;
        };
        events.extend(
            pairs
                .iter()
                .filter(|(k, _)| !skip.contains(k))
                .map(|(k, v)| LineEvent::Metric {
                    name: (*k).to_string(),
                    value: *v,
                    step: self.step,
                }),
        );
        events
    }
}

impl OutputParser for Parser {
    fn line(&mut self, line: &str) -> Vec<LineEvent> {
        let line = line.trim();
        if line.starts_with('{') {
            return self.logs(line);
        }
        if let Some(c) = BAR.captures(line) {
            if let Ok(total) = c["total"].parse::<u32>() {
                self.total = total;
            }
            let rate = c.name("rate").and_then(|r| r.as_str().parse::<f32>().ok());
            self.it_per_sec = match (rate, &c["unit"]) {
                (Some(r), "s/it") if r > 0.0 => Some(1.0 / r),
                (Some(r), "it/s") => Some(r),
                _ => self.it_per_sec,
            };
            return Vec::new();
        }
        if let Some(c) = RESUMED.captures(line)
            && let Ok(step) = c["step"].parse()
        {
            self.step = step;
            return vec![LineEvent::Resumed { step }];
        }
        if let Some(c) = SAVED.captures(line) {
            return vec![LineEvent::Saved {
                step: c["step"].parse().ok(),
            }];
        }
        if line == "✅ Training completed." {
            return vec![LineEvent::Done];
        }
        Vec::new()
    }
}

/// TRL-specific failures, checked before the shared table.
static SIGNATURES: Signatures = Signatures::new(&[
    Signature {
        // The driver's own check, then transformers' and accelerate's.
        pattern: r"UnsupportedPrecision: |Your setup doesn't support bf16/gpu|fp16 mixed precision requires a GPU",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "mixed precision this machine cannot run (set training.extras.bf16 and fp16 to false, or leave them unset so the precision is chosen for the machine)",
    },
    Signature {
        pattern: r"The chat template is not training-compatible|at least one example has no assistant tokens",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "the model's chat template has no {% generation %} markers, so assistant_only_loss cannot be used with it (set training.extras.assistant_only_loss to false)",
    },
    Signature {
        pattern: r"assistant_only_loss=True., but the dataset is not conversational|assistant_only_loss. argument is only supported for conversational",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "assistant_only_loss needs a conversational dataset, rows of messages (set training.extras.assistant_only_loss to false)",
    },
    Signature {
        pattern: r"the tokenizer is not configured with a padding token|has no pad token and no eos token",
        kind: ErrorKind::Model,
        retryable: false,
        what: "the model's tokenizer has no pad token",
    },
    Signature {
        pattern: r"Either .datasets. or .dataset_name. must be provided",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "no dataset given to trl",
    },
    Signature {
        pattern: r"Cannot use (?:apply_)?chat[_ ]template|chat_template is not set|Can't load tokenizer for|TemplateError|TemplateSyntaxError|UndefinedError",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "chat template or tokenizer error",
    },
    Signature {
        pattern: r"does not appear to have a file named|Incorrect path_or_model_id|is not a local folder and is not a valid model identifier|Unrecognized model in|Error no file named .* found in directory",
        kind: ErrorKind::Model,
        retryable: false,
        what: "base model folder unusable",
    },
    Signature {
        pattern: r"Dataset .* has no rows|DatasetGenerationError|KeyError: '(?:text|messages|prompt|completion|chosen|rejected)'|Unable to find '",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "dataset unusable",
    },
    Signature {
        pattern: r"got an unexpected keyword argument|is not a valid (?:SchedulerType|OptimizerNames|SaveStrategy)|At most one of fp16 and bf16|Invalid .loss_type.|Unknown loss type: |requires an eval strategy|should be set through the .lr_scheduler_kwargs.|required positional argument: 'num_decay_steps'|Expected value warmup_steps >= 0",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "invalid training option",
    },
    Signature {
        pattern: r"No valid checkpoint found in output directory|Can't find a valid checkpoint at|PytorchStreamReader failed",
        kind: ErrorKind::Trainer,
        retryable: true,
        what: "checkpoint to resume from is missing or corrupt",
    },
]);

static NAN_LOSS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"'loss':\s*'?nan'?").expect("nan regex"));

pub(super) fn classify(status: ExitStatus, tail: &[String]) -> JobError {
    if let Some(known) = SIGNATURES.find(tail) {
        return known;
    }
    // The run loop stops a run whose loss stays NaN; its kill must not read as OOM.
    let last_logs = tail
        .iter()
        .rev()
        .find(|l| l.trim_start().starts_with('{') && l.contains("'loss':"));
    if let Some(line) = last_logs.filter(|l| NAN_LOSS.is_match(l)) {
        return error(
            ErrorKind::Trainer,
            format!("training diverged (loss is nan): {}", line.trim()),
            false,
        );
    }
    if let Some(known) = classify_common(status, tail) {
        return known;
    }
    if status.success() {
        return error(
            ErrorKind::Trainer,
            format!("trl exited 0 without saving the adapter ({ADAPTER})"),
            true,
        );
    }
    unclassified("trl", status, tail)
}
