//! SimpleTuner's output: the step bar and startup lines on the console,
//! and the JSON events its `raw` webhook POSTs (see the module docs of
//! `simpletuner`).

use crate::common;
use crate::{LineEvent, OutputParser};
use regex::Regex;
use serde_json::Value;
use std::sync::LazyLock;

static EPOCH_DESC: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Epoch (\d+)/(\d+),? Steps$").expect("epoch regex"));
static STEPS_COMPLETED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s*- Steps completed: (\d+)\s*$").expect("steps regex"));
static RESUMING: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"Resuming from global_step (\d+)\.").expect("resume regex"));
static RESUMED_EVENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Resumed from global_step (\d+)").expect("resumed regex"));
static CHECKPOINT_DIR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"checkpoint-(\d+)/?$").expect("checkpoint regex"));

pub(super) struct Parser {
    batch_size: u32,
    /// Resume and save hints arrive from the log and the webhook alike;
    /// each is reported once per step.
    resumed: Option<u32>,
    saved: Option<u32>,
}

impl Parser {
    pub(super) fn new(batch_size: u32) -> Self {
        Self {
            batch_size,
            resumed: None,
            saved: None,
        }
    }

    fn resumed(&mut self, step: u32) -> Vec<LineEvent> {
        if step == 0 || self.resumed == Some(step) {
            return Vec::new();
        }
        self.resumed = Some(step);
        vec![LineEvent::Resumed { step }]
    }

    fn saved(&mut self, step: Option<u32>) -> Vec<LineEvent> {
        if step.is_some() && self.saved == step {
            return Vec::new();
        }
        self.saved = step.or(self.saved);
        vec![LineEvent::Saved { step }]
    }
}

fn capture_u32(regex: &Regex, text: &str) -> Option<u32> {
    regex.captures(text)?.get(1)?.as_str().parse().ok()
}

impl OutputParser for Parser {
    fn line(&mut self, line: &str) -> Vec<LineEvent> {
        if let Some(bar) = common::tqdm(line)
            && let Some(desc) = EPOCH_DESC.captures(bar.desc)
        {
            return vec![LineEvent::Progress {
                step: bar.n,
                total: bar.total,
                loss: common::postfix_value(bar.postfix, "step_loss").map(|v| v as f32),
                lr: common::postfix_value(bar.postfix, "lr"),
                samples_per_sec: bar.it_per_sec.map(|r| r * self.batch_size as f32),
                epoch: desc[1].parse().ok(),
            }];
        }
        if let Some(step) = capture_u32(&STEPS_COMPLETED, line).or(capture_u32(&RESUMING, line)) {
            return self.resumed(step);
        }
        Vec::new()
    }

    /// The `raw` webhook bodies (`helpers/webhooks/events.py`): the event
    /// dict plus `type`, `job_id`, `severity` and `timestamp`. Failures
    /// (`error`, `training.status` failed) carry no event: `classify`
    /// reads the same failure from the output lines.
    fn webhook(&mut self, body: &Value) -> Vec<LineEvent> {
        let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
        match body.get("type").and_then(Value::as_str) {
            Some("training.status") => {
                let Some(progress) = body.get("progress") else {
                    return Vec::new();
                };
                let (Some(step), Some(total)) = (
                    progress.get("current").and_then(Value::as_f64),
                    progress.get("total").and_then(Value::as_f64),
                ) else {
                    return Vec::new();
                };
                let step = step as u32;
                let metrics = progress.get("metrics");
                let metric = |key: &str| metrics.and_then(|m| m.get(key)).and_then(Value::as_f64);
                // The startup status reports the loss accumulator, still 0.
                let startup = text(progress, "label").as_deref() == Some("Training initialisation");
                let mut events = vec![LineEvent::Progress {
                    step,
                    total: total as u32,
                    loss: metric("loss").filter(|_| !startup).map(|v| v as f32),
                    lr: metric("learning_rate"),
                    samples_per_sec: None,
                    epoch: metric("epoch").map(|v| v as f32),
                }];
                if let Some(value) = metric("grad_norm") {
                    events.push(LineEvent::Metric {
                        name: "grad_norm".into(),
                        value,
                        step,
                    });
                }
                events
            }
            Some("lifecycle.stage") => {
                let Some(stage) = body.get("stage") else {
                    return Vec::new();
                };
                let message = text(body, "message").unwrap_or_default();
                match (
                    text(stage, "key").as_deref(),
                    text(stage, "status").as_deref(),
                ) {
                    // `checkpoint_save completed` comes before the sampler
                    // state, the manifest and `.guard`: not saved yet.
                    (Some("training_complete"), Some("completed")) => vec![LineEvent::Done],
                    (Some("init_resume_checkpoint"), Some("completed")) => {
                        match capture_u32(&RESUMED_EVENT, &message) {
                            Some(step) => self.resumed(step),
                            None => Vec::new(),
                        }
                    }
                    _ => Vec::new(),
                }
            }
            // Sent once the folder is complete and renamed into place.
            Some("training.checkpoint") => {
                let path = body
                    .get("checkpoint")
                    .and_then(|c| text(c, "path"))
                    .unwrap_or_default();
                self.saved(capture_u32(&CHECKPOINT_DIR, &path))
            }
            _ => Vec::new(),
        }
    }
}
