//! Telemetry end to end: spans cross a real nats-server in W3C headers and
//! reach an OTLP receiver as one trace; the Prometheus endpoint serves the
//! metric catalog over HTTP; OTLP metric export reaches the receiver.

use futures::StreamExt;
use opentelemetry::trace::TraceContextExt;
use std::path::Path;
use std::time::Duration;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use trainyard_core::telemetry::propagation::{
    JobAttrs, inject_current_nats, inject_nats, process_span, send_span,
};
use trainyard_core::telemetry::{Telemetry, TelemetrySettings, metrics};
use trainyard_natsd::{NatsServer, find_nats_server};
use trainyard_tests::otlp::{OtlpReceiver, ReceivedSpan};
use trainyard_tests::prom;

const WAIT: Duration = Duration::from_secs(20);

fn settings(service: &str, env: &[(&str, String)]) -> TelemetrySettings {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    TelemetrySettings::resolve(service, &Default::default(), &env).expect("settings")
}

fn nats() -> (tempfile::TempDir, NatsServer) {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let binary = find_nats_server(root).expect("nats-server");
    let server = NatsServer::start(&binary, &dir.path().join("nats")).expect("nats-server starts");
    (dir, server)
}

fn by_name<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one span named {name:?} in {spans:#?}");
    found[0]
}

/// The coordinator-side service submits and publishes a task; the captioner
/// side handles it and publishes a result; the coordinator side handles the
/// result. Two telemetry pipelines (two service names), one nats-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_one_trace_across_nats() {
    let receiver = OtlpReceiver::start().await;
    let (_dir, server) = nats();
    let otlp = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let (front, front_dispatch) = Telemetry::start(&settings("ty-coordinator", &otlp)).unwrap();
    let (back, back_dispatch) = Telemetry::start(&settings("ty-captioner", &otlp)).unwrap();
    assert!(front.tracing_enabled() && back.tracing_enabled());

    let client = async_nats::connect(server.url()).await.unwrap();
    let mut tasks = client.subscribe("ty.task.prepare").await.unwrap();
    let mut results = client.subscribe("ty.result.prepare").await.unwrap();
    client.flush().await.unwrap();
    let job = JobAttrs {
        job_id: Some("job-1"),
        tenant: Some("acme"),
        stage: Some("prepare"),
        attempt: Some(1),
    };

    // Captioner side: handle one task, publish its result.
    let captioner = {
        let client = client.clone();
        async move {
            let msg = tasks.next().await.expect("a task");
            assert!(
                msg.headers
                    .as_ref()
                    .is_some_and(|h| h.get("traceparent").is_some())
            );
            let span = process_span(msg.headers.as_ref(), "ty.task.prepare", job);
            async {
                tracing::info_span!("caption").in_scope(|| tracing::info!("captioned"));
                let publish = send_span("ty.result.prepare", job);
                let mut headers = async_nats::HeaderMap::new();
                inject_nats(&publish.context(), &mut headers);
                client
                    .publish_with_headers("ty.result.prepare", headers, "done".into())
                    .instrument(publish)
                    .await
                    .unwrap();
                client.flush().await.unwrap();
            }
            .instrument(span)
            .await;
        }
        .with_subscriber(back_dispatch)
    };
    let captioner = tokio::spawn(captioner);

    // Coordinator side: submit, publish the task, then handle the result.
    let trace_id = async {
        let submit = tracing::info_span!("submit", otel.kind = "server");
        let trace_id = submit.context().span().span_context().trace_id();
        async {
            let publish = send_span("ty.task.prepare", job);
            let mut headers = async_nats::HeaderMap::new();
            async {
                inject_current_nats(&mut headers);
                client
                    .publish_with_headers("ty.task.prepare", headers, "task".into())
                    .await
                    .unwrap();
            }
            .instrument(publish)
            .await;
        }
        .instrument(submit)
        .await;
        let msg = results.next().await.expect("a result");
        let span = process_span(msg.headers.as_ref(), "ty.result.prepare", job);
        span.in_scope(|| tracing::info!("result admitted"));
        trace_id
    }
    .with_subscriber(front_dispatch)
    .await;
    tokio::time::timeout(WAIT, captioner)
        .await
        .expect("captioner finished")
        .unwrap();

    front.flush().await;
    back.flush().await;
    let spans = receiver.wait_for_spans(WAIT, |s| s.len() >= 6).await;
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let trace = trace_id.to_string();
    assert!(
        spans.iter().all(|s| s.trace_id == trace),
        "one trace: {spans:#?}"
    );

    let submit = by_name(&spans, "submit");
    let send_task = by_name(&spans, "publish ty.task.prepare");
    let process_task = by_name(&spans, "process ty.task.prepare");
    let caption = by_name(&spans, "caption");
    let send_result = by_name(&spans, "publish ty.result.prepare");
    let process_result = by_name(&spans, "process ty.result.prepare");

    assert_eq!(submit.parent_span_id, None);
    let parent = |child: &ReceivedSpan, parent: &ReceivedSpan| {
        assert_eq!(
            child.parent_span_id.as_deref(),
            Some(parent.span_id.as_str()),
            "{} is a child of {}",
            child.name,
            parent.name
        );
    };
    parent(send_task, submit);
    parent(process_task, send_task);
    parent(caption, process_task);
    parent(send_result, process_task);
    parent(process_result, send_result);

    for s in [submit, send_task, process_result] {
        assert_eq!(s.service, "ty-coordinator", "{}", s.name);
    }
    for s in [process_task, caption, send_result] {
        assert_eq!(s.service, "ty-captioner", "{}", s.name);
    }
    // Semantic conventions and job attributes.
    const PRODUCER: i32 = 4;
    const CONSUMER: i32 = 5;
    assert_eq!(send_task.kind, PRODUCER);
    assert_eq!(process_task.kind, CONSUMER);
    for s in [send_task, process_task, send_result, process_result] {
        assert_eq!(s.attr("messaging.system"), Some("nats"), "{}", s.name);
        assert_eq!(s.attr("trainyard.job.id"), Some("job-1"));
        assert_eq!(s.attr("trainyard.tenant"), Some("acme"));
        assert_eq!(s.attr("trainyard.stage"), Some("prepare"));
        assert_eq!(s.attr("trainyard.attempt"), Some("1"));
    }
    assert_eq!(
        send_task.attr("messaging.destination.name"),
        Some("ty.task.prepare")
    );
    assert_eq!(send_task.attr("messaging.operation.type"), Some("send"));
    assert_eq!(
        process_task.attr("messaging.operation.type"),
        Some("process")
    );

    front.shutdown().await;
    back.shutdown().await;
}

