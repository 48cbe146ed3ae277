//! Every metric Trainyard exports, defined once.
//!
//! [`CATALOG`] lists them with their OpenTelemetry name and unit and the name
//! the Prometheus endpoint shows (the OTel name with dots as underscores, the
//! unit as a suffix, `_total` on counters). [`Metrics`] holds the instruments
//! and records through typed methods, so label names never drift between
//! services. Dashboards and alert rules in `deploy/observability/` may only
//! name metrics of this catalog (a test checks).
//!
//! Gauges whose series come and go (one per running job, per GPU, per stage
//! and pool) are observable: the latest value of each series is kept here and
//! reported at each collection, and a removed series disappears from the
//! next scrape.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Gauge, Histogram, Meter, MeterProvider as _, ObservableGauge, UpDownCounter,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Instrumentation scope of every instrument and tracer.
pub const METER_NAME: &str = "trainyard";

/// What kind of Prometheus family an instrument becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Histogram,
    Gauge,
}

/// One exported metric.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    /// The name on the Prometheus endpoint.
    pub name: &'static str,
    /// The OpenTelemetry instrument name (what OTLP carries).
    pub otel_name: &'static str,
    /// UCUM unit.
    pub unit: &'static str,
    pub kind: Kind,
    /// Label (attribute) keys, besides those Prometheus adds at scrape.
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! def {
    ($id:ident, $prom:literal, $otel:literal, $unit:literal, $kind:ident, [$($label:literal),*], $help:literal) => {
        pub const $id: MetricDef = MetricDef {
            name: $prom,
            otel_name: $otel,
            unit: $unit,
            kind: Kind::$kind,
            labels: &[$($label),*],
            help: $help,
        };
    };
}

pub mod autoscaler;
mod catalog;

pub use catalog::*;

/// Histogram bounds for stage and wait times: sub-second to eight hours.
const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0, 14400.0, 28800.0,
];

/// Progress of one running job, as its trainer last reported it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobProgress {
    pub tenant: String,
    pub backend: String,
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub samples_per_second: Option<f64>,
    /// Unix time of the report, in seconds.
    pub reported_at: f64,
}

/// One GPU as NVML last read it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub name: String,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// 0 to 1.
    pub utilization: f64,
}

#[derive(Default)]
struct Boards {
    jobs: BTreeMap<String, JobProgress>,
    gpus: BTreeMap<u32, GpuSample>,
    /// (stage, pool) → (pending, ack pending)
    backlog: BTreeMap<(String, String), (u64, u64)>,
    dlq: BTreeMap<String, u64>,
}

type Shared = Arc<Mutex<Boards>>;

fn lock(boards: &Shared) -> std::sync::MutexGuard<'_, Boards> {
    boards.lock().unwrap_or_else(|e| e.into_inner())
}

