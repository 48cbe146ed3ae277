//! The coordinator's observability against a real nats-server and real gRPC
//! over loopback: its RPC and NATS API spans join the caller's trace, the
//! job's trace context is stored in the record and a reconciled task rejoins
//! it, GetMetrics returns a job's series, and the Prometheus endpoint shows
//! the job counters and the backlog and dead-letter gauges.
//!
//! Telemetry is process-wide (one global subscriber, one set of
//! instruments): every test first calls [`shared`], which installs it with
//! an OTLP receiver and a scrape endpoint on a runtime of its own. Each test
//! counts spans and series as if its fleet were the only one, so each runs
//! in a process of its own: nextest's, or under `cargo test` a child process
//! of this binary that runs that test alone ([`alone`]).

use async_nats::jetstream;
use futures::StreamExt;
use prost::Message;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use trainyard_core::auth::token_key;
use trainyard_core::config::TelemetryConfig;
use trainyard_core::telemetry::Telemetry;
use trainyard_core::topology::{self, AUTH_HEADER, ApiOp, EventKind, subject};
use trainyard_proto::v1::{
    ApiReply, CancelRequest, GetMetricsRequest, GetMetricsResponse, GetRequest, JobEvent,
    JobRecord, JobState, Metric, Progress, Stage, SubmitRequest, api_reply, job_event::Kind,
};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::otlp::{OtlpReceiver, ReceivedSpan};
use trainyard_tests::*;

const WAIT: Duration = Duration::from_secs(30);
/// A caller's trace context, as a client would send it.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const SERVER_SPAN_KIND: i32 = 2;

struct Shared {
    receiver: OtlpReceiver,
    telemetry: Telemetry,
    scrape: SocketAddr,
}

/// Installs this process's telemetry once: spans to an OTLP receiver,
/// metrics on a loopback scrape endpoint. Both live on a runtime of their
/// own, so they outlive any one test's runtime.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let receiver = OtlpReceiver::start().await;
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                let config = TelemetryConfig {
                    otlp_endpoint: receiver.endpoint(),
                    metrics_port: port,
                    metrics_host: "127.0.0.1".into(),
                    ..Default::default()
                };
                let telemetry =
                    trainyard_core::telemetry::init("ty-coordinator", &config).expect("telemetry");
                assert!(telemetry.tracing_enabled(), "telemetry installed first");
                let scrape = telemetry.metrics_addr().expect("scrape endpoint");
                tx.send(Shared {
                    receiver,
                    telemetry,
                    scrape,
                })
                .ok();
                std::future::pending::<()>().await;
            });
        });
        rx.recv().expect("telemetry started")
    })
}

