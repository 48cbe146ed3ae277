//! `yard validate` against a real coordinator and captioner on loopback:
//! problems and the estimate on stdout, exit code 4 when the job would
//! fail its checks, and the uploaded dataset removed afterwards.

use std::process::Output;
use std::time::Duration;
use trainyard_tests::{Fleet, Services, TOKEN, wait_for};

async fn yard(fleet: &Fleet, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"));
    command
        .arg("validate")
        .args(args)
        // The client's own store setting points elsewhere: uploads go
        // through the API, never through a store the client opens.
        .args([
            "--set",
            &format!("store.uri={}", fleet.dir.path().join("elsewhere").display()),
        ])
        .env("TY_SERVER", format!("http://{}", fleet.grpc))
        .env("TY_TOKEN", TOKEN)
        .env_remove("HF_TOKEN");
    command.output().await.expect("yard runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_prints_problems_and_the_estimate() {
    let fleet = Fleet::start_with(
        Services {
            coordinator: true,
            captioner: true,
            worker: false,
            uploader: false,
        },
        |_| {},
    )
    .await;
    let sample = fleet.dir.path().join("sample-dir");
    trainyard_captioner::sample::write_sample_dataset(&sample).expect("sample");
    let sample = sample.to_str().unwrap();

    // The captioner subscribes a moment after the coordinator is up.
    let output = wait_for("a captioner to answer", Duration::from_secs(30), || async {
        let output = yard(&fleet, &[sample, "--trigger", "tyzx"]).await;
        (!String::from_utf8_lossy(&output.stderr).contains("UNAVAILABLE")).then_some(output)
    })
    .await;
    let text = stdout(&output);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains(
            "estimate 8 images × 1 repeats ÷ batch 2 = 4 steps per epoch; 200 steps ≈ 50.0 epochs\n"
        ),
        "{text}"
    );
    assert!(
        text.ends_with("ok: a job with these settings passes its checks\n"),
        "{text}"
    );

    let output = yard(
        &fleet,
        &[sample, "--trigger", "tyzx", "--resolution", "128"],
    )
    .await;
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(4), "{text}");
    assert!(
        text.starts_with(
            "problem  dataset.resolution: 8 images are smaller than training.resolution 128"
        ),
        "{text}"
    );
    assert!(text.ends_with("not ok: 1 problem\n"), "{text}");

    // Each run uploaded the folder for the check and removed it again.
    let uploads = fleet
        .store
        .list(&trainyard_tests::upload_key("acme", "x").replace("/x", ""))
        .await
        .expect("list");
    assert_eq!(fleet.store.list("tenants").await.expect("list"), []);
    assert_eq!(uploads, [], "uploads left behind");
    fleet.stop().await;
}

/// `yard submit ./dir` against a fleet whose store is not the client's:
/// the folder goes through the API into the caller's tenant's uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_uploads_a_folder_through_the_api() {
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
    let elsewhere = fleet.dir.path().join("elsewhere");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
        .args(["submit", sample.to_str().unwrap(), "--trigger", "tyzx"])
        .args(["--set", &format!("store.uri={}", elsewhere.display())])
        .env("TY_SERVER", format!("http://{}", fleet.grpc))
        .env("TY_TOKEN", TOKEN)
        .output()
        .await
        .expect("yard runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let uploads = fleet
        .store
        .list("tenants/acme/uploads")
        .await
        .expect("list");
    assert_eq!(
        uploads.len(),
        std::fs::read_dir(&sample).unwrap().count(),
        "{uploads:?}"
    );
    assert!(!elsewhere.exists(), "the client opened no store");
    fleet.stop().await;
}
