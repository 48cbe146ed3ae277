//! Delivery to an `hf://org/repo[@branch][/path]` destination: one commit
//! per job holding the job's outputs, a model card ([`card`]) and the
//! sha256 manifest, made with the job's token through the Hub's upload
//! protocol ([`trainyard_core::destination::hf::api`]).
//!
//! ```text
//! repo exists? ──no──▶ create (private unless Destination.public)
//! branch exists? ──no──▶ create it from main
//! head ◀─────────────────────────────────────────────┐
//! this job's commit among the latest? ──yes──▶ done   │
//! preupload (which files are LFS) → LFS batch → PUT   │
//! commit(parentCommit = head) ──412/409──▶ (bounded) ─┘
//! ```
//!
//! Re-delivery after a crash (the commit made, the result never sent)
//! finds the commit by its trailer `Trainyard-Job: <job id>` in the
//! branch's history and records it instead of committing again; a
//! delivery that raced with another attempt of the same job meets a moved
//! head, re-reads it, and finds that attempt's commit the same way. LFS
//! uploads are content-addressed: an object already stored is not sent.
//!
//! The history is read page by page from the head, newest first, following
//! the Hub's `Link` header ([`HubApi::commits`]), and the walk stops at the
//! trailer, at the last page, at a commit dated before the job was created
//! (less [`CLOCK_SKEW_MS`]: the job's commit cannot be older; dates are the
//! Hub's clock, the job's the coordinator's), or after [`MAX_COMMIT_PAGES`]
//! pages. Past that cap — more commits to the branch since the job was
//! created than the cap covers — the job's commit is taken as absent and
//! the delivery commits: at worst a second commit of the same files, never
//! a lost delivery. [`scan_page`] decides each page; it is pure.
//!
//! Errors: a refused token (401/403) fails the job with `AUTH`; 429 and
//! 5xx go back to the stage runtime with the Hub's `Retry-After`; a head
//! that keeps moving past [`COMMIT_ATTEMPTS`] is retried later the same way.

pub mod card;
pub mod job;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use trainyard_core::destination::hf::api::{
    CommitEntry, CommitOp, HubApi, HubApiError, PreuploadFile, SAMPLE_BYTES, commit_body,
};
use trainyard_core::destination::hf::{HfDestination, HfTarget, MAIN};
use trainyard_core::redact::display_url;
use trainyard_core::runtime::{StageError, TaskContext};
use trainyard_proto::v1::{Artifact, DeliveredFile, ErrorKind};

/// Commits tried against a head that moved before the delivery gives the
/// task back to the runtime.
pub const COMMIT_ATTEMPTS: usize = 3;
/// Pages of history read at most looking for a job's commit: with the
/// Hub's pages of [`COMMITS_PER_PAGE`] (100), its 2,000 latest commits.
/// The bound on a re-delivery's requests when the job's creation time is
/// unknown or the branch is very busy.
///
/// [`COMMITS_PER_PAGE`]: trainyard_core::destination::hf::api::COMMITS_PER_PAGE
pub const MAX_COMMIT_PAGES: usize = 20;
/// How much older than the job's creation a commit may be dated and the
/// walk still go on: the Hub's clock and the coordinator's may differ.
pub const CLOCK_SKEW_MS: i64 = 10 * 60 * 1000;
/// The trailer that marks a job's commit.
pub const TRAILER: &str = "Trainyard-Job";

/// An opened `hf://` destination with the spec's options for it.
#[derive(Clone, Debug)]
pub struct HubTarget {
    pub dest: HfDestination,
    /// The destination as the spec wrote it.
    pub label: String,
    /// A repository created by the delivery is public.
    pub public: bool,
    /// The card's license tag; empty: `other`.
    pub license: String,
}

/// One file of the commit.
struct CommitFile {
    /// Its path in the repository.
    path: String,
    local: PathBuf,
    size: u64,
    sha256: String,
}

/// What one delivery needs besides the target.
pub struct Delivery<'a> {
    pub job: &'a str,
    pub artifacts: &'a [Artifact],
    pub locals: &'a [PathBuf],
    /// The model card's text.
    pub card: String,
    /// The manifest, given each artifact's URIs in this repository.
    pub manifest: Bytes,
    /// The commit's summary line.
    pub summary: String,
    /// Where README.md and manifest.json are written before upload.
    pub work: &'a Path,
    /// When the job was created (ms since the epoch): its commit is not
    /// older. `None` when unknown.
    pub created_ms: Option<i64>,
}

/// What a delivery did.
#[derive(Debug, Default)]
pub struct Delivered {
    pub files: Vec<DeliveredFile>,
    pub commit: String,
    /// False when this job's commit was already there.
    pub committed: bool,
    /// Bytes sent to LFS storage now.
    pub uploaded_bytes: u64,
}

