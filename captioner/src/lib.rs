//! Trainyard's prepare stage library: turn a user's dataset source into a
//! clean, captioned folder described by a manifest.
//!
//! Users hand us zips from every operating system, loose image URLs and
//! folders with captions in various states; trainers want one flat folder
//! of decodable images, each with a one-line `<stem>.txt` caption that
//! starts with the trigger word. Everything between those two is here, as a
//! library with no NATS or artifact-store code, so the stage wiring stays
//! thin and every step is testable on local files:
//!
//! - [`fetch`]: the one guarded HTTP client for user URLs (no private
//!   addresses after DNS, byte and time limits);
//! - [`unpack`]: the one guarded zip reader (no path escapes, no links,
//!   bounded size and entry count);
//! - `collect` and `images` (internal): junk removal, flattening, nested
//!   zips, sidecars, full decode of every image, the prepared folder;
//! - [`video`]: video clips, probed with `ffprobe` and held to limits;
//! - [`caption`]: caption backends and the caption/trigger-word policy;
//! - [`manifest`]: `manifest.json` with sizes and sha256 per image;
//! - [`text`]: datasets for language models (one `train.jsonl`);
//! - [`preflight`]: the checks a job passes before a GPU is held;
//! - [`sample`]: a bundled, procedurally drawn sample dataset.
//!
//! The service around it: [`datasets`] (a job's dataset fetched and
//! prepared), [`stage`] (the prepare stage on the shared runtime) and
//! [`preflight_server`] (`ty.preflight`: preflight without a job, for the
//! coordinator's `Validate`).
//!
//! The entry points are [`fetch_source`] (remote → [`LocalInput`]) and
//! [`prepare_local`] ([`LocalInput`] → [`PreparedDataset`]). Every error is
//! a [`PrepareError`] that says whether a retry can help.

pub mod caption;
mod collect;
pub mod datasets;
mod error;
pub mod fetch;
mod images;
/// The prepared dataset's manifest, shared with the coordinator (caption review).
pub use trainyard_core::manifest;
pub mod preflight;
pub mod preflight_server;
mod prepare;
pub mod sample;
mod source;
pub mod stage;
pub mod text;
pub mod unpack;
pub mod video;

pub use caption::{CaptionBackend, CaptionError, ImageInfo, TemplateCaptioner};
pub use collect::IMAGE_EXTENSIONS;
pub use error::{DatasetError, PrepareError};
pub use fetch::{FetchError, FetchPolicy, GuardedClient};
pub use images::MIN_SIDE;
pub use manifest::{
    CaptionSource, DatasetManifest, DropReason, DroppedFile, ManifestEntry, MediaKind, TextEntry,
    VideoFacts,
};
pub use prepare::{LocalInput, PrepareSettings, PreparedDataset, prepare_local};
pub use source::{RemoteSource, fetch_images, fetch_source, fetch_zip};
pub use unpack::{UnpackError, UnpackLimits};
pub use video::{VIDEO_EXTENSIONS, VideoSettings};

use trainyard_core::supervise::{Policy, Supervisor};

/// Runs the prepare stage, and answers `ty.preflight` requests, until
/// `shutdown`.
pub async fn run(
    config: trainyard_core::Config,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let Some((client, topo)) = trainyard_core::service::connect(
        &config,
        &trainyard_core::topology::permissions::Role::Captioner,
        &shutdown,
    )
    .await?
    else {
        return Ok(()); // stopped before NATS was ready
    };
    let handler = stage::PrepareStage::new(&config)?;
    let server = std::sync::Arc::new(preflight_server::PreflightServer::new(&config)?);
    let requests = preflight_server::subscribe(&client)
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to preflight requests: {e}"))?;
    // Ends with the stage runtime, whichever way that ends; a failure is
    // logged and the responder started again with backoff.
    let stop = shutdown.child_token();
    let loops = Supervisor::new(stop.clone());
    {
        let (client, concurrency) = (client.clone(), config.captioner.concurrency);
        let mut first = Some(requests);
        loops.spawn("preflight", Policy::restart(), move |stop| {
            let (client, server, first) = (client.clone(), server.clone(), first.take());
            async move {
                let requests = match first {
                    Some(requests) => requests,
                    None => preflight_server::subscribe(&client).await?,
                };
                preflight_server::serve(client, requests, server, concurrency, stop)
                    .await
                    .map_err(async_nats::Error::from)
            }
        });
    }
    let mut runner = trainyard_core::runtime::RunnerConfig::for_service(
        trainyard_proto::v1::Stage::Prepare,
        &config,
    );
    runner.concurrency = config.captioner.concurrency;
    let heartbeat = trainyard_core::registry::Heartbeat::for_runner(topo.workers.clone(), &runner);
    let result = trainyard_core::service::run_stage(client, topo, runner, handler, shutdown).await;
    heartbeat.stop().await;
    stop.cancel();
    loops.wait().await;
    result
}
