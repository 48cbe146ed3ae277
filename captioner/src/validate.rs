//! `ty.preflight`: a job's preflight without a job, for the `Validate` API.
//!
//! The coordinator checks the spec, then asks here because only a
//! captioner can fetch and unpack a dataset. Every captioner serves the
//! subject in one queue group, so one of them answers each request: it
//! prepares the dataset in a scratch folder (removed afterwards), runs the
//! same checks as the prepare stage and replies with a `ValidateReply`.
//! Nothing is stored and no job is created. Each captioner answers up to
//! `captioner.concurrency` requests at a time, beside its stage's tasks.
//!
//! A caption backend that calls a service or a model is not called: images
//! without a sidecar get a stand-in caption, and the reply says which
//! backend would caption them. A local backend (the template) runs, so the
//! caption checks see the real captions.

use crate::caption::{CaptionBackend, CaptionError, ImageInfo};
use crate::datasets::{Datasets, access_checks, caption_backend};
use crate::manifest::CaptionSource;
use crate::preflight::Checked;
use crate::preflight::{AccessChecks, Report, check};
use async_trait::async_trait;
use futures::StreamExt;
use prost::Message;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use trainyard_core::Config;
use trainyard_core::store::ArtifactStore;
use trainyard_core::telemetry::propagation::{
    JobAttrs, inject_current_nats, process_span, record_job,
};
use trainyard_core::topology::{PREFLIGHT_QUEUE, subject};
use trainyard_proto::v1::{JobSpec, PreflightRequest, ValidateReply};

/// Runs preflight for specs that are not jobs.
pub struct Validator {
    datasets: Datasets,
    access: AccessChecks,
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

impl Validator {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let store = ArtifactStore::open_with(&config.store.uri, &config.store.s3)?;
        Ok(Self {
            datasets: Datasets::new(config, store.clone())?,
            access: access_checks(config, store)?,
        })
    }

    /// Every preflight check of `spec` (already normalised).
    pub async fn check(&self, spec: &JobSpec) -> Report {
        let work = self
            .datasets
            .work_root
            .join(format!("validate-{}", uuid::Uuid::now_v7().simple()));
        let mut report = Report::default();
        if let Err(e) = tokio::fs::create_dir_all(&work).await {
            report.unchecked(
                check::DATASET,
                format!("cannot create work dir {}: {e}", work.display()),
            );
            report.merge(self.access.run(spec).await);
            return report;
        }
        let backend = caption_backend(&spec.caption.clone().unwrap_or_default());
        let captioner = DryRun(&backend);
        let (dataset, access) = tokio::join!(
            self.datasets.prepare(spec, &work, &captioner, None),
            self.access.run(spec)
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
        if let Err(error) = tokio::fs::remove_dir_all(&work).await {
            tracing::warn!(path = %work.display(), %error, "could not remove validate work dir");
        }
        report
    }
}

/// Subscribes to `ty.preflight` in the captioners' queue group. Done
/// before the service reports ready, so a request finds a responder.
pub async fn subscribe(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, async_nats::Error> {
    let requests = client
        .queue_subscribe(subject::preflight(), PREFLIGHT_QUEUE.into())
        .await?;
    client.flush().await?;
    Ok(requests)
}

/// Answers requests, `concurrency` at a time, until `shutdown`; checks
/// still running then are abandoned with an answer that says so.
pub async fn serve(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    validator: Arc<Validator>,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let tracker = TaskTracker::new();
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = requests.next() => match message { Some(m) => m, None => break },
        };
        let Some(reply_to) = message.reply.clone() else {
            continue;
        };
        let (client, validator, slots, stop) = (
            client.clone(),
            validator.clone(),
            slots.clone(),
            shutdown.clone(),
        );
        // A child of the requester's span; the reply carries this one's
        // context, so the check is part of the caller's trace.
        let span = process_span(
            message.headers.as_ref(),
            subject::preflight(),
            JobAttrs::default(),
        );
        // Ends when its check does, or at shutdown with a "retry" answer.
        tracker.spawn(
            async move {
                let answer = tokio::select! {
                    answer = answer(&validator, &message.payload, &slots) => answer,
                    _ = stop.cancelled() => {
                        let mut report = Report::default();
                        report.unchecked(check::DATASET, "the captioner is stopping; retry");
                        report.to_reply()
                    }
                };
                let mut headers = async_nats::HeaderMap::new();
                inject_current_nats(&mut headers);
                if let Err(error) = client
                    .publish_with_headers(reply_to, headers, answer.encode_to_vec().into())
                    .await
                {
                    tracing::warn!(%error, "could not send preflight reply");
                }
            }
            .instrument(span)
            .with_current_subscriber(),
        );
    }
    let _ = requests.unsubscribe().await;
    tracker.close();
    tracker.wait().await;
}

async fn answer(validator: &Validator, payload: &[u8], slots: &Semaphore) -> ValidateReply {
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
    let _slot = slots.acquire().await.expect("semaphore never closes");
    let spec = request.spec.unwrap_or_default();
    record_job(
        &tracing::Span::current(),
        JobAttrs {
            tenant: Some(&request.tenant),
            ..JobAttrs::default()
        },
    );
    tracing::info!(tenant = %request.tenant, "preflight without a job");
    validator.check(&spec).await.to_reply()
}