/// The line that marks `job`'s commit.
pub fn trailer(job: &str) -> String {
    format!("{TRAILER}: {job}")
}

/// Whether `commit` has the trailer line `mark` ([`trailer`]).
fn has_trailer(commit: &CommitEntry, mark: &str) -> bool {
    commit
        .message
        .lines()
        .chain(commit.title.lines())
        .any(|line| line.trim() == mark)
}

/// What one page of history (newest first) says about a job's commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageScan {
    /// The job's commit, by id.
    Found(String),
    /// A commit dated before the job's creation (less [`CLOCK_SKEW_MS`])
    /// and no job commit before it: the rest of the history is older still.
    Older,
    /// Neither: the next page, if any, may hold it.
    Continue,
}

/// Reads one page for `job`'s commit; `created_ms` is when the job was
/// created (`None`: unknown, never [`PageScan::Older`]). A commit whose
/// date does not parse is not taken as older.
pub fn scan_page(commits: &[CommitEntry], job: &str, created_ms: Option<i64>) -> PageScan {
    let oldest = created_ms.map(|ms| ms.saturating_sub(CLOCK_SKEW_MS));
    let mark = trailer(job);
    for commit in commits {
        if has_trailer(commit, &mark) {
            return PageScan::Found(commit.id.clone());
        }
        let dated = trainyard_core::parse_rfc3339(&commit.date);
        if let (Some(oldest), Some(date)) = (oldest, dated)
            && date < oldest
        {
            return PageScan::Older;
        }
    }
    PageScan::Continue
}

impl HubTarget {
    fn api(&self) -> &HubApi {
        &self.dest.api
    }

    fn target(&self) -> &HfTarget {
        &self.dest.target
    }

    /// The files' paths in the repository; each artifact, then the card
    /// and the manifest.
    pub fn paths(&self, artifacts: &[Artifact]) -> Vec<String> {
        artifacts
            .iter()
            .map(|a| self.target().path_of(&a.name))
            .collect()
    }

    /// `hf://repo@<branch>/<path>` of each artifact: the URIs the
    /// committed manifest lists (the commit's id cannot be in itself).
    pub fn branch_uris(&self, artifacts: &[Artifact]) -> Vec<Vec<String>> {
        self.paths(artifacts)
            .into_iter()
            .map(|p| vec![self.target().uri_of(&self.target().branch, &p)])
            .collect()
    }

    /// The error a Hub failure means for the job, naming the destination.
    fn stage_error(&self, error: HubApiError) -> StageError {
        let message = format!("destination {}: {error}", display_url(&self.label));
        if error.is_auth() {
            return StageError::fail(ErrorKind::Auth, message);
        }
        if error.is_retryable() || matches!(error, HubApiError::Conflict { .. }) {
            let delay = error.retry_after().unwrap_or(Duration::ZERO);
            return StageError::retry(ErrorKind::Storage, message, delay);
        }
        StageError::fail(ErrorKind::Storage, message)
    }

    /// Delivers `delivery` in one commit; see the module docs.
    pub async fn deliver(
        &self,
        delivery: &Delivery<'_>,
        ctx: &TaskContext,
    ) -> Result<Delivered, StageError> {
        self.deliver_inner(delivery, ctx)
            .await
            .map_err(|e| self.stage_error(e))
    }

