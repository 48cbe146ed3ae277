//! The retry policy end to end: transient failures are naked with the
//! policy's backoff (a server's Retry-After as a lower bound), a task out of
//! attempts is dead-lettered once and its job FAILED, and an out-of-memory
//! training is retried with a lighter setting recorded in the job record
//! (resuming the checkpoint stored before the OOM).
//! Only lower bounds of timing are asserted.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trainyard_core::topology::DLQ_STREAM;
use trainyard_proto::v1::{
    DatasetSource, DeadLetter, ErrorKind, ExtraValue, JobState, RetryPolicy, Stage,
    dataset_source::Source, extra_value::Kind,
};
use trainyard_tests::*;

/// An HTTP server whose `/data.zip` answers 503 (with `Retry-After` on the
/// failures listed in `retry_after`) for the first `failures` requests, then
/// 200 with `zip`; it keeps the time of every request.
struct Flaky {
    url: String,
    requests: Arc<Mutex<Vec<Instant>>>,
}

async fn flaky(
    failures: usize,
    retry_after: &'static [(usize, &'static str)],
    zip: Vec<u8>,
) -> Flaky {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = requests.clone();
    let zip = Arc::new(zip);
    let app = axum::Router::new().route(
        "/data.zip",
        axum::routing::get(move || {
            let seen = seen.clone();
            let zip = zip.clone();
            async move {
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(Instant::now());
                    seen.len()
                };
                if n <= failures {
                    let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
                    if let Some((_, secs)) = retry_after.iter().find(|(i, _)| *i == n) {
                        response
                            .headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
                    }
                    response
                } else {
                    Response::new(axum::body::Body::from(zip.as_ref().clone()))
                }
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Flaky {
        url: format!("http://{addr}/data.zip"),
        requests,
    }
}

fn sample_zip() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let files = trainyard_captioner::sample::write_sample_dataset(dir.path()).unwrap();
    let entries: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(p).unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    make_zip(&refs)
}

fn prepare_policy(initial_ms: u64, jitter: f64, max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        stages: vec![Stage::Prepare as i32],
        initial_delay_ms: initial_ms,
        multiplier: 2.0,
        max_delay_ms: 10_000,
        max_attempts,
        jitter: Some(jitter),
        non_retryable: Vec::new(),
    }
}

async fn fleet() -> Fleet {
    Fleet::start_with(Services::ALL, |c| c.captioner.allow_private_urls = true).await
}

fn url_spec(url: &str, retry: RetryPolicy) -> trainyard_proto::v1::JobSpec {
    let mut spec = spec("file:///unused", 10);
    spec.dataset = Some(DatasetSource {
        source: Some(Source::ZipUrl(url.into())),
    });
    spec.retry = Some(retry);
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_answering_503_twice_succeeds_after_the_backoff() {
    let fleet = fleet().await;
    // The second 503 asks for 1 s, more than the policy's 600–1000 ms.
    let server = flaky(2, &[(2, "1")], sample_zip()).await;
    let mut client = fleet.client(TOKEN).await;
    let policy = prepare_policy(400, 0.25, 4);
    let job = submit(&mut client, url_spec(&server.url, policy)).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Succeeded, "{:?}", record.error);
    let times = server.requests.lock().unwrap().clone();
    assert!(times.len() >= 3, "{} requests", times.len());
    let first_gap = times[1] - times[0];
    let second_gap = times[2] - times[1];
    // Delivery 1 failed: at least 400 ms × (1 − 0.25).
    assert!(first_gap >= Duration::from_millis(300), "{first_gap:?}");
    // Delivery 2 failed: Retry-After 1 s is the floor.
    assert!(second_gap >= Duration::from_millis(1000), "{second_gap:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_always_answering_503_fails_after_the_cap_with_one_dead_letter() {
    let fleet = fleet().await;
    let server = flaky(usize::MAX, &[], Vec::new()).await;
    let mut client = fleet.client(TOKEN).await;
    let job = submit(
        &mut client,
        url_spec(&server.url, prepare_policy(200, 0.0, 3)),
    )
    .await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.clone().unwrap();
    assert_eq!(error.kind(), ErrorKind::Fetch);
    assert!(
        error.message.contains("gave up after 3 deliveries"),
        "{}",
        error.message
    );
    let times = server.requests.lock().unwrap().clone();
    assert_eq!(times.len(), 3, "one fetch per delivery");
    assert!(times[1] - times[0] >= Duration::from_millis(200));
    assert!(times[2] - times[1] >= Duration::from_millis(400));
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let mut dlq = js.get_stream(DLQ_STREAM).await.unwrap();
    let state = dlq.info().await.unwrap().state.clone();
    assert_eq!(state.messages, 1);
    let letter = dlq.get_raw_message(state.first_sequence).await.unwrap();
    let letter = DeadLetter::decode(letter.payload).unwrap();
    assert_eq!(letter.job_id, job.job_id);
    assert_eq!(letter.deliveries, 3);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_kind_fails_on_the_first_delivery_with_one_dead_letter() {
    let fleet = fleet().await;
    let server = flaky(usize::MAX, &[], Vec::new()).await;
    let mut client = fleet.client(TOKEN).await;
    let mut policy = prepare_policy(200, 0.0, 5);
    policy.non_retryable = vec![ErrorKind::Fetch as i32];
    let job = submit(&mut client, url_spec(&server.url, policy)).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(60)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.unwrap();
    assert_eq!(error.kind(), ErrorKind::Fetch);
    assert!(!error.retryable);
    assert!(error.message.contains("503"), "{}", error.message);
    assert_eq!(server.requests.lock().unwrap().len(), 1);
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let mut dlq = js.get_stream(DLQ_STREAM).await.unwrap();
    let state = dlq.info().await.unwrap().state.clone();
    assert_eq!(state.messages, 1);
    let letter = dlq.get_raw_message(state.first_sequence).await.unwrap();
    let letter = DeadLetter::decode(letter.payload).unwrap();
    assert_eq!(
        (letter.job_id.as_str(), letter.kind()),
        (job.job_id.as_str(), ErrorKind::Fetch)
    );
    assert_eq!(letter.deliveries, 1);
    assert!(letter.reason.contains("503"), "{}", letter.reason);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_is_retried_with_a_smaller_batch_recorded_in_the_record() {
    let fleet = Fleet::start().await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 20);
    let training = spec.training.as_mut().unwrap();
    training.batch_size = 4;
    training.extras.insert(
        "fault_oom_at_step".into(),
        ExtraValue {
            kind: Some(Kind::Int(2)),
        },
    );
    spec.retry = Some(RetryPolicy {
        stages: vec![Stage::Train as i32],
        // Long enough for the coordinator to record the adjustment first.
        initial_delay_ms: 500,
        multiplier: 1.0,
        max_attempts: 3,
        jitter: Some(0.0),
        ..Default::default()
    });
    let job = submit(&mut client, spec).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;
    let record = get(&mut client, &job.job_id).await;
    // The fault OOMs at any batch size: every lighter setting is tried,
    // then the cap ends the job.
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.clone().unwrap();
    assert_eq!(error.kind(), ErrorKind::Oom, "{}", error.message);
    assert!(
        error.message.contains("gave up after 3 deliveries"),
        "{}",
        error.message
    );
    assert_eq!(
        record.adjustments,
        ["oom: batch_size 4 → 2", "oom: batch_size 2 → 1"]
    );
    assert_eq!(record.effective_training.as_ref().unwrap().batch_size, 1);
    assert_eq!(
        record
            .spec
            .as_ref()
            .unwrap()
            .training
            .as_ref()
            .unwrap()
            .batch_size,
        4,
        "the spec stays as submitted"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_after_a_checkpoint_resumes_it_with_the_smaller_batch_and_succeeds() {
    let fleet = Fleet::start().await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 20);
    let training = spec.training.as_mut().unwrap();
    training.batch_size = 4;
    training.save_every = 5;
    // Out of memory at step 8, only at batch size 4 and up: the checkpoint
    // of step 5 is stored by then, and the lighter retry gets past step 8.
    for (key, value) in [("fault_oom_at_step", 8), ("fault_oom_min_batch_size", 4)] {
        training.extras.insert(
            key.into(),
            ExtraValue {
                kind: Some(Kind::Int(value)),
            },
        );
    }
    spec.retry = Some(RetryPolicy {
        stages: vec![Stage::Train as i32],
        initial_delay_ms: 500,
        multiplier: 1.0,
        max_attempts: 3,
        jitter: Some(0.0),
        ..Default::default()
    });
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;
    let record = get(&mut client, &job.job_id).await;
    let logs: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(trainyard_proto::v1::job_event::Kind::Log(l)) => Some(l.line.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "{:?}; logs: {logs:#?}",
        record.error
    );
    assert_eq!(record.adjustments, ["oom: batch_size 4 → 2"]);
    assert_eq!(record.effective_training.as_ref().unwrap().batch_size, 2);
    assert!(
        logs.contains(&"trainer resumed at step 5"),
        "the retry resumed the stored checkpoint: {logs:#?}"
    );
    // The second attempt's first step is 6, not 1.
    let steps: Vec<u32> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(trainyard_proto::v1::job_event::Kind::Progress(p))
                if p.stage() == Stage::Train && p.step > 0 =>
            {
                Some(p.step)
            }
            _ => None,
        })
        .collect();
    let restart = steps
        .windows(2)
        .find(|w| w[1] < w[0])
        .map(|w| w[1])
        .expect("a second attempt reported progress");
    assert!(
        restart > 5,
        "the retry started over at step {restart}: {steps:?}"
    );
    assert_eq!(steps.last(), Some(&20));
    fleet.stop().await;
}
