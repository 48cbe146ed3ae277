//! Hub files and snapshots into the cache: one file by a `HEAD` then a
//! download of its location; a folder by the revision listing, then each
//! matching file at the listed commit. Links go under
//! `snapshots/<org>--<repo>@<commit>/`, so a folder part is a real folder.

use super::cache::{BlobKey, Expected};
use super::{ModelLease, Models, fail};
use std::path::PathBuf;
use std::time::Duration;
use trainyard_core::runtime::StageError;
use trainyard_models::glob_match;
use trainyard_models::hub::{HubError, HubFileInfo};
use trainyard_proto::v1::ErrorKind;

/// Files of one snapshot fetched at once.
const PARALLEL_FILES: usize = 4;

/// What a fetch is for, for its error messages.
pub(super) struct Ctx<'a> {
    pub reference: &'a str,
    pub part: &'a str,
    pub token: Option<&'a str>,
}

impl Ctx<'_> {
    fn error(&self, error: HubError) -> StageError {
        let reference = self.reference;
        if error.is_auth() {
            let advice = match self.token {
                None => {
                    "the job has no hf_token secret; give it one (secrets.hf_token) from a Hugging Face account that has access"
                }
                Some(_) => {
                    "the job's hf_token secret lacks access to it; accept the model's licence on the Hub with the account that made the token, or use a token of an account that has"
                }
            };
            return StageError::fail(
                ErrorKind::Auth,
                format!("base_model {reference}: {error}: {advice}"),
            );
        }
        if error.is_retryable() {
            let delay = error.retry_after().unwrap_or(Duration::from_secs(10));
            return StageError::retry(
                ErrorKind::Model,
                format!("base_model {reference} ({} part): {error}", self.part),
                delay,
            );
        }
        fail(format!("base_model {reference}: {error}"))
    }
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `snapshots/<org>--<name>@<commit>`.
fn snapshot_dir(repo: &str, commit: &str) -> String {
    format!("snapshots/{}@{commit}", repo.replace('/', "--"))
}

/// The folder every include pattern lives in (`transformer/*.json` →
/// `transformer`), or "" when they do not share one.
fn common_folder(include: &[&str]) -> String {
    let folders: Vec<Vec<&str>> = include
        .iter()
        .map(|pattern| {
            let segments: Vec<&str> = pattern.split('/').collect();
            segments[..segments.len() - 1]
                .iter()
                .take_while(|s| !s.contains('*'))
                .copied()
                .collect()
        })
        .collect();
    let Some(first) = folders.first() else {
        return String::new();
    };
    let mut common = first.len();
    for folder in &folders[1..] {
        common = common.min(first.iter().zip(folder).take_while(|(a, b)| a == b).count());
    }
    first[..common].join("/")
}

impl Models {
    /// One file of a repository, as a link in its snapshot folder.
    pub(super) async fn hub_file(
        &self,
        ctx: &Ctx<'_>,
        repo: &str,
        revision: &str,
        path: &str,
        lease: &mut ModelLease,
    ) -> Result<PathBuf, StageError> {
        let ref_key = format!("{repo}@{revision}");
        // A commit never moves: a file linked under it is the file.
        if is_commit(revision) {
            let link = format!("{}/{path}", snapshot_dir(repo, revision));
            if let Some(pin) = self.cache.pin_link(&link).await {
                lease.hold(ctx.part, pin);
                return Ok(self.cache.root().join(link));
            }
        }
        let info = match self.hub.file_info(repo, revision, path, ctx.token).await {
            Ok(info) => info,
            Err(e) if e.is_retryable() => {
                // The hub is unreachable: a copy from an earlier run will do.
                if let Some(commit) = self.cache.known_ref(&ref_key) {
                    let link = format!("{}/{path}", snapshot_dir(repo, &commit));
                    if let Some(pin) = self.cache.pin_link(&link).await {
                        tracing::warn!(repo, revision, error = %e, "hub unreachable; using the cached copy");
                        lease.hold(ctx.part, pin);
                        return Ok(self.cache.root().join(link));
                    }
                }
                return Err(ctx.error(e));
            }
            Err(e) => return Err(ctx.error(e)),
        };
        let commit = info.commit.clone().unwrap_or_else(|| revision.to_string());
        self.cache.remember_ref(&ref_key, &commit);
        let link = format!("{}/{path}", snapshot_dir(repo, &commit));
        let expected = Expected {
            sha256: info.sha256().map(str::to_string),
            git_blob_id: info.git_blob_id().map(str::to_string),
            size: info.size,
        };
        self.fetch_into(ctx, &link, &info, expected, lease).await?;
        Ok(self.cache.root().join(link))
    }

