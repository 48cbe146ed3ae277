//! `gs://` and `az://` destinations against real protocol servers: Azurite
//! (Microsoft's emulator, which checks Shared Key and SAS signatures) and
//! the GCS stand-in in `tests/src/gcs.rs` (which checks the service
//! account's JWTs and V4 signed URLs). A destination opened with the job's
//! own keys is probed, takes a multipart upload, lists, and signs a GET
//! URL that fetches exactly the stored bytes until it expires.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;
use trainyard_core::destination::{Destinations, ProbeFailure, secret_keys};
use trainyard_core::store::ArtifactStore;
use trainyard_proto::v1::Secrets;
use trainyard_tests::azurite::Azurite;
use trainyard_tests::gcs::GcsServer;
use trainyard_tests::*;

fn rules() -> Destinations {
    Destinations::new(Vec::new(), "s3://fleet/store", BTreeMap::new()).allow_private_endpoints(true)
}

/// Writes a 9 MiB file (two multipart parts) and a small one through
/// `store`, and checks a signed URL of each fetches the same bytes.
async fn round_trip(store: &ArtifactStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let big: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("big.bin"), &big).expect("write");
    let artifact = store
        .put_file(&dir.path().join("big.bin"), "out/big.bin")
        .await
        .expect("multipart put");
    assert_eq!(artifact.sha256, hex::encode(Sha256::digest(&big)));
    store
        .put_bytes("out/small.txt", Bytes::from_static(b"small\n"))
        .await
        .expect("put");
    let listed = store.list("out").await.expect("list");
    assert_eq!(
        listed,
        [
            ("out/big.bin".to_string(), big.len() as u64),
            ("out/small.txt".to_string(), 6)
        ]
    );
    let http = reqwest::Client::new();
    let url = store
        .presign_get("out/big.bin", Duration::from_secs(600))
        .await
        .expect("sign");
    let fetched = http
        .get(&url)
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    assert_eq!(hex::encode(Sha256::digest(&fetched)), artifact.sha256);
    // A URL with its signature changed is refused.
    let tampered = url
        .replacen("sig=", "sig=A", 1)
        .replacen("Signature=", "Signature=00", 1);
    let status = http.get(&tampered).send().await.expect("get").status();
    assert!(status.as_u16() == 403 || status.as_u16() == 401, "{status}");
}

/// Polls `url` until it is refused (it was signed to expire in a second).
async fn refused_after_expiry(url: &str) {
    let http = reqwest::Client::new();
    wait_for(
        "the signed url to expire",
        Duration::from_secs(10),
        || async {
            let status = http.get(url).send().await.ok()?.status();
            (status.as_u16() == 403).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_destinations_write_list_and_sign_on_azurite() {
    let azurite = Azurite::start();
    azurite.create_container("deliveries").await;
    let rules = rules();
    let secrets = azurite.job_secrets();
    // No container: the probe says so, and that it is not worth a retry.
    let missing = rules
        .probe("acme", "az://nowhere/x", Some(&secrets))
        .await
        .unwrap_err();
    assert_eq!(missing.failure, ProbeFailure::Refused, "{missing}");
    // The wrong key: denied.
    let mut wrong = secrets.clone();
    wrong.values.insert(
        secret_keys::AZURE_ACCOUNT_KEY.into(),
        "d3Jvbmcga2V5IHdyb25nIGtleQ==".into(),
    );
    let denied = rules
        .probe("acme", "az://deliveries/x", Some(&wrong))
        .await
        .unwrap_err();
    assert_eq!(denied.failure, ProbeFailure::Denied, "{denied}");
    rules
        .probe("acme", "azure://deliveries/jobs", Some(&secrets))
        .await
        .expect("probe");
    let store = rules
        .open("acme", "azure://deliveries/jobs", Some(&secrets))
        .expect("open");
    assert_eq!(store.root(), "az://deliveries/jobs");
    round_trip(&store).await;
    assert!(
        azurite
            .store("deliveries")
            .exists("jobs/out/small.txt")
            .await
            .expect("head"),
        "written below the prefix"
    );
    let short = store
        .presign_get("out/small.txt", Duration::from_secs(1))
        .await
        .expect("sign");
    refused_after_expiry(&short).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_destinations_write_list_and_sign_with_the_jobs_key() {
    let gcs = GcsServer::start().await;
    gcs.create_bucket("deliveries");
    let rules = rules();
    let secrets = Secrets {
        values: [(
            secret_keys::GCS_SERVICE_ACCOUNT_KEY.to_string(),
            gcs.service_account_key(),
        )]
        .into(),
        ..Default::default()
    };
    let missing = rules
        .probe("acme", "gs://nowhere/x", Some(&secrets))
        .await
        .unwrap_err();
    assert_eq!(missing.failure, ProbeFailure::Refused, "{missing}");
    rules
        .probe("acme", "gs://deliveries/jobs", Some(&secrets))
        .await
        .expect("probe");
    assert!(
        gcs.keys("deliveries").is_empty(),
        "the probe leaves nothing"
    );
    let store = rules
        .open("acme", "gs://deliveries/jobs", Some(&secrets))
        .expect("open");
    round_trip(&store).await;
    assert_eq!(
        gcs.object("deliveries", "jobs/out/small.txt").as_deref(),
        Some(&b"small\n"[..])
    );
    let short = store
        .presign_get("out/small.txt", Duration::from_secs(1))
        .await
        .expect("sign");
    refused_after_expiry(&short).await;
}
