//! The NATS layout of DESIGN.md as typed constructors: every subject, stream,
//! consumer and bucket name comes from here, never from a literal in a service.
//!
//! | name | kind | subjects / keys |
//! |---|---|---|
//! | `TY_TASKS` | work queue, message schedules | `ty.task.prepare`, `ty.task.train.<pool>`, `ty.task.deliver`; `ty.retry.<stage>.<tenant>.<job>`: a task waiting for its retry (one per job and stage), which the server publishes to its task subject when due |
//! | `TY_RESULTS` | work queue | `ty.result.<stage>` |
//! | `TY_EVENTS` | limits (age, `nats.event_max_bytes`; oldest dropped) | `ty.event.<tenant>.<job>.<kind>`; consumer `ty-webhooks` on `ty.event.*.*.state` |
//! | `TY_DLQ` | limits (30 days, `nats.dlq_max_bytes`; oldest dropped) | `ty.dlq.<stage>` |
//! | `ty_jobs` | KV | `<tenant>.<job>` |
//! | `ty_idem` | KV | `<tenant>.<sha256 of idempotency key>` |
//! | `ty_workers` | KV with TTL (3 heartbeats) | `<worker id>` → the worker's registry entry |
//! | `ty_claims` | KV, entries kept a day after their last renewal | `<tenant>.<job>.<stage>` → the [`TaskClaim`](trainyard_proto::v1::TaskClaim) of the runtime running it |
//! | `ty_webhook_secrets` | KV, coordinators only | `<tenant>` → the tenant's webhook signing secrets ([`TenantWebhookSecrets`](trainyard_proto::v1::TenantWebhookSecrets)) |
//!
//! Plain NATS request/reply (no stream): `ty.api.<op>` (the job API, served
//! by the coordinators), `ty.preflight` (a job's preflight without a job,
//! served by the captioners in the [`PREFLIGHT_QUEUE`] queue group) and
//! `ty.control.drain.<stage>[.<pool>].<worker id>` (the autoscaler asking one
//! stage service to drain, [`subject::drain`]).

use crate::config::NatsConfig;
use async_nats::jetstream::{self, consumer, kv, stream};
use backoff::backoff::Backoff as _;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trainyard_proto::v1::{JobState, Stage};
use trainyard_proto::{Attempt, JobId, TenantId};

mod ids;
pub mod permissions;

pub use ids::*;

pub const TASKS_STREAM: &str = "TY_TASKS";
pub const RESULTS_STREAM: &str = "TY_RESULTS";
pub const EVENTS_STREAM: &str = "TY_EVENTS";
pub const DLQ_STREAM: &str = "TY_DLQ";
pub const JOBS_BUCKET: &str = "ty_jobs";
pub const IDEM_BUCKET: &str = "ty_idem";
pub const WORKERS_BUCKET: &str = "ty_workers";
pub const CLAIMS_BUCKET: &str = "ty_claims";
/// The autoscaler's leader lease and each pool's planner memory.
pub const AUTOSCALER_BUCKET: &str = "ty_autoscaler";
/// The autoscaler's last decisions and machines per pool, for `yard fleet`.
pub const FLEET_BUCKET: &str = "ty_fleet";
/// Each tenant's webhook signing secrets. Created, read and written by the
/// coordinators only (not by [`ensure`], which every role runs): no other
/// role needs it, and a NATS account that grants it to another role hands
/// that role every tenant's secret.
pub const WEBHOOK_SECRETS_BUCKET: &str = "ty_webhook_secrets";
/// A claim is renewed with every in-progress ack, so only a claim left
/// behind by a finished task gets this old; a day leaves room for any
/// late result to be checked against it.
/// How long dead letters are kept.
pub const DLQ_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
pub const CLAIM_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// How often a worker rewrites its registry entry. The bucket's entries
/// expire after three missed beats, so a dead worker drops out by itself.
pub const WORKER_HEARTBEAT: Duration = Duration::from_secs(5);
/// The coordinator replicas share this durable consumer of `TY_RESULTS`.
pub const RESULTS_CONSUMER: &str = "ty-coordinator";
/// The coordinator replicas share this durable consumer of the state
/// events in `TY_EVENTS`, to deliver job webhooks.
pub const WEBHOOKS_CONSUMER: &str = "ty-webhooks";
/// The queue group the coordinators serve `ty.api.*` in: one answers each request.
pub const API_QUEUE: &str = "ty-coordinator";
/// The queue group captioners serve `ty.preflight` in: one answers each request.
pub const PREFLIGHT_QUEUE: &str = "ty-captioner";
/// Header carrying the caller's bearer token on the NATS API.
pub const AUTH_HEADER: &str = "authorization";
/// Header of a task republished for its retry: the task's own
/// [`task_msg_id`]. The server drops `Nats-Msg-Id` from the message a
/// schedule publishes, so the runtime and the reconciler read the task's
/// identity from here.
pub const TASK_ID_HEADER: &str = "Ty-Task-Id";
/// Header of a task republished for its retry: how many deliveries the
/// task had before this message, so the retry policy counts on across
/// messages.
pub const DELIVERED_HEADER: &str = "Ty-Delivered";
/// The server's message-schedule headers (nats-server 2.12+, ADR-51).
pub const SCHEDULE_HEADER: &str = "Nats-Schedule";
pub const SCHEDULE_TARGET_HEADER: &str = "Nats-Schedule-Target";

