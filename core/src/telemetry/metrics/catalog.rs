//! The catalog: every exported metric's definition, the list in
//! documentation order, and the names and table derived from it.

use super::{Kind, MetricDef, autoscaler};

def!(
    JOBS_SUBMITTED,
    "trainyard_jobs_submitted_total",
    "trainyard.jobs.submitted",
    "{job}",
    Counter,
    ["tenant", "backend"],
    "Jobs accepted by the coordinator."
);
def!(
    JOBS_FINISHED,
    "trainyard_jobs_finished_total",
    "trainyard.jobs.finished",
    "{job}",
    Counter,
    ["tenant", "backend", "state"],
    "Jobs that reached a final state (succeeded, failed, cancelled)."
);
def!(
    STAGE_DURATION,
    "trainyard_stage_duration_seconds",
    "trainyard.stage.duration",
    "s",
    Histogram,
    ["stage", "pool", "outcome"],
    "Time a stage handler spent on one task attempt."
);
def!(
    QUEUE_WAIT,
    "trainyard_queue_wait_seconds",
    "trainyard.queue.wait",
    "s",
    Histogram,
    ["stage", "pool"],
    "Time from a task's publish to the start of its handling."
);
def!(
    TASK_RETRIES,
    "trainyard_task_retries_total",
    "trainyard.task.retries",
    "{retry}",
    Counter,
    ["stage", "reason"],
    "Task attempts that failed and were scheduled again, by error kind."
);
def!(
    TASK_REDELIVERIES,
    "trainyard_task_redeliveries_total",
    "trainyard.task.redeliveries",
    "{delivery}",
    Counter,
    ["stage", "reason"],
    "Tasks JetStream delivered again (ack wait ran out, worker lost)."
);
def!(
    DLQ_MESSAGES,
    "trainyard_dlq_messages_total",
    "trainyard.dlq.messages",
    "{message}",
    Counter,
    ["stage", "reason"],
    "Tasks moved to the dead-letter stream."
);
def!(
    DLQ_DEPTH,
    "trainyard_dlq_depth",
    "trainyard.dlq.depth",
    "{message}",
    Gauge,
    ["stage"],
    "Messages currently held in the dead-letter stream."
);
def!(
    STAGE_BACKLOG,
    "trainyard_stage_backlog",
    "trainyard.stage.backlog",
    "{task}",
    Gauge,
    ["stage", "pool", "state"],
    "Tasks waiting (state=pending) or delivered and unacknowledged (state=ack_pending), from JetStream consumer info."
);
def!(
    JOB_STEP,
    "trainyard_job_step",
    "trainyard.job.step",
    "{step}",
    Gauge,
    ["job_id", "tenant", "backend"],
    "Current training step of a running job."
);
def!(
    JOB_TOTAL_STEPS,
    "trainyard_job_total_steps",
    "trainyard.job.total_steps",
    "{step}",
    Gauge,
    ["job_id", "tenant", "backend"],
    "Total training steps of a running job."
);
def!(
    JOB_LOSS,
    "trainyard_job_loss",
    "trainyard.job.loss",
    "",
    Gauge,
    ["job_id", "tenant", "backend"],
    "Latest training loss of a running job."
);
def!(
    JOB_LEARNING_RATE,
    "trainyard_job_learning_rate",
    "trainyard.job.learning_rate",
    "",
    Gauge,
    ["job_id", "tenant", "backend"],
    "Current learning rate of a running job."
);
def!(
    JOB_SAMPLES_RATE,
    "trainyard_job_samples_per_second",
    "trainyard.job.samples",
    "{sample}/s",
    Gauge,
    ["job_id", "tenant", "backend"],
    "Training throughput of a running job."
);
def!(
    JOB_PROGRESS_TIME,
    "trainyard_job_progress_timestamp_seconds",
    "trainyard.job.progress.timestamp",
    "s",
    Gauge,
    ["job_id", "tenant", "backend"],
    "Unix time of a running job's latest progress report."
);
def!(
    GPU_MEMORY_USED,
    "trainyard_gpu_memory_used_bytes",
    "trainyard.gpu.memory.used",
    "By",
    Gauge,
    ["gpu", "gpu_name"],
    "GPU memory in use (NVML; absent without a GPU)."
);
def!(
    GPU_MEMORY_TOTAL,
    "trainyard_gpu_memory_total_bytes",
    "trainyard.gpu.memory.total",
    "By",
    Gauge,
    ["gpu", "gpu_name"],
    "GPU memory installed (NVML; absent without a GPU)."
);
def!(
    GPU_UTILIZATION,
    "trainyard_gpu_utilization_ratio",
    "trainyard.gpu.utilization",
    "1",
    Gauge,
    ["gpu", "gpu_name"],
    "GPU busy fraction, 0 to 1 (NVML; absent without a GPU)."
);
def!(
    WORKER_BUSY,
    "trainyard_worker_busy_seconds_total",
    "trainyard.worker.busy",
    "s",
    Counter,
    ["stage", "pool"],
    "Seconds a service's task slots spent handling tasks."
);
def!(
    WORKER_IDLE,
    "trainyard_worker_idle_seconds_total",
    "trainyard.worker.idle",
    "s",
    Counter,
    ["stage", "pool"],
    "Seconds a service's task slots spent waiting for tasks."
);
def!(
    WORKER_SLOTS,
    "trainyard_worker_slots",
    "trainyard.worker.slots",
    "{slot}",
    Gauge,
    ["stage", "pool"],
    "Task slots a running service offers (1 per concurrent task it may run)."
);
def!(
    WORKER_RUNNING,
    "trainyard_worker_running",
    "trainyard.worker.running",
    "{task}",
    Gauge,
    ["stage", "pool"],
    "Tasks a service is handling right now."
);
def!(
    MODEL_CACHE_HITS,
    "trainyard_model_cache_hits_total",
    "trainyard.model_cache.hits",
    "{lookup}",
    Counter,
    [],
    "Model lookups served from the local cache."
);
def!(
    MODEL_CACHE_MISSES,
    "trainyard_model_cache_misses_total",
    "trainyard.model_cache.misses",
    "{lookup}",
    Counter,
    [],
    "Model lookups that had to fetch the model."
);
def!(
    MODEL_CACHE_FETCHED,
    "trainyard_model_cache_fetched_bytes_total",
    "trainyard.model_cache.fetched",
    "By",
    Counter,
    [],
    "Bytes fetched into the model cache."
);
def!(
    MODEL_CACHE_SIZE,
    "trainyard_model_cache_size_bytes",
    "trainyard.model_cache.size",
    "By",
    Gauge,
    [],
    "Bytes the model cache holds on disk."
);
def!(
    ARTIFACT_UPLOADED,
    "trainyard_artifact_uploaded_bytes_total",
    "trainyard.artifact.uploaded",
    "By",
    Counter,
    ["stage"],
    "Bytes written to the artifact store or a delivery destination."
);
def!(
    ARTIFACT_DOWNLOADED,
    "trainyard_artifact_downloaded_bytes_total",
    "trainyard.artifact.downloaded",
    "By",
    Counter,
    ["stage"],
    "Bytes read from the artifact store or a job's sources."
);

