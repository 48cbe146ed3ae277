//! Attacks on the fleet's storage and its controls, against a real fleet
//! (nats-server, gRPC on loopback, a local artifact store): a tenant must
//! not fill JetStream with log events, push a spec larger than NATS
//! carries, exhaust a captioner's memory with a zip's central directory,
//! or keep a GPU busy by cancelling before its task is running.

use futures::StreamExt;
use prost::Message;
use std::time::Duration;
use trainyard_core::events::EventSink;
use trainyard_core::topology::{EVENTS_STREAM, subject};
use trainyard_proto::v1::{
    ExtraValue, JobEvent, JobState, Stage, SubmitRequest, ValidateRequest, extra_value, job_event,
};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::*;

const EVENTS_MAX: u64 = 1 << 20;

/// A trainer's log events as `Watch` shows them: (stream, text).
fn log_lines(events: &[JobEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(job_event::Kind::Log(l)) if l.stage() == Stage::Train => {
                Some((l.stream.clone(), l.line.clone()))
            }
            _ => None,
        })
        .collect()
}

/// A job's events read straight from `TY_EVENTS`, whatever is left of them.
async fn stored_events(fleet: &Fleet, tenant: &TenantId, job: &JobId) -> Vec<JobEvent> {
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject::job_events(tenant, job),
            ..Default::default()
        })
        .await
        .unwrap();
    let pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    for _ in 0..pending {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        out.push(JobEvent::decode(message.payload.as_ref()).unwrap());
    }
    out
}

/// A flood of log events (as a trainer with no budget would send) stays
/// within the events stream's byte limit, the oldest going first; a job
/// run after it still completes, and its chatty trainer publishes no
/// more than the job's log budget over both its runs, then a note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_the_events_stream_with_logs_stays_within_its_limit() {
    const BUDGET: u64 = 2048;
    let fleet = Fleet::start_secured(Services::ALL, |c| {
        c.nats.event_max_bytes = EVENTS_MAX;
        c.worker.log_event_budget_bytes = BUDGET;
        // The reference trainer built with this tree (its chatter fault),
        // where the binaries were copied.
        if let Some(dir) = std::env::var_os("TY_TEST_BIN_DIR") {
            c.worker.reference_trainer =
                Some(std::path::Path::new(&dir).join("ty-reference-trainer"));
        }
    })
    .await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);

    // 4 MiB of log events under one job, through the same sink a worker uses.
    let flooder = EventSink::new(
        js.clone(),
        TenantId::parse("acme").unwrap(),
        JobId::generate(),
    );
    let text = "x".repeat(64 << 10);
    for _ in 0..64 {
        flooder.log(Stage::Train, "stdout", &text).await;
    }
    let mut stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_bytes, EVENTS_MAX as i64);
    assert!(
        info.state.bytes <= EVENTS_MAX,
        "{} bytes in TY_EVENTS",
        info.state.bytes
    );
    assert!(info.state.messages < 64, "nothing was dropped");

    let mut client = fleet.client(TOKEN).await;
    // A trainer printing 1 kB of noise after each of its 100 steps, out
    // of memory at step 10 of its first attempt (batch size 2): the
    // budget is the job's, so the retry publishes none of its output.
    let mut chatty = spec(&fleet.sample_uri().await, 100);
    let training = chatty.training.as_mut().unwrap();
    training.batch_size = 2;
    for (key, value) in [
        ("fault_chatter_bytes_per_step", 1000),
        ("fault_oom_at_step", 10),
        ("fault_oom_min_batch_size", 2),
    ] {
        training.extras.insert(
            key.into(),
            ExtraValue {
                kind: Some(extra_value::Kind::Int(value)),
            },
        );
    }
    chatty.retry = Some(trainyard_proto::v1::RetryPolicy {
        stages: vec![Stage::Train as i32],
        initial_delay_ms: 200,
        multiplier: 1.0,
        max_attempts: 3,
        jitter: Some(0.0),
        ..Default::default()
    });
    let job = submit(&mut client, chatty).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    let done = get(&mut client, &job.job_id).await;
    assert_eq!(done.state(), JobState::Succeeded, "{:?}", done.error);
    assert_eq!(done.adjustments, ["oom: batch_size 2 → 1"], "two runs");

    let lines = log_lines(&events);
    let trainer_bytes: u64 = lines
        .iter()
        .filter(|(stream, _)| stream != "worker")
        .map(|(_, text)| text.len() as u64 + 1)
        .sum();
    assert!(
        trainer_bytes <= BUDGET,
        "{trainer_bytes} bytes of trainer log events"
    );
    let notes: Vec<&str> = lines
        .iter()
        .filter(|(stream, _)| stream == "worker")
        .map(|(_, text)| text.as_str())
        .collect();
    // Each run says so twice: when the budget is (found) spent, and at its end.
    assert_eq!(
        notes
            .iter()
            .filter(|n| n.starts_with("log budget exhausted"))
            .count(),
        4,
        "{notes:?}"
    );
    // The claim carries the job's count to every run.
    let kv = js
        .get_key_value(trainyard_core::topology::CLAIMS_BUCKET)
        .await
        .unwrap();
    let claim = trainyard_core::claim::Claims::stored(
        &kv,
        &TenantId::parse("acme").unwrap(),
        &JobId::parse(&job.job_id).unwrap(),
        Stage::Train,
    )
    .await
    .unwrap()
    .expect("the train stage's claim");
    assert_eq!(claim.log_bytes, trainer_bytes, "{claim:?}");
    // The full output of both runs is still in their log artifacts.
    let prefix = trainyard_core::store::keys::logs(
        &TenantId::parse("acme").unwrap(),
        &JobId::parse(&job.job_id).unwrap(),
    );
    let logs = fleet.store.list(&prefix).await.expect("the trainer logs");
    assert_eq!(logs.len(), 2, "{logs:?}");
    let kept: u64 = logs.iter().map(|(_, size)| size).sum();
    assert!(kept > 100_000, "{kept} bytes of trainer log");
    let info = stream.info().await.unwrap();
    assert!(info.state.bytes <= EVENTS_MAX);
    let tenant = TenantId::parse("acme").unwrap();
    let stored = stored_events(&fleet, &tenant, &JobId::parse(&job.job_id).unwrap()).await;
    assert!(!stored.is_empty());
    fleet.stop().await;
}

