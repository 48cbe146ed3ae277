//! `ty.preflight`: a job's preflight without a job, for the `Validate` API.
//!
//! The coordinator checks the spec, then asks here because only a
//! captioner can fetch and unpack a dataset. Every captioner serves the
//! subject in one queue group, so one of them answers each request: it
//! prepares the dataset in a scratch folder (removed afterwards), runs the
//! same checks as the prepare stage and replies with a `ValidateReply`.
//! Nothing is stored and no job is created. Each captioner answers up to
//! `captioner.concurrency` requests at a time, beside its stage's tasks;
//! more wait in the subscription ([`trainyard_core::serve`]).
//!
//! A caption backend that calls a service or a model is not called: images
//! without a sidecar get a stand-in caption, and the reply says which
//! backend would caption them. A local backend (the template) runs, so the
//! caption checks see the real captions.

use crate::caption::select::CaptionSetup;
use crate::caption::{CaptionBackend, CaptionError, ImageInfo};
use crate::datasets::{Datasets, access_checks};
use crate::manifest::CaptionSource;
use crate::preflight::Checked;
use crate::preflight::{AccessChecks, Report, check};
use async_trait::async_trait;
use bytes::Bytes;
use prost::Message;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use trainyard_core::Config;
use trainyard_core::serve::{self, Responder, ServeError};
use trainyard_core::store::ArtifactStore;
use trainyard_core::telemetry::propagation::{JobAttrs, record_job};
use trainyard_core::topology::{PREFLIGHT_QUEUE, subject};
use trainyard_proto::TenantId;
use trainyard_proto::v1::{JobSpec, PreflightRequest, ValidateReply};

/// Runs preflight for specs that are not jobs.
pub struct PreflightServer {
    datasets: Datasets,
    access: AccessChecks,
    /// Opens the request's sealed secrets (sealed for the tenant, no job).
    secrets: Option<trainyard_core::secrets::Keyring>,
    /// Builds the jobs' caption backends (never called here unless local).
    captions: CaptionSetup,
}

/// Stands in for a caption backend during `Validate`: a local one captions
/// as in a job; any other is not called.
struct DryRun<'a>(&'a dyn CaptionBackend);

/// The caption a non-local backend's images get during `Validate`.
fn stand_in(backend: &str) -> String {
    format!("[caption by {backend}]")
}

#[async_trait]
impl CaptionBackend for DryRun<'_> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn inserts_trigger(&self) -> bool {
        self.0.inserts_trigger()
    }

    fn is_local(&self) -> bool {
        true
    }

    async fn caption(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        if self.0.is_local() {
            self.0.caption(image).await
        } else {
            Ok(stand_in(self.0.name()))
        }
    }
}

impl PreflightServer {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let store = ArtifactStore::open_config(&config.store)?;
        Ok(Self {
            datasets: Datasets::new(config, store.clone())?,
            access: access_checks(config, store)?,
            secrets: trainyard_core::secrets::Keyring::from_config(&config.secrets)?,
            captions: CaptionSetup::new(&config.captioner.caption, None)?
                .with_ffmpeg(config.captioner.video.ffmpeg.clone()),
        })
    }

    /// Every preflight check of `tenant`'s `spec` (already normalised).
    pub async fn check(&self, tenant: &str, spec: &JobSpec) -> Report {
        let work = self
            .datasets
            .work_root
            .join(format!("preflight-{}", uuid::Uuid::now_v7().simple()));
        let mut report = Report::default();
        if let Err(e) = tokio::fs::create_dir_all(&work).await {
            report.unchecked(
                check::DATASET,
                format!("cannot create work dir {}: {e}", work.display()),
            );
            report.merge(self.access.run(tenant, spec).await);
            return report;
        }
        let tenant_id = match TenantId::parse(tenant) {
            Ok(tenant) => tenant,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&work).await;
                report.unchecked(check::DATASET, format!("tenant: {e}"));
                return report;
            }
        };
        // Built without secrets: a remote backend is never called here.
        let caption = spec.caption.clone().unwrap_or_default();
        let (backend, setup_problem) = match self.captions.backend(&tenant_id, &caption, None) {
            Ok(backend) => (backend, None),
            Err(e) => (
                Box::new(crate::caption::select::template_of(&caption)) as Box<dyn CaptionBackend>,
                Some(e),
            ),
        };
        let captioner = DryRun(&*backend);
        let (dataset, access) = tokio::join!(
            self.datasets
                .prepare(&tenant_id, spec, &work, &captioner, None),
            self.access.run(tenant, spec)
        );
        match crate::preflight::run(spec, dataset, access).await {
            Ok(Checked {
                report: checked,
                prepared,
                ..
            }) => {
                report = checked;
                if let Some(prepared) = prepared {
                    let filled: Vec<&str> = prepared
                        .manifest
                        .images
                        .iter()
                        .filter(|i| matches!(i.caption_source, CaptionSource::Backend(_)))
                        .map(|i| i.caption.as_str())
                        .collect();
                    if let Some(example) = filled.first() {
                        let how = if backend.is_local() {
                            format!("gives each one a caption, e.g. {example:?}")
                        } else {
                            "captions them when the job runs".to_owned()
                        };
                        report.warnings.push(format!(
                            "{} of {} images have no sidecar caption; the {} backend {how}",
                            filled.len(),
                            prepared.manifest.images.len(),
                            backend.name()
                        ));
                    }
                }
            }
            Err(error) => report.unchecked(
                check::DATASET,
                format!("the check was interrupted ({error:?}); retry"),
            ),
        }
        if let Some(e) = setup_problem {
            report.problem(
                check::DATASET,
                trainyard_proto::v1::ErrorKind::InvalidSpec,
                e.to_string(),
            );
        }
        if let Err(error) = tokio::fs::remove_dir_all(&work).await {
            tracing::warn!(path = %work.display(), %error, "could not remove a preflight work dir");
        }
        report
    }
}

