//! `yard submit ./dir` and `yard fetch` against a fleet whose artifact store
//! is a bucket (moto on loopback): the bytes go straight between the client
//! and the bucket through presigned URLs (moto's request log shows the
//! signed PUTs and GETs), the client holding no store settings at all.

use std::process::Output;
use std::time::Duration;
use trainyard_tests::{Fleet, S3Server, Services, TOKEN, get, sha256_hex, watch_all};

async fn yard(fleet: &Fleet, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
        .args(args)
        .env("TY_SERVER", format!("http://{}", fleet.grpc))
        .env("TY_TOKEN", TOKEN)
        .env_remove("HF_TOKEN")
        .output()
        .await
        .expect("yard runs")
}

/// Lines of moto's log for presigned requests of `method`.
fn presigned(s3: &S3Server, method: &str) -> usize {
    s3.log_tail()
        .lines()
        .filter(|l| l.contains(&format!("\"{method} /fleet/store/tenants/acme/")))
        .filter(|l| l.contains("X-Amz-Signature="))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_and_fetch_go_through_presigned_urls_on_s3() {
    let s3 = S3Server::start();
    s3.create_bucket("fleet").await;
    let options = s3.options();
    let fleet = Fleet::start_with(Services::ALL, |config| {
        config.store.uri = "s3://fleet/store".into();
        config.store.s3 = options;
    })
    .await;
    let sample = fleet.dir.path().join("sample-dir");
    trainyard_captioner::sample::write_sample_dataset(&sample).expect("sample");
    let files = std::fs::read_dir(&sample).unwrap().count();
    let output = yard(
        &fleet,
        &[
            "submit",
            sample.to_str().unwrap(),
            "--trigger",
            "tyzx",
            "--backend",
            "reference",
            "--steps",
            "30",
            "--resolution",
            "32",
            "--rank",
            "4",
            "--batch-size",
            "2",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let job = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert_eq!(presigned(&s3, "PUT"), files, "{}", s3.log_tail());

    let mut client = fleet.client(TOKEN).await;
    watch_all(&mut client, &job, Duration::from_secs(180)).await;
    let record = get(&mut client, &job).await;
    assert_eq!(
        record.state(),
        trainyard_proto::v1::JobState::Succeeded,
        "{:?}",
        record.error
    );

    let out = fleet.dir.path().join("fetched");
    let output = yard(&fleet, &["fetch", &job, out.to_str().unwrap()]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for artifact in &record.artifacts {
        assert_eq!(sha256_hex(&out.join(&artifact.name)), artifact.sha256);
    }
    assert_eq!(
        presigned(&s3, "GET"),
        record.artifacts.len(),
        "{}",
        s3.log_tail()
    );
    fleet.stop().await;
}