/// A spec over the fleet's limit is refused, by Submit and by Validate,
/// with its size and the limit, and no job is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_spec_is_refused() {
    let fleet = Fleet::start_secured(Services::NONE, |_| {}).await;
    let mut fleet = fleet;
    fleet.start_coordinator().await;
    let mut client = fleet.client(TOKEN).await;
    let limit = fleet.config.coordinator.max_spec_bytes;
    let mut big = spec("file:///nowhere", 10);
    for i in 0..40 {
        big.labels.insert(format!("l{i}"), "v".repeat(limit / 32));
    }
    assert!(big.encoded_len() > limit);

    let status = client
        .submit(SubmitRequest {
            spec: Some(big.clone()),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("spec: is "),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains(&limit.to_string()),
        "{}",
        status.message()
    );
    let status = client
        .validate(ValidateRequest { spec: Some(big) })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let listed = client
        .list(trainyard_proto::v1::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty());
    fleet.stop().await;
}

/// Waits until no process mentions `job` (its trainer is gone).
async fn until_no_trainer(job: &str, timeout: Duration) {
    wait_for("the trainer to stop", timeout, || {
        let gone = processes_mentioning(job).is_empty();
        async move { gone.then_some(()) }
    })
    .await;
}

async fn until_trainer(job: &str) {
    wait_for("the trainer to run", Duration::from_secs(120), || {
        let running = !processes_mentioning(job).is_empty();
        async move { running.then_some(()) }
    })
    .await;
}

