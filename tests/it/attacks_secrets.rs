//! Secrets never in clear outside the submitting call: a job with
//! distinctive secrets (a Hub token, an `s3://` destination's own keys)
//! runs to SUCCEEDED, delivering to S3 with those keys, while a wildcard
//! subscriber records every message on the bus; then no secret value is in
//! any recorded message (tasks, results, events, KV writes, API traffic), in
//! any stream's stored messages (every KV key and revision, TY_TASKS,
//! TY_RESULTS, TY_EVENTS, TY_DLQ), nor in what the API returns. The sealed
//! form did travel (its key id is seen), and the final record keeps none.
//!
//! One form of the access key id is by design: the delivered copy's
//! download URL, presigned by the uploader with the job's own keys, names
//! it in `X-Amz-Credential` as every S3 presigned URL does (an access key
//! id is an identifier, not a secret; the secret key signs and is never
//! sent). That form is allowed; the id anywhere else, and the secret key
//! anywhere at all, is a leak.

use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trainyard_core::store::ArtifactStore;
use trainyard_core::topology::JOBS_BUCKET;
use trainyard_proto::v1::{Destination, JobRecord, JobState, Secrets};
use trainyard_tests::*;

const HF_TOKEN: &str = "hf_SEALEDxHUBx7c1";
const ACCESS_KEY: &str = "AKIDSEALEDx7c1";
const SECRET_KEY: &str = "s3SEALEDxSECRETx7c1";
const EXTRA: &str = "xyzzySEALEDxEXTRAx7c1";

/// A recorded message: its subject, and its subject, headers and payload as bytes.
type Seen = (String, Vec<u8>);

/// The access key id as a presigned URL names it.
const PRESIGNED_CREDENTIAL: &str = "X-Amz-Credential=AKIDSEALEDx7c1%2F";

fn leaks(bytes: &[u8]) -> Option<&'static str> {
    let allowed = PRESIGNED_CREDENTIAL.as_bytes();
    let mut scrubbed = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(allowed) {
            scrubbed.extend_from_slice(b"X-Amz-Credential=<id>%2F");
            i += allowed.len();
        } else {
            scrubbed.push(bytes[i]);
            i += 1;
        }
    }
    [HF_TOKEN, ACCESS_KEY, SECRET_KEY, EXTRA]
        .into_iter()
        .find(|secret| contains(&scrubbed, secret))
}

