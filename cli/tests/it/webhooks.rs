//! `yard webhooks secret` and `yard webhooks rotate` against a real
//! coordinator on loopback: the caller's own secret on stdout, the same as
//! the API shows; a rotation prints a new one and says how long the old one
//! still signs; webhooks off is a clear error.

use std::process::Output;
use trainyard_proto::v1::GetWebhookSecretRequest;
use trainyard_tests::{Fleet, OTHER_TOKEN, Services, TOKEN};

async fn yard(fleet: &Fleet, token: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
        .arg("webhooks")
        .args(args)
        .env("TY_SERVER", format!("http://{}", fleet.grpc))
        .env("TY_TOKEN", token)
        .output()
        .await
        .expect("yard runs")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn coordinator_only() -> Services {
    Services {
        coordinator: true,
        ..Services::NONE
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yard_webhooks_shows_and_rotates_the_callers_own_secret() {
    let fleet = Fleet::start_with(coordinator_only(), |config| {
        config.webhooks.enabled = true;
    })
    .await;
    let shown = stdout(&yard(&fleet, TOKEN, &["secret"]).await);
    assert!(shown.starts_with("whsec_"), "{shown}");
    let api = fleet
        .client(TOKEN)
        .await
        .get_webhook_secret(GetWebhookSecretRequest {})
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert_eq!(shown, api);
    assert_ne!(stdout(&yard(&fleet, OTHER_TOKEN, &["secret"]).await), shown);

    let output = yard(&fleet, TOKEN, &["rotate"]).await;
    let rotated = stdout(&output);
    assert!(
        rotated.starts_with("whsec_") && rotated != shown,
        "{rotated}"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("previous secret also signs until"),
        "{output:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&yard(&fleet, TOKEN, &["secret", "--json"]).await)).unwrap();
    assert_eq!(json["secret"], rotated.as_str());
    assert!(json["previous_valid_until_ms"].as_i64().unwrap() > 0);
    fleet.stop().await;

    let fleet = Fleet::start_with(coordinator_only(), |_| {}).await;
    let output = yard(&fleet, TOKEN, &["secret"]).await;
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("webhooks are not configured on this fleet"),
        "{error}"
    );
    fleet.stop().await;
}