/// Messages left in `TY_TASKS`.
async fn tasks_left(js: &async_nats::jetstream::Context) -> u64 {
    let mut stream = js
        .get_stream(trainyard_core::topology::TASKS_STREAM)
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

/// A job cancelled while its training task waits in the queue, with no
/// worker to hear the cancel message: the worker that takes the task later
/// never starts a trainer for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_before_the_task_is_taken_keeps_the_trainer_from_starting() {
    let fleet = Fleet::start_secured(
        Services {
            worker: false,
            ..Services::ALL
        },
        |_| {},
    )
    .await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec(&fleet.sample_uri().await, 100_000)).await;
    wait_for("the training task", Duration::from_secs(60), || {
        let mut client = client.clone();
        let id = job.job_id.clone();
        async move { (get(&mut client, &id).await.stage() == Stage::Train).then_some(()) }
    })
    .await;
    client
        .cancel(trainyard_proto::v1::CancelRequest {
            job_id: job.job_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(tasks_left(&js).await, 1, "the training task waits");

    let (_stop, _worker) = fleet.start_worker();
    wait_for("the task to be dropped", Duration::from_secs(60), || {
        let js = js.clone();
        async move { (tasks_left(&js).await == 0).then_some(()) }
    })
    .await;
    assert!(processes_mentioning(&job.job_id).is_empty());
    // A run, however it ends, stores its trainer's output: there was none.
    let key = format!(
        "{}/train-attempt-1-delivery-1.log",
        trainyard_core::store::keys::logs(
            &trainyard_proto::TenantId::parse("acme").unwrap(),
            &trainyard_proto::JobId::parse(&job.job_id).unwrap()
        )
    );
    assert!(fleet.store.get_bytes(&key).await.is_err(), "a trainer ran");
    assert_eq!(
        get(&mut client, &job.job_id).await.state(),
        JobState::Cancelled
    );
    fleet.stop().await;
}

/// A cancel whose message never reaches the worker (a reconnect, a lost
/// core-NATS message): the record the coordinator made final stops the
/// trainer at the worker's next heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_whose_message_is_lost_still_stops_the_trainer() {
    let fleet = Fleet::start_secured(Services::ALL, |_| {}).await;
    let parts = fleet.coordinator_parts().await;
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec(&fleet.sample_uri().await, 100_000)).await;
    until_trainer(&job.job_id).await;

    // The coordinator's cancel without its message.
    let (tenant, id) = (
        TenantId::parse(&job.tenant).unwrap(),
        JobId::parse(&job.job_id).unwrap(),
    );
    parts
        .repo
        .update(&tenant, &id, |mut record| async move {
            record.state = JobState::Cancelled as i32;
            (Some(record), ())
        })
        .await
        .unwrap();
    until_no_trainer(&job.job_id, Duration::from_secs(60)).await;
    wait_for("the task to be dropped", Duration::from_secs(30), || {
        let js = parts.js.clone();
        async move { (tasks_left(&js).await == 0).then_some(()) }
    })
    .await;
    fleet.stop().await;
}

