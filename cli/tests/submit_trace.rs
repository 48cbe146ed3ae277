//! `yard submit` with an OTLP endpoint starts the job's trace, against a
//! real coordinator on loopback: its span is exported before it exits, and
//! the coordinator's Submit span, exported to the same in-test receiver, is
//! its child.
//!
//! A binary of its own: the coordinator's spans reach the receiver through
//! this process's global telemetry, which only the first `telemetry::init`
//! installs, so no other test may start a fleet (whose harness installs an
//! inert one) in this process first.

use std::time::Duration;
use trainyard_core::config::TelemetryConfig;
use trainyard_tests::otlp::OtlpReceiver;
use trainyard_tests::{Fleet, Services, TOKEN};

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
