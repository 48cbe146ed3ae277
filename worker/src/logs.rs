//! Trainer output as log events, off the path that reads the trainer's
//! pipes: lines are queued without waiting (a bounded queue; what does not
//! fit is counted and reported as dropped) and a task of their own publishes
//! them, consecutive lines of one stream joined by `\n` into one event, at
//! most [`FLUSH_EVERY`] after the first of them or sooner when
//! [`MAX_LINES`] lines or [`MAX_BYTES`] bytes are waiting. A slow or absent
//! NATS then costs log lines, never trainer progress.
//!
//! The worker's own notes (`stream` "worker") go through the same queue, so
//! they keep their place among the trainer's lines, and are always an
//! event of their own.
//!
//! The trainer's lines are metered by a [`LogBudget`]: past the job's
//! byte budget (over all its attempts, counted in the task's claim) one
//! note says so and no more trainer lines go out; over the
//! byte rate lines are dropped and a note (at most every
//! [`RATE_NOTE_EVERY`], and at the end) counts them.

use crate::log_budget::{Admit, LogBudget, LogLimits};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;
use trainyard_core::events::EventSink;
use trainyard_proto::v1::Stage;

/// How long a line may wait for the lines that follow it.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Lines per event, at most.
pub const MAX_LINES: usize = 200;
/// Bytes of text per event, about at most (well below NATS's payload limit).
pub const MAX_BYTES: usize = 256 * 1024;
/// Lines waiting to be published, at most; the last [`RESERVED`] places
/// are kept for the worker's notes.
const QUEUE: usize = 4096;
/// Least time between two notes about lines dropped over the rate.
pub const RATE_NOTE_EVERY: Duration = Duration::from_secs(5);
const RESERVED: usize = 64;

enum Entry {
    Trainer { stream: &'static str, line: String },
    Note(String),
}

/// The publishing task of one trainer run, and its queue.
pub struct LogBatcher {
    tx: mpsc::Sender<Entry>,
    dropped: Arc<AtomicU64>,
    spent: Arc<Spent>,
    task: JoinHandle<()>,
}

/// Set once the attempt's budget is spent, so later lines are counted
/// where they arrive instead of queued.
#[derive(Default)]
struct Spent {
    exhausted: AtomicBool,
    /// Bytes of lines dropped by [`LogBatcher::line`] since.
    bytes: AtomicU64,
}

impl LogBatcher {
    /// `job_bytes` is what the job's log events used before this run
    /// ([`trainyard_core::runtime::TaskContext::log_bytes`]); the bytes
    /// this run publishes are added to it.
    pub fn start(
        events: EventSink,
        stage: Stage,
        limits: LogLimits,
        job_bytes: Arc<AtomicU64>,
    ) -> LogBatcher {
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let budget = LogBudget::new(
            limits,
            job_bytes.load(Ordering::Relaxed),
            std::time::Instant::now(),
        );
        let spent = Arc::new(Spent::default());
        let metered = Metered { budget, job_bytes };
        // In the caller's span: its log events carry the job's trace context.
        let task = tokio::spawn(
            publish(events, stage, rx, dropped.clone(), metered, spent.clone())
                .instrument(tracing::Span::current()),
        );
        LogBatcher {
            tx,
            dropped,
            spent,
            task,
        }
    }

