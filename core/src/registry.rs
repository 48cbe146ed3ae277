//! The service registry: every stage service (captioner, worker, uploader)
//! keeps an entry in the `ty_workers` KV bucket under its worker id,
//! rewritten every [`WORKER_HEARTBEAT`]; entries expire after three missed
//! beats, so a crashed service drops out by itself, and a clean shutdown
//! deletes its entry. The autoscaler reads it to tell a machine's activity
//! (starting: no entry yet; idle since when; busy; draining: asked to
//! drain, taking no task — released once it runs none either).
//!
//! [`Entry`] holds the fields every stage writes; a worker's entry adds
//! its own (backends, cached models: `trainyard_worker::registry`) to the
//! same JSON object, which readers of [`Entry`] ignore.

use crate::runtime::RunnerConfig;
use crate::topology::{WORKER_HEARTBEAT, worker_key};
use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The stage of an entry written before entries named theirs: a worker's.
fn train_stage() -> String {
    "train".into()
}

/// The fields of a registry entry every stage writes (JSON in the bucket).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub worker_id: String,
    /// `prepare`, `train` or `deliver`.
    #[serde(default = "train_stage")]
    pub stage: String,
    /// The GPU pool of a worker; `default` for the other stages.
    pub pool: String,
    /// Tasks at once.
    pub slots: usize,
    /// Tasks running now.
    pub busy_slots: usize,
    /// Since when no task runs (ms since the Unix epoch); 0 while busy.
    #[serde(default)]
    pub idle_since: i64,
    /// Asked to drain: it takes no task any more, hands its running ones
    /// back, and waits to be terminated (false in entries from before
    /// draining).
    #[serde(default)]
    pub draining: bool,
    /// Milliseconds since the Unix epoch.
    pub started_at: i64,
    /// Milliseconds since the Unix epoch.
    pub updated_at: i64,
    /// The jobs whose tasks run now (one id per running task).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<String>,
}

