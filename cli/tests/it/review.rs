//! `yard captions` and `yard approve` against a fleet with a captioner and
//! no worker: a review-gated job waits, its captions are exported, edited
//! as files and applied under their version (a stale folder is refused),
//! and the approval moves it to TRAINING.

use std::path::Path;
use std::process::Output;
use std::time::Duration;
use trainyard_proto::v1::JobState;
use trainyard_tests::{Fleet, Services, TOKEN, get, spec, submit, wait_for};

async fn yard(fleet: &Fleet, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
        .args(args)
        .env("TY_SERVER", format!("http://{}", fleet.grpc))
        .env("TY_TOKEN", TOKEN)
        .output()
        .await
        .expect("yard runs")
}

fn ok(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The first exported caption file's name.
fn first_text(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".txt"))
        .collect();
    names.sort();
    names.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captions_are_exported_edited_applied_and_approved() {
    let services = Services {
        worker: false,
        uploader: false,
        ..Services::ALL
    };
    let fleet = Fleet::start_with(services, |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    spec.caption.as_mut().unwrap().review = true;
    let job = submit(&mut client, spec).await.job_id;
    wait_for("AWAITING_REVIEW", Duration::from_secs(60), || {
        let (mut client, job) = (client.clone(), job.clone());
        async move { (get(&mut client, &job).await.state() == JobState::AwaitingReview).then_some(()) }
    })
    .await;

    let shown = ok(&yard(&fleet, &["get", &job]).await);
    assert!(shown.contains(&format!("yard captions {job}")), "{shown}");
    let printed = ok(&yard(&fleet, &["captions", &job]).await);
    assert!(
        printed.contains("captions version 1  (8 files)"),
        "{printed}"
    );

    let (a, b) = (fleet.dir.path().join("a"), fleet.dir.path().join("b"));
    for dir in [&a, &b] {
        ok(&yard(
            &fleet,
            &["captions", &job, "--export", dir.to_str().unwrap()],
        )
        .await);
    }
    let name = first_text(&a);
    std::fs::write(a.join(&name), "tyzx, edited in a folder\n").unwrap();
    let applied = ok(&yard(&fleet, &["captions", &job, "--apply", a.to_str().unwrap()]).await);
    assert!(applied.contains("1 captions changed"), "{applied}");
    assert!(applied.contains("version 2"), "{applied}");
    // Nothing more to send from the same folder.
    let again = ok(&yard(&fleet, &["captions", &job, "--apply", a.to_str().unwrap()]).await);
    assert!(again.contains("no caption changed"), "{again}");
    // A folder exported at version 1 is refused now.
    std::fs::write(b.join(&name), "tyzx, edited elsewhere\n").unwrap();
    let stale = yard(&fleet, &["captions", &job, "--apply", b.to_str().unwrap()]).await;
    assert!(!stale.status.success());
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(
        stderr.contains("ABORTED") && stderr.contains("version 2"),
        "{stderr}"
    );
    let printed = ok(&yard(&fleet, &["captions", &job]).await);
    assert!(
        printed.contains("tyzx, edited in a folder  (edited)"),
        "{printed}"
    );

    let approved = ok(&yard(&fleet, &["approve", &job]).await);
    assert!(
        approved.contains("approved (captions version 2): TRAINING"),
        "{approved}"
    );
    assert_eq!(get(&mut client, &job).await.state(), JobState::Training);
    fleet.stop().await;
}
