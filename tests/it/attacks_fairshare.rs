//! Attacks on fair share, each as a tenant would make it, against a real
//! fleet (nats-server, coordinator, captioner, worker, uploader) with a
//! real HTTP server on loopback:
//!
//! - starving a stage: tenant A submits more failing jobs than the stage's
//!   consumer lets run at once (`nats.max_ack_pending`), each fetching a
//!   `zip_url` that answers 503 with an hour's `Retry-After` and a
//!   `spec.retry` of a day between tries; tenant B's good job must still
//!   start before the first of A's retries is even due, and A's retries
//!   wait no longer than the fleet's `retry.fleet_max_delay_ms`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trainyard_core::topology::{self, TASKS_STREAM, subject};
use trainyard_proto::v1::{DatasetSource, JobState, RetryPolicy, Stage, dataset_source::Source};
use trainyard_tests::*;

/// An HTTP server answering every path with 503 and `Retry-After: 3600`;
/// it keeps the times each path was asked for.
struct Failing {
    base: String,
    requests: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
}

async fn failing_server() -> Failing {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let seen = requests.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .entry(uri.path().to_string())
                .or_default()
                .push(Instant::now());
            let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("3600"));
            response
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Failing {
        base: format!("http://{addr}"),
        requests,
    }
}

/// The fleet of the starvation attack: two prepare tasks out at once for
/// all tenants, and no retry waiting longer than `fleet_max`.
async fn small_fleet(fleet_max: Duration) -> Fleet {
    Fleet::start_with(Services::ALL, |c| {
        c.captioner.allow_private_urls = true;
        c.nats.max_ack_pending = 2;
        c.retry.fleet_max_delay_ms = fleet_max.as_millis() as u64;
    })
    .await
}

/// A job whose dataset is `url`, retried a day apart (as a tenant may ask).
fn failing_spec(url: &str) -> trainyard_proto::v1::JobSpec {
    let mut spec = spec("file:///unused", 10);
    spec.dataset = Some(DatasetSource {
        source: Some(Source::ZipUrl(url.into())),
    });
    spec.retry = Some(RetryPolicy {
        stages: vec![Stage::Prepare as i32],
        initial_delay_ms: 86_400_000,
        multiplier: 1.0,
        max_delay_ms: 86_400_000,
        max_attempts: 5,
        jitter: Some(0.0),
        non_retryable: Vec::new(),
    });
    spec
}

/// Whether a job has started training (or got further).
fn started(state: JobState) -> bool {
    matches!(
        state,
        JobState::Training | JobState::Delivering | JobState::Succeeded
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_jobs_of_one_tenant_do_not_starve_another() {
    // B must start before the first of A's retries is due (the fleet's
    // maximum after A's first failures); a retry held on the consumer
    // would keep B's task behind A's for at least that long.
    let fleet_max = Duration::from_secs(12);
    let bound = fleet_max - Duration::from_secs(2);
    let fleet = small_fleet(fleet_max).await;
    let server = failing_server().await;
    let mut tenant_a = fleet.client(TOKEN).await;
    let mut tenant_b = fleet.client(OTHER_TOKEN).await;

    let attackers = 6; // three times the consumer's max_ack_pending
    let mut a_jobs = Vec::new();
    for n in 0..attackers {
        let url = format!("{}/a{n}.zip", server.base);
        a_jobs.push(submit(&mut tenant_a, failing_spec(&url)).await.job_id);
    }
    let b_job = submit(&mut tenant_b, spec(&fleet.sample_uri().await, 10)).await;

    let reached = wait_for("B's job to start training", bound, || {
        let mut client = tenant_b.clone();
        let job = b_job.job_id.clone();
        async move {
            let record = get(&mut client, &job).await;
            started(record.state()).then_some(record.state())
        }
    })
    .await;
    assert!(started(reached));
    // Every one of A's jobs failed once and none is over: they are all
    // retrying while B runs.
    let fetched = server.requests.lock().unwrap().len();
    assert_eq!(fetched, attackers, "each of A's datasets was fetched");
    for job in &a_jobs {
        let record = get(&mut tenant_a, job).await;
        assert!(!record.state().is_final(), "{job}: {:?}", record.state());
    }
    // A's retries wait as schedules, not on the stage's consumer.
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let waiting = wait_for("A's retries to wait as schedules", bound, || {
        let js = js.clone();
        async move {
            let stream = js.get_stream(TASKS_STREAM).await.ok()?;
            let info = stream
                .info_with_subjects(subject::all_retries())
                .await
                .ok()?;
            let subjects: Vec<String> = info
                .filter_map(|s| async move { s.ok().map(|(subject, _)| subject) })
                .collect()
                .await;
            (subjects.len() == attackers).then_some(subjects)
        }
    })
    .await;
    assert!(
        waiting
            .iter()
            .all(|s| s.starts_with("ty.retry.prepare.acme."))
    );
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(TASKS_STREAM)
        .await
        .unwrap()
        .get_consumer(&topology::consumer_name(Stage::Prepare, ""))
        .await
        .unwrap();
    let pending = consumer.info().await.unwrap().num_ack_pending;
    assert_eq!(pending, 0, "no retry holds a slot of the prepare consumer");

    // The tenant asked for a day and its server for an hour: each retry
    // comes at the fleet's maximum.
    let second = wait_for(
        "A's first retry",
        fleet_max + Duration::from_secs(20),
        || {
            let requests = server.requests.clone();
            async move {
                let requests = requests.lock().unwrap();
                requests
                    .values()
                    .find(|times| times.len() >= 2)
                    .map(|times| times[1] - times[0])
            }
        },
    )
    .await;
    assert!(second >= fleet_max - Duration::from_secs(1), "{second:?}");
    fleet.stop().await;
}