/// The instruments of one process.
pub struct Metrics {
    jobs_submitted: Counter<u64>,
    jobs_finished: Counter<u64>,
    stage_duration: Histogram<f64>,
    queue_wait: Histogram<f64>,
    task_retries: Counter<u64>,
    task_redeliveries: Counter<u64>,
    dlq_messages: Counter<u64>,
    worker_busy: Counter<f64>,
    worker_idle: Counter<f64>,
    worker_slots: UpDownCounter<i64>,
    worker_running: UpDownCounter<i64>,
    model_cache_hits: Counter<u64>,
    model_cache_misses: Counter<u64>,
    model_cache_fetched: Counter<u64>,
    model_cache_size: Gauge<u64>,
    artifact_uploaded: Counter<u64>,
    artifact_downloaded: Counter<u64>,
    autoscaler: autoscaler::Instruments,
    boards: Shared,
    _observed: Vec<ObservableGauge<f64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn observed(
    meter: &Meter,
    def: MetricDef,
    boards: &Shared,
    read: impl Fn(&Boards, &mut dyn FnMut(f64, &[KeyValue])) + Send + Sync + 'static,
) -> ObservableGauge<f64> {
    let boards = boards.clone();
    meter
        .f64_observable_gauge(def.otel_name)
        .with_unit(def.unit)
        .with_description(def.help)
        .with_callback(move |observer| {
            let boards = lock(&boards);
            read(&boards, &mut |value, attrs| observer.observe(value, attrs));
        })
        .build()
}

fn job_attrs(job_id: &str, p: &JobProgress) -> [KeyValue; 3] {
    [
        KeyValue::new("job_id", job_id.to_string()),
        KeyValue::new("tenant", p.tenant.clone()),
        KeyValue::new("backend", p.backend.clone()),
    ]
}

fn gpu_attrs(g: &GpuSample) -> [KeyValue; 2] {
    [
        KeyValue::new("gpu", i64::from(g.index)),
        KeyValue::new("gpu_name", g.name.clone()),
    ]
}

fn job_gauge(
    meter: &Meter,
    def: MetricDef,
    boards: &Shared,
    value: fn(&JobProgress) -> Option<f64>,
) -> ObservableGauge<f64> {
    observed(meter, def, boards, move |b, observe| {
        for (id, p) in &b.jobs {
            if let Some(v) = value(p) {
                observe(v, &job_attrs(id, p));
            }
        }
    })
}

fn gpu_gauge(
    meter: &Meter,
    def: MetricDef,
    boards: &Shared,
    value: fn(&GpuSample) -> f64,
) -> ObservableGauge<f64> {
    observed(meter, def, boards, move |b, observe| {
        for g in b.gpus.values() {
            observe(value(g), &gpu_attrs(g));
        }
    })
}

impl Metrics {
    /// Instruments on `meter`.
    pub fn new(meter: &Meter) -> Metrics {
        let counter = |d: MetricDef| {
            meter
                .u64_counter(d.otel_name)
                .with_unit(d.unit)
                .with_description(d.help)
                .build()
        };
        let seconds = |d: MetricDef| {
            meter
                .f64_counter(d.otel_name)
                .with_unit(d.unit)
                .with_description(d.help)
                .build()
        };
        let histogram = |d: MetricDef| {
            meter
                .f64_histogram(d.otel_name)
                .with_unit(d.unit)
                .with_description(d.help)
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build()
        };
        let up_down = |d: MetricDef| {
            meter
                .i64_up_down_counter(d.otel_name)
                .with_unit(d.unit)
                .with_description(d.help)
                .build()
        };
        let boards: Shared = Arc::default();
        let observed_gauges = vec![
            job_gauge(meter, JOB_STEP, &boards, |p| Some(p.step as f64)),
            job_gauge(meter, JOB_TOTAL_STEPS, &boards, |p| {
                Some(p.total_steps as f64)
            }),
            job_gauge(meter, JOB_LOSS, &boards, |p| p.loss),
            job_gauge(meter, JOB_LEARNING_RATE, &boards, |p| p.learning_rate),
            job_gauge(meter, JOB_SAMPLES_RATE, &boards, |p| p.samples_per_second),
            job_gauge(meter, JOB_PROGRESS_TIME, &boards, |p| Some(p.reported_at)),
            gpu_gauge(meter, GPU_MEMORY_USED, &boards, |g| {
                g.memory_used_bytes as f64
            }),
            gpu_gauge(meter, GPU_MEMORY_TOTAL, &boards, |g| {
                g.memory_total_bytes as f64
            }),
            gpu_gauge(meter, GPU_UTILIZATION, &boards, |g| g.utilization),
            observed(meter, STAGE_BACKLOG, &boards, |b, observe| {
                for ((stage, pool), (pending, ack_pending)) in &b.backlog {
                    for (state, n) in [("pending", pending), ("ack_pending", ack_pending)] {
                        observe(
                            *n as f64,
                            &[
                                KeyValue::new("stage", stage.clone()),
                                KeyValue::new("pool", pool.clone()),
                                KeyValue::new("state", state),
                            ],
                        );
                    }
                }
            }),
            observed(meter, DLQ_DEPTH, &boards, |b, observe| {
                for (stage, n) in &b.dlq {
                    observe(*n as f64, &[KeyValue::new("stage", stage.clone())]);
                }
            }),
        ];
        Metrics {
            jobs_submitted: counter(JOBS_SUBMITTED),
            jobs_finished: counter(JOBS_FINISHED),
            stage_duration: histogram(STAGE_DURATION),
            queue_wait: histogram(QUEUE_WAIT),
            task_retries: counter(TASK_RETRIES),
            task_redeliveries: counter(TASK_REDELIVERIES),
            dlq_messages: counter(DLQ_MESSAGES),
            worker_busy: seconds(WORKER_BUSY),
            worker_idle: seconds(WORKER_IDLE),
            worker_slots: up_down(WORKER_SLOTS),
            worker_running: up_down(WORKER_RUNNING),
            model_cache_hits: counter(MODEL_CACHE_HITS),
            model_cache_misses: counter(MODEL_CACHE_MISSES),
            model_cache_fetched: counter(MODEL_CACHE_FETCHED),
            model_cache_size: meter
                .u64_gauge(MODEL_CACHE_SIZE.otel_name)
                .with_unit(MODEL_CACHE_SIZE.unit)
                .with_description(MODEL_CACHE_SIZE.help)
                .build(),
            artifact_uploaded: counter(ARTIFACT_UPLOADED),
            artifact_downloaded: counter(ARTIFACT_DOWNLOADED),
            autoscaler: autoscaler::Instruments::new(meter),
            boards,
            _observed: observed_gauges,
        }
    }

