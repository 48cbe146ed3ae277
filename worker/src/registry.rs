//! The worker registry: every worker keeps an entry in the `ty_workers` KV
//! bucket saying what it can run (backends whose trainers are installed),
//! what base models its cache holds and how busy it is, rewritten every
//! [`WORKER_HEARTBEAT`]. Entries expire after three missed beats, so a
//! crashed worker drops out by itself; a clean shutdown deletes its entry.
//! Scheduling can read the bucket to prefer workers that hold a job's model.
//!
//! [`WORKER_HEARTBEAT`]: trainyard_core::topology::WORKER_HEARTBEAT

use crate::models::{CachedModel, Models};
use crate::train::TrainStage;
use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use trainyard_core::runtime::RunnerConfig;
use trainyard_core::topology::WORKER_HEARTBEAT;

/// One worker's entry, JSON in the bucket: the fields of every stage's
/// [`trainyard_core::registry::Entry`] and the worker's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerEntry {
    pub worker_id: String,
    /// Always `train`.
    #[serde(default)]
    pub stage: String,
    pub pool: String,
    /// Backends whose `[worker.trainers]` paths are set.
    pub backends: Vec<String>,
    /// Base models in the cache, with the parts held.
    pub models: Vec<CachedModel>,
    pub cache_bytes: u64,
    /// The cache's size limit; 0 means none.
    pub cache_max_bytes: u64,
    /// Trainings at once.
    pub slots: usize,
    /// Trainings running now (tasks taken, or runs holding a model).
    pub busy_slots: usize,
    /// Since when no task runs (ms since the Unix epoch); 0 while busy.
    #[serde(default)]
    pub idle_since: i64,
    /// Asked to drain (see [`trainyard_core::registry::Entry::draining`]).
    #[serde(default)]
    pub draining: bool,
    /// Milliseconds since the Unix epoch.
    pub started_at: i64,
    /// Milliseconds since the Unix epoch.
    pub updated_at: i64,
    /// The jobs whose tasks run now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<String>,
}

/// What does not change while the worker runs.
#[derive(Clone, Debug)]
pub struct Identity {
    pub worker_id: String,
    pub pool: String,
    pub backends: Vec<String>,
    pub slots: usize,
    pub cache_max_bytes: u64,
    /// The runtime's count of running tasks.
    pub occupancy: std::sync::Arc<trainyard_core::registry::Occupancy>,
}

impl Identity {
    /// This worker's identity from its runner settings and training stage.
    pub fn of(runner: &RunnerConfig, stage: &TrainStage) -> Self {
        Self {
            worker_id: runner.worker_id.clone(),
            pool: runner.pool.clone(),
            backends: trainyard_backends::installed(&stage.tools)
                .into_iter()
                .map(String::from)
                .collect(),
            slots: runner.concurrency,
            cache_max_bytes: stage.models.max_bytes(),
            occupancy: runner.occupancy.clone(),
        }
    }
}

/// The worker's heartbeat: the stage services' heartbeat
/// ([`trainyard_core::registry::Heartbeat`]) writing the worker's own
/// entry. [`Heartbeat::stop`] deletes the entry; dropping it stops the
/// task too (which then deletes the entry on its own).
pub struct Heartbeat(trainyard_core::registry::Heartbeat);

impl Heartbeat {
    /// Starts writing the entry now, every `interval` and whenever a task
    /// starts or ends. Errors writing are logged and the next beat tries
    /// again; on stop the entry is deleted.
    pub fn start(kv: kv::Store, identity: Identity, models: Models, interval: Duration) -> Self {
        let started_at = trainyard_core::now_ms();
        let (worker_id, occupancy) = (identity.worker_id.clone(), identity.occupancy.clone());
        Self(trainyard_core::registry::Heartbeat::start(
            kv,
            &worker_id,
            interval,
            occupancy,
            move || serde_json::to_vec(&snapshot(&identity, &models, started_at)),
        ))
    }

    /// The heartbeat of a worker running `stage`, every [`WORKER_HEARTBEAT`].
    pub fn for_stage(kv: kv::Store, runner: &RunnerConfig, stage: &TrainStage) -> Self {
        Self::start(
            kv,
            Identity::of(runner, stage),
            stage.models.clone(),
            WORKER_HEARTBEAT,
        )
    }

    /// Stops the heartbeat and waits until the entry is deleted.
    pub async fn stop(self) {
        self.0.stop().await
    }
}

/// The entry as of now.
pub fn snapshot(identity: &Identity, models: &Models, started_at: i64) -> WorkerEntry {
    WorkerEntry {
        worker_id: identity.worker_id.clone(),
        stage: "train".into(),
        pool: identity.pool.clone(),
        backends: identity.backends.clone(),
        models: models.holdings(),
        cache_bytes: models.cache_bytes(),
        cache_max_bytes: identity.cache_max_bytes,
        slots: identity.slots,
        busy_slots: models.leases().max(identity.occupancy.running()),
        idle_since: identity.occupancy.idle_since(),
        draining: identity.occupancy.draining(),
        started_at,
        updated_at: trainyard_core::now_ms(),
        jobs: identity.occupancy.jobs(),
    }
}

/// Every live entry of the bucket, for schedulers and tools.
pub async fn entries(kv: &kv::Store) -> Result<Vec<WorkerEntry>, async_nats::Error> {
    trainyard_core::registry::entries_as(kv).await
}
