//! The coordinator: the only writer of job state.
//!
//! It serves the job API over gRPC ([`grpc`]) and NATS request/reply
//! ([`nats_api`]), both thin layers over [`api::JobApi`]; applies stage
//! results to records through the pure state machine in [`job`]
//! ([`results`]); repairs jobs whose task went missing ([`reconcile`]);
//! and reports the stage backlogs and dead-letter depth ([`backlog`]).
//! Its spans join each job's trace ([`trace`]).
//! It keeps no state of its own: run one replica or several.

pub mod api;
pub mod backlog;
pub mod effects;
pub mod grpc;
pub mod job;
pub mod nats_api;
pub mod reconcile;
pub mod repo;
pub mod results;
pub mod trace;
pub mod validate;
pub mod webhooks;

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trainyard_core::{Config, topology};
use trainyard_proto::v1::job_service_server::JobServiceServer;

/// Binds the gRPC port and then serves until `shutdown`. `ready` receives
/// the bound address (useful with port 0).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let Some((client, topo)) =
        trainyard_core::service::connect(&config, "ty-coordinator", &shutdown).await?
    else {
        return Ok(()); // stopped before NATS was ready
    };
    let js = topo.js.clone();
    let repo = repo::JobRepo::new(topo.jobs.clone(), js.clone());
    let effects = effects::Effects {
        client: client.clone(),
        js: js.clone(),
        repo: repo.clone(),
    };
    let api = api::JobApi {
        repo: repo.clone(),
        idem: topo.idem.clone(),
        js: js.clone(),
        effects: effects.clone(),
        client: client.clone(),
        validate_timeout: Duration::from_secs(config.coordinator.validate_timeout_secs.max(1)),
        webhooks: webhooks::SubmitRules::from_config(&config.webhooks),
    };
    let deliverer = webhooks::Deliverer::new(&config.webhooks, repo.clone(), js.clone())?;
    let auth = api::Auth::new(&config.coordinator.tokens);

    let store =
        trainyard_core::store::ArtifactStore::open_with(&config.store.uri, &config.store.s3)?;
    let reconciler = reconcile::Reconciler {
        js: js.clone(),
        repo: repo.clone(),
        effects: effects.clone(),
        idem: topo.idem.clone(),
        store,
    };
    // On start-up every record counts as stale: this replica may be the
    // one that died mid-way.
    reconciler.pass_logged(0).await;

    let api_requests = nats_api::subscribe(&client)
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to the NATS API: {e}"))?;
    let listener = TcpListener::bind(&config.coordinator.grpc_addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "gRPC listening");
    if let Some(ready) = ready {
        let _ = ready.send(addr);
    }

    let tasks = TaskTracker::new();
    let Some(consumer) = topology::until_ready("the results consumer", &shutdown, || {
        topology::results_consumer(&js, &config.nats)
    })
    .await
    else {
        return Ok(());
    };
    {
        let (repo, effects, stop) = (repo.clone(), effects.clone(), shutdown.child_token());
        let claims = topo.claims.clone();
        // Ends on shutdown; an error stops the whole coordinator.
        let failed = shutdown.clone();
        tasks.spawn(async move {
            if let Err(error) = results::run(consumer, repo, claims, effects, stop).await {
                tracing::error!(%error, "result loop failed");
                failed.cancel();
            }
        });
    }
    if let Some(deliverer) = deliverer {
        let ack_wait = webhooks::Deliverer::ack_wait(&config.webhooks);
        let Some(consumer) = topology::until_ready("the webhooks consumer", &shutdown, || {
            topology::webhooks_consumer(&js, ack_wait)
        })
        .await
        else {
            return Ok(());
        };
        let stop = shutdown.child_token();
        tasks.spawn(async move {
            if let Err(error) = deliverer.run(consumer, stop).await {
                tracing::error!(%error, "webhook loop failed");
            }
        });
    }
    {
        let (client, api, auth, stop) = (
            client.clone(),
            api.clone(),
            auth.clone(),
            shutdown.child_token(),
        );
        tasks.spawn(async move {
            if let Err(error) = nats_api::serve(client, api_requests, api, auth, stop).await {
                tracing::error!(%error, "nats api failed");
            }
        });
    }
    {
        let (reconciler, stop) = (reconciler.clone(), shutdown.child_token());
        let every = Duration::from_secs(config.coordinator.reconcile_interval_secs.max(1));
        let stale_ms = (config.coordinator.stale_after_secs * 1000) as i64;
        tasks.spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticker.tick() => reconciler.pass_logged(stale_ms).await,
                }
            }
        });
    }

    {
        let (js, stop) = (js.clone(), shutdown.child_token());
        let every = Duration::from_secs(config.coordinator.backlog_interval_secs.max(1));
        tasks.spawn(backlog::run(js, every, stop));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<JobServiceServer<grpc::GrpcJobService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(trainyard_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = JobServiceServer::new(grpc::GrpcJobService { api, auth });
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stop = shutdown.clone();
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
        .await?;
    tasks.close();
    tasks.wait().await;
    tracing::info!("coordinator stopped");
    Ok(())
}