/// Whether the calling test is to run here: true in a process of its own
/// (under nextest, or in the child below). Under `cargo test` this binary's
/// tests are threads of one process and would share the telemetry, so the
/// test runs this binary again with only itself, checks that it passed, and
/// returns false.
async fn alone(test: &str) -> bool {
    const CHILD: &str = "TY_TEST_ALONE";
    if std::env::var_os(CHILD).is_some()
        || std::env::var("NEXTEST_EXECUTION_MODE").is_ok_and(|m| m == "process-per-test")
    {
        return true;
    }
    let exe = std::env::current_exe().expect("this test binary");
    let out = tokio::process::Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .output()
        .await
        .expect("this test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(" 1 passed;"),
        "{test} failed in its own process:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// Exports the finished spans now and waits until `done` holds for them.
async fn spans_until(done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
    let shared = shared();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        shared.telemetry.flush().await;
        let spans = shared.receiver.spans();
        if done(&spans) {
            return spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans not received in time; got {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn the_span(spans: &[ReceivedSpan], pred: impl Fn(&ReceivedSpan) -> bool) -> &ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| pred(s)).collect();
    assert_eq!(found.len(), 1, "exactly one such span in {spans:#?}");
    found[0]
}

/// Scrapes this process's `/metrics`.
async fn scrape() -> prometheus_parse::Scrape {
    prom::scrape(shared().scrape).await
}

/// Waits until the scrape shows `name{labels}` at `want` (`None`: absent).
async fn until_scraped(name: &str, labels: &[(&str, &str)], want: Option<f64>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = prom::value(&scrape().await, name, labels);
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?}: want {want:?}, scraped {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request carrying the caller's trace context.
fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    request
}

/// A fleet with a coordinator only, a tenant of its own for exact counts.
async fn coordinator_fleet(tenant: &str, tweak: impl FnOnce(&mut trainyard_core::Config)) -> Fleet {
    let tenant = tenant.to_string();
    Fleet::start_with(
        Services {
            coordinator: true,
            ..Services::NONE
        },
        move |config| {
            config
                .coordinator
                .tokens
                .insert(token_key(&format!("token-{tenant}")), tenant.clone());
            tweak(config);
        },
    )
    .await
}

/// Every JobService call runs in a server span, a child of the caller's
/// span, with the RPC attributes and the job's; the task a submit publishes
/// continues the trace, and the record keeps its context. The NATS API does
/// the same with its request's headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_join_the_callers_trace() {
    if !alone("calls_join_the_callers_trace").await {
        return;
    }
    shared();
    let fleet = coordinator_fleet("spans", |_| {}).await;
    let mut client = fleet.client("token-spans").await;
    let submitted = client
        .submit(traced(SubmitRequest {
            spec: Some(spec(&fleet.sample_uri_for("spans").await, 5)),
        }))
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job");
    let job = submitted.job_id.clone();
    client
        .get(traced(GetRequest {
            job_id: job.clone(),
        }))
        .await
        .expect("get");
    // A failing call is traced too.
    let status = client
        .get(traced(GetRequest {
            job_id: "not a job".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Over NATS: a Get with the caller's context in its headers.
    let nats = fleet.nats_client().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(AUTH_HEADER, "Bearer token-spans");
    headers.insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").as_str(),
    );
    let reply = nats
        .request_with_headers(
            subject::api(ApiOp::Get),
            headers,
            GetRequest {
                job_id: job.clone(),
            }
            .encode_to_vec()
            .into(),
        )
        .await
        .expect("api reply");
    let reply = ApiReply::decode(reply.payload).expect("reply");
    assert!(matches!(reply.result, Some(api_reply::Result::Get(_))));

    let rpc = |method: &'static str| {
        move |s: &ReceivedSpan| s.name == format!("trainyard.v1.JobService/{method}")
    };
    let spans = spans_until(|spans| {
        spans.iter().filter(|s| rpc("Get")(s)).count() == 2
            && spans.iter().any(rpc("Submit"))
            && spans.iter().any(|s| s.name == "publish ty.task.prepare")
            && spans.iter().any(|s| s.name == "process ty.api.get")
    })
    .await;

    let submit = the_span(&spans, rpc("Submit"));
    assert_eq!(submit.trace_id, TRACE);
    assert_eq!(submit.parent_span_id.as_deref(), Some(CALLER_SPAN));
    assert_eq!(submit.kind, SERVER_SPAN_KIND);
    assert_eq!(submit.service, "ty-coordinator");
    assert_eq!(submit.attr("rpc.system"), Some("grpc"));
    assert_eq!(submit.attr("rpc.service"), Some("trainyard.v1.JobService"));
    assert_eq!(submit.attr("rpc.method"), Some("Submit"));
    assert_eq!(submit.attr("trainyard.tenant"), Some("spans"));
    assert_eq!(submit.attr("trainyard.job.id"), Some(job.as_str()));

    // The prepare task's publish is the submit's child, and the task
    // carries its context.
    let publish = the_span(&spans, |s| s.name == "publish ty.task.prepare");
    assert_eq!(publish.trace_id, TRACE);
    assert_eq!(
        publish.parent_span_id.as_deref(),
        Some(submit.span_id.as_str())
    );
    assert_eq!(publish.attr("trainyard.job.id"), Some(job.as_str()));
    assert_eq!(publish.attr("trainyard.stage"), Some("prepare"));
    assert_eq!(publish.attr("trainyard.attempt"), Some("1"));
    let js = jetstream::new(nats.clone());
    let task = js
        .get_stream(topology::TASKS_STREAM)
        .await
        .unwrap()
        .get_last_raw_message_by_subject("ty.task.prepare")
        .await
        .expect("the prepare task is queued");
    let traceparent = task.headers.get("traceparent").expect("task traceparent");
    assert_eq!(
        traceparent.as_str(),
        format!("00-{TRACE}-{}-01", publish.span_id)
    );

    // The record keeps the submit span's context.
    assert_eq!(
        submitted.trace_context,
        format!("00-{TRACE}-{}-01", submit.span_id)
    );

    let gets: Vec<_> = spans.iter().filter(|s| rpc("Get")(s)).collect();
    for get in &gets {
        assert_eq!(get.trace_id, TRACE);
        assert_eq!(get.parent_span_id.as_deref(), Some(CALLER_SPAN));
        assert_eq!(get.attr("trainyard.tenant"), Some("spans"));
    }
    assert_eq!(
        gets.iter()
            .filter(|s| s.attr("trainyard.job.id") == Some(job.as_str()))
            .count(),
        1,
        "the bad id is not recorded: {gets:#?}"
    );

    let api = the_span(&spans, |s| s.name == "process ty.api.get");
    assert_eq!(api.trace_id, TRACE);
    assert_eq!(api.parent_span_id.as_deref(), Some(CALLER_SPAN));
    assert_eq!(api.attr("messaging.system"), Some("nats"));
    assert_eq!(api.attr("messaging.destination.name"), Some("ty.api.get"));
    assert_eq!(api.attr("trainyard.job.id"), Some(job.as_str()));
    assert_eq!(api.attr("trainyard.tenant"), Some("spans"));
    fleet.stop().await;
}

/// A task the reconciler publishes again, with no message to answer, is
/// sent under the trace context stored in the record: it rejoins the job's
/// trace. So does the cancel message of a job failed past its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciled_task_rejoins_the_jobs_trace() {
    if !alone("a_reconciled_task_rejoins_the_jobs_trace").await {
        return;
    }
    shared();
    let fleet = Fleet::start_with(Services::NONE, |_| {}).await;
    let parts = fleet.coordinator_parts().await;
    let spec = trainyard_coordinator::validate::normalise(spec(&fleet.sample_uri().await, 5))
        .expect("valid spec");
    let job = JobId::generate();
    let stored_span = "1111222233334444";
    let (record, _effects_never_run) = trainyard_coordinator::job::submitted(
        JobRecord {
            job_id: job.to_string(),
            tenant: "acme".into(),
            spec: Some(spec),
            trace_context: format!("00-{TRACE}-{stored_span}-01\nvendor=x1"),
            ..Default::default()
        },
        trainyard_core::now_ms(),
    );
    // What a coordinator that died after storing the record leaves: no task.
    parts.repo.create(&record).await.expect("record stored");

    // A second job of another trace, past its deadline: the reconciler
    // fails it and sends its cancel message under that trace.
    let late_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut late_spec = record.spec.clone().unwrap();
    late_spec.timeout_secs = 1;
    let late = JobId::generate();
    let (late_record, _) = trainyard_coordinator::job::submitted(
        JobRecord {
            job_id: late.to_string(),
            tenant: "acme".into(),
            spec: Some(late_spec),
            trace_context: format!("00-{late_trace}-{stored_span}-01"),
            ..Default::default()
        },
        trainyard_core::now_ms() - 10_000,
    );
    parts
        .repo
        .create(&late_record)
        .await
        .expect("record stored");
    let mut cancels = parts.nats.subscribe(subject::cancel(&late)).await.unwrap();
    parts.nats.flush().await.unwrap();

    let pass = parts.reconciler.pass(0).await.expect("pass");
    assert_eq!((pass.republished, pass.failed), (1, 1));
    let cancel = tokio::time::timeout(WAIT, cancels.next())
        .await
        .expect("a cancel message in time")
        .expect("a cancel message");
    let traceparent = cancel
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .expect("the cancel message carries a traceparent");
    assert_eq!(
        traceparent.as_str().split('-').nth(1),
        Some(late_trace),
        "{traceparent:?}"
    );

    let task = parts
        .js
        .get_stream(topology::TASKS_STREAM)
        .await
        .unwrap()
        .get_last_raw_message_by_subject("ty.task.prepare")
        .await
        .expect("the task is published again");
    let traceparent = task.headers.get("traceparent").expect("traceparent");
    let parts_of: Vec<&str> = traceparent.as_str().split('-').collect();
    assert_eq!(parts_of[1], TRACE, "the stored trace: {traceparent:?}");
    assert_ne!(parts_of[2], stored_span, "a new span of that trace");
    assert_eq!(
        task.headers.get("tracestate").map(|v| v.as_str()),
        Some("vendor=x1")
    );

    let spans = spans_until(|spans| {
        spans
            .iter()
            .any(|s| s.name == "reconcile republish" && s.trace_id == TRACE)
            && spans
                .iter()
                .any(|s| s.name == "publish ty.task.prepare" && s.trace_id == TRACE)
            && spans.iter().any(|s| s.name == "reconcile deadline")
    })
    .await;
    let deadline = the_span(&spans, |s| s.name == "reconcile deadline");
    assert_eq!(deadline.trace_id, late_trace);
    assert_eq!(deadline.parent_span_id.as_deref(), Some(stored_span));
    assert_eq!(deadline.attr("trainyard.job.id"), Some(late.as_str()));
    let repair = the_span(&spans, |s| s.name == "reconcile republish");
    assert_eq!(repair.parent_span_id.as_deref(), Some(stored_span));
    assert_eq!(repair.attr("trainyard.job.id"), Some(job.as_str()));
    let publish = the_span(&spans, |s| s.name == "publish ty.task.prepare");
    assert_eq!(
        publish.parent_span_id.as_deref(),
        Some(repair.span_id.as_str())
    );
    assert_eq!(parts_of[2], publish.span_id);
    fleet.stop().await;
}

#[path = "observability/metrics.rs"]
mod metrics;