/// A job past its deadline is stopped by the worker's own clock, before
/// any reconciler pass fails it and sends a cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_stops_the_trainer_without_a_cancel_message() {
    let fleet = Fleet::start_secured(Services::ALL, |c| {
        c.coordinator.reconcile_interval_secs = 3600;
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let mut long = spec(&fleet.sample_uri().await, 100_000);
    // Long enough for the dataset to be prepared and the trainer to start
    // on a busy machine.
    long.timeout_secs = 25;
    let job = submit(&mut client, long).await;
    until_trainer(&job.job_id).await;
    until_no_trainer(&job.job_id, Duration::from_secs(60)).await;
    let record = get(&mut client, &job.job_id).await;
    assert!(
        trainyard_core::runtime::deadline_ms(&record)
            .is_some_and(|deadline| trainyard_core::now_ms() >= deadline),
        "stopped before its deadline"
    );
    // No reconciler pass has failed it: the worker stopped it by its own clock.
    assert!(!record.state().is_final(), "{:?}", record.state());
    fleet.stop().await;
}

/// A zip declaring fifty million entries (its end records only) fails its
/// job as a bad dataset, at once and without a retry, and the captioner
/// goes on to prepare the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_declaring_millions_of_entries_is_refused_and_the_captioner_serves_on() {
    let fleet = Fleet::start_secured(Services::ALL, |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let bomb = trainyard_captioner::unpack::eocd::forged_zip64_end(50_000_000, 46 * 50_000_000);
    let key = format!("{}/bomb.zip", upload_key("acme", "bomb"));
    fleet.store.put_bytes(&key, bomb.into()).await.unwrap();
    let job = submit(&mut client, spec(&fleet.store.uri(&key), 20)).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(60)).await;
    let failed = get(&mut client, &job.job_id).await;
    assert_eq!(failed.state(), JobState::Failed);
    let error = failed.error.expect("the cause");
    assert_eq!(error.kind(), trainyard_proto::v1::ErrorKind::BadDataset);
    assert!(!error.retryable);
    assert!(
        error.message.contains("declares 50000000 entries"),
        "{}",
        error.message
    );

    let next = submit(&mut client, spec(&fleet.sample_uri().await, 20)).await;
    watch_all(&mut client, &next.job_id, Duration::from_secs(120)).await;
    assert_eq!(
        get(&mut client, &next.job_id).await.state(),
        JobState::Succeeded
    );
    fleet.stop().await;
}

/// A training stage whose result is larger than NATS carries (2 MiB of
/// artifact names).
struct Oversized;

impl trainyard_core::runtime::StageHandler for Oversized {
    type Task = trainyard_proto::v1::TrainTask;

    async fn handle(
        &self,
        _task: trainyard_proto::v1::TrainTask,
        _ctx: trainyard_core::runtime::TaskContext,
    ) -> Result<trainyard_proto::v1::stage_result::Outcome, trainyard_core::runtime::StageError>
    {
        let artifacts = (0..2048)
            .map(|i| trainyard_proto::v1::Artifact {
                name: format!("{i}-{}", "a".repeat(1024)),
                ..Default::default()
            })
            .collect();
        Ok(trainyard_proto::v1::stage_result::Outcome::Trained(
            trainyard_proto::v1::TrainOutput {
                artifacts,
                ..Default::default()
            },
        ))
    }
}

/// A stage result the server refuses as over its `max_payload` fails the
/// job with that reason, instead of a publish retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_larger_than_nats_carries_fails_the_job_with_the_reason() {
    let fleet = Fleet::start_secured(
        Services {
            worker: false,
            uploader: false,
            ..Services::ALL
        },
        |_| {},
    )
    .await;
    let client = fleet.nats_client().await;
    let topo = trainyard_core::topology::ensure(
        &async_nats::jetstream::new(client.clone()),
        &fleet.config.nats,
    )
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let runtime = {
        let config = trainyard_core::runtime::RunnerConfig::new(Stage::Train, &fleet.config.nats);
        let stop = stop.clone();
        tokio::spawn(async move {
            trainyard_core::runtime::run_stage(
                client,
                topo,
                config,
                std::sync::Arc::new(Oversized),
                stop,
            )
            .await
            .expect("runtime")
        })
    };
    let mut api = fleet.client(TOKEN).await;
    let job = submit(&mut api, spec(&fleet.sample_uri().await, 20)).await;
    watch_all(&mut api, &job.job_id, Duration::from_secs(60)).await;
    let failed = get(&mut api, &job.job_id).await;
    assert_eq!(failed.state(), JobState::Failed);
    let error = failed.error.expect("the cause");
    assert!(!error.retryable);
    assert!(
        error
            .message
            .contains("larger than the NATS server carries"),
        "{}",
        error.message
    );
    stop.cancel();
    runtime.await.unwrap();
    fleet.stop().await;
}
