//! The worker's observability, end to end with a real nats-server and real
//! reference-trainer children: a job whose first attempt runs out of memory
//! and whose retry succeeds leaves its trainer output in the store for both
//! attempts, `metric` events with the documented names, spans for the run,
//! the model and the checkpoint uploads at an OTLP receiver, model cache and
//! artifact byte counters on `/metrics`, and no per-job gauge once it ended.
//!
//! A binary of its own: the fleet runs in-process and records into this
//! process's global telemetry, which only the first `telemetry::init`
//! installs, so no other test may start a fleet (whose harness installs an
//! inert one) in this process first. (The trainer-log tests that once lived
//! here need no such thing: they are `tests/it/trainer_logs.rs`.)

use std::collections::BTreeMap;
use std::time::Duration;
use trainyard_core::config::TelemetryConfig;
use trainyard_proto::v1::{
    ExtraValue, JobState, RetryPolicy, Secrets, Stage, extra_value, job_event,
};
use trainyard_tests::otlp::OtlpReceiver;
use trainyard_tests::*;

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "hf_observability_secret_value";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a loopback port")
        .local_addr()
        .expect("addr")
        .port()
}

async fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    prom::scrape(addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_job_leaves_logs_metrics_events_and_spans() {
    let receiver = OtlpReceiver::start().await;
    // This process's telemetry, as the worker binary's would be: OTLP to
    // the receiver and a scrape endpoint. The fleet runs in-process, so it
    // records into it.
    let port = free_port();
    let telemetry = trainyard_core::telemetry::init(
        "ty-worker",
        &TelemetryConfig {
            otlp_endpoint: receiver.endpoint(),
            metrics_port: port,
            metrics_host: "127.0.0.1".into(),
            ..Default::default()
        },
    )
    .expect("telemetry");
    let addr = telemetry.metrics_addr().expect("scrape endpoint");

    let fleet = Fleet::start_with(Services::ALL, |c| {
        c.worker.metric_events_per_second = 0;
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 60);
    let training = spec.training.as_mut().unwrap();
    training.batch_size = 4;
    training.save_every = 5;
    // Out of memory at step 8 at batch size 4: attempt 1 fails after the
    // checkpoint of step 5; attempt 2 runs lighter and finishes.
    for (key, v) in [("fault_oom_at_step", 8), ("fault_oom_min_batch_size", 4)] {
        training.extras.insert(
            key.into(),
            ExtraValue {
                kind: Some(extra_value::Kind::Int(v)),
            },
        );
    }
    spec.secrets = Some(Secrets {
        hf_token: SECRET.into(),
        ..Default::default()
    });
    spec.retry = Some(RetryPolicy {
        stages: vec![Stage::Train as i32],
        initial_delay_ms: 200,
        multiplier: 1.0,
        max_attempts: 3,
        jitter: Some(0.0),
        ..Default::default()
    });
    let job = submit(&mut client, spec).await;
    let job_id = job.job_id.clone();

    // While the job trains, its gauges are on the endpoint.
    let watching = {
        let mut client = fleet.client(TOKEN).await;
        let job_id = job_id.clone();
        tokio::spawn(async move { watch_all(&mut client, &job_id, Duration::from_secs(180)).await })
    };
    let during = wait_for("the job's step gauge", Duration::from_secs(120), || async {
        let s = scrape(addr).await;
        prom::value(&s, "trainyard_job_step", &[("job_id", job_id.as_str())]).map(|step| (s, step))
    })
    .await;
    let (during, step) = during;
    assert!(step >= 1.0, "step {step}");
    assert_eq!(
        prom::value(&during, "trainyard_job_total_steps", &[("job_id", &job_id)]),
        Some(60.0)
    );
    let row = during
        .samples
        .iter()
        .find(|s| s.metric == "trainyard_job_step" && s.labels.get("job_id") == Some(&job_id))
        .unwrap();
    assert_eq!(
        (row.labels.get("tenant"), row.labels.get("backend")),
        (Some("acme"), Some("reference"))
    );

    let events = watching.await.unwrap();
    let record = get(&mut client, &job_id).await;
    assert_eq!(record.state(), JobState::Succeeded, "{:?}", record.error);
    assert_eq!(record.adjustments, ["oom: batch_size 4 → 2"]);

    // Metric events: the documented names, at most one per metric and
    // step, and each series ends on the last step.
    let mut series: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for event in &events {
        if let Some(job_event::Kind::Metric(m)) = &event.kind {
            assert!(m.value.is_finite(), "{m:?}");
            series.entry(m.name.clone()).or_default().push(m.step);
        }
    }
    let names: Vec<&str> = series.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["epoch", "learning_rate", "loss", "samples_per_second"],
        "metric event names"
    );
    for (name, steps) in &series {
        assert_eq!(steps.last(), Some(&60), "{name} ends on the last step");
        // Attempt 2 starts over from the checkpoint: per attempt, no step twice.
        let restart = steps.windows(2).position(|w| w[1] <= w[0]);
        let (first, second) = steps.split_at(restart.map_or(steps.len(), |i| i + 1));
        for part in [first, second] {
            assert!(part.windows(2).all(|w| w[0] < w[1]), "{name}: {steps:?}");
        }
        assert!(restart.is_some(), "{name}: two attempts in {steps:?}");
    }

    // The trainer's output of both runs, in the store (a transient failure
    // is retried as the same attempt, delivered again).
    let logs: Vec<String> = fleet
        .store
        .list(&format!("tenants/acme/jobs/{job_id}/logs"))
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        logs,
        [
            format!("tenants/acme/jobs/{job_id}/logs/train-attempt-1-delivery-1.log"),
            format!("tenants/acme/jobs/{job_id}/logs/train-attempt-1-delivery-2.log")
        ]
    );
    let text = |key: &str| {
        let store = fleet.store.clone();
        let key = key.to_string();
        async move { String::from_utf8(store.get_bytes(&key).await.unwrap().to_vec()).unwrap() }
    };
    let failed = text(&logs[0]).await;
    assert!(
        failed.contains("CUDA out of memory"),
        "stderr of the failed attempt: {failed}"
    );
    assert!(
        failed.contains("ty-progress step=7 "),
        "stdout of the failed attempt: {failed}"
    );
    let succeeded = text(&logs[1]).await;
    assert!(
        succeeded.contains("ty-progress step=60 ") && !succeeded.contains("out of memory"),
        "{succeeded}"
    );
    assert!(!failed.contains(SECRET) && !succeeded.contains(SECRET));
    // Where they are is said in the job's log events.
    let notes: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(job_event::Kind::Log(l)) if l.stream == "worker" => Some(l.line.as_str()),
            _ => None,
        })
        .filter(|l| l.starts_with("trainer output stored at "))
        .collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[1].contains(&fleet.store.uri(&logs[1])), "{notes:?}");

    // Counters on /metrics; the job's gauges are gone.
    let after = scrape(addr).await;
    for (name, labels) in [
        ("trainyard_model_cache_misses_total", &[][..]),
        ("trainyard_model_cache_hits_total", &[][..]),
        ("trainyard_model_cache_fetched_bytes_total", &[][..]),
        ("trainyard_model_cache_size_bytes", &[][..]),
        (
            "trainyard_artifact_uploaded_bytes_total",
            &[("stage", "train")][..],
        ),
        (
            "trainyard_artifact_downloaded_bytes_total",
            &[("stage", "train")][..],
        ),
    ] {
        let v = prom::value(&after, name, labels).unwrap_or_else(|| panic!("{name} is scraped"));
        assert!(v > 0.0, "{name} = {v}");
    }
    assert!(
        !after
            .samples
            .iter()
            .any(|s| s.metric.starts_with("trainyard_job_")
                && s.labels.get("job_id") == Some(&job_id)),
        "the job's gauges are gone"
    );
    // No GPU here: no GPU series at all.
    assert!(
        !after
            .samples
            .iter()
            .any(|s| s.metric.starts_with("trainyard_gpu_"))
    );

    // Spans of the worker's steps, with the job id.
    telemetry.flush().await;
    let of_job = |s: &trainyard_tests::otlp::ReceivedSpan, name: &str| {
        s.name == name && s.attr("trainyard.job.id") == Some(job_id.as_str())
    };
    let spans = receiver
        .wait_for_spans(WAIT, |spans| {
            spans.iter().filter(|s| of_job(s, "train.run")).count() == 2
                && spans.iter().any(|s| of_job(s, "train.checkpoint.upload"))
                && spans.iter().any(|s| of_job(s, "train.adapter.upload"))
                && spans
                    .iter()
                    .filter(|s| of_job(s, "train.log.upload"))
                    .count()
                    == 2
        })
        .await;
    let runs: Vec<_> = spans.iter().filter(|s| of_job(s, "train.run")).collect();
    assert!(runs.iter().all(|r| r.attr("backend") == Some("reference")));
    assert!(
        runs.iter().any(|r| r.attr("resume_step") == Some("5")),
        "the retry resumed step 5: {runs:#?}"
    );
    let upload = spans
        .iter()
        .find(|s| of_job(s, "train.checkpoint.upload") && s.attr("step") == Some("5"))
        .expect("the upload of step 5");
    assert!(
        upload
            .attr("bytes")
            .is_some_and(|b| b.parse::<u64>().unwrap() > 0)
    );
    assert!(
        runs.iter()
            .any(|r| Some(&r.span_id) == upload.parent_span_id.as_ref()),
        "a checkpoint upload is a child of its run"
    );
    let models: Vec<Option<&str>> = spans
        .iter()
        .filter(|s| of_job(s, "train.model"))
        .map(|s| s.attr("cache"))
        .collect();
    assert_eq!(
        models,
        [Some("miss"), Some("hit")],
        "model cache of attempts 1 and 2"
    );
    // Nothing secret or signed travels in the spans.
    for span in &spans {
        for (key, value) in &span.attributes {
            assert!(
                !value.contains(SECRET) && !value.contains("X-Amz-") && !key.contains("token"),
                "{key}={value} in {}",
                span.name
            );
        }
    }

    fleet.stop().await;
    telemetry.shutdown().await;
}
