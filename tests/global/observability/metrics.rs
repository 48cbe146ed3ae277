//! The coordinator's metrics: GetMetrics returns a job's series, the job
//! counters count each job once, and the backlog and dead-letter gauges
//! follow JetStream. Each test runs alone (the parent's [`alone`]), under
//! its path in this binary.

use super::*;

async fn publish_event(js: &jetstream::Context, tenant: &str, job: &str, at_ms: i64, kind: Kind) {
    let (t, j) = (TenantId::parse(tenant).unwrap(), JobId::parse(job).unwrap());
    let event_kind = match kind {
        Kind::Metric(_) => EventKind::Metric,
        _ => EventKind::Progress,
    };
    let event = JobEvent {
        job_id: job.to_string(),
        tenant: tenant.to_string(),
        at_ms,
        kind: Some(kind),
    };
    js.publish(
        subject::event(&t, &j, event_kind),
        event.encode_to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

fn metric(name: &str, step: u32, value: f64) -> Kind {
    Kind::Metric(Metric {
        name: name.into(),
        value,
        step,
    })
}

/// GetMetrics returns one series per name from the job's metric events, in
/// order, over gRPC and NATS; another tenant's job is not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_metrics_returns_a_jobs_series() {
    if !alone("metrics::get_metrics_returns_a_jobs_series").await {
        return;
    }
    shared();
    let fleet = coordinator_fleet("plots", |_| {}).await;
    let mut client = fleet.client("token-plots").await;
    let job = submit(&mut client, spec(&fleet.sample_uri_for("plots").await, 5)).await;
    let other = submit(&mut client, spec(&fleet.sample_uri_for("plots").await, 5)).await;
    let js = jetstream::new(fleet.nats_client().await);
    for step in 1..=3u32 {
        let at = 1_000 * i64::from(step);
        publish_event(
            &js,
            "plots",
            &job.job_id,
            at,
            metric("loss", step, 1.0 / f64::from(step)),
        )
        .await;
        publish_event(
            &js,
            "plots",
            &job.job_id,
            at,
            metric("learning_rate", step, 0.002),
        )
        .await;
        // Progress events are not metric points.
        let progress = Kind::Progress(Progress {
            stage: Stage::Train as i32,
            step,
            total_steps: 3,
            ..Default::default()
        });
        publish_event(&js, "plots", &job.job_id, at, progress).await;
    }
    // Another job's metrics stay out.
    publish_event(&js, "plots", &other.job_id, 1, metric("loss", 1, 9.0)).await;

    let reply = client
        .get_metrics(GetMetricsRequest {
            job_id: job.job_id.clone(),
            names: vec![],
        })
        .await
        .expect("get metrics")
        .into_inner();
    assert!(!reply.truncated);
    let series: BTreeMap<&str, Vec<(u32, f64, i64)>> = reply
        .series
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.points
                    .iter()
                    .map(|p| (p.step, p.value, p.at_ms))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        reply
            .series
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["learning_rate", "loss"],
        "sorted by name"
    );
    assert_eq!(
        series["loss"],
        [(1, 1.0, 1_000), (2, 0.5, 2_000), (3, 1.0 / 3.0, 3_000)]
    );
    assert_eq!(series["learning_rate"].len(), 3);

    // A names filter.
    let only = client
        .get_metrics(GetMetricsRequest {
            job_id: job.job_id.clone(),
            names: vec!["learning_rate".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only.series.len(), 1);
    assert_eq!(only.series[0].name, "learning_rate");

    // A job without metric events has no series (and the call returns).
    let third = submit(&mut client, spec(&fleet.sample_uri_for("plots").await, 5)).await;
    let none = client
        .get_metrics(GetMetricsRequest {
            job_id: third.job_id.clone(),
            names: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.series.is_empty());

    // Isolation and bad input.
    let mut stranger = fleet.client(OTHER_TOKEN).await;
    let status = stranger
        .get_metrics(GetMetricsRequest {
            job_id: job.job_id.clone(),
            names: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = client
        .get_metrics(GetMetricsRequest {
            job_id: "../etc".into(),
            names: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = client
        .get_metrics(GetMetricsRequest {
            job_id: JobId::generate().to_string(),
            names: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    // The same over the NATS API.
    let nats = fleet.nats_client().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(AUTH_HEADER, "Bearer token-plots");
    let reply = nats
        .request_with_headers(
            subject::api(ApiOp::GetMetrics),
            headers,
            GetMetricsRequest {
                job_id: job.job_id.clone(),
                names: vec!["loss".into()],
            }
            .encode_to_vec()
            .into(),
        )
        .await
        .expect("api reply");
    match ApiReply::decode(reply.payload).unwrap().result {
        Some(api_reply::Result::Metrics(GetMetricsResponse { series, .. })) => {
            assert_eq!(series.len(), 1);
            assert_eq!(series[0].points.len(), 3);
        }
        other => panic!("a metrics reply, got {other:?}"),
    }
    fleet.stop().await;
}

/// A new job counts as submitted once (an idempotent replay does not), and
/// as finished once, by its final state, from the transition that ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_counted_once_when_submitted_and_when_finished() {
    if !alone("metrics::jobs_are_counted_once_when_submitted_and_when_finished").await {
        return;
    }
    shared();
    let fleet = coordinator_fleet("counted", |_| {}).await;
    let mut client = fleet.client("token-counted").await;
    let mut first = spec(&fleet.sample_uri_for("counted").await, 5);
    first.idempotency_key = "once".into();
    let job = submit(&mut client, first.clone()).await;
    let replay = client
        .submit(SubmitRequest { spec: Some(first) })
        .await
        .unwrap()
        .into_inner();
    assert!(replay.duplicate);
    let submitted = [("tenant", "counted"), ("backend", "reference")];
    until_scraped("trainyard_jobs_submitted_total", &submitted, Some(1.0)).await;

    for _ in 0..2 {
        let cancelled = client
            .cancel(CancelRequest {
                job_id: job.job_id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_eq!(cancelled.state(), JobState::Cancelled);
    }
    let finished = [
        ("tenant", "counted"),
        ("backend", "reference"),
        ("state", "cancelled"),
    ];
    until_scraped("trainyard_jobs_finished_total", &finished, Some(1.0)).await;
    let now = scrape().await;
    assert_eq!(
        prom::value(&now, "trainyard_jobs_finished_total", &finished),
        Some(1.0)
    );
    assert_eq!(
        prom::value(&now, "trainyard_jobs_submitted_total", &submitted),
        Some(1.0)
    );
    fleet.stop().await;
}

/// The whole pipeline: a job's metric series come back from GetMetrics
/// (the reference trainer reports loss, learning rate and throughput), and
/// the job counts as succeeded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_jobs_metrics_and_counters() {
    if !alone("metrics::a_finished_jobs_metrics_and_counters").await {
        return;
    }
    shared();
    let fleet = Fleet::start_with(Services::ALL, |config| {
        config
            .coordinator
            .tokens
            .insert(token_key("token-e2e"), "e2e".into());
    })
    .await;
    let mut client = fleet.client("token-e2e").await;
    let job = submit(&mut client, spec(&fleet.sample_uri_for("e2e").await, 20)).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    assert!(
        events.iter().any(|e| matches!(&e.kind,
            Some(Kind::State(s)) if s.state() == JobState::Succeeded)),
        "the job succeeded"
    );
    let reply = client
        .get_metrics(GetMetricsRequest {
            job_id: job.job_id.clone(),
            names: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = reply.series.iter().map(|s| s.name.as_str()).collect();
    for name in ["loss", "learning_rate"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let loss = reply.series.iter().find(|s| s.name == "loss").unwrap();
    assert!(!loss.points.is_empty());
    assert!(loss.points.windows(2).all(|w| w[0].step <= w[1].step));
    assert_eq!(loss.points.last().unwrap().step, 20);
    assert!(
        loss.points
            .iter()
            .all(|p| p.value.is_finite() && p.at_ms > 0)
    );

    until_scraped(
        "trainyard_jobs_finished_total",
        &[
            ("tenant", "e2e"),
            ("backend", "reference"),
            ("state", "succeeded"),
        ],
        Some(1.0),
    )
    .await;
    until_scraped(
        "trainyard_jobs_submitted_total",
        &[("tenant", "e2e"), ("backend", "reference")],
        Some(1.0),
    )
    .await;
    fleet.stop().await;
}

/// The backlog gauge shows the tasks a stage's consumer has not taken (and
/// those of a pool no worker serves yet); the DLQ gauge the dead letters
/// per stage; a consumer that is gone, with its tasks, is cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_and_dlq_gauges_follow_jetstream() {
    if !alone("metrics::backlog_and_dlq_gauges_follow_jetstream").await {
        return;
    }
    shared();
    let fleet = coordinator_fleet("backlog", |config| {
        config.coordinator.backlog_interval_secs = 1;
    })
    .await;
    let js = jetstream::new(fleet.nats_client().await);
    // A worker of pool "q1" opened its consumer and took nothing yet.
    topology::task_consumer(&js, Stage::Train, "q1", &fleet.config.nats)
        .await
        .expect("consumer");
    for i in 0..3 {
        js.publish(subject::task(Stage::Train, "q1"), format!("t{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // Pool "q2" has tasks and no consumer.
    for i in 0..2 {
        js.publish(subject::task(Stage::Train, "q2"), format!("u{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    js.publish(subject::dlq(Stage::Deliver), "dead".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let backlog = "trainyard_stage_backlog";
    let q1 = |state| [("stage", "train"), ("pool", "q1"), ("state", state)];
    until_scraped(backlog, &q1("pending"), Some(3.0)).await;
    until_scraped(backlog, &q1("ack_pending"), Some(0.0)).await;
    let q2 = [("stage", "train"), ("pool", "q2"), ("state", "pending")];
    until_scraped(backlog, &q2, Some(2.0)).await;
    until_scraped("trainyard_dlq_depth", &[("stage", "deliver")], Some(1.0)).await;
    until_scraped("trainyard_dlq_depth", &[("stage", "train")], Some(0.0)).await;

    // One task taken and not acked yet: pending 2, ack pending 1.
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(topology::TASKS_STREAM)
        .await
        .unwrap()
        .get_consumer(&topology::consumer_name(Stage::Train, "q1"))
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let _held = batch.next().await.expect("a task").expect("a message");
    until_scraped(backlog, &q1("pending"), Some(2.0)).await;
    until_scraped(backlog, &q1("ack_pending"), Some(1.0)).await;

    // The consumer is removed and its tasks purged: the series goes.
    let stream = js.get_stream(topology::TASKS_STREAM).await.unwrap();
    stream
        .delete_consumer(&topology::consumer_name(Stage::Train, "q1"))
        .await
        .unwrap();
    stream
        .purge()
        .filter(subject::task(Stage::Train, "q1"))
        .await
        .unwrap();
    until_scraped(backlog, &q1("pending"), None).await;
    until_scraped(backlog, &q2, Some(2.0)).await;
    fleet.stop().await;
}
