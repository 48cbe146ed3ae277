//! Access checks: what a job reads and writes besides its dataset. They
//! need nothing from the dataset, so the prepare stage runs them while the
//! dataset is fetched.
//!
//! - The base model: an artifact-store `.safetensors` must lie below the
//!   job's tenant's prefix, exist, and fit `[store] max_model_bytes`; a preset needs each part the backend uses
//!   (`TrainerBackend::parts`) to be readable on the Hub with the job's
//!   `secrets.hf_token`, as does an `hf://` reference (a `HEAD` per file, the
//!   revision listing for a snapshot: nothing is downloaded). A preset with
//!   no Hub parts (the reference denoiser) is made by the worker itself.
//! - Each destination: allowed and writable now, probed through
//!   [`Destinations`], the same rules the uploader opens them with.

use super::{Report, check};
use trainyard_backends::Tools;
use trainyard_core::destination::{Destinations, ProbeFailure};
use trainyard_core::redact::{display_url, redact_in};
use trainyard_core::store::{ArtifactStore, StoreError};
use trainyard_models::hub::HubClient;
use trainyard_models::{HubRef, ModelSource};
use trainyard_proto::TenantId;
use trainyard_proto::v1::{ErrorKind, JobSpec};

/// What the access checks reach: the artifact store, the Hub and the
/// destinations.
#[derive(Clone, Debug)]
pub struct AccessChecks {
    store: ArtifactStore,
    hub: HubClient,
    destinations: Destinations,
    /// Largest base model a spec may name in the store.
    max_model_bytes: u64,
}

impl AccessChecks {
    pub fn new(store: ArtifactStore, hub: HubClient, destinations: Destinations) -> Self {
        Self {
            store,
            hub,
            destinations,
            max_model_bytes: u64::MAX,
        }
    }

    /// These checks with a cap on a store base model's size
    /// (`[store] max_model_bytes`).
    pub fn with_model_cap(mut self, max_model_bytes: u64) -> Self {
        self.max_model_bytes = max_model_bytes;
        self
    }

    /// The model and destination checks of `tenant`'s job, concurrently.
    pub async fn run(&self, tenant: &str, spec: &JobSpec) -> Report {
        let (mut model, destinations) =
            tokio::join!(self.model(tenant, spec), self.destinations(tenant, spec));
        model.merge(destinations);
        model
    }

    /// The base model is there and `tenant` may read it.
    pub async fn model(&self, tenant: &str, spec: &JobSpec) -> Report {
        let mut report = Report::default();
        let model = spec.base_model.clone().unwrap_or_default();
        let backend = spec
            .training
            .as_ref()
            .map(|t| t.backend.clone())
            .unwrap_or_default();
        let token = spec
            .secrets
            .as_ref()
            .map(|s| s.hf_token.as_str())
            .filter(|t| !t.is_empty());
        let source = match ModelSource::parse(&model.uri) {
            Ok(source) => source,
            Err(e) => {
                // The message quotes the URI: never with its credentials.
                let message = redact_in(&e.problem, &model.uri);
                report.problem(check::BASE_MODEL, ErrorKind::InvalidSpec, message);
                return report;
            }
        };
        match source {
            ModelSource::Store(uri) => self.store_model(tenant, &uri, &mut report).await,
            // Made by the worker (the reference denoiser): nothing to reach.
            ModelSource::Preset(preset) if preset.parts.is_empty() => {}
            ModelSource::Preset(preset) => {
                let family = preset.family;
                let Some(trainer) = trainyard_backends::by_name(&backend, &Tools::default()) else {
                    return report;
                };
                let mut parts = Vec::new();
                for role in trainer.parts(family) {
                    match preset.part(role) {
                        None => report.problem(
                            check::BASE_MODEL,
                            ErrorKind::Model,
                            format!(
                                "preset {} has no {role} part, which {backend} needs for {family}",
                                preset.name
                            ),
                        ),
                        Some(part) => parts.push(HubRef {
                            repo: part.repo.to_owned(),
                            revision: part.revision.to_owned(),
                            path: part.file.map(str::to_owned),
                        }),
                    }
                }
                let checks = parts.iter().map(|r| self.hub_model(r, token));
                for found in futures::future::join_all(checks).await {
                    report.merge(found);
                }
            }
            ModelSource::Hub(hub) => report.merge(self.hub_model(&hub, token).await),
        }
        report
    }

