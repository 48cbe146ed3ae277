//! `yard fleet status` against a secured bus: it reads the pools the
//! autoscaler keeps in `ty_fleet` with the autoscaler's identity, as JSON
//! and as a table (a busy machine with its GPUs, price, host and job).

use trainyard_autoscaler::record::{DecisionRecord, MachineRecord, PoolRecord};
use trainyard_core::topology::FLEET_BUCKET;
use trainyard_core::topology::permissions::Role;
use trainyard_tests::{Fleet, Services};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yard_fleet_status_shows_what_the_autoscaler_recorded() {
    let fleet = Fleet::start_secured(
        Services {
            coordinator: true,
            ..Services::NONE
        },
        |_| {},
    )
    .await;
    // What an autoscaler writes, under its own identity.
    let js = async_nats::jetstream::new(fleet.nats_client_as(&Role::Autoscaler).await);
    let kv = js.get_key_value(FLEET_BUCKET).await.expect("ty_fleet");
    let now = trainyard_core::now_ms();
    let record = PoolRecord {
        pool: "train.flux".into(),
        updated_at_ms: now,
        machines: vec![MachineRecord {
            name: "trainyard-train.flux-0".into(),
            activity: "busy".into(),
            since_ms: now - 90_000,
            dollars_per_hour: 0.69,
            gpu_type: "NVIDIA RTX A6000".into(),
            gpu_count: 2,
            interruptible: true,
            host: "EU-RO-1".into(),
            jobs: vec!["0193c0de-0000-7000-8000-000000000001".into()],
        }],
        decisions: [DecisionRecord {
            at_ms: now - 90_000,
            pending: 2,
            ack_pending: 0,
            work_secs: 1_200.0,
            live: 0,
            busy: 0,
            wanted: 1,
            launch: vec!["trainyard-train.flux-0".into()],
            release: vec![],
            drain: vec![],
            reason: "scale_from_zero".into(),
            error: String::new(),
        }]
        .into(),
    };
    kv.put("train.flux", serde_json::to_vec(&record).unwrap().into())
        .await
        .expect("put");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("autoscaler.toml");
    std::fs::write(&config, fleet.config_as(&Role::Autoscaler).to_toml()).unwrap();
    let yard = |extra: &'static [&'static str]| {
        let config = config.clone();
        async move {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_yard"))
                .args(["fleet", "status", "--config"])
                .arg(&config)
                .args(extra)
                .output()
                .await
                .expect("yard runs");
            assert!(output.status.success(), "{output:?}");
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let json: serde_json::Value = serde_json::from_str(&yard(&["--json"]).await).unwrap();
    let pools: Vec<PoolRecord> = serde_json::from_value(json["pools"].clone()).unwrap();
    assert_eq!(pools, [record]);
    assert_eq!(json["dollars_per_hour"], 0.69);
    let machine = &json["pools"][0]["machines"][0];
    assert_eq!(machine["gpu_type"], "NVIDIA RTX A6000");
    assert_eq!(machine["gpu_count"], 2);
    assert_eq!(machine["interruptible"], true);
    assert_eq!(machine["host"], "EU-RO-1");
    assert_eq!(
        machine["jobs"],
        serde_json::json!(["0193c0de-0000-7000-8000-000000000001"])
    );
    let text = yard(&[]).await;
    assert!(
        text.contains(
            "pool train.flux  machines 1 (busy 1, idle 0, starting 0, draining 0)  $0.69/h"
        ),
        "{text}"
    );
    assert!(text.contains("scale_from_zero"), "{text}");
    // The busy machine's row: its GPUs, price, spot, host and job.
    let row = text
        .lines()
        .find(|l| l.contains("trainyard-train.flux-0") && l.contains("busy"))
        .unwrap_or_else(|| panic!("no machine row: {text}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        columns[3..],
        [
            "2x",
            "NVIDIA",
            "RTX",
            "A6000",
            "$0.69/h",
            "spot",
            "EU-RO-1",
            "0193c0de-0000-7000-8000-000000000001"
        ],
        "{row}"
    );
    assert!(text.ends_with("fleet $0.69/h\n"), "{text}");
    fleet.stop().await;
}