    /// Queues a line of the trainer's; never waits.
    pub fn line(&self, stream: &'static str, line: &str) {
        if self.spent.exhausted.load(Ordering::Relaxed) {
            self.spent
                .bytes
                .fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
            return;
        }
        if self.tx.capacity() <= RESERVED {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let entry = Entry::Trainer {
            stream,
            line: line.to_string(),
        };
        if self.tx.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a note of the worker's, published as an event of its own; never waits.
    pub fn note(&self, line: &str) {
        if self.tx.try_send(Entry::Note(line.to_string())).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes what is queued, for at most `timeout`; what is left then
    /// is dropped (NATS is away: the run's result must not wait for it).
    pub async fn close(self, timeout: Duration) {
        let LogBatcher { tx, task, .. } = self;
        drop(tx);
        let abort = task.abort_handle();
        if tokio::time::timeout(timeout, task).await.is_err() {
            abort.abort();
            tracing::warn!("trainer log lines not published in time were dropped");
        }
    }
}

/// Lines waiting to be published.
#[derive(Default)]
struct Pending {
    lines: Vec<(&'static str, String)>,
    bytes: usize,
}

impl Pending {
    fn full(&self) -> bool {
        self.lines.len() >= MAX_LINES || self.bytes >= MAX_BYTES
    }

    /// Consecutive lines of one stream, joined.
    fn take_runs(&mut self) -> Vec<(&'static str, String)> {
        self.bytes = 0;
        let mut runs: Vec<(&'static str, String)> = Vec::new();
        for (stream, line) in self.lines.drain(..) {
            match runs.last_mut() {
                Some((last, text)) if *last == stream => {
                    text.push('\n');
                    text.push_str(&line);
                }
                _ => runs.push((stream, line)),
            }
        }
        runs
    }
}

/// The job's budget, and the count shared with its claim.
struct Metered {
    budget: LogBudget,
    job_bytes: Arc<AtomicU64>,
}

async fn publish(
    events: EventSink,
    stage: Stage,
    mut rx: mpsc::Receiver<Entry>,
    dropped: Arc<AtomicU64>,
    metered: Metered,
    spent: Arc<Spent>,
) {
    let Metered {
        mut budget,
        job_bytes,
    } = metered;
    let mut pending = Pending::default();
    let mut flush_at = tokio::time::Instant::now();
    let mut rate_noted = std::time::Instant::now();
    loop {
        let entry = tokio::select! {
            entry = rx.recv() => entry,
            _ = tokio::time::sleep_until(flush_at), if !pending.lines.is_empty() => {
                flush(&events, stage, &mut pending, &dropped).await;
                continue;
            }
        };
        match entry {
            Some(Entry::Trainer { stream, line }) => {
                let now = std::time::Instant::now();
                match budget.admit(line.len() as u64 + 1, now) {
                    Admit::Pass => {
                        job_bytes.fetch_max(budget.spent(), Ordering::Relaxed);
                    }
                    Admit::OverRate => {
                        if now.duration_since(rate_noted) >= RATE_NOTE_EVERY {
                            rate_noted = now;
                            flush(&events, stage, &mut pending, &dropped).await;
                            note_over_rate(&events, stage, &mut budget).await;
                        }
                        continue;
                    }
                    Admit::Exhausted { first } => {
                        if first {
                            spent.exhausted.store(true, Ordering::Relaxed);
                            flush(&events, stage, &mut pending, &dropped).await;
                            let limit = budget.limits().budget_bytes;
                            tracing::warn!(job = %events.job(), limit, "trainer log event budget exhausted");
                            let note = format!(
                                "log budget exhausted: the job's {limit} bytes of log events (over all its attempts) are spent; \
                                 later trainer output is kept only in the attempt's log artifact"
                            );
                            events.log(stage, "worker", &note).await;
                        }
                        continue;
                    }
                }
                if pending.lines.is_empty() {
                    flush_at = tokio::time::Instant::now() + FLUSH_EVERY;
                }
                pending.bytes += line.len();
                pending.lines.push((stream, line));
                if pending.full() {
                    flush(&events, stage, &mut pending, &dropped).await;
                }
            }
            Some(Entry::Note(line)) => {
                flush(&events, stage, &mut pending, &dropped).await;
                events.log(stage, "worker", &line).await;
            }
            None => {
                flush(&events, stage, &mut pending, &dropped).await;
                note_over_rate(&events, stage, &mut budget).await;
                let over = budget.dropped_over_budget + spent.bytes.load(Ordering::Relaxed);
                if over > 0 {
                    let note = format!("log budget exhausted, {over} bytes dropped");
                    events.log(stage, "worker", &note).await;
                }
                return;
            }
        }
    }
}

/// The note counting the lines dropped over the rate since the last one.
async fn note_over_rate(events: &EventSink, stage: Stage, budget: &mut LogBudget) {
    let bytes = std::mem::take(&mut budget.dropped_over_rate);
    if bytes > 0 {
        let rate = budget.limits().bytes_per_sec;
        let note = format!(
            "{bytes} bytes of trainer output dropped: over the log rate of {rate} bytes a second"
        );
        events.log(stage, "worker", &note).await;
    }
}

async fn flush(events: &EventSink, stage: Stage, pending: &mut Pending, dropped: &AtomicU64) {
    let lost = dropped.swap(0, Ordering::Relaxed);
    if lost > 0 {
        tracing::warn!(job = %events.job(), lost, "trainer log lines dropped: the event stream is slow");
        let note = format!("{lost} trainer log lines dropped: the event stream was too slow");
        events.log(stage, "worker", &note).await;
    }
    for (stream, text) in pending.take_runs() {
        events.log(stage, stream, &text).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_lines_of_a_stream_are_joined() {
        let mut pending = Pending::default();
        for (stream, line) in [
            ("stdout", "a"),
            ("stdout", "b"),
            ("stderr", "c"),
            ("stdout", "d"),
        ] {
            pending.bytes += line.len();
            pending.lines.push((stream, line.to_string()));
        }
        assert_eq!(
            pending.take_runs(),
            [
                ("stdout", "a\nb".to_string()),
                ("stderr", "c".to_string()),
                ("stdout", "d".to_string())
            ]
        );
        assert!(pending.lines.is_empty());
        assert_eq!(pending.bytes, 0);
    }
}