    /// Instruments that record into nothing.
    pub fn noop() -> Metrics {
        let provider = opentelemetry::metrics::NoopMeterProvider::new();
        Metrics::new(&provider.meter(METER_NAME))
    }

    /// The coordinator accepted a job.
    pub fn job_submitted(&self, tenant: &str, backend: &str) {
        self.jobs_submitted.add(
            1,
            &[
                KeyValue::new("tenant", tenant.to_string()),
                KeyValue::new("backend", backend.to_string()),
            ],
        );
    }

    /// A job reached its final `state` (e.g. "succeeded", "failed", "cancelled").
    pub fn job_finished(&self, tenant: &str, backend: &str, state: &str) {
        self.jobs_finished.add(
            1,
            &[
                KeyValue::new("tenant", tenant.to_string()),
                KeyValue::new("backend", backend.to_string()),
                KeyValue::new("state", state.to_string()),
            ],
        );
    }

    /// A stage handler finished one attempt; `outcome` is "ok", "retry",
    /// "failed" or "cancelled".
    pub fn stage_finished(&self, stage: &str, pool: &str, outcome: &str, took: Duration) {
        self.stage_duration.record(
            took.as_secs_f64(),
            &[
                KeyValue::new("stage", stage.to_string()),
                KeyValue::new("pool", pool.to_string()),
                KeyValue::new("outcome", outcome.to_string()),
            ],
        );
    }

    /// A task started after waiting `waited` since it was published.
    pub fn queue_waited(&self, stage: &str, pool: &str, waited: Duration) {
        self.queue_wait.record(
            waited.as_secs_f64(),
            &[
                KeyValue::new("stage", stage.to_string()),
                KeyValue::new("pool", pool.to_string()),
            ],
        );
    }

    /// A failed attempt is retried; `reason` is the error kind.
    pub fn task_retried(&self, stage: &str, reason: &str) {
        self.task_retries.add(1, &stage_reason(stage, reason));
    }

    /// JetStream delivered a task again; `reason` e.g. "ack_timeout".
    pub fn task_redelivered(&self, stage: &str, reason: &str) {
        self.task_redeliveries.add(1, &stage_reason(stage, reason));
    }

