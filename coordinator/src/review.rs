//! Caption review: `GetCaptions`, `UpdateCaptions` and `ApproveCaptions`
//! on [`JobApi`], for gRPC and the NATS API alike.
//!
//! The captions of a job are a versioned artifact. Version 1 is what the
//! captioner prepared: the dataset's `manifest.json`
//! (`tenants/<t>/jobs/<j>/dataset/`). Each applied `UpdateCaptions` makes
//! the next version, a whole manifest with the edited captions (source
//! `"edited"`) at `tenants/<t>/jobs/<j>/captions/v<n>.json`; the record's
//! `captions_version` says which version is current.
//!
//! **Order, and why it is safe.** An update first *reserves* its version:
//! a compare-and-set of the record from `n` to `n + 1` (only in
//! `AWAITING_REVIEW`, only from the version the client read; else
//! ABORTED with the current one). Only the update that won the CAS writes
//! `v<n+1>.json`, so a version's file has one writer and two concurrent
//! updates from the same version never mix: the loser writes nothing. A
//! coordinator lost between the reservation and the write leaves a version
//! without its file; its client got no answer, and readers take the newest
//! version that has one (the lost edits are the ones never acknowledged).
//! A version reserved less than [`WRITING_GRACE_MS`] ago without its file
//! may still be being written: reads based on it (an update, an approval)
//! answer UNAVAILABLE rather than build on the older captions, and
//! `GetCaptions` answers the older captions under the older version, so an
//! edit made on them is ABORTED, never lost.
//!
//! **The trainer's dataset.** The prepared dataset is not touched while the
//! job waits: the worker fetches `dataset/` only once a train task exists.
//! `ApproveCaptions` writes the approved version into it — each changed
//! `<stem>.txt` (the caption file the trainers read), then `manifest.json`
//! last — and only then moves the job to TRAINING by CAS and publishes the
//! train task. A coordinator lost half-way leaves the job in review with
//! some captions already written; the next approval compares with the
//! manifest (still the old one) and writes them all again. The worker
//! checks each image's sha256 from the manifest; an edit changes only
//! captions, never an image, so those stay as the captioner wrote them.

use crate::api::{ApiError, JobApi, parse_job};
use crate::job::{self, Decision, Event};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use tracing::Instrument;
use trainyard_core::manifest::{CaptionSource, DatasetManifest, MANIFEST_FILE_NAME, MediaKind};
use trainyard_core::store::{StoreError, keys};
use trainyard_proto::v1::{
    ApproveCaptionsResponse, CaptionEntry, Captions, JobRecord, JobState, UpdateCaptionsRequest,
};
use trainyard_proto::{JobId, TenantId};

/// The longest caption an edit may set, in characters.
pub const MAX_CAPTION_CHARS: usize = 4_000;
/// The most entries one `UpdateCaptions` may change.
pub const MAX_EDITS: usize = 10_000;
/// How long a reserved version may be without its file before it is taken
/// for lost (its writer gone) rather than still being written.
pub const WRITING_GRACE_MS: i64 = 10_000;
/// The largest manifest read (a dataset of `[captioner] max_files` images
/// has a manifest far below this).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Caption files written at once on approval.
const WRITES_AT_ONCE: usize = 16;

/// `"image"` or `"video"`, as the manifest records it.
pub fn media_name(media: MediaKind) -> &'static str {
    match media {
        MediaKind::Image => "image",
        MediaKind::Video => "video",
    }
}

/// The entries of a manifest as the API shows them.
pub fn entries(manifest: &DatasetManifest) -> Vec<CaptionEntry> {
    manifest
        .images
        .iter()
        .map(|e| CaptionEntry {
            path: e.file.clone(),
            caption: e.caption.clone(),
            source: String::from(e.caption_source.clone()),
            media: media_name(e.media).to_string(),
        })
        .collect()
}

