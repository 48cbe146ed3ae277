//! Caption review end to end: a job with `caption.review` stops after
//! preparing in AWAITING_REVIEW with no task out and its deadline paused,
//! its captions are read and edited under optimistic concurrency (gRPC and
//! the NATS API), and the approved captions reach the trainer: the
//! reference trainer counts caption tags into the adapter's
//! `ss_tag_frequency`, so an edited tag shows there.

use prost::Message;
use std::time::Duration;
use tonic::Code;
use trainyard_core::claim::Claims;
use trainyard_core::manifest::DatasetManifest;
use trainyard_core::store::keys;
use trainyard_core::topology::{AUTH_HEADER, ApiOp, CLAIMS_BUCKET, TASKS_STREAM, subject};
use trainyard_proto::v1::{
    ApiReply, ApproveCaptionsRequest, CaptionEntry, GetCaptionsRequest, JobState, Stage,
    UpdateCaptionsRequest, Webhook, api_reply::Result as Reply, job_event::Kind,
};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::webhook::Receiver;
use trainyard_tests::*;

const HOUR_MS: i64 = 3_600_000;
const EDITED_TAG: &str = "reviewedtag42";

async fn get_captions_over_nats(nats: &async_nats::Client, job: &str) -> Reply {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(AUTH_HEADER, format!("Bearer {TOKEN}").as_str());
    let body = GetCaptionsRequest { job_id: job.into() }.encode_to_vec();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        nats.request_with_headers(subject::api(ApiOp::GetCaptions), headers, body.into()),
    )
    .await
    .expect("reply in time")
    .expect("reply");
    ApiReply::decode(reply.payload)
        .expect("ApiReply")
        .result
        .expect("result")
}

