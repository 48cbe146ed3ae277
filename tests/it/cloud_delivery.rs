//! Jobs delivering to cloud buckets, end to end: a destination chain
//! (`on_error = "next"`) falls back past a bucket whose keys are refused,
//! and a job delivered to S3 (moto), Azure (Azurite) and GCS (the
//! stand-in) hands back download URLs that fetch exactly its bytes — for a
//! copy written with the job's own keys, the URL the uploader signed at
//! delivery (`Get` and the `job.completed` webhook alike).

use sha2::{Digest, Sha256};
use std::time::Duration;
use trainyard_core::config::DestinationCredential;
use trainyard_core::destination::secret_keys;
use trainyard_proto::v1::{Destination, JobRecord, JobSpec, JobState, job_event::Kind};
use trainyard_tests::azurite::Azurite;
use trainyard_tests::gcs::GcsServer;
use trainyard_tests::webhook::Receiver;
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
async fn fetch_sha256(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("get");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    (status, hex::encode(Sha256::digest(&body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_delivers_to_azure_and_gcs_and_get_hands_out_urls_of_its_bytes() {
    let azurite = Azurite::start();
    azurite.create_container("deliveries").await;
    let gcs = GcsServer::start().await;
    gcs.create_bucket("deliveries");
    // Azure through the fleet's credential (so Get signs its copies) and
    // with the job's own key, GCS with the job's own service account key
    // (the uploader signs those at delivery).
    let credential = DestinationCredential {
        tenants: vec!["acme".into()],
        azure_account: Some(trainyard_tests::azurite::ACCOUNT.into()),
        azure_access_key: Some(trainyard_tests::azurite::ACCOUNT_KEY.into()),
        endpoint: Some(azurite.endpoint.clone()),
        ..Default::default()
    };
    let fleet = Fleet::start_with(Services::ALL, |config| {
        config
            .destinations
            .credentials
            .insert("azurite".into(), credential);
    })
    .await;
    let mut spec = spec(&fleet.sample_uri().await, 20);
    let mut secrets = azurite.job_secrets();
    secrets.values.insert(
        secret_keys::GCS_SERVICE_ACCOUNT_KEY.into(),
        gcs.service_account_key(),
    );
    spec.secrets = Some(secrets);
    spec.destinations = [
        "az://deliveries/out?credential=azurite",
        "az://deliveries/own",
        "gs://deliveries/out",
    ]
    .into_iter()
    .map(|uri| Destination {
        uri: uri.into(),
        ..Default::default()
    })
    .collect();
    let (record, lines) = run(&fleet, spec).await;
    assert_eq!(record.state(), JobState::Succeeded, "{lines:#?}");
    let adapter = record
        .artifacts
        .iter()
        .find(|a| a.name == "lora.safetensors")
        .expect("adapter");
    let key = format!("out/{}/lora.safetensors", record.job_id);
    let in_azure = azurite
        .store("deliveries")
        .get_bytes(&key)
        .await
        .expect("azure object");
    assert_eq!(hex::encode(Sha256::digest(&in_azure)), adapter.sha256);
    let in_gcs = gcs.object("deliveries", &key).expect("gcs object");
    assert_eq!(hex::encode(Sha256::digest(&in_gcs)), adapter.sha256);
    assert!(
        gcs.keys("deliveries")
            .contains(&format!("out/{}/manifest.json", record.job_id)),
        "{:?}",
        gcs.keys("deliveries")
    );
    // Get signs a URL per output: the coordinator's route for the local
    // store, the fleet credential's bucket for its copy; the copies written
    // with the job's keys carry the URLs the uploader signed.
    let mut client = fleet.client(TOKEN).await;
    let shown = get(&mut client, &record.job_id).await;
    let now = trainyard_core::now_ms();
    for artifact in &shown.artifacts {
        assert!(
            artifact.download_url.contains("/v1/download/"),
            "{artifact:?}"
        );
        assert!(artifact.download_url_expires_at_ms > now);
        assert_eq!(
            fetch_sha256(&artifact.download_url).await,
            (200, artifact.sha256.clone()),
            "{}",
            artifact.name
        );
    }
    let mut signed = 0;
    for file in &shown.delivered {
        let marker = if file.destination.starts_with("az://") {
            "sig="
        } else if file.destination.starts_with("gs://") {
            "X-Goog-Signature="
        } else {
            continue;
        };
        assert!(file.download_url.contains(marker), "{file:?}");
        assert!(file.download_url_expires_at_ms > now, "{file:?}");
        // Azurite and the stand-in check the signature and its expiry.
        assert_eq!(
            fetch_sha256(&file.download_url).await,
            (200, file.sha256.clone()),
            "{}",
            file.uri
        );
        signed += 1;
    }
    assert_eq!(signed, 3, "{:?}", shown.delivered);
    // Those the uploader signed are the record's, as it stored them.
    let again = get(&mut client, &record.job_id).await;
    for (first, second) in shown.delivered.iter().zip(&again.delivered) {
        if trainyard_core::destination::uses_job_keys(&first.destination) {
            assert_eq!(first.download_url, second.download_url);
        }
    }

    // The route refuses a token with a changed character, and one whose
    // time has passed (made with the fleet's key and an expiry in the past).
    let url = &shown.artifacts[0].download_url;
    let (base, token) = url.split_once("/v1/download/").expect("route");
    let mut tampered = token.to_string();
    let last = tampered.pop().expect("token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let (status, _) = fetch_sha256(&format!("{base}/v1/download/{tampered}")).await;
    assert_eq!(status, 403);
    let keyring = trainyard_core::secrets::Keyring::load(
        fleet.config.secrets.key_file.as_deref().expect("key file"),
    )
    .expect("keyring");
    let fleet_urls = trainyard_coordinator::downloads::DownloadUrls::new(
        fleet.store.clone(),
        Duration::from_secs(60),
        base.to_string(),
        Default::default(),
        Some(std::sync::Arc::new(keyring)),
    );
    let output_key = fleet.store.key_of(&shown.artifacts[0].uri).expect("key");
    let expired = fleet_urls.token(&output_key, now - 1);
    let (status, _) = fetch_sha256(&format!("{base}/v1/download/{expired}")).await;
    assert_eq!(status, 403, "an expired link");
    let fresh = fleet_urls.token(&output_key, now + 60_000);
    assert_eq!(
        fetch_sha256(&format!("{base}/v1/download/{fresh}")).await,
        (200, shown.artifacts[0].sha256.clone()),
        "the same key, unexpired, under the fleet's key"
    );
    // Another tenant's job is not theirs to Get, so never signed for them.
    let mut other = fleet.client(OTHER_TOKEN).await;
    assert!(
        other
            .get(trainyard_proto::v1::GetRequest {
                job_id: record.job_id.clone(),
            })
            .await
            .is_err()
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_written_with_the_jobs_own_s3_keys_has_the_uploaders_url_in_get_and_the_webhook() {
    const TTL_SECS: u64 = 900;
    let s3 = S3Server::start();
    s3.create_bucket("deliveries").await;
    let receiver = Receiver::start(&[]).await;
    let fleet = Fleet::start_with(Services::ALL, |config| {
        config.webhooks.enabled = true;
        config.webhooks.allow_private_addresses = true;
        // The one setting: the coordinator puts it on the deliver task.
        config.coordinator.download_url_ttl_secs = TTL_SECS;
    })
    .await;
    let mut spec = spec(&fleet.sample_uri().await, 20);
    spec.secrets = Some(s3.job_secrets());
    spec.destinations = vec![Destination {
        uri: "s3://deliveries/out".into(),
        ..Default::default()
    }];
    spec.webhook = Some(trainyard_proto::v1::Webhook {
        url: receiver.url(),
        events: vec![],
    });
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;
    let record = get(&mut client, &job.job_id).await;
    // Final: its sealed keys are gone from the record, so only the
    // uploader could have signed what follows.
    assert_eq!(record.state(), JobState::Succeeded, "{:?}", record.error);

    let copies: Vec<_> = record
        .delivered
        .iter()
        .filter(|d| d.destination == "s3://deliveries/out")
        .collect();
    assert!(!copies.is_empty(), "{:?}", record.delivered);
    let times = record.times.unwrap_or_default();
    for copy in &copies {
        let url = &copy.download_url;
        // Signed by the uploader with the job's own key, for the fleet's TTL.
        assert!(url.contains("X-Amz-Credential=tenant-key"), "{copy:?}");
        assert!(url.contains(&format!("X-Amz-Expires={TTL_SECS}")), "{url}");
        let signed_at = copy.download_url_expires_at_ms - (TTL_SECS * 1000) as i64;
        assert!(
            signed_at > times.delivering_at_ms - 1000 && signed_at <= times.finished_at_ms,
            "signed at {signed_at}, delivering {}..{}",
            times.delivering_at_ms,
            times.finished_at_ms
        );
        // It downloads exactly the delivered bytes, with no credentials.
        assert_eq!(
            fetch_sha256(url).await,
            (200, copy.sha256.clone()),
            "{}",
            copy.uri
        );
    }
    let adapter = record
        .artifacts
        .iter()
        .find(|a| a.name == "lora.safetensors")
        .expect("adapter");
    assert!(copies.iter().any(|c| c.sha256 == adapter.sha256));

    // The webhook carries the same URLs and times.
    let hits = receiver.wait_hits(1, Duration::from_secs(60)).await;
    let body = hits[0].json();
    assert_eq!(body["type"], "job.completed");
    let sent = body["data"]["delivered"].as_array().expect("delivered");
    for copy in &copies {
        let hooked = sent
            .iter()
            .find(|d| d["uri"] == copy.uri.as_str())
            .unwrap_or_else(|| panic!("{} not in the webhook: {sent:?}", copy.uri));
        assert_eq!(hooked["download_url"], copy.download_url.as_str());
        assert_eq!(
            hooked["download_url_expires_at"],
            trainyard_core::rfc3339(copy.download_url_expires_at_ms).as_str()
        );
        let url = hooked["download_url"].as_str().unwrap();
        assert_eq!(fetch_sha256(url).await, (200, copy.sha256.clone()));
    }

    // No URL is in the job's events.
    let signature = |url: &str| {
        url.split('&')
            .find_map(|p| p.strip_prefix("X-Amz-Signature="))
            .map(str::to_owned)
            .expect("signed")
    };
    let shown_events = format!("{events:?}");
    for copy in &copies {
        assert!(
            !shown_events.contains(&signature(&copy.download_url)),
            "a URL in the events"
        );
    }
    fleet.stop().await;
}
