//! `ty-bench gpu-smoke` as an operator runs it: the bench binary, its fleet
//! of real service processes, a real reference-trainer run. The GPU
//! trainers are not installed here, so a run selecting one must show it
//! SKIPPED with what is missing, not FAIL.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;
use trainyard_tests::chaos::bin_dir;

/// `ty-bench` beside the service binaries it starts.
fn bench() -> PathBuf {
    let beside = bin_dir().join("ty-bench");
    if beside.is_file() {
        beside
    } else {
        PathBuf::from(env!("CARGO_BIN_EXE_ty-bench"))
    }
}

/// Runs `ty-bench gpu-smoke <args>` with nothing of the caller's config,
/// Hub token or trainer paths, within `timeout`.
async fn smoke(args: &[&str], timeout: Duration) -> Output {
    let mut command = tokio::process::Command::new(bench());
    command
        .arg("gpu-smoke")
        .args(args)
        .env_remove("TY_CONFIG")
        .env_remove("HF_TOKEN")
        .kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if name.starts_with("TY_WORKER__") {
            command.env_remove(name);
        }
    }
    tokio::time::timeout(timeout, command.output())
        .await
        .expect("gpu-smoke finished in time")
        .expect("gpu-smoke runs")
}

/// The table row of `backend`, as its cells.
fn row<'a>(stdout: &'a str, backend: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&backend))
        .unwrap_or_else(|| panic!("no row for {backend} in:\n{stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_backend_passes_and_one_not_installed_is_skipped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = format!(
        "worker.model_cache_dir={}",
        dir.path().join("cache").display()
    );
    let output = smoke(
        &[
            "--only",
            "reference,kohya",
            "--timeout",
            "120",
            "--set",
            &cache,
        ],
        Duration::from_secs(240),
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let header = row(&stdout, "backend");
    assert_eq!(
        header,
        [
            "backend",
            "preset",
            "result",
            "steps",
            "wall",
            "checkpoint",
            "adapter"
        ]
    );
    let reference = row(&stdout, "reference");
    assert_eq!(reference[1], "reference-denoiser-v1", "{stdout}");
    assert_eq!(reference[2], "PASS", "{stdout}");
    // The default 4 steps, raised to the reference trainer's minimum.
    assert_eq!(reference[3], "20/20", "{stdout}");
    assert_eq!(reference[5], "step", "a checkpoint was seen: {stdout}");
    assert!(reference[7].ends_with(".safetensors"), "{stdout}");
    let kohya = row(&stdout, "kohya");
    assert_eq!(kohya[1..3], ["sdxl-base-1.0", "SKIPPED"], "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("kohya SKIPPED: ") && l.contains("worker.trainers.kohya_dir")),
        "the reason names what to set: {stdout}"
    );
}

#[tokio::test]
async fn an_unknown_backend_is_refused_before_anything_starts() {
    let output = smoke(&["--only", "reference,sd-scripts"], Duration::from_secs(30)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(output.stdout.is_empty(), "no table");
    assert!(
        stderr.contains(
            "--only: unknown backend \"sd-scripts\"; known: reference, kohya, diffusion-pipe, \
             simpletuner, ai-toolkit, trl"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("starting the fleet"), "{stderr}");
}

/// Every backend's smoke job (its preset, settings and dataset) through the
/// fleet against the backend's stand-in (`tests/standins/`), with the
/// presets' files served by a loopback Hub: what the GPU runs will submit
/// is accepted by submission, preflight and each backend, and reaches a
/// checkpoint and the adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_passes_against_its_standin() {
    const HF_TOKEN: &str = "hf_test_token_smoke";
    let hub = trainyard_tests::hub::FakeHub::start(HF_TOKEN).await;
    hub.add_presets(&["sdxl-base-1.0", "qwen2.5-0.5b-instruct"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let standins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("standins");
    // ai-toolkit loads the SDXL preset's single file with diffusers'
    // `from_single_file`, which reads the pipeline's configs from the Hub
    // or the HF cache: as on a GPU machine that has reached the Hub once.
    let hf_home = dir.path().join("hf-home");
    let snapshot = hf_home.join(
        "hub/models--stabilityai--stable-diffusion-xl-base-1.0/snapshots/\
         0123456789abcdef0123456789abcdef01234567",
    );
    std::fs::create_dir_all(&snapshot).expect("hf cache");
    std::fs::write(snapshot.join("model_index.json"), "{}").expect("model_index.json");
    let set = |key: &str, value: String| format!("worker.{key}={value}");
    let sets = [
        set(
            "model_cache_dir",
            dir.path().join("cache").display().to_string(),
        ),
        set("hf_endpoint", hub.endpoint()),
        set("checkpoint_scan_ms", "100".into()),
        set(
            "trainers.env",
            format!(
                "{{ STANDIN_STEP_SECONDS = \"0.3\", HF_HOME = \"{}\" }}",
                hf_home.display()
            ),
        ),
    ]
    .into_iter()
    .chain(
        [
            ("python", "trl/python3"),
            ("accelerate", "bin/accelerate"),
            ("deepspeed", "bin/deepspeed"),
            ("kohya_dir", "kohya"),
            ("diffusion_pipe_dir", "diffusion-pipe"),
            ("simpletuner_dir", "simpletuner"),
            ("ai_toolkit_dir", "ai-toolkit"),
        ]
        .map(|(key, path)| {
            set(
                &format!("trainers.{key}"),
                standins.join(path).display().to_string(),
            )
        }),
    )
    .collect::<Vec<_>>();
    // The reference backend is the test above.
    let mut args = vec![
        "--only",
        "kohya,diffusion-pipe,simpletuner,ai-toolkit,trl",
        "--steps",
        "4",
        "--timeout",
        "120",
    ];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let mut command = tokio::process::Command::new(bench());
    command
        .arg("gpu-smoke")
        .args(&args)
        .env_remove("TY_CONFIG")
        .env("HF_TOKEN", HF_TOKEN)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(600), command.output())
        .await
        .expect("gpu-smoke finished in time")
        .expect("gpu-smoke runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for (backend, preset) in [
        ("kohya", "sdxl-base-1.0"),
        ("diffusion-pipe", "sdxl-base-1.0"),
        ("simpletuner", "sdxl-base-1.0"),
        ("ai-toolkit", "sdxl-base-1.0"),
        ("trl", "qwen2.5-0.5b-instruct"),
    ] {
        let cells = row(&stdout, backend);
        assert_eq!(cells[1..4], [preset, "PASS", "4/4"], "{stdout}");
    }
}
