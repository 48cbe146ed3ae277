//! Client authentication, closed by default: no token works unless listed
//! (by its hash), a coordinator with none refuses to start, failed attempts
//! are limited per peer over gRPC and the NATS API, and gRPC serves TLS
//! when given a certificate (plain only on loopback).

use prost::Message;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use trainyard_coordinator::listen::ListenError;
use trainyard_proto::v1::job_service_client::JobServiceClient;
use trainyard_proto::v1::{ApiReply, ListRequest, api_reply::Result as Reply};
use trainyard_tests::{Bearer, Fleet, OTHER_TOKEN, Services, TOKEN};

fn coordinator_only() -> Services {
    Services {
        coordinator: true,
        ..Services::NONE
    }
}

/// The coordinator's own error when it will not start.
async fn refused(config: trainyard_core::Config) -> ListenError {
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        trainyard_coordinator::run(config, Default::default(), None),
    )
    .await
    .expect("refused at once");
    result
        .expect_err("the coordinator must not start")
        .downcast::<ListenError>()
        .expect("a listen error")
}

#[tokio::test]
async fn no_tokens_or_plain_grpc_off_loopback_and_the_coordinator_refuses_to_start() {
    let fleet = Fleet::start_with(Services::NONE, |_| {}).await;
    let mut config = fleet.config.clone();
    config.coordinator.tokens.clear();
    assert!(matches!(refused(config).await, ListenError::NoTokens));
    let mut config = fleet.config.clone();
    config.coordinator.grpc_addr = "0.0.0.0:0".into();
    assert!(matches!(
        refused(config).await,
        ListenError::PlainOffLoopback(_)
    ));
    fleet.stop().await;
}

#[tokio::test]
async fn failed_attempts_are_limited_per_peer_over_grpc() {
    let fleet = Fleet::start_with(coordinator_only(), |config| {
        config.coordinator.auth_failures_per_minute = 3;
    })
    .await;
    // The stored hash is not a token either.
    let guesses = ["guess-1", "guess-2", &trainyard_tests::token_key(TOKEN)];
    for guess in guesses {
        let status = fleet
            .client(guess)
            .await
            .list(ListRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{guess}");
    }
    // This peer (127.0.0.1) is refused now, even with a good token.
    let status = fleet
        .client(TOKEN)
        .await
        .list(ListRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("too many failed authentications"),
        "{}",
        status.message()
    );
    fleet.stop().await;
}

#[tokio::test]
async fn failed_attempts_are_limited_per_caller_over_nats() {
    let fleet = Fleet::start_with(coordinator_only(), |config| {
        config.coordinator.auth_failures_per_minute = 2;
    })
    .await;
    let list = |nats: async_nats::Client, token: &'static str| async move {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {token}").as_str());
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            nats.request_with_headers(
                "ty.api.list",
                headers,
                ListRequest::default().encode_to_vec().into(),
            ),
        )
        .await
        .expect("reply in time")
        .expect("request");
        ApiReply::decode(reply.payload)
            .expect("ApiReply")
            .result
            .expect("result")
    };
    let guesser = fleet.nats_client().await;
    for _ in 0..2 {
        let reply = list(guesser.clone(), "guess").await;
        assert!(
            matches!(&reply, Reply::Error(e) if e.code == "Unauthenticated"),
            "{reply:?}"
        );
    }
    let reply = list(guesser.clone(), OTHER_TOKEN).await;
    assert!(
        matches!(&reply, Reply::Error(e) if e.code == "ResourceExhausted" && e.message.contains("retry in")),
        "{reply:?}"
    );
    // Another connection (another inbox) is not held up by the guesser.
    let reply = list(fleet.nats_client().await, OTHER_TOKEN).await;
    assert!(matches!(reply, Reply::List(_)), "{reply:?}");
    fleet.stop().await;
}

#[tokio::test]
async fn grpc_serves_tls_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = trainyard_tests::localhost_cert(dir.path());
    let (c, k) = (cert.clone(), key.clone());
    let fleet = Fleet::start_with(coordinator_only(), move |config| {
        config.coordinator.tls_cert_file = Some(c);
        config.coordinator.tls_key_file = Some(k);
    })
    .await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&cert).unwrap()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", fleet.grpc.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("a TLS connection");
    let mut client = JobServiceClient::with_interceptor(channel, Bearer(TOKEN.into()));
    client
        .list(ListRequest::default())
        .await
        .expect("an authenticated call over TLS");
    // Plain gRPC to the TLS port gets no answer.
    let plain = Channel::from_shared(format!("http://{}", fleet.grpc))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        let mut client = JobServiceClient::with_interceptor(plain, Bearer(TOKEN.into()));
        assert!(client.list(ListRequest::default()).await.is_err());
    }
    fleet.stop().await;
}