/// What a job event is about; the last subject token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    State,
    Progress,
    Metric,
    Log,
    Checkpoint,
    Stuck,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::State => "state",
            EventKind::Progress => "progress",
            EventKind::Metric => "metric",
            EventKind::Log => "log",
            EventKind::Checkpoint => "checkpoint",
            EventKind::Stuck => "stuck",
        }
    }
}

/// An operation of the NATS request/reply API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiOp {
    Submit,
    Get,
    List,
    Cancel,
    Validate,
    GetMetrics,
    WebhookSecret,
    RotateWebhookSecret,
    /// Caption review: a prepared job's captions, edits, approval.
    GetCaptions,
    UpdateCaptions,
    ApproveCaptions,
}

impl ApiOp {
    pub fn name(self) -> &'static str {
        match self {
            ApiOp::Submit => "submit",
            ApiOp::Get => "get",
            ApiOp::List => "list",
            ApiOp::Cancel => "cancel",
            ApiOp::Validate => "validate",
            ApiOp::GetMetrics => "metrics",
            ApiOp::WebhookSecret => "webhook_secret",
            ApiOp::RotateWebhookSecret => "rotate_webhook_secret",
            ApiOp::GetCaptions => "get_captions",
            ApiOp::UpdateCaptions => "update_captions",
            ApiOp::ApproveCaptions => "approve_captions",
        }
    }

    pub fn from_name(name: &str) -> Option<ApiOp> {
        [
            ApiOp::Submit,
            ApiOp::Get,
            ApiOp::List,
            ApiOp::Cancel,
            ApiOp::Validate,
            ApiOp::GetMetrics,
            ApiOp::WebhookSecret,
            ApiOp::RotateWebhookSecret,
            ApiOp::GetCaptions,
            ApiOp::UpdateCaptions,
            ApiOp::ApproveCaptions,
        ]
        .into_iter()
        .find(|op| op.name() == name)
    }
}

/// Subject constructors.
pub mod subject {
    use super::*;

    /// The task subject of a stage; `pool` matters only for training.
    pub fn task(stage: Stage, pool: &str) -> String {
        match stage {
            Stage::Train => format!("ty.task.train.{pool}"),
            other => format!("ty.task.{}", other.name()),
        }
    }

