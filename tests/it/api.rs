//! The job API: validation, idempotency, tenant isolation, auth, and the
//! same operations over NATS request/reply. Only the coordinator runs here:
//! these tests look at records, not at training.

use prost::Message;
use std::time::Duration;
use trainyard_proto::v1::{
    ApiReply, DatasetSource, GetRequest, ListRequest, SubmitRequest, api_reply::Result as Reply,
};
use trainyard_tests::*;

fn coordinator_only() -> Services {
    Services {
        coordinator: true,
        captioner: false,
        worker: false,
        uploader: false,
    }
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let fleet = Fleet::start_with(coordinator_only(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let base = spec(&fleet.upload_uri("acme", "set.zip"), 10);
    type Change = Box<dyn Fn(&mut trainyard_proto::v1::JobSpec)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "training.steps",
            Box::new(|s| s.training.as_mut().unwrap().steps = 0),
        ),
        (
            "training.backend",
            Box::new(|s| s.training.as_mut().unwrap().backend = "dreambooth9000".into()),
        ),
        (
            "dataset",
            Box::new(|s| s.dataset = Some(DatasetSource { source: None })),
        ),
        (
            "training.rank",
            Box::new(|s| s.training.as_mut().unwrap().rank = 0),
        ),
    ];
    for (field, change) in cases {
        let mut spec = base.clone();
        change(&mut spec);
        let status = client
            .submit(SubmitRequest { spec: Some(spec) })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    let status = client
        .submit(SubmitRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let list = client
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.jobs.is_empty(),
        "no job was created by a bad submission"
    );
    fleet.stop().await;
}

#[tokio::test]
async fn same_idempotency_key_returns_the_same_job() {
    let fleet = Fleet::start_with(coordinator_only(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.upload_uri("acme", "set.zip"), 10);
    spec.idempotency_key = "upload-7f3a".into();
    let first = client
        .submit(SubmitRequest {
            spec: Some(spec.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let second = client
        .submit(SubmitRequest {
            spec: Some(spec.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.job.unwrap().job_id, second.job.unwrap().job_id);
    // Another tenant with the same key (and its own dataset) gets its own job.
    let mut other = fleet.client(OTHER_TOKEN).await;
    spec.dataset = trainyard_tests::spec(&fleet.upload_uri("globex", "set.zip"), 10).dataset;
    let theirs = other
        .submit(SubmitRequest { spec: Some(spec) })
        .await
        .unwrap()
        .into_inner();
    assert!(!theirs.duplicate);
    let list = client
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.jobs.len(), 1);
    fleet.stop().await;
}

#[tokio::test]
async fn list_and_get_show_only_the_callers_jobs() {
    let fleet = Fleet::start_with(coordinator_only(), |_| {}).await;
    let mut acme = fleet.client(TOKEN).await;
    let mut globex = fleet.client(OTHER_TOKEN).await;
    let mut mine = Vec::new();
    for _ in 0..3 {
        let job = submit(&mut acme, spec(&fleet.upload_uri("acme", "a.zip"), 10)).await;
        mine.push(job.job_id);
    }
    let theirs = submit(&mut globex, spec(&fleet.upload_uri("globex", "b.zip"), 10)).await;
    // Pages of two, newest first.
    let page = acme
        .list(ListRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 2);
    assert_eq!(page.jobs[0].job_id, mine[2]);
    assert!(!page.next_page_token.is_empty());
    let rest = acme
        .list(ListRequest {
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.jobs.len(), 1);
    assert_eq!(rest.jobs[0].job_id, mine[0]);
    assert!(rest.next_page_token.is_empty());
    let globex_list = globex
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(globex_list.jobs.len(), 1);
    assert_eq!(globex_list.jobs[0].job_id, theirs.job_id);
    // Another tenant's job is not found, not forbidden: its existence is not revealed.
    let status = acme
        .get(GetRequest {
            job_id: theirs.job_id,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    fleet.stop().await;
}

#[tokio::test]
async fn secrets_are_never_echoed_and_unknown_tokens_are_refused() {
    let fleet = Fleet::start_with(coordinator_only(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.upload_uri("acme", "set.zip"), 10);
    spec.secrets = Some(trainyard_proto::v1::Secrets {
        hf_token: "hf_SUPERSECRET".into(),
        ..Default::default()
    });
    let job = submit(&mut client, spec).await;
    assert!(!format!("{job:?}").contains("hf_SUPERSECRET"));
    let got = get(&mut client, &job.job_id).await;
    assert!(!format!("{got:?}").contains("hf_SUPERSECRET"));
    let mut stranger = fleet.client("nope").await;
    let status = stranger.list(ListRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    fleet.stop().await;
}

#[tokio::test]
async fn the_api_answers_over_nats_request_reply() {
    let fleet = Fleet::start_with(coordinator_only(), |_| {}).await;
    let nats = fleet.nats_client().await;
    let request = |op: &str, token: &str, body: Vec<u8>| {
        let nats = nats.clone();
        let (op, token) = (op.to_string(), token.to_string());
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("authorization", format!("Bearer {token}").as_str());
            let reply = tokio::time::timeout(
                Duration::from_secs(10),
                nats.request_with_headers(format!("ty.api.{op}"), headers, body.into()),
            )
            .await
            .expect("reply in time")
            .expect("request");
            ApiReply::decode(reply.payload)
                .expect("ApiReply")
                .result
                .expect("result")
        }
    };
    let submitted = request(
        "submit",
        TOKEN,
        SubmitRequest {
            spec: Some(spec(&fleet.upload_uri("acme", "set.zip"), 10)),
        }
        .encode_to_vec(),
    )
    .await;
    let Reply::Submit(submitted) = submitted else {
        panic!("{submitted:?}")
    };
    let id = submitted.job.unwrap().job_id;
    let got = request(
        "get",
        TOKEN,
        GetRequest { job_id: id.clone() }.encode_to_vec(),
    )
    .await;
    assert!(matches!(got, Reply::Get(ref g) if g.job.as_ref().unwrap().job_id == id));
    let denied = request("get", "wrong", GetRequest { job_id: id }.encode_to_vec()).await;
    assert!(
        matches!(denied, Reply::Error(ref e) if e.code == "Unauthenticated"),
        "{denied:?}"
    );
    let garbage = request("submit", TOKEN, vec![0xff, 0xff, 0xff]).await;
    assert!(
        matches!(garbage, Reply::Error(ref e) if e.code == "InvalidArgument"),
        "{garbage:?}"
    );
    fleet.stop().await;
}

#[tokio::test]
async fn health_reports_the_job_service_serving() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let fleet = Fleet::start_with(coordinator_only(), |_| {}).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", fleet.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: "trainyard.v1.JobService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    fleet.stop().await;
}

#[tokio::test]
async fn a_slow_validate_does_not_hold_up_a_get_over_nats() {
    use futures::StreamExt as _;
    let fleet = Fleet::start_with(coordinator_only(), |c| {
        c.coordinator.validate_timeout_secs = 600;
    })
    .await;
    let nats = fleet.nats_client().await;
    // A captioner that takes the preflight request and answers only when told.
    let mut preflight = nats
        .queue_subscribe("ty.preflight", "ty-captioner".into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {TOKEN}").as_str());
    let validate = {
        let (nats, headers) = (nats.clone(), headers.clone());
        let body = trainyard_proto::v1::ValidateRequest {
            spec: Some(spec(&fleet.upload_uri("acme", "set.zip"), 10)),
        };
        tokio::spawn(async move {
            nats.request_with_headers("ty.api.validate", headers, body.encode_to_vec().into())
                .await
        })
    };
    let held = tokio::time::timeout(Duration::from_secs(10), preflight.next())
        .await
        .expect("the coordinator asks a captioner")
        .expect("subscribed");
    // The Validate waits on the captioner; a Get is answered meanwhile.
    let body = GetRequest {
        job_id: "j-missing".into(),
    };
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        nats.request_with_headers("ty.api.get", headers, body.encode_to_vec().into()),
    )
    .await
    .expect("a Get is not stalled by a running Validate")
    .expect("request");
    let got = ApiReply::decode(got.payload).unwrap().result.unwrap();
    assert!(
        matches!(got, Reply::Error(ref e) if e.code == "NotFound"),
        "{got:?}"
    );
    assert!(!validate.is_finished());
    let answer = trainyard_proto::v1::ValidateReply {
        ok: true,
        ..Default::default()
    };
    nats.publish(held.reply.unwrap(), answer.encode_to_vec().into())
        .await
        .unwrap();
    let validated = tokio::time::timeout(Duration::from_secs(10), validate)
        .await
        .expect("validate answered")
        .unwrap()
        .expect("request");
    let validated = ApiReply::decode(validated.payload).unwrap().result.unwrap();
    assert!(
        matches!(validated, Reply::Validate(ref v) if v.ok),
        "{validated:?}"
    );
    fleet.stop().await;
}
