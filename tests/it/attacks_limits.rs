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
/// more than its log budget, then one note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_the_events_stream_with_logs_stays_within_its_limit() {
    const BUDGET: u64 = 2048;
    let fleet = Fleet::start_with(Services::ALL, |c| {
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
    let flooder = EventSink::new(js.clone(), TenantId::parse("acme").unwrap(), JobId::generate());
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
    // A trainer printing 1 kB of noise after each of its 100 steps.
    let mut chatty = spec(&fleet.sample_uri().await, 100);
    chatty.training.as_mut().unwrap().extras.insert(
        "fault_chatter_bytes_per_step".into(),
        ExtraValue {
            kind: Some(extra_value::Kind::Int(1000)),
        },
    );
    let job = submit(&mut client, chatty).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    let done = get(&mut client, &job.job_id).await;
    assert_eq!(done.state(), JobState::Succeeded, "{:?}", done.error);

    let lines = log_lines(&events);
    let trainer_bytes: u64 = lines
        .iter()
        .filter(|(stream, _)| stream != "worker")
        .map(|(_, text)| text.len() as u64 + 1)
        .sum();
    assert!(trainer_bytes <= BUDGET, "{trainer_bytes} bytes of trainer log events");
    let notes: Vec<&str> = lines
        .iter()
        .filter(|(stream, _)| stream == "worker")
        .map(|(_, text)| text.as_str())
        .collect();
    assert_eq!(
        notes
            .iter()
            .filter(|n| n.starts_with("log budget exhausted"))
            .count(),
        2,
        "{notes:?}"
    );
    // The full output is still in the attempt's log artifact.
    let key = format!("jobs/{}/logs/train-attempt-1-delivery-1.log", job.job_id);
    let log = fleet.store.get_bytes(&key).await.expect("the trainer log");
    assert!(log.len() > 100_000, "{} bytes of trainer log", log.len());
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
    let fleet = Fleet::start_with(Services::NONE, |_| {}).await;
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
    assert!(status.message().starts_with("spec: is "), "{}", status.message());
    assert!(status.message().contains(&limit.to_string()), "{}", status.message());
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