    /// A store base model: below `tenant`'s prefix, there, and within the
    /// cap; only its metadata is read.
    async fn store_model(&self, tenant: &str, raw: &str, report: &mut Report) {
        let uri = display_url(raw);
        let key = match TenantId::parse(tenant)
            .map_err(|e| e.to_string())
            .and_then(|t| self.store.tenant_key(&t, raw).map_err(|e| e.to_string()))
        {
            Ok(key) => key,
            Err(problem) => {
                report.problem(check::BASE_MODEL, ErrorKind::InvalidSpec, problem);
                return;
            }
        };
        match self.store.size_within(&key, self.max_model_bytes).await {
            Ok(_) => {}
            Err(StoreError::NotFound(_)) => report.problem(
                check::BASE_MODEL,
                ErrorKind::Model,
                format!("{uri} does not exist in the artifact store"),
            ),
            Err(e) if e.is_refused() => {
                report.problem(check::BASE_MODEL, ErrorKind::InvalidSpec, e.to_string())
            }
            Err(e) => report.unchecked(check::BASE_MODEL, format!("{uri}: {e}")),
        }
    }

    /// One file or snapshot on the Hub exists and `token` may read it.
    async fn hub_model(&self, hub: &HubRef, token: Option<&str>) -> Report {
        let mut report = Report::default();
        let Err(error) = self.hub.check_access(hub, token).await else {
            return report;
        };
        let name = match &hub.path {
            Some(path) => format!("hf://{}@{}/{path}", hub.repo, hub.revision),
            None => format!("hf://{}@{}", hub.repo, hub.revision),
        };
        if error.is_auth() {
            let hint = if token.is_some() {
                "use a token of an account that has accepted the model's licence"
            } else {
                "set secrets.hf_token to a token of an account that has accepted the model's licence"
            };
            report.problem(
                check::BASE_MODEL,
                ErrorKind::Auth,
                format!("{name} cannot be read: {error}; {hint}"),
            );
        } else if error.is_retryable() {
            report.unchecked(check::BASE_MODEL, format!("{name}: {error}"));
        } else {
            report.problem(
                check::BASE_MODEL,
                ErrorKind::Model,
                format!("{name} cannot be read: {error}"),
            );
        }
        report
    }

    /// Every destination is allowed for `tenant` and writable now. A local
    /// folder outside the allowed roots gets the same answer whether or
    /// not it exists.
    pub async fn destinations(&self, tenant: &str, spec: &JobSpec) -> Report {
        let secrets = spec.secrets.as_ref();
        let probes = spec.destinations.iter().map(|d| async move {
            (
                d.uri.as_str(),
                self.destinations.probe(tenant, &d.uri, secrets).await,
            )
        });
        let mut report = Report::default();
        let mut results: Vec<_> = futures::future::join_all(probes).await;
        // A chain (`on_error = "next"`) is a problem only when none of its
        // members can be written; then its last member's answer is the one.
        for members in trainyard_core::destination::chain::chains(&spec.destinations) {
            if members.iter().any(|&m| results[m].1.is_ok()) {
                for &m in &members {
                    results[m].1 = Ok(());
                }
            } else if let Some((_, rest)) = members.split_last() {
                for &m in rest {
                    results[m].1 = Ok(());
                }
            }
        }
        for (raw, result) in results {
            let Err(error) = result else { continue };
            // Messages name the destination: never with its credentials.
            let uri = display_url(raw);
            let message = redact_in(&error.message, raw);
            match error.failure {
                ProbeFailure::Refused => {
                    report.problem(check::DESTINATIONS, ErrorKind::Storage, message)
                }
                ProbeFailure::Denied => {
                    report.problem(check::DESTINATIONS, ErrorKind::Auth, message)
                }
                ProbeFailure::Unavailable => {
                    report.unchecked(check::DESTINATIONS, format!("{uri}: {message}"))
                }
            }
        }
        report
    }
}
