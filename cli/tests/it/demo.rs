//! The README's quick start, `yard demo`, as a user runs it: a local fleet
//! of its own (its own nats-server and store under `--data-dir`) trains a
//! real LoRA with the reference trainer on the bundled sample dataset and
//! delivers it; what it prints names the delivered file, and no download
//! link of the fleet it has stopped.

use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_trains_and_delivers_a_lora_and_names_it() {
    let data = tempfile::tempdir().unwrap();
    // The workspace root: where `.trainyard/tools` holds nats-server.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
        .args(["demo", "--steps", "40", "--data-dir"])
        .arg(data.path())
        .current_dir(root)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(180), run)
        .await
        .expect("the demo finishes")
        .expect("yard runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("dataset  8 images"), "{stdout}");
    assert!(
        stdout.contains("trained  40 steps with reference"),
        "{stdout}"
    );
    assert!(!stdout.contains("download (until"), "{stdout}");
    let delivered = stdout
        .lines()
        .find_map(|l| l.strip_prefix("LoRA delivered to "))
        .unwrap_or_else(|| panic!("no delivered LoRA named in:\n{stdout}"));
    let delivered = Path::new(delivered.trim());
    assert!(
        delivered.starts_with(data.path().join("outputs")),
        "{delivered:?}"
    );
    // A safetensors file: an 8-byte header length, then that much JSON
    // naming LoRA tensors.
    let bytes = std::fs::read(delivered).expect("the delivered LoRA");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + header_len]).expect("a safetensors header");
    assert!(
        header
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.contains("lora")),
        "{header}"
    );
}
