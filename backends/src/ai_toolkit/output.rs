//! ai-toolkit's console output: its step bar (desc = the job name), the
//! save and resume lines, and the end-of-run summary.

use crate::common;
use crate::{LineEvent, OutputParser};
use regex::Regex;
use std::path::Path;
use std::sync::LazyLock;

static STEP_FILE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"_(\d{9})\.safetensors$").expect("step file regex"));
static SAVING: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Saving at step (\d+)").expect("saving regex"));
static RESUMING: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"#### IMPORTANT RESUMING FROM (.+) ####").expect("resuming regex")
});
static FOUND_STEP: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^Found step (\d+) in metadata, starting from there").expect("found step regex")
});
static COMPLETED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s*- 1 completed job$").expect("completed regex"));

pub(super) struct Parser {
    /// The bar's description is the job name.
    name: String,
    batch_size: u32,
    /// The step announced by `Saving at step N`, for the save lines after it.
    saving: Option<u32>,
    resumed: Option<u32>,
}

impl Parser {
    pub(super) fn new(name: String, batch_size: u32) -> Self {
        Self {
            name,
            batch_size,
            saving: None,
            resumed: None,
        }
    }
}

impl OutputParser for Parser {
    fn line(&mut self, line: &str) -> Vec<LineEvent> {
        if let Some(bar) = common::tqdm(line)
            && bar.desc == self.name
        {
            return vec![LineEvent::Progress {
                step: bar.n,
                total: bar.total,
                loss: common::postfix_value(bar.postfix, "loss").map(|v| v as f32),
                lr: common::postfix_value(bar.postfix, "lr"),
                samples_per_sec: bar.it_per_sec.map(|r| r * self.batch_size as f32),
                epoch: None,
            }];
        }
        let step_of = |re: &Regex, text: &str| -> Option<u32> {
            re.captures(text)?.get(1)?.as_str().parse().ok()
        };
        if let Some(step) = step_of(&SAVING, line) {
            self.saving = Some(step);
            return Vec::new();
        }
        if let Some(path) = line.strip_prefix("Saved checkpoint to ") {
            let path = Path::new(path.trim());
            let step = path.to_str().and_then(|p| step_of(&STEP_FILE, p));
            self.saving = step;
            // The final save, `<name>.safetensors`, ends the run; run.py
            // prints no summary after a success.
            let last = path.file_name() == Some(format!("{}.safetensors", self.name).as_ref());
            return match last {
                true => vec![LineEvent::Saved { step }, LineEvent::Done],
                false => vec![LineEvent::Saved { step }],
            };
        }
        if line.starts_with("Saved optimizer to ") {
            return vec![LineEvent::Saved {
                step: self.saving.take(),
            }];
        }
        let resumed = RESUMING
            .captures(line)
            .and_then(|c| step_of(&STEP_FILE, c.get(1)?.as_str().trim()))
            .or_else(|| step_of(&FOUND_STEP, line));
        if let Some(step) = resumed {
            if self.resumed == Some(step) {
                return Vec::new();
            }
            self.resumed = Some(step);
            return vec![LineEvent::Resumed { step }];
        }
        // Versions that print the summary after a success too.
        if COMPLETED.is_match(line) {
            return vec![LineEvent::Done];
        }
        Vec::new()
    }
}
