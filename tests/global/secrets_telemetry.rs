//! A job's secrets reach no log line and no span. The test runs this
//! binary again as a child, with debug logs on and spans exported to an
//! OTLP receiver: the child runs a job with distinctive secrets (a Hub
//! token, an `s3://` destination's own keys) to SUCCEEDED and checks every
//! exported span; the parent checks every line the child's services logged.
//! A binary of its own: it installs the process's global telemetry.

use std::time::Duration;
use trainyard_core::config::TelemetryConfig;
use trainyard_proto::v1::{Destination, JobState, Secrets};
use trainyard_tests::otlp::OtlpReceiver;
use trainyard_tests::*;

const HF_TOKEN: &str = "hf_LOGGEDxNEVERx3f9";
const SECRET_KEY: &str = "s3LOGGEDxNEVERx3f9";
const EXTRA: &str = "xyzzyLOGGEDxNEVERx3f9";
const CHILD: &str = "TY_TEST_SECRETS_CHILD";
const TEST: &str = "no_secret_reaches_a_log_line_or_a_span";

fn leak(text: &str) -> Option<&'static str> {
    [HF_TOKEN, SECRET_KEY, EXTRA]
        .into_iter()
        .find(|s| text.contains(s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_or_a_span() {
    if std::env::var_os(CHILD).is_some() {
        return child().await;
    }
    let exe = std::env::current_exe().expect("this test binary");
    let out = tokio::process::Command::new(exe)
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("TY_LOG", "debug")
        .output()
        .await
        .expect("this test binary runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains(" 1 passed;"),
        "the child failed:\n{stdout}{stderr}"
    );
    let logs = format!("{stdout}{stderr}");
    // The services did log the job, at debug level.
    assert!(logs.contains("job submitted"), "no service log captured");
    assert!(logs.contains("DEBUG"), "debug logs were on");
    for line in logs.lines() {
        assert_eq!(leak(line), None, "a secret in a log line: {line}");
    }
}

async fn child() {
    let receiver = OtlpReceiver::start().await;
    let telemetry = trainyard_core::telemetry::init(
        "ty-coordinator",
        &TelemetryConfig {
            otlp_endpoint: receiver.endpoint(),
            ..Default::default()
        },
    )
    .expect("telemetry");
    assert!(telemetry.tracing_enabled());
    let s3 = S3Server::start();
    s3.create_bucket("deliveries").await;
    let options = s3.options();
    let fleet = Fleet::start_with(Services::ALL, |config| config.store.s3 = options).await;
    let mut spec = spec(&fleet.sample_uri().await, 20);
    spec.destinations.push(Destination {
        uri: "s3://deliveries/out".into(),
        ..Default::default()
    });
    let mut secrets: Secrets = s3.job_secrets();
    secrets.hf_token = HF_TOKEN.into();
    secrets.values.insert(
        trainyard_core::destination::secret_keys::SECRET_ACCESS_KEY.into(),
        SECRET_KEY.into(),
    );
    secrets.values.insert("EXTRA_TOKEN".into(), EXTRA.into());
    spec.secrets = Some(secrets);
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Succeeded, "{events:?}");
    telemetry.flush().await;
    let spans = receiver.spans();
    assert!(
        spans
            .iter()
            .any(|s| s.attr("trainyard.job.id") == Some(job.job_id.as_str())),
        "the job's spans were exported"
    );
    for span in &spans {
        assert_eq!(leak(&format!("{span:?}")), None, "a secret in {span:?}");
    }
    fleet.stop().await;
    telemetry.shutdown().await;
}