/// Without an endpoint nothing is exported, but the trace context still
/// travels in headers (a service without an exporter must not cut the job's
/// trace for those that export); `OTEL_SDK_DISABLED=true` turns both off.
#[tokio::test]
async fn without_an_endpoint_context_travels_but_nothing_is_exported() {
    async fn headers(env: &[(&str, String)]) -> (bool, async_nats::HeaderMap) {
        let (telemetry, dispatch) = Telemetry::start(&settings("ty-worker", env)).unwrap();
        assert_eq!(telemetry.metrics_addr(), None);
        let headers = async {
            let span = send_span("ty.task.deliver", JobAttrs::default());
            let _in = span.enter();
            let mut headers = async_nats::HeaderMap::new();
            inject_current_nats(&mut headers);
            headers
        }
        .with_subscriber(dispatch)
        .await;
        (telemetry.tracing_enabled(), headers)
    }
    let (exporting, sent) = headers(&[]).await;
    assert!(!exporting);
    let traceparent = sent
        .get("traceparent")
        .expect("context travels")
        .to_string();
    assert!(
        traceparent.starts_with("00-") && traceparent.ends_with("-01"),
        "{traceparent}"
    );
    let (exporting, sent) = headers(&[("OTEL_SDK_DISABLED", "true".into())]).await;
    assert!(!exporting);
    assert!(sent.is_empty());
}

fn sample_value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    prom::value(scrape, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} is scraped"))
}

/// Scrapes `/metrics` over HTTP and parses it with a Prometheus parser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_endpoint_serves_the_catalog() {
    let mut s = settings("ty-worker", &[]);
    s.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let (telemetry, _dispatch) = Telemetry::start(&s).unwrap();
    let addr = telemetry.metrics_addr().expect("listening");
    let m = telemetry.metrics();
    m.job_submitted("acme", "reference");
    m.stage_finished("train", "a100", "ok", Duration::from_secs(90));
    m.stage_finished("train", "a100", "ok", Duration::from_secs(30));
    m.set_backlog("train", "a100", 3, 1);
    m.job_progress(
        "job-9",
        metrics::JobProgress {
            tenant: "acme".into(),
            backend: "reference".into(),
            step: 40,
            total_steps: 100,
            loss: Some(0.25),
            learning_rate: Some(2e-4),
            samples_per_second: Some(8.0),
            reported_at: 1_700_000_000.0,
        },
    );

    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert!(response.status().is_success());
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let body = response.text().await.unwrap();
    let scrape = prom::parse(&body);

    assert_eq!(
        sample_value(
            &scrape,
            "trainyard_jobs_submitted_total",
            &[("tenant", "acme")]
        ),
        1.0
    );
    assert_eq!(
        sample_value(
            &scrape,
            "trainyard_stage_duration_seconds",
            &[("stage", "train")]
        ),
        2.0
    );
    assert_eq!(
        sample_value(
            &scrape,
            "trainyard_stage_backlog",
            &[("pool", "a100"), ("state", "pending")]
        ),
        3.0
    );
    assert_eq!(
        sample_value(&scrape, "trainyard_job_step", &[("job_id", "job-9")]),
        40.0
    );
    assert_eq!(
        sample_value(&scrape, "trainyard_job_total_steps", &[("job_id", "job-9")]),
        100.0
    );
    assert_eq!(
        sample_value(
            &scrape,
            "trainyard_job_samples_per_second",
            &[("job_id", "job-9")]
        ),
        8.0
    );
    // Every family on the endpoint is in the catalog.
    for sample in &scrape.samples {
        assert!(
            sample.metric == "target_info"
                || metrics::is_exported_series(&sample.metric)
                || metrics::CATALOG.iter().any(|d| d.name == sample.metric),
            "{} is not in the catalog",
            sample.metric
        );
    }
    // A finished job's series go away.
    m.job_ended("job-9");
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!body.contains("job-9"), "{body}");

    telemetry.shutdown().await;
    // The endpoint stops with the telemetry.
    assert!(
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .is_err()
    );
}

/// Metrics are pushed over OTLP when an endpoint is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reach_the_collector_over_otlp() {
    let receiver = OtlpReceiver::start().await;
    let s = settings(
        "ty-uploader",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200".to_string()),
        ],
    );
    let (telemetry, _dispatch) = Telemetry::start(&s).unwrap();
    telemetry.metrics().artifact_uploaded("deliver", 1234);
    let got = receiver
        .wait_for_metrics(WAIT, |m| {
            m.iter().any(|m| m.name == "trainyard.artifact.uploaded")
        })
        .await;
    let uploaded = got
        .iter()
        .find(|m| m.name == "trainyard.artifact.uploaded")
        .unwrap();
    assert_eq!(uploaded.service, "ty-uploader");
    assert_eq!(uploaded.unit, "By");
    telemetry.shutdown().await;
}

mod deploy_files;