fn contains(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Every message and its headers, as one byte string.
fn message_bytes(
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Vec<u8> {
    let mut bytes = subject.as_bytes().to_vec();
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            bytes.extend_from_slice(name.as_ref());
            for value in values {
                bytes.extend_from_slice(value.as_str().as_bytes());
            }
        }
    }
    bytes.extend_from_slice(payload);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_reaches_the_bus_the_streams_or_the_api() {
    let s3 = S3Server::start();
    s3.create_bucket("deliveries").await;
    let options = s3.options();
    let fleet = Fleet::start_with(Services::ALL, |config| config.store.s3 = options).await;
    let key_id = trainyard_core::secrets::Keyring::from_config(&fleet.config.secrets)
        .expect("key file")
        .expect("a key")
        .current_key_id()
        .to_string();

    // Everything published on the account, from before the submit.
    let nats = fleet.nats_client().await;
    let mut everything = nats.subscribe(">").await.expect("wildcard subscription");
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(message) = everything.next().await {
                let bytes = message_bytes(
                    message.subject.as_str(),
                    message.headers.as_ref(),
                    &message.payload,
                );
                seen.lock()
                    .unwrap()
                    .push((message.subject.to_string(), bytes));
            }
        })
    };

    let mut spec = spec(&fleet.sample_uri().await, 20);
    spec.destinations.push(Destination {
        uri: "s3://deliveries/out".into(),
        ..Default::default()
    });
    let mut secrets: Secrets = s3.job_secrets();
    secrets.hf_token = HF_TOKEN.into();
    use trainyard_core::destination::secret_keys;
    secrets
        .values
        .insert(secret_keys::ACCESS_KEY_ID.into(), ACCESS_KEY.into());
    secrets
        .values
        .insert(secret_keys::SECRET_ACCESS_KEY.into(), SECRET_KEY.into());
    secrets.values.insert("EXTRA_TOKEN".into(), EXTRA.into());
    spec.secrets = Some(secrets);

    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec).await;
    assert!(leaks(format!("{job:?}").as_bytes()).is_none());
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "{:?} {events:?}",
        record.error
    );
    // Delivered to S3 with the job's own (sealed, then opened) keys.
    let bucket = ArtifactStore::open_with("s3://deliveries", &s3.options()).expect("bucket");
    let delivered = bucket
        .list(&format!("out/{}", record.job_id))
        .await
        .expect("list the destination");
    assert!(!delivered.is_empty(), "nothing delivered to S3");
    assert!(leaks(format!("{record:?}{events:?}").as_bytes()).is_none());
    let in_s3 = record
        .delivered
        .iter()
        .find(|d| d.destination == "s3://deliveries/out")
        .expect("the S3 copy");
    assert!(
        in_s3.download_url.contains(PRESIGNED_CREDENTIAL),
        "the S3 copy's URL is presigned with the job's own key: {in_s3:?}"
    );

    // The bus: every message the job's run put on it.
    // The server routes in order: once our marker is recorded, so is
    // everything published before the job was seen final.
    nats.publish("test.secrets.marker", "done".into())
        .await
        .expect("marker");
    nats.flush().await.expect("flush");
    wait_for("the recorder to catch up", Duration::from_secs(10), || {
        let caught_up = seen
            .lock()
            .unwrap()
            .iter()
            .any(|(subject, _)| subject == "test.secrets.marker");
        async move { caught_up.then_some(()) }
    })
    .await;
    {
        let seen = seen.lock().unwrap();
        for (subject, bytes) in seen.iter() {
            assert_eq!(leaks(bytes), None, "a secret on the bus in {subject}");
        }
        assert!(
            seen.iter().any(|(_, bytes)| contains(bytes, &key_id)),
            "the sealed secrets never travelled"
        );
    }

    // The streams: every stored message of every stream and bucket, all revisions.
    let js = async_nats::jetstream::new(nats.clone());
    let mut names = js.stream_names();
    let mut streams = Vec::new();
    while let Some(name) = names.next().await {
        streams.push(name.expect("stream name"));
    }
    for wanted in [
        "TY_TASKS",
        "TY_RESULTS",
        "TY_EVENTS",
        "TY_DLQ",
        "KV_ty_jobs",
    ] {
        assert!(
            streams.iter().any(|s| s == wanted),
            "{wanted} among {streams:?}"
        );
    }
    let mut read = 0;
    for name in &streams {
        let mut stream = js.get_stream(name).await.expect("stream");
        let state = stream.info().await.expect("info").state.clone();
        if state.messages == 0 {
            continue;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(message) = stream.get_raw_message(seq).await else {
                continue; // deleted (acked work-queue messages)
            };
            read += 1;
            let bytes = message_bytes(
                message.subject.as_str(),
                Some(&message.headers),
                &message.payload,
            );
            assert_eq!(leaks(&bytes), None, "a secret in {name} #{seq}");
        }
    }
    assert!(read > 0);

    // The final record keeps no secrets, not even sealed.
    let kv = js.get_key_value(JOBS_BUCKET).await.expect("jobs bucket");
    let stored = kv
        .get(format!("acme.{}", record.job_id))
        .await
        .expect("get")
        .expect("the record");
    let stored = <JobRecord as prost::Message>::decode(stored).expect("a record");
    assert!(stored.spec.unwrap().sealed_secrets.is_none());

    recorder.abort();
    fleet.stop().await;
}

/// Secrets copied from one job into another's spec are refused at submit
/// (`sealed_secrets` is the fleet's), and a fleet without a key refuses
/// jobs with secrets rather than keep them in clear.
#[tokio::test]
async fn sealed_secrets_are_the_fleets_and_a_fleet_without_a_key_refuses_secrets() {
    let coordinator = Services {
        coordinator: true,
        ..Services::NONE
    };
    let fleet = Fleet::start_with(coordinator, |config| config.secrets.key_file = None).await;
    let mut client = fleet.client(TOKEN).await;
    let mut with_secrets = spec(&fleet.upload_uri("acme", "set"), 10);
    with_secrets.secrets = Some(Secrets {
        hf_token: HF_TOKEN.into(),
        ..Default::default()
    });
    let status = client
        .submit(trainyard_proto::v1::SubmitRequest {
            spec: Some(with_secrets),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("key_file"),
        "{}",
        status.message()
    );
    assert!(leaks(status.message().as_bytes()).is_none());
    let mut forged = spec(&fleet.upload_uri("acme", "set"), 10);
    forged.sealed_secrets = Some(Default::default());
    let status = client
        .submit(trainyard_proto::v1::SubmitRequest { spec: Some(forged) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("sealed_secrets"),
        "{}",
        status.message()
    );
    fleet.stop().await;
}
