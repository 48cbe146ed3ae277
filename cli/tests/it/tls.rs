//! `yard` against a coordinator serving TLS: `https://` with `--ca` (or
//! `TY_CA_FILE`) works; without the CA the certificate is not trusted.

use std::process::Output;
use trainyard_tests::{Fleet, Services, TOKEN};

async fn yard(server: &str, ca: Option<&std::path::Path>) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"));
    command
        .args(["--server", server, "list"])
        .env("TY_TOKEN", TOKEN)
        .env_remove("TY_CA_FILE");
    if let Some(ca) = ca {
        command.arg("--ca").arg(ca);
    }
    command.output().await.expect("yard runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yard_calls_a_tls_coordinator_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = trainyard_tests::localhost_cert(dir.path());
    let fleet = Fleet::start_with(
        Services {
            coordinator: true,
            ..Services::NONE
        },
        |config| {
            config.coordinator.tls_cert_file = Some(cert.clone());
            config.coordinator.tls_key_file = Some(key);
        },
    )
    .await;
    let server = format!("https://localhost:{}", fleet.grpc.port());
    let trusted = yard(&server, Some(&cert)).await;
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&trusted.stdout),
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert!(said.contains("no jobs"), "{said}");
    let untrusted = yard(&server, None).await;
    assert!(!untrusted.status.success());
    fleet.stop().await;
}
