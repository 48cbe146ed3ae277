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
    Fleet::start_secured(Services::ALL, |c| {
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
    let b_job = submit(
        &mut tenant_b,
        spec(&fleet.sample_uri_for("globex").await, 10),
    )
    .await;

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

/// A fleet with only a coordinator: submitted jobs stay `QUEUED`.
async fn coordinator_with(quotas: impl FnOnce(&mut trainyard_core::config::QuotasConfig)) -> Fleet {
    Fleet::start_secured(
        Services {
            coordinator: true,
            ..Services::NONE
        },
        |c| quotas(&mut c.quotas),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_past_the_queued_quota_are_refused_with_resource_exhausted() {
    let fleet = coordinator_with(|q| {
        q.max_queued_jobs = 2;
        q.tenants.insert(
            "globex".into(),
            trainyard_core::config::TenantQuotas {
                max_queued_jobs: Some(3),
                ..Default::default()
            },
        );
    })
    .await;
    let dataset = fleet.sample_uri().await;
    let mut tenant_a = fleet.client(TOKEN).await;
    for _ in 0..2 {
        submit(&mut tenant_a, spec(&dataset, 10)).await;
    }
    let refused = tenant_a
        .submit(trainyard_proto::v1::SubmitRequest {
            spec: Some(spec(&dataset, 10)),
        })
        .await
        .expect_err("a third queued job is past acme's quota");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(!refused.message().is_empty(), "the reason is given");
    // Another tenant has its own count and its own limit.
    let mut tenant_b = fleet.client(OTHER_TOKEN).await;
    let dataset = fleet.sample_uri_for("globex").await;
    for _ in 0..3 {
        submit(&mut tenant_b, spec(&dataset, 10)).await;
    }
    let refused = tenant_b
        .submit(trainyard_proto::v1::SubmitRequest {
            spec: Some(spec(&dataset, 10)),
        })
        .await
        .expect_err("a fourth is past globex's own quota");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_the_running_quota_waits_queued_and_starts_when_a_slot_frees() {
    let fleet = Fleet::start_secured(Services::ALL, |c| c.quotas.max_running_jobs = 1).await;
    let dataset = fleet.sample_uri().await;
    let mut tenant_a = fleet.client(TOKEN).await;
    let first = submit(&mut tenant_a, spec(&dataset, 10)).await;
    let second = submit(&mut tenant_a, spec(&dataset, 10)).await;
    assert_eq!(second.state(), JobState::Queued);
    assert!(!second.quota_hold.is_empty(), "held by the running quota");
    // Another tenant is not held by acme's jobs.
    let mut tenant_b = fleet.client(OTHER_TOKEN).await;
    let other = submit(
        &mut tenant_b,
        spec(&fleet.sample_uri_for("globex").await, 10),
    )
    .await;
    assert!(other.quota_hold.is_empty());

    // While the first runs, the second waits QUEUED with no task.
    let mut watched = tenant_a.clone();
    let first_events = watch_all(&mut watched, &first.job_id, Duration::from_secs(120)).await;
    assert!(!first_events.is_empty());
    assert_eq!(
        get(&mut tenant_a, &first.job_id).await.state(),
        JobState::Succeeded
    );
    // The first's end frees the slot: the second starts and succeeds.
    watch_all(&mut tenant_a, &second.job_id, Duration::from_secs(120)).await;
    let second = get(&mut tenant_a, &second.job_id).await;
    assert_eq!(second.state(), JobState::Succeeded, "{:?}", second.error);
    assert!(second.quota_hold.is_empty());
    let times = second.times.unwrap();
    assert!(
        times.preparing_at_ms
            >= get(&mut tenant_a, &first.job_id)
                .await
                .times
                .unwrap()
                .finished_at_ms,
        "the second started only after the first ended"
    );
    watch_all(&mut tenant_b, &other.job_id, Duration::from_secs(120)).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_the_gpu_budget_waits_queued_and_does_not_fail() {
    // A budget of a few microseconds of GPU time: the first job's
    // training spends it.
    let fleet = Fleet::start_secured(Services::ALL, |c| {
        c.quotas.max_gpu_hours_per_day = 1e-9;
    })
    .await;
    let dataset = fleet.sample_uri().await;
    let mut tenant_a = fleet.client(TOKEN).await;
    let first = submit(&mut tenant_a, spec(&dataset, 10)).await;
    assert!(first.quota_hold.is_empty(), "nothing spent yet");
    watch_all(&mut tenant_a, &first.job_id, Duration::from_secs(120)).await;
    let first = get(&mut tenant_a, &first.job_id).await;
    assert_eq!(first.state(), JobState::Succeeded, "{:?}", first.error);
    let times = first.times.unwrap();
    assert!(
        times.delivering_at_ms > times.training_at_ms,
        "the first job trained for some time"
    );

    let second = submit(&mut tenant_a, spec(&dataset, 10)).await;
    assert_eq!(second.state(), JobState::Queued);
    assert!(
        second.quota_hold.starts_with("GPU budget spent:")
            && second.quota_hold.contains("GPU-hours in the last 24 h"),
        "{}",
        second.quota_hold
    );
    // Another tenant has its own budget: its job runs to the end while
    // acme's waits, across the reconciler's passes.
    let mut tenant_b = fleet.client(OTHER_TOKEN).await;
    let other = submit(
        &mut tenant_b,
        spec(&fleet.sample_uri_for("globex").await, 10),
    )
    .await;
    assert!(other.quota_hold.is_empty());
    watch_all(&mut tenant_b, &other.job_id, Duration::from_secs(120)).await;
    assert_eq!(
        get(&mut tenant_b, &other.job_id).await.state(),
        JobState::Succeeded
    );
    // A reconciler pass re-checks the window: still no room, nothing starts.
    let parts = fleet.coordinator_parts().await;
    let pass = parts.reconciler.pass(i64::MAX / 2).await.unwrap();
    assert_eq!(pass.started, 0, "{pass:?}");
    let second = get(&mut tenant_a, &second.job_id).await;
    assert_eq!(second.state(), JobState::Queued, "held, not failed");
    assert!(second.quota_hold.starts_with("GPU budget spent:"));
    assert!(second.error.is_none());
    fleet.stop().await;
}

/// The number of tasks in `TY_TASKS` on `subject`.
async fn tasks_on(js: &async_nats::jetstream::Context, subject: &str) -> u64 {
    let stream = js.get_stream(TASKS_STREAM).await.unwrap();
    let info = stream.info_with_subjects(subject).await.unwrap();
    info.filter_map(|s| async move { s.ok().map(|(_, n)| u64::try_from(n).unwrap_or(0)) })
        .collect::<Vec<u64>>()
        .await
        .iter()
        .sum()
}

/// A job's record once `check` holds for it.
async fn record_when(
    client: &trainyard_tests::Client,
    job: &str,
    what: &str,
    check: impl Fn(&trainyard_proto::v1::JobRecord) -> bool,
) -> trainyard_proto::v1::JobRecord {
    let check = &check;
    wait_for(what, Duration::from_secs(60), || {
        let mut client = client.clone();
        let job = job.to_string();
        async move {
            let record = get(&mut client, &job).await;
            check(&record).then_some(record)
        }
    })
    .await
}

/// A tenant with its pool's quota of training tasks out (one, in a pool
/// no worker serves, so it stays out) cannot take another of that pool's
/// GPUs: its next job there enters TRAINING without a task and spends no
/// GPU time; its job in another pool trains, another tenant's job in the
/// same pool is not held, and the held job gets its task when the
/// tenant's job there ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_pools_training_quota_waits_without_a_task_while_others_train() {
    let fleet = Fleet::start_secured(Services::ALL, |c| {
        c.quotas.max_running_tasks.train = Some(1);
    })
    .await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let idle_tasks = subject::task(Stage::Train, "idle");
    let dataset = fleet.sample_uri().await;
    let in_idle = |dataset: &str| {
        let mut spec = spec(dataset, 10);
        spec.pool = "idle".into();
        spec
    };
    let acme = fleet.client(TOKEN).await;
    let parked = submit(&mut acme.clone(), in_idle(&dataset)).await.job_id;
    record_when(&acme, &parked, "the first job to train", |r| {
        r.state() == JobState::Training
    })
    .await;
    let second = submit(&mut acme.clone(), in_idle(&dataset)).await.job_id;
    let held = record_when(&acme, &second, "the second job to reach training", |r| {
        r.state() == JobState::Training
    })
    .await;
    assert!(
        held.quota_hold.starts_with(
            "waiting for a task slot (train in pool idle): the tenant has 1 tasks there"
        ) && held
            .quota_hold
            .ends_with("(quotas.max_running_tasks.train)"),
        "{}",
        held.quota_hold
    );
    assert_eq!(
        held.times.as_ref().unwrap().training_at_ms,
        0,
        "no GPU time while held"
    );
    assert_eq!(
        tasks_on(&js, &idle_tasks).await,
        1,
        "only the first job's task is out"
    );

    // The quota is per pool: acme's job in the default pool trains to the end.
    let mut client = acme.clone();
    let elsewhere = submit(&mut client, spec(&dataset, 10)).await;
    watch_all(&mut client, &elsewhere.job_id, Duration::from_secs(120)).await;
    let elsewhere = get(&mut client, &elsewhere.job_id).await;
    assert_eq!(
        elsewhere.state(),
        JobState::Succeeded,
        "{:?}",
        elsewhere.error
    );
    // And per tenant: globex's job in the same pool gets its task.
    let globex = fleet.client(OTHER_TOKEN).await;
    let theirs = submit(
        &mut globex.clone(),
        in_idle(&fleet.sample_uri_for("globex").await),
    )
    .await
    .job_id;
    let theirs = record_when(&globex, &theirs, "globex's job to train", |r| {
        r.state() == JobState::Training
    })
    .await;
    assert!(theirs.quota_hold.is_empty(), "{}", theirs.quota_hold);
    assert_eq!(tasks_on(&js, &idle_tasks).await, 2);
    // Across a reconciler pass the held job stays held.
    let parts = fleet.coordinator_parts().await;
    let pass = parts
        .reconciler
        .pass(trainyard_core::now_ms())
        .await
        .unwrap();
    assert_eq!(pass.started, 0, "{pass:?}");
    assert!(!get(&mut client, &second).await.quota_hold.is_empty());

    // The first job ends: the held one gets the slot and its task.
    client
        .cancel(trainyard_proto::v1::CancelRequest {
            job_id: parked.clone(),
            reason: "test".into(),
        })
        .await
        .expect("cancel");
    let released = record_when(&acme, &second, "the held job's task", |r| {
        r.quota_hold.is_empty()
    })
    .await;
    assert_eq!(released.state(), JobState::Training);
    assert!(released.times.as_ref().unwrap().training_at_ms > 0);
    assert_eq!(tasks_on(&js, &idle_tasks).await, 3);
    fleet.stop().await;
}
