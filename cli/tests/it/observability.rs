//! `yard` and observability against a real coordinator on loopback:
//! `yard submit` with an OTLP endpoint starts the job's trace (its span is
//! exported before it exits, and the coordinator's Submit span, exported to
//! the same in-test receiver, is its child); `yard metrics` prints a job's
//! series.

use prost::Message;
use std::time::Duration;
use trainyard_core::config::TelemetryConfig;
use trainyard_core::topology::{EventKind, subject};
use trainyard_proto::v1::{JobEvent, Metric, job_event::Kind};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::otlp::OtlpReceiver;
use trainyard_tests::{Fleet, Services, TOKEN, spec, submit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_from_yard_starts_the_trace() {
    let receiver = OtlpReceiver::start().await;
    // This process's telemetry (the coordinator's), installed before the
    // fleet's harness would install an inert one.
    let telemetry = trainyard_core::telemetry::init(
        "ty-coordinator",
        &TelemetryConfig {
            otlp_endpoint: receiver.endpoint(),
            ..Default::default()
        },
    )
    .expect("telemetry");
    assert!(telemetry.tracing_enabled());
    let fleet = Fleet::start_with(
        Services {
            coordinator: true,
            ..Services::NONE
        },
        |_| {},
    )
    .await;
    let sample = fleet.dir.path().join("sample-dir");
    trainyard_captioner::sample::write_sample_dataset(&sample).expect("sample");

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
        .args(["submit", sample.to_str().unwrap(), "--steps", "5"])
        .args(["--set", &format!("store.uri={}", fleet.config.store.uri)])
        .env("TY_SERVER", format!("http://{}", fleet.grpc))
        .env("TY_TOKEN", TOKEN)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env_remove("OTEL_SDK_DISABLED")
        .env_remove("OTEL_TRACES_SAMPLER")
        .output()
        .await
        .expect("yard runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let job = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(!job.is_empty());

    let submit_rpc = "trainyard.v1.JobService/Submit";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let spans = loop {
        telemetry.flush().await;
        let spans = receiver.spans();
        if spans.iter().any(|s| s.name == "yard submit")
            && spans.iter().any(|s| s.name == submit_rpc)
        {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans not received: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let client = spans.iter().find(|s| s.name == "yard submit").unwrap();
    let server = spans.iter().find(|s| s.name == submit_rpc).unwrap();
    assert_eq!(client.service, "yard");
    assert_eq!(client.parent_span_id, None, "yard's span is the root");
    assert_eq!(server.service, "ty-coordinator");
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(
        server.parent_span_id.as_deref(),
        Some(client.span_id.as_str())
    );
    assert_eq!(server.attr("trainyard.job.id"), Some(job.as_str()));
    fleet.stop().await;
    telemetry.shutdown().await;
}

async fn yard_metrics(fleet: &Fleet, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
        .arg("metrics")
        .args(args)
        .env("TY_SERVER", format!("http://{}", fleet.grpc))
        .env("TY_TOKEN", TOKEN)
        .output()
        .await
        .expect("yard runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yard_metrics_prints_a_jobs_series() {
    let fleet = Fleet::start_with(
        Services {
            coordinator: true,
            ..Services::NONE
        },
        |_| {},
    )
    .await;
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec(&fleet.sample_uri().await, 5)).await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let (tenant, id) = (
        TenantId::parse(&job.tenant).unwrap(),
        JobId::parse(&job.job_id).unwrap(),
    );
    for (name, step, value) in [("loss", 1, 0.5), ("loss", 2, 0.25), ("train/lr", 2, 0.01)] {
        let event = JobEvent {
            job_id: job.job_id.clone(),
            tenant: job.tenant.clone(),
            at_ms: 7,
            kind: Some(Kind::Metric(Metric {
                name: name.into(),
                value,
                step,
            })),
        };
        js.publish(
            subject::event(&tenant, &id, EventKind::Metric),
            event.encode_to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let output = yard_metrics(&fleet, &[&job.job_id]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["METRIC", "STEP", "VALUE"],
            vec!["loss", "1", "0.5"],
            vec!["loss", "2", "0.25"],
            vec!["train/lr", "2", "0.01"],
        ],
        "{text}"
    );

    let output = yard_metrics(&fleet, &[&job.job_id, "--json", "--name", "train/lr"]).await;
    assert!(output.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(
        lines,
        [
            serde_json::json!({"name": "train/lr", "points": [{"step": 2, "value": 0.01, "at_ms": 7}]})
        ]
    );

    // Another tenant's job, or a bad id: a clear error.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
        .args(["metrics", &job.job_id])
        .env("TY_SERVER", format!("http://{}", fleet.grpc))
        .env("TY_TOKEN", trainyard_tests::OTHER_TOKEN)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("error: NOT_FOUND"));
    let output = yard_metrics(&fleet, &["../x"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("error: INVALID_ARGUMENT: job_id"));
    fleet.stop().await;
}