/// A caption as a person typed it made one: every run of whitespace
/// (line breaks included) one space, trimmed.
pub fn one_line(caption: &str) -> String {
    caption.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Applies `edits` to `manifest`: each named file's caption replaced (one
/// line, trimmed) and marked `"edited"`. Every problem at once, as the
/// message of an INVALID_ARGUMENT: an unknown path, a path named twice, an
/// empty or over-long caption. Returns how many captions changed.
pub fn apply_edits(
    manifest: &mut DatasetManifest,
    edits: &[CaptionEntry],
) -> Result<usize, String> {
    if edits.is_empty() {
        return Err("no captions to change".into());
    }
    if edits.len() > MAX_EDITS {
        return Err(format!(
            "{} captions in one update, at most {MAX_EDITS}",
            edits.len()
        ));
    }
    let index: HashMap<&str, usize> = manifest
        .images
        .iter()
        .enumerate()
        .map(|(i, e)| (e.file.as_str(), i))
        .collect();
    let mut problems = Vec::new();
    let mut wanted: BTreeMap<usize, String> = BTreeMap::new();
    for edit in edits {
        let shown: String = edit.path.chars().take(200).collect();
        let Some(&i) = index.get(edit.path.as_str()) else {
            problems.push(format!("{shown:?}: no such file in the dataset"));
            continue;
        };
        let caption = one_line(&edit.caption);
        let chars = caption.chars().count();
        if caption.is_empty() {
            problems.push(format!("{shown:?}: the caption is empty"));
        } else if chars > MAX_CAPTION_CHARS {
            problems.push(format!(
                "{shown:?}: the caption has {chars} characters, at most {MAX_CAPTION_CHARS}"
            ));
        } else if wanted.insert(i, caption).is_some() {
            problems.push(format!("{shown:?}: named twice"));
        }
    }
    if !problems.is_empty() {
        problems.truncate(20);
        return Err(format!("captions: {}", problems.join("; ")));
    }
    let mut changed = 0;
    for (i, caption) in wanted {
        let entry = &mut manifest.images[i];
        if entry.caption != caption {
            entry.caption = caption;
            entry.caption_source = CaptionSource::Backend(CaptionSource::EDITED.into());
            changed += 1;
        }
    }
    Ok(changed)
}

/// The entries of `approved` whose caption differs from `stored`'s (the
/// caption files an approval must write), as (caption file, caption).
pub fn changed_files(
    stored: &DatasetManifest,
    approved: &DatasetManifest,
) -> Vec<(String, String)> {
    let old: HashMap<&str, &str> = stored
        .images
        .iter()
        .map(|e| (e.file.as_str(), e.caption.as_str()))
        .collect();
    approved
        .images
        .iter()
        .filter(|e| old.get(e.file.as_str()) != Some(&e.caption.as_str()))
        .map(|e| (e.caption_file.clone(), e.caption.clone()))
        .collect()
}

/// The version a record's captions are at: 1 for a job prepared before
/// versions were kept, 0 when not prepared.
fn current_version(record: &JobRecord) -> u32 {
    match record.captions_version {
        0 if !record.dataset_uri.is_empty() => 1,
        v => v,
    }
}

fn state_name(record: &JobRecord) -> String {
    crate::webhooks::state_name(record.state()).to_ascii_uppercase()
}

fn not_in_review(record: &JobRecord) -> ApiError {
    ApiError::FailedPrecondition(format!(
        "job is {}: its captions change only while it is AWAITING_REVIEW",
        state_name(record)
    ))
}

fn stale(named: u32, current: u32) -> ApiError {
    ApiError::Aborted(format!(
        "captions are at version {current}, not {named}: read them again"
    ))
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(_) => {
            ApiError::NotFound("the job's prepared dataset is gone (past its ttl?)".into())
        }
        e if e.is_retryable() => ApiError::Unavailable(format!("artifact store: {e}")),
        e => ApiError::Internal(format!("artifact store: {e}")),
    }
}

