//! `yard fleet resume` and the stop line of `yard fleet status` against a
//! secured bus: a stop flag the autoscaler set (the account's spend limit)
//! shows first in the table and in the JSON, and `resume` clears it with
//! the autoscaler's identity.

use trainyard_autoscaler::lease::{StopFlag, read_stop, set_stop};
use trainyard_core::topology::AUTOSCALER_BUCKET;
use trainyard_core::topology::permissions::Role;
use trainyard_tests::{Fleet, Services};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yard_fleet_resume_clears_the_stop_that_status_shows() {
    let fleet = Fleet::start_secured(
        Services {
            coordinator: true,
            ..Services::NONE
        },
        |_| {},
    )
    .await;
    let js = async_nats::jetstream::new(fleet.nats_client_as(&Role::Autoscaler).await);
    let state = js
        .get_key_value(AUTOSCALER_BUCKET)
        .await
        .expect("ty_autoscaler");
    let flag = StopFlag {
        reason: "spend_limit".into(),
        message: "You have reached your spend limit of $80.00/hr".into(),
        pool: "train.flux".into(),
        at_ms: trainyard_core::now_ms() - 90_000,
    };
    assert!(set_stop(&state, &flag).await.expect("set"));
    // A second stop keeps the first reason.
    let later = StopFlag {
        pool: "train.sdxl".into(),
        ..flag.clone()
    };
    assert!(!set_stop(&state, &later).await.expect("set again"));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("autoscaler.toml");
    std::fs::write(&config, fleet.config_as(&Role::Autoscaler).to_toml()).unwrap();
    let yard = |args: &'static [&'static str]| {
        let config = config.clone();
        async move {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
                .args(args)
                .arg("--config")
                .arg(&config)
                .output()
                .await
                .expect("yard runs");
            assert!(output.status.success(), "{output:?}");
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let json: serde_json::Value =
        serde_json::from_str(&yard(&["fleet", "status", "--json"]).await).unwrap();
    let shown: StopFlag = serde_json::from_value(json["stop"].clone()).unwrap();
    assert_eq!(shown, flag);
    let text = yard(&["fleet", "status"]).await;
    assert!(
        text.starts_with("SCALE-UP STOPPED 1m30s ago: spend_limit in pool train.flux"),
        "{text}"
    );

    let resumed = yard(&["fleet", "resume"]).await;
    assert!(resumed.starts_with("resumed:"), "{resumed}");
    assert_eq!(read_stop(&state).await.expect("read"), None);
    let json: serde_json::Value =
        serde_json::from_str(&yard(&["fleet", "status", "--json"]).await).unwrap();
    assert!(json["stop"].is_null(), "{json}");
    assert!(!yard(&["fleet", "status"]).await.contains("STOPPED"));
    // Nothing to clear is no error.
    assert!(yard(&["fleet", "resume"]).await.starts_with("not stopped"));
    fleet.stop().await;
}