/// The status code of a call expected to fail.
fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.map(|_| ()).unwrap_err().code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewed_job_waits_without_a_task_and_trains_on_its_edited_captions() {
    let receiver = Receiver::start(&[]).await;
    let fleet = Fleet::start_with(Services::ALL, |config| {
        config.webhooks.enabled = true;
        config.webhooks.allow_private_addresses = true;
        config.webhooks.initial_delay_ms = 200;
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();
    let mut spec = with_destination(spec(&fleet.sample_uri().await, 10), &outputs);
    spec.caption.as_mut().unwrap().review = true;
    spec.timeout_secs = 60;
    spec.webhook = Some(Webhook {
        url: receiver.url(),
        events: vec!["state".into()],
    });
    let job = submit(&mut client, spec).await;
    let id = job.job_id.clone();

    // Prepared, then waiting: no train task, no claim, a state webhook.
    let waiting = wait_for("AWAITING_REVIEW", Duration::from_secs(60), || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let record = get(&mut client, &id).await;
            assert!(!record.state().is_final(), "{record:?}");
            (record.state() == JobState::AwaitingReview).then_some(record)
        }
    })
    .await;
    assert_eq!(waiting.captions_version, 1);
    assert_eq!(waiting.stage(), Stage::Prepare);
    let hit = wait_for(
        "the awaiting_review webhook",
        Duration::from_secs(30),
        || async {
            receiver
                .hits()
                .into_iter()
                .find(|h| h.json()["data"]["state"] == "awaiting_review")
        },
    )
    .await;
    assert_eq!(hit.json()["data"]["job_id"], id.as_str());
    assert_eq!(hit.json()["data"]["captions_version"], 1);

    let CoordinatorParts {
        nats,
        js,
        repo,
        reconciler,
        ..
    } = fleet.coordinator_parts().await;
    let (tenant, job_id) = (TenantId::parse("acme").unwrap(), JobId::parse(&id).unwrap());
    let claims = js.get_key_value(CLAIMS_BUCKET).await.unwrap();
    let no_train_task = || async {
        let claim = Claims::stored(&claims, &tenant, &job_id, Stage::Train)
            .await
            .unwrap();
        assert!(claim.is_none(), "a train claim while in review: {claim:?}");
        let mut stream = js.get_stream(TASKS_STREAM).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.state.messages, 0, "a task in TY_TASKS while in review");
    };
    // The prepare task leaves TY_TASKS once the captioner's ack lands.
    wait_for(
        "the prepare task acked",
        Duration::from_secs(10),
        || async {
            let mut stream = js.get_stream(TASKS_STREAM).await.unwrap();
            (stream.info().await.unwrap().state.messages == 0).then_some(())
        },
    )
    .await;
    no_train_task().await;

    // Waiting an hour in review with a 60 s timeout: the reconciler fails
    // nothing and republishes nothing (the record made an hour older
    // rather than a test that waits).
    repo.update(&tenant, &job_id, |mut record| async move {
        record.created_at_ms -= HOUR_MS;
        record.times.as_mut().unwrap().awaiting_review_at_ms -= HOUR_MS;
        (Some(record), ())
    })
    .await
    .unwrap();
    for _ in 0..2 {
        let pass = reconciler.pass(0).await.unwrap();
        assert_eq!((pass.failed, pass.republished), (0, 0), "{pass:?}");
    }
    assert_eq!(
        get(&mut client, &id).await.state(),
        JobState::AwaitingReview
    );
    no_train_task().await;

    // Read, then edit under the version.
    let captions = client
        .get_captions(GetCaptionsRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((captions.version, captions.entries.len()), (1, 8));
    let first = captions.entries[0].clone();
    assert_eq!(first.media, "image");
    let edited = format!("tyzx, {EDITED_TAG}, a photo");
    let edit = |version: u32, path: &str, caption: &str| UpdateCaptionsRequest {
        job_id: id.clone(),
        version,
        entries: vec![CaptionEntry {
            path: path.into(),
            caption: caption.into(),
            ..Default::default()
        }],
    };
    let mut other = fleet.client(OTHER_TOKEN).await;
    assert_eq!(
        code(
            other
                .get_captions(GetCaptionsRequest { job_id: id.clone() })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(other.update_captions(edit(1, &first.path, &edited)).await),
        Code::NotFound
    );
    assert_eq!(
        code(client.update_captions(edit(1, "../x.png", &edited)).await),
        Code::InvalidArgument
    );
    let updated = client
        .update_captions(edit(1, &first.path, &format!(" {edited}\n")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.version, 2);
    let stale = client
        .update_captions(edit(1, &first.path, "tyzx, lost"))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert!(stale.message().contains("version 2"), "{}", stale.message());
    // The NATS API answers the same.
    match get_captions_over_nats(&nats, &id).await {
        Reply::Captions(c) => {
            assert_eq!(c.version, 2);
            let entry = c.entries.iter().find(|e| e.path == first.path).unwrap();
            assert_eq!(
                (entry.caption.as_str(), entry.source.as_str()),
                (edited.as_str(), "edited")
            );
        }
        other => panic!("{other:?}"),
    }

    // Approve: a stale version is refused, the current one trains, again is fine.
    let approve = |version| ApproveCaptionsRequest {
        job_id: id.clone(),
        version,
    };
    assert_eq!(
        code(client.approve_captions(approve(1)).await),
        Code::Aborted
    );
    let approved = client
        .approve_captions(approve(2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.job.unwrap().state(), JobState::Training);
    let again = client
        .approve_captions(approve(0))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.job.unwrap().state(), JobState::AwaitingReview);
    assert_eq!(
        code(
            client
                .update_captions(edit(2, &first.path, "tyzx, late"))
                .await
        ),
        Code::FailedPrecondition
    );

    let events = watch_all(&mut client, &id, Duration::from_secs(180)).await;
    let states: Vec<JobState> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::State(s)) => Some(s.state()),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::Preparing,
            JobState::AwaitingReview,
            JobState::Training,
            JobState::Delivering,
            JobState::Succeeded
        ]
    );
    let record = get(&mut client, &id).await;
    assert!(
        record.review_paused_ms >= HOUR_MS as u64,
        "paused {}",
        record.review_paused_ms
    );

    // The dataset the worker fetched holds the edit, and the trainer read it.
    let manifest: DatasetManifest = serde_json::from_slice(
        &fleet
            .store
            .get_bytes(&keys::dataset_file(&tenant, &job_id, "manifest.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    let entry = manifest
        .images
        .iter()
        .find(|e| e.file == first.path)
        .unwrap();
    assert_eq!(entry.caption, edited);
    let text = fleet
        .store
        .get_bytes(&keys::dataset_file(&tenant, &job_id, &entry.caption_file))
        .await
        .unwrap();
    assert_eq!(std::str::from_utf8(&text).unwrap(), edited);
    let adapter = std::fs::read(outputs.join(&id).join("lora.safetensors")).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&adapter).unwrap();
    let tags = metadata.metadata().clone().unwrap()["ss_tag_frequency"].clone();
    assert!(tags.contains(EDITED_TAG), "ss_tag_frequency {tags}");
    fleet.stop().await;
}
