//! A job's delivery to an `hf://` destination, as the deliver stage calls
//! it: the model card from the spec, the training summary and the prepared
//! dataset's captions, the manifest with the files' URIs in the
//! repository, then one commit ([`HubTarget::deliver`]).

use super::{Delivered, Delivery, HubTarget, card};
use std::path::{Path, PathBuf};
use trainyard_core::runtime::{StageError, TaskContext};
use trainyard_core::store::ArtifactStore;
use trainyard_proto::v1::{Artifact, JobSpec, TrainSummary};

/// What an `hf://` delivery needs of the task.
pub struct JobInput<'a> {
    pub job: &'a str,
    pub spec: &'a JobSpec,
    pub train: &'a TrainSummary,
    /// The prepared dataset in the artifact store (its captions).
    pub dataset_uri: &'a str,
}

/// Up to [`card::MAX_SAMPLES`] distinct captions of the job's prepared
/// dataset (its `manifest.json`, read only below the job's tenant), for
/// the model card; none when it cannot be read.
async fn samples(store: &ArtifactStore, ctx: &TaskContext, dataset_uri: &str) -> Vec<String> {
    let Ok(key) = store.tenant_key(&ctx.meta.tenant, dataset_uri) else {
        return Vec::new();
    };
    let key = format!("{}/manifest.json", key.trim_end_matches('/'));
    let Ok(bytes) = store.get_bytes(&key).await else {
        return Vec::new();
    };
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let mut samples: Vec<String> = Vec::new();
    for image in manifest["images"].as_array().into_iter().flatten() {
        if let Some(caption) = image["caption"].as_str().filter(|c| !c.trim().is_empty())
            && !samples.iter().any(|s| s == caption)
        {
            samples.push(caption.to_owned());
            if samples.len() == card::MAX_SAMPLES {
                break;
            }
        }
    }
    samples
}

/// Every artifact, the model card and the manifest to `hub`, in one commit.
pub async fn deliver(
    hub: &HubTarget,
    store: &ArtifactStore,
    artifacts: &[Artifact],
    locals: &[PathBuf],
    input: &JobInput<'_>,
    ctx: &TaskContext,
    work: &Path,
) -> Result<Delivered, StageError> {
    let repo = hub.dest.target.repo.as_str();
    ctx.note(&format!(
        "delivering {} files to hf://{repo}",
        artifacts.len()
    ))
    .await;
    let files: Vec<(String, u64, String)> = hub
        .paths(artifacts)
        .into_iter()
        .zip(artifacts)
        .map(|(path, a)| (path, a.size, a.sha256.clone()))
        .collect();
    let samples = samples(store, ctx, input.dataset_uri).await;
    let card = card::model_card(&card::CardInput {
        repo,
        spec: input.spec,
        summary: input.train,
        license: &hub.license,
        files: &files,
        samples: &samples,
    });
    let manifest = crate::deliver::manifest_body(
        input.job,
        input.spec,
        input.train,
        artifacts,
        hub.branch_uris(artifacts),
    );
    let name = if input.spec.name.is_empty() {
        input.job
    } else {
        input.spec.name.as_str()
    };
    let delivery = Delivery {
        job: input.job,
        artifacts,
        locals,
        card,
        manifest,
        summary: format!("Trainyard: {}", name.lines().next().unwrap_or_default()),
        work,
        created_ms: Some(ctx.record.created_at_ms).filter(|ms| *ms > 0),
    };
    hub.deliver(&delivery, ctx).await
}