/// How many tasks a stage runtime runs now, for which jobs, since when
/// none, and whether it drains: shared by the run loop (which counts) and
/// the heartbeat (which reports). A change wakes the heartbeat, so the
/// entry says busy within moments of a task's start (the autoscaler
/// releases only idle machines), and draining as soon as a drain is asked.
#[derive(Debug)]
pub struct Occupancy {
    running: AtomicUsize,
    idle_since: AtomicI64,
    /// The job of each running task (held only to push or remove one).
    jobs: std::sync::Mutex<Vec<String>>,
    draining: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Default for Occupancy {
    fn default() -> Self {
        Self {
            running: AtomicUsize::new(0),
            idle_since: AtomicI64::new(crate::now_ms()),
            jobs: std::sync::Mutex::default(),
            draining: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl Occupancy {
    /// A task of `job` started.
    pub fn enter(&self, job: &str) {
        self.jobs_held().push(job.to_string());
        self.running.fetch_add(1, Ordering::SeqCst);
        self.idle_since.store(0, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// A task of `job` ended.
    pub fn leave(&self, job: &str) {
        {
            let mut jobs = self.jobs_held();
            if let Some(at) = jobs.iter().position(|j| j == job) {
                jobs.swap_remove(at);
            }
        }
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle_since.store(crate::now_ms(), Ordering::SeqCst);
        }
        self.changed.notify_one();
    }

    /// Waits for the next change (one already signalled counts).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Since when no task runs (ms since the epoch); 0 while one does.
    pub fn idle_since(&self) -> i64 {
        self.idle_since.load(Ordering::SeqCst)
    }

    /// The jobs whose tasks run now, sorted (a job twice when two of its
    /// tasks run).
    pub fn jobs(&self) -> Vec<String> {
        let mut jobs = self.jobs_held().clone();
        jobs.sort();
        jobs
    }

    fn jobs_held(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A list of ids stays whole whatever panicked while holding it.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The service was asked to drain; true the first time. It stays so.
    pub fn drain(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::SeqCst);
        if first {
            self.changed.notify_one();
        }
        first
    }

    /// Whether the service drains.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// The heartbeat of a stage service; [`Heartbeat::stop`] deletes the
/// entry. Dropping it stops the task too (which then deletes the entry).
pub struct Heartbeat {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Heartbeat {
    /// Writes `snapshot()` under `worker_id` now, every `interval` and
    /// whenever `occupancy` changes. Errors writing are logged and the next
    /// beat tries again; on stop the entry is deleted.
    pub fn start<F>(
        kv: kv::Store,
        worker_id: &str,
        interval: Duration,
        occupancy: std::sync::Arc<Occupancy>,
        snapshot: F,
    ) -> Self
    where
        F: Fn() -> serde_json::Result<Vec<u8>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let cancelled = stop.clone();
        let key = worker_key(worker_id);
        // Lives until stopped or dropped; deletes the entry on its way out.
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancelled.cancelled() => break,
                    _ = ticks.tick() => {}
                    _ = occupancy.changed() => {}
                }
                let put = match snapshot() {
                    Ok(json) => kv
                        .put(&key, json.into())
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = put {
                    tracing::warn!(error = %e, "cannot write this service's registry entry");
                }
            }
            if let Err(e) = kv.delete(&key).await {
                tracing::warn!(error = %e, "cannot delete this service's registry entry");
            }
        });
        Self {
            stop,
            task: Some(task),
        }
    }

    /// The heartbeat of a stage service running with `runner`, every
    /// [`WORKER_HEARTBEAT`], writing the common [`Entry`].
    pub fn for_runner(kv: kv::Store, runner: &RunnerConfig) -> Self {
        let started_at = crate::now_ms();
        let (id, stage, pool, slots) = (
            runner.worker_id.clone(),
            runner.stage.name().to_string(),
            runner.pool.clone(),
            runner.concurrency.max(1),
        );
        let occupancy = runner.occupancy.clone();
        let wake = occupancy.clone();
        Self::start(kv, &runner.worker_id, WORKER_HEARTBEAT, wake, move || {
            serde_json::to_vec(&Entry {
                worker_id: id.clone(),
                stage: stage.clone(),
                pool: pool.clone(),
                slots,
                busy_slots: occupancy.running(),
                idle_since: occupancy.idle_since(),
                draining: occupancy.draining(),
                started_at,
                updated_at: crate::now_ms(),
                jobs: occupancy.jobs(),
            })
        })
    }

    /// Stops the heartbeat and waits until the entry is deleted.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "registry heartbeat task failed");
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Every live entry of the bucket (entries that do not parse are skipped).
pub async fn entries(kv: &kv::Store) -> Result<Vec<Entry>, async_nats::Error> {
    entries_as(kv).await
}

/// Every live entry of the bucket read as `T` (a service's own entry type,
/// such as the worker's), skipping those that do not parse as one.
pub async fn entries_as<T: serde::de::DeserializeOwned>(
    kv: &kv::Store,
) -> Result<Vec<T>, async_nats::Error> {
    use futures::StreamExt;
    let mut keys = kv.keys().await?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if let Some(value) = kv.get(&key).await?
            && let Ok(entry) = serde_json::from_slice::<T>(&value)
        {
            out.push(entry);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_keeps_since_when_it_is_idle() {
        let o = Occupancy::default();
        assert!(o.idle_since() > 0);
        o.enter("job-b");
        o.enter("job-a");
        assert_eq!((o.running(), o.idle_since()), (2, 0));
        assert_eq!(o.jobs(), ["job-a", "job-b"]);
        o.leave("job-b");
        assert_eq!(o.idle_since(), 0, "one task still runs");
        assert_eq!(o.jobs(), ["job-a"]);
        o.leave("job-a");
        assert_eq!(o.running(), 0);
        assert!(o.idle_since() > 0);
        assert!(o.jobs().is_empty());
        assert!(!o.draining());
        assert!(o.drain(), "the first request drains");
        assert!(!o.drain(), "a second one changes nothing");
        assert!(o.draining());
    }

    #[test]
    fn an_entry_without_a_stage_is_a_workers() {
        let json = r#"{"worker_id":"w","pool":"p","slots":1,"busy_slots":0,
            "started_at":1,"updated_at":2,"models":[]}"#;
        let entry: Entry = serde_json::from_str(json).expect("entry");
        assert_eq!((entry.stage.as_str(), entry.idle_since), ("train", 0));
        assert!(entry.jobs.is_empty(), "an entry from before job ids");
        assert!(!entry.draining, "an older entry is not draining");
    }
}