    pub fn all_tasks() -> &'static str {
        "ty.task.>"
    }

    /// Where a task waits for its retry: one schedule per job and stage
    /// (a new one replaces the old), published by the server to the task
    /// subject when due.
    pub fn retry(tenant: &TenantId, job: &JobId, stage: Stage) -> String {
        format!("ty.retry.{}.{tenant}.{job}", stage.name())
    }

    pub fn all_retries() -> &'static str {
        "ty.retry.>"
    }

    pub fn result(stage: Stage) -> String {
        format!("ty.result.{}", stage.name())
    }

    pub fn all_results() -> &'static str {
        "ty.result.>"
    }

    pub fn event(tenant: &TenantId, job: &JobId, kind: EventKind) -> String {
        format!("ty.event.{tenant}.{job}.{}", kind.name())
    }

    /// Every event of one job.
    pub fn job_events(tenant: &TenantId, job: &JobId) -> String {
        format!("ty.event.{tenant}.{job}.>")
    }

    pub fn all_events() -> &'static str {
        "ty.event.>"
    }

    /// Every job's state events.
    pub fn all_state_events() -> &'static str {
        "ty.event.*.*.state"
    }

    pub fn dlq(stage: Stage) -> String {
        format!("ty.dlq.{}", stage.name())
    }

    pub fn all_dlq() -> &'static str {
        "ty.dlq.>"
    }

    pub fn cancel(job: &JobId) -> String {
        format!("ty.control.{job}.cancel")
    }

    pub fn all_cancels() -> &'static str {
        "ty.control.*.cancel"
    }

    /// Where the autoscaler asks one stage service to drain (core NATS
    /// request/reply, answered with a
    /// [`DrainReply`](crate::runtime::DrainReply)):
    /// `ty.control.drain.train.<pool>.<worker id>` for a worker,
    /// `ty.control.drain.<stage>.<worker id>` for the other stages, so each
    /// stage role hears only its own ([`drains_of`]). `None` when the worker
    /// id (or the pool) is not one subject token.
    pub fn drain(stage: Stage, pool: &str, worker_id: &str) -> Option<String> {
        let token = |s: &str| {
            !s.is_empty()
                && !s
                    .chars()
                    .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace())
        };
        if !token(worker_id) || (stage == Stage::Train && !token(pool)) {
            return None;
        }
        Some(format!("{}.{worker_id}", drain_prefix(stage, pool)))
    }

    /// Every drain request of one stage (and pool, for training): what its
    /// services subscribe to.
    pub fn drains_of(stage: Stage, pool: &str) -> String {
        format!("{}.*", drain_prefix(stage, pool))
    }

    fn drain_prefix(stage: Stage, pool: &str) -> String {
        match stage {
            Stage::Train => format!("ty.control.drain.train.{pool}"),
            other => format!("ty.control.drain.{}", other.name()),
        }
    }

    /// Every drain request: what the autoscaler may send.
    pub fn all_drains() -> &'static str {
        "ty.control.drain.>"
    }

    /// The job id in a cancel subject.
    pub fn job_of_cancel(subject: &str) -> Option<JobId> {
        let rest = subject.strip_prefix("ty.control.")?;
        let job = rest.strip_suffix(".cancel")?;
        JobId::parse(job).ok()
    }

    pub fn api(op: ApiOp) -> String {
        format!("ty.api.{}", op.name())
    }

    pub fn all_api() -> &'static str {
        "ty.api.*"
    }

    /// Preflight without a job: a `PreflightRequest` in, a `ValidateReply` out.
    pub fn preflight() -> &'static str {
        "ty.preflight"
    }

    /// A subject with its job-specific tokens replaced by placeholders
    /// (`ty.event.{tenant}.{job}.state`, `ty.control.{job}.cancel`): the
    /// low-cardinality destination name spans are named after.
    pub fn destination(subject: &str) -> String {
        let tokens: Vec<&str> = subject.split('.').collect();
        match tokens.as_slice() {
            ["ty", "event", _, _, kind] => format!("ty.event.{{tenant}}.{{job}}.{kind}"),
            ["ty", "control", _, "cancel"] => "ty.control.{job}.cancel".to_string(),
            _ => subject.to_string(),
        }
    }
}

/// KV key of a job record.
pub fn job_key(tenant: &TenantId, job: &JobId) -> String {
    format!("{tenant}.{job}")
}

/// KV key of a worker's registry entry.
pub fn worker_key(worker_id: &str) -> String {
    worker_id.to_string()
}

/// KV key of the claim on a job's task of one stage (every attempt shares it).
pub fn claim_key(tenant: &TenantId, job: &JobId, stage: Stage) -> String {
    format!("{tenant}.{job}.{}", stage.name())
}