/// Every metric, in documentation order.
pub const CATALOG: &[MetricDef] = &[
    JOBS_SUBMITTED,
    JOBS_FINISHED,
    STAGE_DURATION,
    QUEUE_WAIT,
    TASK_RETRIES,
    TASK_REDELIVERIES,
    DLQ_MESSAGES,
    DLQ_DEPTH,
    STAGE_BACKLOG,
    JOB_STEP,
    JOB_TOTAL_STEPS,
    JOB_LOSS,
    JOB_LEARNING_RATE,
    JOB_SAMPLES_RATE,
    JOB_PROGRESS_TIME,
    GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL,
    GPU_UTILIZATION,
    WORKER_BUSY,
    WORKER_IDLE,
    WORKER_SLOTS,
    WORKER_RUNNING,
    MODEL_CACHE_HITS,
    MODEL_CACHE_MISSES,
    MODEL_CACHE_FETCHED,
    MODEL_CACHE_SIZE,
    ARTIFACT_UPLOADED,
    ARTIFACT_DOWNLOADED,
    autoscaler::DECISIONS,
    autoscaler::MACHINES,
    autoscaler::DOLLARS,
];

/// The series names a metric puts on the Prometheus endpoint (a histogram's
/// `_bucket`, `_sum` and `_count`).
pub fn series_names(def: &MetricDef) -> Vec<String> {
    match def.kind {
        Kind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{}{s}", def.name))
            .collect(),
        _ => vec![def.name.to_string()],
    }
}

/// Whether `name` is a series some catalog metric exports.
pub fn is_exported_series(name: &str) -> bool {
    CATALOG
        .iter()
        .any(|d| series_names(d).iter().any(|s| s == name))
}

/// The catalog as a Markdown table (the one in
/// `deploy/observability/README.md`; a test keeps them equal).
pub fn catalog_markdown() -> String {
    let mut out = String::from(
        "| Prometheus name | OTel instrument | unit | type | labels | meaning |\n|---|---|---|---|---|---|\n",
    );
    for d in CATALOG {
        let kind = match d.kind {
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
            Kind::Gauge => "gauge",
        };
        let labels = if d.labels.is_empty() {
            "—".to_string()
        } else {
            d.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let unit = if d.unit.is_empty() {
            "—".to_string()
        } else {
            format!("`{}`", d.unit)
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} | {} | {} |\n",
            d.name, d.otel_name, unit, kind, labels, d.help
        ));
    }
    out
}