    /// A task went to the dead-letter stream.
    pub fn dead_lettered(&self, stage: &str, reason: &str) {
        self.dlq_messages.add(1, &stage_reason(stage, reason));
    }

    /// Messages held in the dead-letter stream for `stage`.
    pub fn set_dlq_depth(&self, stage: &str, messages: u64) {
        lock(&self.boards).dlq.insert(stage.to_string(), messages);
    }

    /// Backlog of a stage's consumer (pending and ack-pending tasks).
    pub fn set_backlog(&self, stage: &str, pool: &str, pending: u64, ack_pending: u64) {
        lock(&self.boards).backlog.insert(
            (stage.to_string(), pool.to_string()),
            (pending, ack_pending),
        );
    }

    /// Forgets a consumer's backlog series (the consumer is gone).
    pub fn clear_backlog(&self, stage: &str, pool: &str) {
        lock(&self.boards)
            .backlog
            .remove(&(stage.to_string(), pool.to_string()));
    }

    /// The latest progress of a running job.
    pub fn job_progress(&self, job_id: &str, progress: JobProgress) {
        lock(&self.boards).jobs.insert(job_id.to_string(), progress);
    }

    /// The job stopped running here: its series disappear.
    pub fn job_ended(&self, job_id: &str) {
        lock(&self.boards).jobs.remove(job_id);
    }

    /// The GPUs as last read; replaces the previous reading.
    pub fn set_gpus(&self, gpus: impl IntoIterator<Item = GpuSample>) {
        lock(&self.boards).gpus = gpus.into_iter().map(|g| (g.index, g)).collect();
    }

    /// A task slot was busy for `busy`.
    pub fn slot_busy(&self, stage: &str, pool: &str, busy: Duration) {
        self.worker_busy
            .add(busy.as_secs_f64(), &stage_pool(stage, pool));
    }

    /// A task slot was idle for `idle`.
    pub fn slot_idle(&self, stage: &str, pool: &str, idle: Duration) {
        self.worker_idle
            .add(idle.as_secs_f64(), &stage_pool(stage, pool));
    }

    /// A service started (`+n`) or stopped (`-n`) offering task slots.
    pub fn slots_changed(&self, stage: &str, pool: &str, delta: i64) {
        self.worker_slots.add(delta, &stage_pool(stage, pool));
    }

    /// A task started (`+1`) or ended (`-1`) on this service.
    pub fn running_changed(&self, stage: &str, pool: &str, delta: i64) {
        self.worker_running.add(delta, &stage_pool(stage, pool));
    }

    pub fn model_cache_hit(&self) {
        self.model_cache_hits.add(1, &[]);
    }

    /// A model was fetched into the cache (`bytes` downloaded).
    pub fn model_cache_miss(&self, bytes: u64) {
        self.model_cache_misses.add(1, &[]);
        self.model_cache_fetched.add(bytes, &[]);
    }

    pub fn set_model_cache_size(&self, bytes: u64) {
        self.model_cache_size.record(bytes, &[]);
    }

    pub fn artifact_uploaded(&self, stage: &str, bytes: u64) {
        self.artifact_uploaded
            .add(bytes, &[KeyValue::new("stage", stage.to_string())]);
    }

    pub fn artifact_downloaded(&self, stage: &str, bytes: u64) {
        self.artifact_downloaded
            .add(bytes, &[KeyValue::new("stage", stage.to_string())]);
    }
}

fn stage_reason(stage: &str, reason: &str) -> [KeyValue; 2] {
    [
        KeyValue::new("stage", stage.to_string()),
        KeyValue::new("reason", reason.to_string()),
    ]
}

fn stage_pool(stage: &str, pool: &str) -> [KeyValue; 2] {
    [
        KeyValue::new("stage", stage.to_string()),
        KeyValue::new("pool", pool.to_string()),
    ]
}
