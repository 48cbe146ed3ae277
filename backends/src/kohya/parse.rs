//! kohya's output lines (`train_network.py`, `library/train_util.py`, and
//! accelerate's `checkpointing.py` for the end of a state save), as events.
//!
//! After a resume the `steps` bar counts from 0 again (it is
//! `tqdm(range(max_train_steps - initial_step))`), so the parser adds the step
//! of the `load train state from …` line to it: progress stays absolute.
//! kohya's own step numbers (`saving state at step N`, file names) are
//! already absolute within the first epoch, which is why the backend renders
//! a run as one epoch.

use crate::common::{self, NUM};
use crate::{LineEvent, OutputParser};
use regex::Regex;
use std::sync::LazyLock;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("kohya regex")
}

/// `  total optimization steps / 学習ステップ数: 2000`
static TOTAL: LazyLock<Regex> =
    LazyLock::new(|| re(r"total optimization steps\b[^:]*:\s*(?P<n>\d+)"));
/// `override steps. steps for 16 epochs is / 指定エポックまでのステップ数: 3200`
static OVERRIDE: LazyLock<Regex> =
    LazyLock::new(|| re(r"override steps\. steps for \d+ epochs is\b[^:]*:\s*(?P<n>\d+)"));
/// `epoch 1/16`
static EPOCH: LazyLock<Regex> = LazyLock::new(|| re(r"^epoch (?P<e>\d+)/(?P<n>\d+)$"));
/// `load train state from /o/x-step00000250-state/train_state.json: {'current_epoch': 1, 'current_step': 250}`
static LOADED: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"load train state from (?P<p>.+?): \{'current_epoch': (?P<e>\d+), 'current_step': (?P<s>\d+)\}",
    )
});
/// `saving state at step 250` (logged before the state is written).
static SAVING_STATE: LazyLock<Regex> = LazyLock::new(|| re(r"saving state at step (?P<s>\d+)\b"));
/// accelerate's last line of a state save: `Random states saved in /o/x-step00000250-state/random_states_0.pkl`.
static STATE_WRITTEN: LazyLock<Regex> = LazyLock::new(|| {
    re(r"Random states saved in .*-step(?P<s>\d{8})-state[/\\]random_states_\d+\.pkl")
});
/// The last line of a finished run.
static DONE: LazyLock<Regex> = LazyLock::new(|| re(r"(?:^|\s)model saved\.$"));
/// `avr_loss=0.109` in the bar's postfix.
static AVR_LOSS: LazyLock<Regex> = LazyLock::new(|| re(&format!(r"avr_loss=(?P<v>{NUM})")));

pub(crate) struct Parser {
    total: u32,
    /// Steps done before this process started (from the train state it loaded).
    offset: u32,
    epoch: Option<f32>,
    batch_size: u32,
    /// The last progress sent, to drop tqdm's repeated prints of one step.
    last: Option<(u32, Option<u32>)>,
}

impl Parser {
    pub(crate) fn new(steps: u32, batch_size: u32) -> Self {
        Self {
            total: steps,
            offset: 0,
            epoch: None,
            batch_size: batch_size.max(1),
            last: None,
        }
    }

    fn piece(&mut self, line: &str) -> Option<LineEvent> {
        let line = line.trim();
        if let Some(bar) = common::tqdm(line).filter(|b| b.desc == "steps") {
            let step = self.offset + bar.n;
            let loss = AVR_LOSS
                .captures(bar.postfix)
                .and_then(|c| common::num(&c["v"]))
                .map(|v| v as f32);
            let key = (step, loss.map(f32::to_bits));
            if self.last == Some(key) {
                return None;
            }
            self.last = Some(key);
            return Some(LineEvent::Progress {
                step,
                total: self.total.max(step),
                loss,
                lr: None,
                samples_per_sec: bar.it_per_sec.map(|r| r * self.batch_size as f32),
                epoch: self.epoch,
            });
        }
        if let Some(c) = LOADED.captures(line) {
            let step = c["s"].parse().ok()?;
            self.offset = step;
            return Some(LineEvent::Resumed { step });
        }
        if let Some(c) = SAVING_STATE
            .captures(line)
            .or_else(|| STATE_WRITTEN.captures(line))
        {
            return Some(LineEvent::Saved {
                step: c["s"].parse().ok(),
            });
        }
        if let Some(c) = TOTAL.captures(line).or_else(|| OVERRIDE.captures(line)) {
            self.total = c["n"].parse().unwrap_or(self.total);
            return None;
        }
        if let Some(c) = EPOCH.captures(line) {
            self.epoch = c["e"].parse().ok();
            return None;
        }
        DONE.is_match(line).then_some(LineEvent::Done)
    }
}

impl OutputParser for Parser {
    /// The run loop splits on `\r` already; a line that still holds several
    /// bar refreshes is split here too.
    fn line(&mut self, line: &str) -> Vec<LineEvent> {
        line.split('\r').filter_map(|p| self.piece(p)).collect()
    }
}
