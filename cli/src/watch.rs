//! `yard watch`: follow a job's event stream to its end. On a terminal the
//! state, the prepare/deliver notes and the training steps are progress
//! bars; otherwise (CI logs, pipes) the same facts are plain lines, the
//! training ones thinned to every tenth of the run.

use crate::client::Client;
use crate::view::{display_uri, error_line, stage_name, state_name};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use trainyard_proto::v1::job_event::Kind;
use trainyard_proto::v1::{
    Checkpoint, GetRequest, JobRecord, JobState, LogLine, Progress, Stage, StateChanged,
    WatchRequest,
};

#[derive(Clone, Copy, Debug, Default)]
pub struct WatchOptions {
    /// Print log lines too.
    pub logs: bool,
}

/// How a watched job ended.
pub struct WatchOutcome {
    /// The record fetched after the last event.
    pub record: JobRecord,
    /// Server time (Unix ms) of the first training step reported.
    pub first_step_at_ms: Option<i64>,
}

/// Follows `job_id` until its final state, then fetches its record.
pub async fn watch(
    client: &mut Client,
    job_id: &str,
    options: WatchOptions,
) -> anyhow::Result<WatchOutcome> {
    let mut stream = client
        .watch(WatchRequest {
            job_id: job_id.to_string(),
        })
        .await?
        .into_inner();
    let mut view = View::new(std::io::stdout().is_terminal());
    let mut first_step_at_ms = None;
    let ended = loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        };
        match event.kind {
            Some(Kind::State(change)) => {
                view.state(&change);
                if change.state() == JobState::AwaitingReview {
                    view.line(&format!(
                        "awaiting review: yard captions {job_id}, then yard approve {job_id} (or yard cancel {job_id})"
                    ));
                }
            }
            Some(Kind::Progress(p)) => {
                if p.stage == Stage::Train as i32 && p.step >= 1 && first_step_at_ms.is_none() {
                    first_step_at_ms = Some(event.at_ms);
                }
                view.progress(&p);
            }
            Some(Kind::Checkpoint(c)) => view.checkpoint(&c),
            Some(Kind::Log(line)) if options.logs => view.log(&line),
            _ => {}
        }
    };
    view.finish();
    ended?;
    let record = client
        .get(GetRequest {
            job_id: job_id.to_string(),
        })
        .await?
        .into_inner()
        .job
        .ok_or_else(|| anyhow::anyhow!("the coordinator answered without a job"))?;
    if !record.state().is_final() {
        anyhow::bail!(
            "the event stream ended while job {job_id} is still {}; run `yard watch {job_id}` again",
            state_name(record.state())
        );
    }
    Ok(WatchOutcome {
        record,
        first_step_at_ms,
    })
}

enum View {
    Bars(Bars),
    Plain(Plain),
}

struct Bars {
    multi: MultiProgress,
    status: ProgressBar,
    train: Option<ProgressBar>,
}

struct Plain {
    started: Instant,
    last_note: String,
    last_step_tenth: Option<u32>,
    last_step_print: Instant,
}

fn train_text(p: &Progress, fallback_eta: Option<Duration>) -> String {
    let mut parts = Vec::new();
    if p.loss.is_finite() && p.loss != 0.0 {
        parts.push(format!("loss {:.4}", p.loss));
    }
    if p.learning_rate > 0.0 {
        parts.push(format!("lr {:.2e}", p.learning_rate));
    }
    if p.samples_per_second > 0.0 {
        parts.push(format!("{:.0} samples/s", p.samples_per_second));
    }
    let eta = (p.eta_seconds > 0.0)
        .then(|| Duration::from_secs_f32(p.eta_seconds))
        .or(fallback_eta);
    if let Some(eta) = eta {
        parts.push(format!("eta {}", short_duration(eta)));
    }
    parts.join("  ")
}

