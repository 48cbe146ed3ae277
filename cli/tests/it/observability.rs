//! `yard` and observability against a real coordinator on loopback: `yard
//! metrics` prints a job's series. (That `yard submit` starts the job's
//! trace is `tests/submit_trace.rs`, which needs a process of its own.)

use prost::Message;
use trainyard_core::topology::{EventKind, subject};
use trainyard_proto::v1::{JobEvent, Metric, job_event::Kind};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::{Fleet, Services, TOKEN, spec, submit};

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