/// The durable consumer name of a stage (per pool for training).
pub fn consumer_name(stage: Stage, pool: &str) -> String {
    match stage {
        Stage::Train => format!("ty-train-{pool}"),
        other => format!("ty-{}", other.name()),
    }
}

/// Handles on the JetStream objects every service uses.
#[derive(Clone)]
pub struct Topology {
    pub js: jetstream::Context,
    pub jobs: kv::Store,
    pub workers: kv::Store,
    pub claims: kv::Store,
}

/// Creates (or finds) every stream and bucket. Idempotent. The coordinator
/// calls it at start-up (and any service on an open dev bus, so start order
/// does not matter there); on a fleet with identities only the coordinator
/// may, and the other roles [`bind`].
pub async fn ensure(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<Topology, async_nats::Error> {
    let replicas = config.replicas.max(1);
    let dedup = Duration::from_secs(config.dedup_window_secs.max(1));
    let streams = [
        tasks_stream(config),
        stream::Config {
            name: RESULTS_STREAM.into(),
            subjects: vec![subject::all_results().into()],
            retention: stream::RetentionPolicy::WorkQueue,
            discard: stream::DiscardPolicy::New,
            duplicate_window: dedup,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: EVENTS_STREAM.into(),
            subjects: vec![subject::all_events().into()],
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(config.event_max_age_secs.max(60)),
            max_messages_per_subject: 20_000,
            // Bounded in bytes too, dropping the oldest: job events are a
            // view, and a chatty job must not fill JetStream's store.
            max_bytes: clamp_bytes(config.event_max_bytes),
            discard: stream::DiscardPolicy::Old,
            // A worker reads its job's last checkpoint event by subject
            // (`$JS.API.DIRECT.GET.TY_EVENTS.<subject>`), which its NATS
            // permissions can name, unlike a read by sequence.
            allow_direct: true,
            duplicate_window: dedup,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: DLQ_STREAM.into(),
            subjects: vec![subject::all_dlq().into()],
            retention: stream::RetentionPolicy::Limits,
            // Long enough for an operator to look; never forever.
            max_age: DLQ_MAX_AGE,
            max_bytes: clamp_bytes(config.dlq_max_bytes),
            discard: stream::DiscardPolicy::Old,
            num_replicas: replicas,
            ..Default::default()
        },
    ];
    for config in streams {
        let limits = (config.max_bytes, config.max_age, config.allow_direct);
        let stream = js.get_or_create_stream(config.clone()).await?;
        let info = stream.cached_info();
        let found = (
            info.config.max_bytes,
            info.config.max_age,
            info.config.allow_direct,
        );
        if found != limits {
            // A stream made before these limits existed (or under other
            // settings) takes them now. A role not allowed to change
            // streams leaves that to one that is.
            let name = config.name.clone();
            if let Err(error) = js
                .update_stream(stream::Config {
                    max_bytes: limits.0,
                    max_age: limits.1,
                    allow_direct: limits.2,
                    ..info.config.clone()
                })
                .await
            {
                tracing::warn!(stream = %name, %error, "could not apply the stream's size and age limits");
            }
        }
    }
    let mut tasks = js.get_stream(TASKS_STREAM).await?;
    let found = &tasks.info().await?.config;
    if !found.allow_message_schedules || found.subjects != tasks_stream(config).subjects {
        // A stream made before delayed retries: it takes schedules and
        // their subjects from now on (a stream cannot turn them off again).
        let mut wanted = found.clone();
        let fresh = tasks_stream(config);
        wanted.subjects = fresh.subjects;
        wanted.allow_message_schedules = true;
        wanted.discard = fresh.discard;
        js.update_stream(wanted).await?;
    }
    let jobs = bucket(js, JOBS_BUCKET, 5, None, replicas).await?;
    idem_bucket(js, config).await?;
    let workers = bucket(js, WORKERS_BUCKET, 1, Some(WORKER_HEARTBEAT * 3), replicas).await?;
    let claims = bucket(js, CLAIMS_BUCKET, 1, Some(CLAIM_MAX_AGE), replicas).await?;
    bucket(js, AUTOSCALER_BUCKET, 1, None, replicas).await?;
    bucket(js, FLEET_BUCKET, 1, None, replicas).await?;
    Ok(Topology {
        js: js.clone(),
        jobs,
        workers,
        claims,
    })
}

/// Binds to the streams and buckets a stage service uses without creating
/// or changing any: fails until the coordinator has laid them out. What a
/// stage role's NATS permissions allow ([`permissions`]).
pub async fn bind(js: &jetstream::Context) -> Result<Topology, async_nats::Error> {
    js.get_stream(TASKS_STREAM).await?;
    Ok(Topology {
        js: js.clone(),
        jobs: js.get_key_value(JOBS_BUCKET).await?,
        workers: js.get_key_value(WORKERS_BUCKET).await?,
        claims: js.get_key_value(CLAIMS_BUCKET).await?,
    })
}

/// The coordinators' bucket of idempotency keys (see [`IDEM_BUCKET`]);
/// created on first call.
pub async fn idem_bucket(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<kv::Store, async_nats::Error> {
    bucket(js, IDEM_BUCKET, 1, None, config.replicas.max(1)).await
}

/// `TY_TASKS`: the stages' work queue, and the retries waiting to go back
/// into it. A retry is not a NAK with a delay, which would hold one of the
/// stage consumer's `max_ack_pending` slots for the whole delay (a
/// tenant's failing jobs would hold them all): the runtime acks the task
/// and republishes it as a message schedule (`@at` its due time) on
/// [`subject::retry`], which no consumer reads; the server publishes it to
/// the task subject when due.
fn tasks_stream(config: &NatsConfig) -> stream::Config {
    stream::Config {
        name: TASKS_STREAM.into(),
        subjects: vec![subject::all_tasks().into(), subject::all_retries().into()],
        retention: stream::RetentionPolicy::WorkQueue,
        // Message schedules need the old-message discard; with no limit
        // set on the stream nothing is ever discarded for it, and a store
        // that is full still refuses new tasks.
        discard: stream::DiscardPolicy::Old,
        allow_message_schedules: true,
        duplicate_window: Duration::from_secs(config.dedup_window_secs.max(1)),
        num_replicas: config.replicas.max(1),
        ..Default::default()
    }
}

/// A byte limit as NATS takes it (`i64`, `-1` for none).
fn clamp_bytes(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// The coordinators' bucket of tenants' webhook signing secrets (see
/// [`WEBHOOK_SECRETS_BUCKET`]); created on first call. History 2: the
/// entry before a rotation stays readable for an operator's look.
pub async fn webhook_secrets_bucket(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<kv::Store, async_nats::Error> {
    bucket(js, WEBHOOK_SECRETS_BUCKET, 2, None, config.replicas.max(1)).await
}

/// The first delay between two [`ensure_until`] attempts, and the longest.
const ENSURE_FIRST_DELAY: Duration = Duration::from_millis(250);
const ENSURE_MAX_DELAY: Duration = Duration::from_secs(5);

/// [`ensure`], tried again with exponential backoff (250 ms doubling to
/// 5 s, ±25 %) until it succeeds or `shutdown` is cancelled (`None`). A
/// service may start before its NATS server is up, or on a fresh cluster
/// whose nodes have not all joined yet, where an R3 stream cannot be
/// placed and every attempt times out; it comes up once the cluster can
/// take the streams. Each failure is logged.
pub async fn ensure_until(
    js: &jetstream::Context,
    config: &NatsConfig,
    shutdown: &CancellationToken,
) -> Option<Topology> {
    until_ready("NATS streams and buckets", shutdown, || ensure(js, config)).await
}

/// Runs `attempt` until it succeeds, with a growing pause between tries
/// (logged as warnings); `None` once `shutdown` is cancelled. For what a
/// service needs from NATS before it can work (streams, its consumer): a
/// cluster that cannot take it yet (a node missing, a partition, a leader
/// election) delays start-up instead of ending it.
pub async fn until_ready<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delays = backoff::ExponentialBackoff {
        current_interval: ENSURE_FIRST_DELAY,
        initial_interval: ENSURE_FIRST_DELAY,
        randomization_factor: 0.25,
        multiplier: 2.0,
        max_interval: ENSURE_MAX_DELAY,
        max_elapsed_time: None,
        ..Default::default()
    };
    let mut tries = 1u32;
    loop {
        let error = tokio::select! {
            _ = shutdown.cancelled() => return None,
            result = attempt() => match result {
                Ok(ready) => {
                    if tries > 1 {
                        tracing::info!(attempt = tries, "{what} ready");
                    }
                    return Some(ready);
                }
                Err(error) => error,
            },
        };
        let delay = delays.next_backoff().unwrap_or(ENSURE_MAX_DELAY);
        tracing::warn!(
            attempt = tries,
            %error,
            retry_in_ms = delay.as_millis() as u64,
            "cannot set up {what} yet; retrying"
        );
        tries = tries.saturating_add(1);
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn bucket(
    js: &jetstream::Context,
    name: &str,
    history: i64,
    max_age: Option<Duration>,
    replicas: usize,
) -> Result<kv::Store, async_nats::Error> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.into(),
            history,
            max_age: max_age.unwrap_or_default(),
            num_replicas: replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another service created it between our two calls.
        Err(_) => Ok(js.get_key_value(name).await?),
    }
}

/// The pull consumer a stage service reads its tasks from. Deliveries are
/// unlimited here: the stage runtime counts them and dead-letters a task
/// itself, because the server's max-deliveries advisory may go unheard.
pub async fn task_consumer(
    js: &jetstream::Context,
    stage: Stage,
    pool: &str,
    config: &NatsConfig,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    let stream = js.get_stream(TASKS_STREAM).await?;
    let name = consumer_name(stage, pool);
    let consumer = stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: subject::task(stage, pool),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait(),
                max_deliver: -1,
                max_ack_pending: config.max_ack_pending.max(1),
                ..Default::default()
            },
        )
        .await?;
    Ok(consumer)
}

/// The consumer the coordinator replicas share for stage results.
pub async fn results_consumer(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    let stream = js.get_stream(RESULTS_STREAM).await?;
    let consumer = stream
        .get_or_create_consumer(
            RESULTS_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(RESULTS_CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait(),
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await?;
    Ok(consumer)
}

/// The coordinators' shared durable consumer of state events, for webhooks.
/// It starts at the events published after its creation (not the stream's
/// history) and never gives up a message by itself: the webhook loop counts
/// attempts and terminates. `ack_wait` must exceed one POST's timeout.
pub async fn webhooks_consumer(
    js: &jetstream::Context,
    ack_wait: Duration,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    let stream = js.get_stream(EVENTS_STREAM).await?;
    let consumer = stream
        .get_or_create_consumer(
            WEBHOOKS_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(WEBHOOKS_CONSUMER.into()),
                filter_subject: subject::all_state_events().into(),
                deliver_policy: consumer::DeliverPolicy::New,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_deliver: -1,
                // Webhooks waiting for a retry stay pending on the consumer;
                // at this many the server stops handing out new events, so
                // it is far above what failing receivers hold at once.
                max_ack_pending: WEBHOOKS_MAX_ACK_PENDING,
                ..Default::default()
            },
        )
        .await?;
    Ok(consumer)
}

/// How many state events the webhook consumer lets be out at once
/// (delivering, or waiting for a retry); an existing consumer keeps its
/// old setting.
pub const WEBHOOKS_MAX_ACK_PENDING: i64 = 100_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_leave_job_tokens_out() {
        let tenant = TenantId::parse("acme").unwrap();
        let job = JobId::generate();
        assert_eq!(
            subject::destination(&subject::event(&tenant, &job, EventKind::State)),
            "ty.event.{tenant}.{job}.state"
        );
        assert_eq!(
            subject::destination(&subject::cancel(&job)),
            "ty.control.{job}.cancel"
        );
        for fixed in [
            subject::task(Stage::Train, "a100"),
            subject::result(Stage::Deliver),
            subject::dlq(Stage::Prepare),
        ] {
            assert_eq!(subject::destination(&fixed), fixed);
        }
    }

    #[test]
    fn task_ids_round_trip() {
        let tenant = TenantId::parse("acme").unwrap();
        let job = JobId::generate();
        let id = task_msg_id(&tenant, &job, Stage::Train, Attempt(3));
        assert_eq!(
            parse_task_msg_id(&id),
            Some((tenant.clone(), job.clone(), Stage::Train, Attempt(3)))
        );
        assert_eq!(parse_task_msg_id("garbage"), None);
        assert_eq!(
            parse_task_msg_id(&result_msg_id(&tenant, &job, Stage::Train, Attempt(3), "")),
            None
        );
    }

    #[test]
    fn results_under_different_claims_do_not_dedup_each_other() {
        let tenant = TenantId::parse("acme").unwrap();
        let job = JobId::generate();
        let a = result_msg_id(&tenant, &job, Stage::Train, Attempt(1), "t1");
        let b = result_msg_id(&tenant, &job, Stage::Train, Attempt(1), "t2");
        assert_ne!(a, b);
        assert_eq!(
            a,
            result_msg_id(&tenant, &job, Stage::Train, Attempt(1), "t1")
        );
        assert_eq!(
            claim_key(&tenant, &job, Stage::Train),
            format!("acme.{job}.train")
        );
    }

    #[test]
    fn runtime_message_ids_keep_their_form() {
        // Stream dedup compares these strings: a new form would let a
        // redelivery after an upgrade store a second copy.
        let tenant = TenantId::parse("acme").unwrap();
        let job = JobId::parse("j-1").unwrap();
        assert_eq!(
            started_msg_id(&tenant, &job, Stage::Train, Attempt(2)),
            "acme.j-1.train.2.started"
        );
        assert_eq!(
            retry_report_msg_id(&tenant, &job, Stage::Train, Attempt(2), 3),
            "acme.j-1.train.2.adjusted.3"
        );
        assert_eq!(dead_letter_msg_id(Stage::Prepare, 42), "dlq.prepare.42");
        assert_eq!(
            retry_msg_id(&tenant, &job, Stage::Train, Attempt(2), 3),
            "acme.j-1.train.2.retry.3"
        );
        assert_eq!(
            subject::retry(&tenant, &job, Stage::Train),
            "ty.retry.train.acme.j-1"
        );
        assert_eq!(
            schedule_at(1_614_265_330_123),
            "@at 2021-02-25T15:02:10.123Z"
        );
    }

    #[test]
    fn subjects_follow_the_layout() {
        let tenant = TenantId::parse("acme").unwrap();
        let job = JobId::parse("j-1").unwrap();
        assert_eq!(subject::task(Stage::Train, "a100"), "ty.task.train.a100");
        assert_eq!(subject::task(Stage::Prepare, "a100"), "ty.task.prepare");
        assert_eq!(
            subject::event(&tenant, &job, EventKind::Progress),
            "ty.event.acme.j-1.progress"
        );
        assert_eq!(subject::job_of_cancel(&subject::cancel(&job)), Some(job));
        let drain = subject::drain;
        assert_eq!(
            drain(Stage::Train, "a100", "m-3").as_deref(),
            Some("ty.control.drain.train.a100.m-3")
        );
        assert_eq!(
            drain(Stage::Prepare, "x", "c-1").as_deref(),
            Some("ty.control.drain.prepare.c-1")
        );
        // Not one token: no subject. A drain is never taken for a cancel.
        let bad = ["", "a.b", "a*", "a>", "a b"];
        assert!(bad.iter().all(|w| drain(Stage::Deliver, "x", w).is_none()));
        assert_eq!(drain(Stage::Train, "a.b", "w"), None);
        assert_eq!(subject::job_of_cancel("ty.control.drain.x.cancel"), None);
        assert_eq!(ApiOp::from_name("list"), Some(ApiOp::List));
        assert_eq!(
            ApiOp::from_name("rotate_webhook_secret"),
            Some(ApiOp::RotateWebhookSecret)
        );
    }
}