/// Subscribes to `ty.preflight` in the captioners' queue group. Done
/// before the service reports ready, so a request finds a responder.
pub async fn subscribe(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, async_nats::Error> {
    serve::subscribe(client, subject::preflight(), PREFLIGHT_QUEUE).await
}

/// Answers requests, `concurrency` at a time, until `shutdown`; checks
/// still running then are abandoned with an answer that says so.
pub async fn serve(
    client: async_nats::Client,
    requests: async_nats::Subscriber,
    server: Arc<PreflightServer>,
    concurrency: usize,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve::serve(requests, client, server, concurrency, shutdown).await
}

impl Responder for PreflightServer {
    fn destination(&self, _subject: &str) -> String {
        subject::preflight().to_owned()
    }

    async fn answer(&self, request: &async_nats::Message) -> Bytes {
        answer(self, &request.payload).await.encode_to_vec().into()
    }

    fn stopping(&self) -> Option<Bytes> {
        let mut report = Report::default();
        report.unchecked(check::DATASET, "the captioner is stopping; retry");
        Some(report.to_reply().encode_to_vec().into())
    }
}

async fn answer(server: &PreflightServer, payload: &[u8]) -> ValidateReply {
    let request = match PreflightRequest::decode(payload) {
        Ok(request) => request,
        Err(e) => {
            let mut report = Report::default();
            report.problem(
                "spec",
                trainyard_proto::v1::ErrorKind::InvalidSpec,
                format!("preflight request is not valid protobuf: {e}"),
            );
            return report.to_reply();
        }
    };
    let mut spec = request.spec.unwrap_or_default();
    if let Err(e) =
        trainyard_core::secrets::open_spec(server.secrets.as_ref(), &mut spec, &request.tenant, "")
    {
        let mut report = Report::default();
        report.problem(
            "secrets",
            trainyard_proto::v1::ErrorKind::Internal,
            e.to_string(),
        );
        return report.to_reply();
    }
    record_job(
        &tracing::Span::current(),
        JobAttrs {
            tenant: Some(&request.tenant),
            ..JobAttrs::default()
        },
    );
    tracing::info!(tenant = %request.tenant, "preflight without a job");
    server.check(&request.tenant, &spec).await.to_reply()
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::{HeaderMap, Subject};
    use std::time::Duration;
    use tokio::sync::mpsc;
    use trainyard_core::serve::Replies;
    use trainyard_proto::v1::{DatasetSource, dataset_source::Source};

    #[derive(Clone)]
    struct Sent(mpsc::UnboundedSender<Bytes>);

    impl Replies for Sent {
        async fn reply(
            &self,
            _to: Subject,
            _headers: HeaderMap,
            payload: Bytes,
        ) -> Result<(), async_nats::Error> {
            Ok(self.0.send(payload)?)
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    /// Preflight requests beyond `captioner.concurrency` wait in the
    /// subscription: with one slot and a dataset server that never answers,
    /// the second request is not taken; at shutdown both are answered
    /// "retry".
    #[tokio::test]
    async fn requests_beyond_the_concurrency_wait_untaken() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.captioner.work_dir = dir.path().join("work");
        config.captioner.allow_private_urls = true;
        config.store.uri = dir.path().join("store").display().to_string();
        let server = Arc::new(PreflightServer::new(&config).unwrap());

        // A dataset server that takes connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/set.zip", listener.local_addr().unwrap());
        let (connected, mut connections) = mpsc::unbounded_channel();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
                let _ = connected.send(());
            }
        });

        let request = PreflightRequest {
            tenant: "acme".into(),
            spec: Some(JobSpec {
                dataset: Some(DatasetSource {
                    source: Some(Source::ZipUrl(url)),
                }),
                ..Default::default()
            }),
        };
        let (requests, rx) = mpsc::channel::<async_nats::Message>(4);
        for n in 0..2 {
            requests
                .send(async_nats::Message {
                    subject: subject::preflight().into(),
                    reply: Some(format!("_INBOX.{n}").into()),
                    payload: request.encode_to_vec().into(),
                    headers: None,
                    status: None,
                    description: None,
                    length: 0,
                })
                .await
                .unwrap();
        }
        let stream = Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|message| (message, rx))
        }));
        let (sent, mut replies) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve::serve(
            stream,
            Sent(sent),
            server,
            1,
            shutdown.clone(),
        ));

        tokio::time::timeout(WAIT, connections.recv())
            .await
            .expect("the first check fetches the dataset")
            .unwrap();
        assert_eq!(
            requests.max_capacity() - requests.capacity(),
            1,
            "the second request was taken without a free slot"
        );
        shutdown.cancel();
        for _ in 0..2 {
            let reply = tokio::time::timeout(WAIT, replies.recv())
                .await
                .expect("answered")
                .unwrap();
            let reply = ValidateReply::decode(reply).unwrap();
            assert!(!reply.ok);
            assert!(
                reply
                    .problems
                    .iter()
                    .any(|p| p.message.contains("the captioner is stopping; retry")),
                "{reply:?}"
            );
        }
        served.await.unwrap().unwrap();
        drop(silent);
    }
}