    /// Fetches one described file into the cache and links it.
    async fn fetch_into(
        &self,
        ctx: &Ctx<'_>,
        link: &str,
        info: &HubFileInfo,
        expected: Expected,
        lease: &mut ModelLease,
    ) -> Result<(), StageError> {
        let pin = self.fetch_blob(ctx, link, info, &expected).await?;
        self.cache.link(link, pin.sha()).await?;
        lease.hold(ctx.part, pin);
        Ok(())
    }

    async fn fetch_linked(
        &self,
        ctx: &Ctx<'_>,
        link: String,
        info: HubFileInfo,
        expected: Expected,
    ) -> Result<super::cache::Pin, StageError> {
        let pin = self.fetch_blob(ctx, &link, &info, &expected).await?;
        self.cache.link(&link, pin.sha()).await?;
        Ok(pin)
    }

    async fn fetch_blob(
        &self,
        ctx: &Ctx<'_>,
        link: &str,
        info: &HubFileInfo,
        expected: &Expected,
    ) -> Result<super::cache::Pin, StageError> {
        let key = BlobKey::for_expected(expected, &info.location);
        self.cache
            .ensure(&key, expected, link, |partial| async move {
                self.hub
                    .download(&info.location, expected.size, &partial, ctx.token)
                    .await
                    .map(|done| {
                        if done.resumed_from > 0 {
                            tracing::info!(
                                file = link,
                                from = done.resumed_from,
                                "resumed a partial download"
                            );
                        }
                    })
                    .map_err(|e| ctx.error(e))
            })
            .await
    }

    /// The files of a repository matching `include` (all when empty), as a
    /// folder of links.
    pub(super) async fn hub_folder(
        &self,
        ctx: &Ctx<'_>,
        repo: &str,
        revision: &str,
        include: &[&str],
        lease: &mut ModelLease,
    ) -> Result<PathBuf, StageError> {
        let snapshot = self
            .hub
            .snapshot(repo, revision, ctx.token)
            .await
            .map_err(|e| ctx.error(e))?;
        let commit = snapshot.commit.clone();
        self.cache
            .remember_ref(&format!("{repo}@{revision}"), &commit);
        let dir = snapshot_dir(repo, &commit);
        let files: Vec<_> = snapshot
            .files
            .iter()
            .filter(|f| include.is_empty() || include.iter().any(|g| glob_match(g, &f.path)))
            .collect();
        if files.is_empty() {
            return Err(fail(format!(
                "base_model {}: {repo}@{revision} has no files matching {}",
                ctx.reference,
                include.join(", ")
            )));
        }
        let jobs: Vec<(String, HubFileInfo, Expected)> = files
            .into_iter()
            .map(|entry| {
                let info = HubFileInfo {
                    commit: Some(commit.clone()),
                    etag: entry.sha256.clone().or(entry.git_blob_id.clone()),
                    size: entry.size,
                    location: self.hub.file_url(repo, &commit, &entry.path),
                };
                let expected = Expected {
                    sha256: entry.sha256.clone(),
                    git_blob_id: entry.git_blob_id.clone().filter(|_| entry.sha256.is_none()),
                    size: entry.size,
                };
                (format!("{dir}/{}", entry.path), info, expected)
            })
            .collect();
        // Futures of a plain async fn (not of a closure), collected first:
        // the stream stays `Send` for the stage's handler.
        let fetches: Vec<_> = jobs
            .into_iter()
            .map(|(link, info, expected)| self.fetch_linked(ctx, link, info, expected))
            .collect();
        use futures::StreamExt;
        let mut results = futures::stream::iter(fetches).buffer_unordered(PARALLEL_FILES);
        let mut first_error = None;
        while let Some(result) = results.next().await {
            match result {
                Ok(pin) => lease.hold(ctx.part, pin),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        let folder = common_folder(include);
        let path = self.cache.root().join(&dir);
        Ok(if folder.is_empty() {
            path
        } else {
            path.join(folder)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_of_include_patterns() {
        assert_eq!(
            common_folder(&["transformer/*.safetensors", "transformer/*.json"]),
            "transformer"
        );
        assert_eq!(common_folder(&["model_index.json", "*/*.json"]), "");
        assert_eq!(common_folder(&["a/b/*.json", "a/c/*.json"]), "a");
        assert_eq!(common_folder(&[]), "");
        assert!(is_commit(&"a".repeat(40)) && !is_commit("main"));
    }
}
