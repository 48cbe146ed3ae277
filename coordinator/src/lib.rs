//! The coordinator: the only writer of job state.
//!
//! It serves the job API over gRPC ([`grpc`]) and NATS request/reply
//! ([`nats_api`]), both thin layers over [`api::JobApi`]; applies stage
//! results to records through the pure state machine in [`job`]
//! ([`results`]); repairs jobs whose task went missing ([`reconcile`]);
//! and reports the stage backlogs and dead-letter depth ([`backlog`]).
//! Its spans join each job's trace ([`trace`]).
//! It keeps no state of its own: run one replica or several.
//!
//! Its background loops run under [`trainyard_core::supervise`]: a failed
//! result loop stops the coordinator; the NATS API, webhook, reconciler and
//! backlog loops are restarted with backoff, and gRPC health says
//! NOT_SERVING while one of them is down.

pub mod api;
pub mod auth;
pub mod backlog;
pub mod downloads;
pub mod effects;
pub mod grpc;
pub mod job;
pub mod listen;
pub mod nats_api;
pub mod quota;
pub mod reconcile;
pub mod repo;
pub mod results;
pub mod review;
pub mod trace;
pub mod transfer;
pub mod validate;
pub mod webhooks;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use trainyard_core::supervise::{Down, Policy, Supervisor};
use trainyard_core::{Config, topology};
use trainyard_proto::v1::job_service_server::JobServiceServer;