impl JobApi {
    async fn read_manifest(&self, key: &str) -> Result<Option<DatasetManifest>, ApiError> {
        match self.store.size_within(key, MAX_MANIFEST_BYTES).await {
            Ok(_) => {}
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(store_error(e)),
        }
        let bytes = match self.store.get_bytes(key).await {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(store_error(e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            ApiError::Internal(format!("a stored caption manifest is unreadable: {e}"))
        })
    }

    /// The prepared dataset's manifest as stored now.
    async fn dataset_manifest(
        &self,
        tenant: &TenantId,
        job: &JobId,
    ) -> Result<DatasetManifest, ApiError> {
        self.read_manifest(&keys::dataset_file(tenant, job, MANIFEST_FILE_NAME))
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(
                    "the job's prepared dataset has no manifest (past its ttl?)".into(),
                )
            })
    }

    /// The captions of `record`'s current version: the newest version up
    /// to it that has its file, and which version that is. With `strict`, a
    /// newer version reserved within [`WRITING_GRACE_MS`] whose file is not
    /// there yet is UNAVAILABLE.
    async fn captions_of(
        &self,
        tenant: &TenantId,
        job: &JobId,
        record: &JobRecord,
        strict: bool,
    ) -> Result<(DatasetManifest, u32), ApiError> {
        let current = current_version(record);
        for version in (2..=current).rev() {
            if let Some(manifest) = self
                .read_manifest(&keys::captions(tenant, job, version))
                .await?
            {
                return Ok((manifest, version));
            }
            let recent =
                trainyard_core::now_ms().saturating_sub(record.updated_at_ms) < WRITING_GRACE_MS;
            if strict && version == current && recent {
                return Err(ApiError::Unavailable(format!(
                    "captions version {version} is being written: retry in a few seconds"
                )));
            }
        }
        Ok((self.dataset_manifest(tenant, job).await?, 1))
    }

    /// The captions of a prepared job (any state once prepared), with the
    /// version an update must name.
    pub async fn get_captions(
        &self,
        tenant: &TenantId,
        job_id: &str,
    ) -> Result<Captions, ApiError> {
        let job = parse_job(job_id)?;
        let record = self.repo.get(tenant, &job).await?.record;
        if current_version(&record) == 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "job is {}: it has no captions until it is prepared",
                state_name(&record)
            )));
        }
        let (manifest, version) = self.captions_of(tenant, &job, &record, false).await?;
        Ok(Captions {
            job_id: job.to_string(),
            version,
            entries: entries(&manifest),
        })
    }

    /// Replaces the named files' captions of a job in `AWAITING_REVIEW`
    /// made on `request.version`; answers the new version's captions.
    pub async fn update_captions(
        &self,
        tenant: &TenantId,
        request: &UpdateCaptionsRequest,
    ) -> Result<Captions, ApiError> {
        let job = parse_job(&request.job_id)?;
        let record = self.repo.get(tenant, &job).await?.record;
        if record.state() != JobState::AwaitingReview {
            return Err(not_in_review(&record));
        }
        let from = current_version(&record);
        if request.version != from {
            return Err(stale(request.version, from));
        }
        let (mut captions, _) = self.captions_of(tenant, &job, &record, true).await?;
        let changed = apply_edits(&mut captions, &request.entries).map_err(ApiError::Invalid)?;
        // Reserve the next version: only the update that wins writes it.
        let now = trainyard_core::now_ms();
        let (reserved, seen) = self
            .repo
            .update(tenant, &job, |current| {
                let ok = current.state() == JobState::AwaitingReview
                    && current_version(&current) == from;
                let next = ok.then(|| {
                    let mut next = current.clone();
                    next.captions_version = from + 1;
                    next.updated_at_ms = now;
                    next
                });
                async move { (next, current) }
            })
            .await?;
        if reserved.is_none() {
            return Err(if seen.state() != JobState::AwaitingReview {
                not_in_review(&seen)
            } else {
                stale(from, current_version(&seen))
            });
        }
        let version = from + 1;
        let json = serde_json::to_vec_pretty(&captions)
            .map_err(|e| ApiError::Internal(format!("captions: {e}")))?;
        self.store
            .put_bytes(&keys::captions(tenant, &job, version), json.into())
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!(
                    "captions version {version} was not stored ({e}): read the captions and apply the edits again"
                ))
            })?;
        tracing::info!(%job, version, changed, "captions updated");
        Ok(Captions {
            job_id: job.to_string(),
            version,
            entries: entries(&captions),
        })
    }

    /// Approves the captions of a job in `AWAITING_REVIEW` (at `version`,
    /// unless 0): the approved captions written into its dataset, then
    /// `TRAINING` with its train task. A job approved already is answered
    /// as it is.
    pub async fn approve_captions(
        &self,
        tenant: &TenantId,
        job_id: &str,
        version: u32,
    ) -> Result<ApproveCaptionsResponse, ApiError> {
        let job = parse_job(job_id)?;
        let record = self.repo.get(tenant, &job).await?.record;
        let current = current_version(&record);
        let answer = |record: JobRecord| ApproveCaptionsResponse {
            job: Some(crate::api::answered(&record)),
        };
        if version != 0 && version != current {
            return Err(stale(version, current));
        }
        if record.state() != JobState::AwaitingReview {
            let approved = record.times.is_some_and(|t| t.awaiting_review_at_ms > 0)
                && matches!(
                    record.state(),
                    JobState::Training | JobState::Delivering | JobState::Succeeded
                );
            return if approved {
                Ok(answer(record))
            } else if !job::wants_review(&record) {
                Err(ApiError::FailedPrecondition(
                    "job was not submitted with caption.review: there is nothing to approve".into(),
                ))
            } else {
                Err(not_in_review(&record))
            };
        }
        let quota = self.effects.quotas.for_tenant(tenant.as_str());
        if quota.max_running_jobs.is_some() {
            let records = self.repo.of_tenant(tenant).await?;
            if let Some(reason) = crate::quota::approve(&records, &quota, job.as_str()) {
                return Err(ApiError::ResourceExhausted(reason));
            }
        }
        let (approved, _) = self.captions_of(tenant, &job, &record, true).await?;
        if current > 1 {
            self.write_dataset(tenant, &job, &approved).await?;
        }
        let now = trainyard_core::now_ms();
        let (stored, (effects, seen)) = self
            .repo
            .update(tenant, &job, |current_record| {
                let same = current_version(&current_record) == current;
                let decision = same.then(|| job::transition(&current_record, &Event::Approve, now));
                let tenant = tenant.clone();
                async move {
                    match decision {
                        Some(Decision::Apply(mut next, mut todo)) => {
                            crate::results::hold_if_full(
                                &self.repo,
                                &self.effects,
                                &tenant,
                                &mut next,
                                &mut todo,
                            )
                            .await;
                            (Some(*next), (todo, current_record))
                        }
                        _ => (None, (Vec::new(), current_record)),
                    }
                }
            })
            .await?;
        let Some(record) = stored else {
            // Moved on meanwhile: approved by another call, edited, or cancelled.
            return if seen.state() == JobState::AwaitingReview {
                Err(stale(current, current_version(&seen)))
            } else if seen.state() == JobState::Training && current_version(&seen) == current {
                Ok(answer(seen))
            } else {
                Err(not_in_review(&seen))
            };
        };
        tracing::info!(%job, version = current, "captions approved: training");
        let span = crate::trace::job_span("approve captions", &record);
        if let Err(error) = self.effects.run(&record, effects).instrument(span).await {
            // Stored: the reconciler publishes the lost task.
            tracing::warn!(%job, %error, "train task of an approved job not published yet");
        }
        Ok(answer(record))
    }

    /// Writes `approved` into the job's dataset: the caption files that
    /// differ from the stored manifest, then the manifest.
    async fn write_dataset(
        &self,
        tenant: &TenantId,
        job: &JobId,
        approved: &DatasetManifest,
    ) -> Result<(), ApiError> {
        let stored = self.dataset_manifest(tenant, job).await?;
        let files = changed_files(&stored, approved);
        let mut writes = futures::stream::iter(files.into_iter().map(|(file, caption)| {
            let key = keys::dataset_file(tenant, job, &file);
            async move {
                self.store
                    .put_bytes(&key, caption.into_bytes().into())
                    .await
            }
        }))
        .buffer_unordered(WRITES_AT_ONCE);
        while let Some(written) = writes.next().await {
            written.map_err(store_error)?;
        }
        let mut json = serde_json::to_vec_pretty(approved)
            .map_err(|e| ApiError::Internal(format!("manifest: {e}")))?;
        json.push(b'\n');
        self.store
            .put_bytes(
                &keys::dataset_file(tenant, job, MANIFEST_FILE_NAME),
                json.into(),
            )
            .await
            .map_err(store_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_core::manifest::ManifestEntry;

    fn manifest(files: &[(&str, &str)]) -> DatasetManifest {
        DatasetManifest {
            version: 1,
            trigger_word: "ohwx".into(),
            caption_backend: "template".into(),
            images: files
                .iter()
                .map(|(file, caption)| ManifestEntry {
                    file: file.to_string(),
                    caption_file: format!("{}.txt", file.rsplit_once('.').unwrap().0),
                    width: 64,
                    height: 64,
                    size: 1,
                    sha256: "ab".into(),
                    caption: caption.to_string(),
                    caption_source: CaptionSource::Backend("template".into()),
                    media: if file.ends_with(".mp4") {
                        MediaKind::Video
                    } else {
                        MediaKind::Image
                    },
                    video: None,
                })
                .collect(),
            dropped: vec![],
            texts: vec![],
        }
    }

    fn edit(path: &str, caption: &str) -> CaptionEntry {
        CaptionEntry {
            path: path.into(),
            caption: caption.into(),
            ..Default::default()
        }
    }

    #[test]
    fn edits_replace_captions_as_one_trimmed_line() {
        let mut m = manifest(&[("a.png", "ohwx a"), ("b.png", "ohwx b")]);
        let changed = apply_edits(&mut m, &[edit("b.png", "  ohwx a red\n\r\n  bike \t")]).unwrap();
        assert_eq!(changed, 1);
        assert_eq!(m.images[1].caption, "ohwx a red bike");
        assert_eq!(String::from(m.images[1].caption_source.clone()), "edited");
        assert_eq!(m.images[0].caption, "ohwx a");
        assert_eq!(String::from(m.images[0].caption_source.clone()), "template");
        // The same caption again changes nothing.
        assert_eq!(apply_edits(&mut m, &[edit("a.png", "ohwx a")]).unwrap(), 0);
        assert_eq!(entries(&m)[1].source, "edited");
        assert_eq!(entries(&m)[1].media, "image");
    }

    #[test]
    fn bad_edits_are_refused_all_at_once_and_change_nothing() {
        let original = manifest(&[("a.png", "ohwx a")]);
        let rows: Vec<(&str, Vec<CaptionEntry>, &str)> = vec![
            ("no edits", vec![], "no captions"),
            ("unknown path", vec![edit("../x.png", "c")], "no such file"),
            ("empty", vec![edit("a.png", " \n ")], "empty"),
            (
                "too long",
                vec![edit("a.png", &"x".repeat(MAX_CAPTION_CHARS + 1))],
                "at most",
            ),
            (
                "named twice",
                vec![edit("a.png", "one"), edit("a.png", "two")],
                "twice",
            ),
        ];
        for (row, edits, want) in rows {
            let mut m = original.clone();
            let error = apply_edits(&mut m, &edits).unwrap_err();
            assert!(error.contains(want), "{row}: {error}");
            assert_eq!(m, original, "{row}");
        }
        let mut m = original.clone();
        let both = apply_edits(&mut m, &[edit("x.png", "c"), edit("a.png", "")]).unwrap_err();
        assert!(both.contains("x.png") && both.contains("empty"), "{both}");
    }

    #[test]
    fn approval_writes_only_the_changed_caption_files() {
        let stored = manifest(&[
            ("a.png", "ohwx a"),
            ("b.png", "ohwx b"),
            ("c.mp4", "ohwx c"),
        ]);
        let mut approved = stored.clone();
        apply_edits(&mut approved, &[edit("c.mp4", "ohwx a clip")]).unwrap();
        assert_eq!(
            changed_files(&stored, &approved),
            [("c.txt".to_string(), "ohwx a clip".to_string())]
        );
        assert!(changed_files(&approved, &approved).is_empty());
    }
}