/// `42s`, `3m05s`, `2h10m`.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn state_text(change: &StateChanged) -> String {
    let state = JobState::try_from(change.state).unwrap_or_default();
    let mut text = state_name(state).to_string();
    if let Some(stage) = state.running_stage() {
        text.push_str(&format!(
            " ({} attempt {})",
            stage.name(),
            change.attempt.max(1)
        ));
    }
    if let Some(error) = &change.error {
        text.push_str(&format!(": {}", error_line(error)));
    }
    text
}

impl View {
    fn new(terminal: bool) -> View {
        if !terminal {
            return View::Plain(Plain {
                started: Instant::now(),
                last_note: String::new(),
                last_step_tenth: None,
                last_step_print: Instant::now(),
            });
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let status = multi.add(ProgressBar::new_spinner());
        status.set_style(
            ProgressStyle::with_template("{spinner:.green} {prefix:.bold} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        status.set_prefix("waiting for events");
        status.enable_steady_tick(Duration::from_millis(120));
        View::Bars(Bars {
            multi,
            status,
            train: None,
        })
    }

    fn line(&mut self, text: &str) {
        match self {
            View::Bars(b) => {
                let _ = b.multi.println(text);
            }
            View::Plain(p) => println!("[{:>6.1}s] {text}", p.started.elapsed().as_secs_f64()),
        }
    }

    fn state(&mut self, change: &StateChanged) {
        let text = state_text(change);
        if let View::Bars(b) = self {
            let state = JobState::try_from(change.state).unwrap_or_default();
            b.status.set_prefix(state_name(state));
            b.status.set_message("");
        }
        self.line(&format!("state {text}"));
    }

    fn progress(&mut self, p: &Progress) {
        let stage = Stage::try_from(p.stage).unwrap_or_default();
        if stage == Stage::Train && p.total_steps > 0 {
            self.train(p);
        } else if !p.message.is_empty() {
            let note = format!("{}: {}", stage.name(), p.message);
            match self {
                View::Bars(b) => b.status.set_message(note),
                View::Plain(plain) if plain.last_note != note => {
                    plain.last_note = note.clone();
                    self.line(&note);
                }
                View::Plain(_) => {}
            }
        }
    }

    fn train(&mut self, p: &Progress) {
        match self {
            View::Bars(b) => {
                let bar = b.train.get_or_insert_with(|| {
                    let bar = b.multi.add(ProgressBar::new(u64::from(p.total_steps)));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "  train {pos:>5}/{len}  {msg}  [{wide_bar:.cyan/blue}]",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar
                });
                bar.set_length(u64::from(p.total_steps));
                bar.set_position(u64::from(p.step));
                let fallback = (p.step > 0).then(|| bar.eta());
                bar.set_message(train_text(p, fallback));
            }
            View::Plain(plain) => {
                let tenth = p.step.saturating_mul(10) / p.total_steps.max(1);
                let due = plain.last_step_tenth != Some(tenth)
                    || plain.last_step_print.elapsed() >= Duration::from_secs(10)
                    || p.step == p.total_steps;
                if due {
                    plain.last_step_tenth = Some(tenth);
                    plain.last_step_print = Instant::now();
                    let text = format!(
                        "train step {}/{}  {}",
                        p.step,
                        p.total_steps,
                        train_text(p, None)
                    );
                    self.line(text.trim_end());
                }
            }
        }
    }

    fn checkpoint(&mut self, c: &Checkpoint) {
        self.line(&format!(
            "checkpoint at step {}: {}",
            c.step,
            display_uri(&c.uri)
        ));
    }

    /// One event may hold several lines (the worker batches them).
    fn log(&mut self, line: &LogLine) {
        for text in line.line.split('\n') {
            self.line(&format!(
                "{} {}: {}",
                stage_name(line.stage),
                line.stream,
                text
            ));
        }
    }

    fn finish(&mut self) {
        if let View::Bars(b) = self {
            if let Some(train) = &b.train {
                train.abandon();
            }
            b.status.finish_and_clear();
        }
    }
}