    async fn deliver_inner(
        &self,
        delivery: &Delivery<'_>,
        ctx: &TaskContext,
    ) -> Result<Delivered, HubApiError> {
        let (api, target) = (self.api(), self.target());
        let repo = target.repo.as_str();
        let branch = target.branch.as_str();
        if !api.repo_exists(repo).await? && api.create_repo(repo, !self.public).await? {
            let visibility = if self.public { "public" } else { "private" };
            ctx.note(&format!("created the {visibility} repository {repo}"))
                .await;
        }
        if branch != MAIN
            && api.head(repo, branch).await?.is_none()
            && api.create_branch(repo, branch).await?
        {
            ctx.note(&format!("created the branch {branch} of {repo}"))
                .await;
        }
        let files = self.files(delivery).await?;
        let mut uploaded = None;
        let mut uploaded_bytes = 0;
        for attempt in 1..=COMMIT_ATTEMPTS {
            let head = api
                .head(repo, branch)
                .await?
                .ok_or_else(|| HubApiError::NotFound {
                    what: format!("{repo}@{branch}"),
                    code: None,
                })?;
            if let Some(found) = self.job_commit(&head, delivery, ctx).await? {
                let note = format!(
                    "{repo}@{branch} already holds this job's commit {found}; not committed again"
                );
                tracing::info!(job = delivery.job, repo, commit = %found, "{note}");
                ctx.note(&note).await;
                return Ok(self.delivered(&files, delivery, &found, false, uploaded_bytes));
            }
            let ops = match &uploaded {
                Some(ops) => ops,
                None => {
                    let (ops, bytes) = self.upload(&files, &head).await?;
                    uploaded_bytes = bytes;
                    uploaded.insert(ops)
                }
            };
            let description = format!("Delivered by Trainyard.\n\n{}", trailer(delivery.job));
            let body = commit_body(&delivery.summary, &description, Some(&head), ops);
            match api.commit(repo, branch, body).await {
                Ok(commit) => {
                    ctx.note(&format!(
                        "committed {} files to {repo}@{commit}",
                        files.len()
                    ))
                    .await;
                    return Ok(self.delivered(&files, delivery, &commit, true, uploaded_bytes));
                }
                Err(HubApiError::Conflict { status }) if attempt < COMMIT_ATTEMPTS => {
                    tracing::info!(
                        job = delivery.job,
                        repo,
                        status,
                        attempt,
                        "the branch moved while committing; reading its head again"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Err(HubApiError::Conflict { status: 412 })
    }

    /// The job's commit in the history of `head`, walked page by page as
    /// the module docs say; `None` when absent (or past the page cap).
    async fn job_commit(
        &self,
        head: &str,
        delivery: &Delivery<'_>,
        ctx: &TaskContext,
    ) -> Result<Option<String>, HubApiError> {
        let (api, repo) = (self.api(), self.target().repo.as_str());
        let mut page = api.commits(repo, head).await?;
        for read in 1..=MAX_COMMIT_PAGES {
            match scan_page(&page.commits, delivery.job, delivery.created_ms) {
                PageScan::Found(id) => return Ok(Some(id)),
                PageScan::Older => return Ok(None),
                PageScan::Continue => {}
            }
            let Some(next) = page.next.take() else {
                return Ok(None);
            };
            if read == MAX_COMMIT_PAGES {
                let note = format!(
                    "read the latest {read} pages of {repo}'s history without reaching this \
                     job's creation nor its commit; committing"
                );
                tracing::warn!(job = delivery.job, repo, pages = read, "{note}");
                ctx.note(&note).await;
                break;
            }
            page = api.next_commits(repo, &next).await?;
        }
        Ok(None)
    }

    /// The commit's files: each artifact, then `README.md` and
    /// `manifest.json` written to the work folder.
    async fn files(&self, delivery: &Delivery<'_>) -> Result<Vec<CommitFile>, HubApiError> {
        let target = self.target();
        let mut files: Vec<CommitFile> = delivery
            .artifacts
            .iter()
            .zip(delivery.locals)
            .map(|(artifact, local)| CommitFile {
                path: target.path_of(&artifact.name),
                local: local.clone(),
                size: artifact.size,
                sha256: artifact.sha256.clone(),
            })
            .collect();
        let folder = delivery.work.join("hub");
        tokio::fs::create_dir_all(&folder)
            .await
            .map_err(|e| HubApiError::io(&folder, e))?;
        for (name, bytes) in [
            ("README.md", Bytes::from(delivery.card.clone())),
            ("manifest.json", delivery.manifest.clone()),
        ] {
            let local = folder.join(name);
            tokio::fs::write(&local, &bytes)
                .await
                .map_err(|e| HubApiError::io(&local, e))?;
            files.push(CommitFile {
                path: target.path_of(name),
                local,
                size: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(&bytes)),
            });
        }
        Ok(files)
    }

    /// Preupload, then every LFS file to storage; the commit's lines and
    /// the bytes sent.
    async fn upload(
        &self,
        files: &[CommitFile],
        revision: &str,
    ) -> Result<(Vec<CommitOp>, u64), HubApiError> {
        let (api, repo) = (self.api(), self.target().repo.as_str());
        let mut samples = Vec::with_capacity(files.len());
        for file in files {
            samples.push(PreuploadFile {
                path: file.path.clone(),
                sample: sample(&file.local).await?,
                size: file.size,
            });
        }
        let lfs = api.preupload(repo, revision, &samples).await?;
        let is_lfs = |f: &CommitFile| lfs.contains(&f.path);
        let objects: Vec<(String, u64)> = files
            .iter()
            .filter(|f| is_lfs(f))
            .map(|f| (f.sha256.clone(), f.size))
            .collect();
        let mut sent = 0;
        if !objects.is_empty() {
            for object in api.lfs_batch(repo, revision, &objects).await? {
                let Some(file) = files.iter().find(|f| f.sha256 == object.oid) else {
                    continue;
                };
                if object.actions.is_some() {
                    sent += file.size;
                }
                api.lfs_upload(&object, &file.local, file.size).await?;
            }
        }
        let mut ops = Vec::with_capacity(files.len());
        for file in files {
            ops.push(if is_lfs(file) {
                CommitOp::LfsFile {
                    path: file.path.clone(),
                    oid: file.sha256.clone(),
                    size: file.size,
                }
            } else {
                CommitOp::File {
                    path: file.path.clone(),
                    content: tokio::fs::read(&file.local)
                        .await
                        .map_err(|e| HubApiError::io(&file.local, e))?,
                }
            });
        }
        Ok((ops, sent))
    }

    fn delivered(
        &self,
        files: &[CommitFile],
        delivery: &Delivery<'_>,
        commit: &str,
        committed: bool,
        uploaded_bytes: u64,
    ) -> Delivered {
        let target = self.target();
        Delivered {
            files: files
                .iter()
                .take(delivery.artifacts.len())
                .map(|file| DeliveredFile {
                    destination: self.label.clone(),
                    uri: target.uri_of(commit, &file.path),
                    size: file.size,
                    sha256: file.sha256.clone(),
                    commit: commit.to_owned(),
                    ..Default::default()
                })
                .collect(),
            commit: commit.to_owned(),
            committed,
            uploaded_bytes,
        }
    }
}

/// Base64 of a file's first [`SAMPLE_BYTES`].
async fn sample(path: &Path) -> Result<String, HubApiError> {
    use base64::Engine as _;
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| HubApiError::io(path, e))?;
    let mut head = Vec::with_capacity(SAMPLE_BYTES);
    file.take(SAMPLE_BYTES as u64)
        .read_to_end(&mut head)
        .await
        .map_err(|e| HubApiError::io(path, e))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_is_found_by_its_trailer_line_only() {
        let commit = |id: &str, message: &str| CommitEntry {
            id: id.into(),
            title: "Trainyard: x".into(),
            message: message.into(),
            ..Default::default()
        };
        let commits = [
            commit("c3", "Delivered by Trainyard.\n\nTrainyard-Job: job-10"),
            commit("c2", "Delivered by Trainyard.\n\nTrainyard-Job: job-1"),
            commit("c1", "initial"),
        ];
        let found = |job: &str| scan_page(&commits, job, None);
        assert_eq!(found("job-1"), PageScan::Found("c2".into()));
        assert_eq!(found("job-10"), PageScan::Found("c3".into()));
        assert_eq!(found("job"), PageScan::Continue);
    }

    #[test]
    fn a_page_is_found_older_or_read_on() {
        let created = trainyard_core::parse_rfc3339("2026-12-07T12:00:00Z");
        let commit = |id: &str, date: &str, message: &str| CommitEntry {
            id: id.into(),
            title: "x".into(),
            message: message.into(),
            date: date.into(),
        };
        let job = "j-1";
        let mine = trailer(job);
        let cases: &[(&str, Vec<CommitEntry>, Option<i64>, PageScan)] = &[
            ("empty", vec![], created, PageScan::Continue),
            (
                "found among newer commits",
                vec![
                    commit("c2", "2026-12-07T13:00:00Z", ""),
                    commit("c1", "2026-12-07T12:30:00Z", &mine),
                ],
                created,
                PageScan::Found("c1".into()),
            ),
            (
                "all newer",
                vec![commit("c2", "2026-12-07T13:00:00Z", "")],
                created,
                PageScan::Continue,
            ),
            (
                "within the clock skew",
                vec![commit("c1", "2026-12-07T11:55:00Z", "")],
                created,
                PageScan::Continue,
            ),
            (
                "older than the job",
                vec![
                    commit("c2", "2026-12-07T13:00:00Z", ""),
                    commit("c1", "2026-12-07T11:00:00Z", ""),
                    commit("c0", "2026-12-07T10:00:00Z", &mine),
                ],
                created,
                PageScan::Older,
            ),
            (
                "creation unknown",
                vec![commit("c1", "2020-01-01T00:00:00Z", "")],
                None,
                PageScan::Continue,
            ),
            (
                "no date",
                vec![commit("c1", "", "")],
                created,
                PageScan::Continue,
            ),
        ];
        for (name, commits, created, want) in cases {
            assert_eq!(&scan_page(commits, job, *created), want, "{name}");
        }
        assert_eq!(
            trainyard_core::destination::hf::api::COMMITS_PER_PAGE * MAX_COMMIT_PAGES,
            2000,
            "the docs say 2,000"
        );
    }
}