/// Binds the gRPC port and then serves until `shutdown`. `ready` receives
/// the bound address (useful with port 0).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let tls = listen::checked(&config.coordinator)?;
    let secrets = trainyard_core::secrets::Keyring::from_config(&config.secrets)?.map(Arc::new);
    let Some((client, topo)) = trainyard_core::service::connect(
        &config,
        &trainyard_core::topology::permissions::Role::Coordinator,
        &shutdown,
    )
    .await?
    else {
        return Ok(()); // stopped before NATS was ready
    };
    let js = topo.js.clone();
    let Some(idem) = topology::until_ready("the idempotency bucket", &shutdown, || {
        topology::idem_bucket(&js, &config.nats)
    })
    .await
    else {
        return Ok(());
    };
    let repo = repo::JobRepo::new(topo.jobs.clone(), js.clone());
    let effects = effects::Effects {
        client: client.clone(),
        js: js.clone(),
        repo: repo.clone(),
        quotas: std::sync::Arc::new(config.quotas.clone()),
        download_url_ttl_secs: config.coordinator.download_url_ttl_secs,
    };
    let webhook_secrets = if config.webhooks.is_enabled() {
        let Some(kv) = topology::until_ready("the webhook secrets bucket", &shutdown, || {
            topology::webhook_secrets_bucket(&js, &config.nats)
        })
        .await
        else {
            return Ok(());
        };
        Some(webhooks::SecretStore::new(
            kv,
            Duration::from_secs(config.webhooks.secret_overlap_secs),
        ))
    } else {
        None
    };
    let store = trainyard_core::store::ArtifactStore::open_config(&config.store)?;
    let listener = TcpListener::bind(&config.coordinator.grpc_addr).await?;
    let addr = listener.local_addr()?;
    let download_urls = Arc::new(downloads::DownloadUrls::new(
        store.clone(),
        Duration::from_secs(config.coordinator.download_url_ttl_secs),
        config.coordinator.public_url.clone().unwrap_or_else(|| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{addr}")
        }),
        trainyard_core::destination::Destinations::from_config(&config),
        secrets.clone(),
    ));
    let api = api::JobApi {
        repo: repo.clone(),
        idem: idem.clone(),
        js: js.clone(),
        effects: effects.clone(),
        client: client.clone(),
        validate_timeout: Duration::from_secs(config.coordinator.validate_timeout_secs.max(1)),
        webhooks: validate::SubmitRules::from_config(&config.webhooks),
        captions: validate::CaptionRules::from_config(&config.captioner.caption),
        webhook_secrets: webhook_secrets.clone(),
        destinations: trainyard_core::destination::Destinations::from_config(&config),
        secrets,
        max_spec_bytes: config.coordinator.max_spec_bytes,
        store_root: store.root().to_string(),
        download_urls: Some(download_urls.clone()),
        store: store.clone(),
    };
    let deliverer = match webhook_secrets {
        Some(secrets) => {
            webhooks::Deliverer::new(&config.webhooks, repo.clone(), js.clone(), secrets)?
                .map(|d| d.with_download_urls(download_urls.clone()))
        }
        None => None,
    };
    let auth = auth::Auth::new(
        &config.coordinator.tokens,
        config.coordinator.auth_failures_per_minute,
    );
    let transfers = transfer::Transfers {
        store: store.clone(),
        max_bytes: config.store.max_upload_bytes,
        max_files: config.store.max_upload_files,
        presign_expiry: Duration::from_secs(config.store.presign_expiry_secs),
    };

    let reconciler = reconcile::Reconciler {
        js: js.clone(),
        repo: repo.clone(),
        effects: effects.clone(),
        idem: idem.clone(),
        store,
    };
    // On start-up every record counts as stale: this replica may be the
    // one that died mid-way.
    reconciler.pass_logged(0).await;

    let api_requests = nats_api::subscribe(&client)
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to the NATS API: {e}"))?;
    tracing::info!(%addr, tls = tls.is_some(), "gRPC listening");
    if let Some(ready) = ready {
        let _ = ready.send(addr);
    }

    // Every loop is supervised: the results loop stops the coordinator
    // when it fails (it would accept jobs it never advances); the others
    // are restarted, and gRPC health says NOT_SERVING while one is down.
    let loops = Supervisor::new(shutdown.clone());
    let Some(consumer) = topology::until_ready("the results consumer", &shutdown, || {
        topology::results_consumer(&js, &config.nats)
    })
    .await
    else {
        return Ok(());
    };
    {
        let (repo, effects, claims) = (repo.clone(), effects.clone(), topo.claims.clone());
        let (js, nats) = (js.clone(), config.nats.clone());
        let mut first = Some(consumer);
        loops.spawn("results", Policy::ShutDown, move |stop| {
            let (repo, effects, claims) = (repo.clone(), effects.clone(), claims.clone());
            let (first, js, nats) = (first.take(), js.clone(), nats.clone());
            async move {
                let consumer = match first {
                    Some(consumer) => consumer,
                    None => topology::results_consumer(&js, &nats).await?,
                };
                results::run(consumer, repo, claims, effects, stop).await
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
            loops.wait().await; // stopped while waiting: the loops end too
            return Ok(());
        };
        let js = js.clone();
        let mut first = Some(consumer);
        loops.spawn("webhooks", Policy::restart(), move |stop| {
            let (deliverer, first, js) = (deliverer.clone(), first.take(), js.clone());
            async move {
                let consumer = match first {
                    Some(consumer) => consumer,
                    None => topology::webhooks_consumer(&js, ack_wait).await?,
                };
                deliverer.run(consumer, stop).await
            }
        });
    }
    {
        let (client, api, auth) = (client.clone(), api.clone(), auth.clone());
        let mut first = Some(api_requests);
        loops.spawn("nats api", Policy::restart(), move |stop| {
            let (client, api, auth, first) =
                (client.clone(), api.clone(), auth.clone(), first.take());
            async move {
                let requests = match first {
                    Some(requests) => requests,
                    None => nats_api::subscribe(&client).await?,
                };
                nats_api::serve(client, requests, api, auth, stop)
                    .await
                    .map_err(async_nats::Error::from)
            }
        });
    }
    {
        let every = Duration::from_secs(config.coordinator.reconcile_interval_secs.max(1));
        let stale_ms = (config.coordinator.stale_after_secs * 1000) as i64;
        loops.spawn("reconciler", Policy::restart(), move |stop| {
            let reconciler = reconciler.clone();
            async move {
                let mut ticker = tokio::time::interval(every);
                ticker.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = ticker.tick() => reconciler.pass_logged(stale_ms).await,
                    }
                }
                Ok::<(), Infallible>(())
            }
        });
    }
    {
        let js = js.clone();
        let every = Duration::from_secs(config.coordinator.backlog_interval_secs.max(1));
        loops.spawn("backlog", Policy::restart(), move |stop| {
            let js = js.clone();
            async move {
                backlog::run(js, every, stop).await;
                Ok::<(), Infallible>(())
            }
        });
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<JobServiceServer<grpc::GrpcJobService>>()
        .await;
    let tasks = TaskTracker::new();
    tasks.spawn(report_health(health, loops.down(), shutdown.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(trainyard_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = JobServiceServer::new(grpc::GrpcJobService {
        api,
        auth,
        transfers,
    });
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stop = shutdown.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    // HTTP/1.1 beside gRPC: the download route of a local store's URLs.
    server
        .accept_http1(true)
        .add_routes(tonic::service::Routes::from(download_urls.router()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
        .await?;
    loops.wait().await;
    tasks.close();
    tasks.wait().await;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Keeps gRPC health in step with the background loops: NOT_SERVING (for
/// the job service and the server as a whole) while one is down.
async fn report_health(
    health: HealthReporter,
    mut down: tokio::sync::watch::Receiver<Down>,
    shutdown: CancellationToken,
) {
    loop {
        let status = if down.borrow_and_update().is_empty() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health
            .set_service_status(
                <JobServiceServer<grpc::GrpcJobService> as NamedService>::NAME,
                status,
            )
            .await;
        health.set_service_status("", status).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = down.changed() => if changed.is_err() { break },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::HealthService;

    #[tokio::test]
    async fn health_says_not_serving_while_a_loop_is_down() {
        let (reporter, _) = tonic_health::server::health_reporter();
        let service = HealthService::from_health_reporter(reporter.clone());
        reporter
            .set_serving::<JobServiceServer<grpc::GrpcJobService>>()
            .await;
        let (down, watched) = tokio::sync::watch::channel(Down::new());
        let shutdown = CancellationToken::new();
        let reporting = tokio::spawn(report_health(reporter, watched, shutdown.clone()));
        for name in [
            <JobServiceServer<grpc::GrpcJobService> as NamedService>::NAME,
            "",
        ] {
            let request = tonic::Request::new(HealthCheckRequest {
                service: name.into(),
            });
            let mut statuses = service.watch(request).await.unwrap().into_inner();
            let mut until = async |want: ServingStatus| {
                while let Some(status) =
                    tokio::time::timeout(Duration::from_secs(10), statuses.next())
                        .await
                        .expect("in time")
                {
                    if status.unwrap().status() == want.into() {
                        return;
                    }
                }
                panic!("the status stream ended");
            };
            until(ServingStatus::Serving).await;
            down.send_modify(|d| {
                d.insert("nats api");
            });
            until(ServingStatus::NotServing).await;
            down.send_modify(|d| {
                d.remove("nats api");
            });
            until(ServingStatus::Serving).await;
        }
        shutdown.cancel();
        reporting.await.unwrap();
    }
}
