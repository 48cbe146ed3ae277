//! Jobs delivering to cloud buckets, end to end: a destination chain
//! (`on_error = "next"`) falls back past a bucket whose keys are refused,
//! and a job delivered to Azure (Azurite) and GCS (the stand-in) hands back
//! download URLs that fetch exactly its bytes.

use sha2::{Digest, Sha256};
use std::time::Duration;
use trainyard_core::destination::secret_keys;
use trainyard_proto::v1::{Destination, JobRecord, JobSpec, JobState, job_event::Kind};
use trainyard_tests::azurite::Azurite;
use trainyard_tests::*;

/// Runs `spec` to its end; the final record and the log lines on the way.
async fn run(fleet: &Fleet, spec: JobSpec) -> (JobRecord, Vec<String>) {
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;
    let lines = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Log(l)) => Some(l.line.clone()),
            Some(Kind::State(s)) => Some(format!("{:?} {:?}", s.state(), s.error)),
            _ => None,
        })
        .collect();
    (get(&mut client, &job.job_id).await, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_falls_back_past_a_bucket_that_refuses_its_keys() {
    let azurite = Azurite::start();
    azurite.create_container("deliveries").await;
    let fleet = Fleet::start().await;
    let folder = fleet.dir.path().join("outputs/fallback");
    let mut spec = spec(&fleet.sample_uri().await, 20);
    let mut secrets = azurite.job_secrets();
    secrets.values.insert(
        secret_keys::AZURE_ACCOUNT_KEY.into(),
        "bm90IHRoZSBhY2NvdW50J3Mga2V5IGF0IGFsbA==".into(),
    );
    spec.secrets = Some(secrets);
    spec.destinations = vec![
        Destination {
            uri: "az://deliveries/out".into(),
            on_error: "next".into(),
            ..Default::default()
        },
        Destination {
            uri: format!("file://{}", folder.display()),
            ..Default::default()
        },
    ];
    let (record, lines) = run(&fleet, spec).await;
    assert_eq!(record.state(), JobState::Succeeded, "{lines:#?}");
    let adapter = record
        .delivered
        .iter()
        .find(|d| {
            d.uri.ends_with("/lora.safetensors")
                && d.uri.starts_with(&format!("file://{}", folder.display()))
        })
        .unwrap_or_else(|| panic!("the folder has the adapter: {:?}", record.delivered));
    assert!(
        record.delivered.iter().all(|d| !d.uri.starts_with("az://")),
        "{:?}",
        record.delivered
    );
    let local = folder.join(&record.job_id).join("lora.safetensors");
    assert_eq!(sha256_hex(&local), adapter.sha256);
    // The failure is on the job's events, naming the destination and not
    // the key.
    let noted = lines
        .iter()
        .find(|l| l.starts_with("destination az://deliveries/out failed"))
        .unwrap_or_else(|| panic!("no fallback noted in {lines:#?}"));
    assert!(noted.contains("trying the next one"), "{noted}");
    assert!(!noted.contains("bm90IHRoZSBhY2NvdW50"), "{noted}");
    assert!(
        azurite
            .store("deliveries")
            .list("")
            .await
            .expect("list")
            .is_empty(),
        "nothing was written with refused keys"
    );
    fleet.stop().await;
}

/// sha256 of what `url` answers, with its status.
pub async fn fetch_sha256(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("get");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    (status, hex::encode(Sha256::digest(&body)))
}
