//! `hf://org/repo[@branch][/path]` destinations: a Hugging Face model
//! repository, written through the Hub's upload protocol ([`api`]).
//!
//! - The repository id follows the Hub's own rules (`validate_repo_id`):
//!   `namespace/name`, each of ASCII letters, digits, `-`, `_` and `.`, not
//!   starting or ending with `-` or `.`, no `--` or `..`, at most 96
//!   characters, the name not ending in `.git`.
//! - The branch (default `main`) is read as huggingface_hub's
//!   `HfFileSystem.resolve_path` reads the revision of an `hf://` path
//!   (`hf_file_system.py`): it runs from `@` to the next `/`, and is then
//!   percent-decoded. A branch holding `/` is so written with `%2F`:
//!   `hf://me/lora@exp%2Frun-1/v1` is the branch `exp/run-1`, folder `v1`,
//!   while `hf://me/lora@exp/run-1` is the branch `exp`, folder `run-1`.
//!   Decoded, it holds letters, digits, `-`, `_`, `.` and `/` under git's
//!   ref rules (no empty component, none starting with `.` or ending with
//!   `.lock`, no `..`), and is not a `refs/…` name: those are pull requests
//!   and conversions, which the Hub refuses as branches (`create_branch`
//!   in `hf_api.py`). URIs we write back quote it the same way
//!   ([`quote_revision`], upstream's `safe_revision`), and the Hub client
//!   sends it as one percent-encoded path segment ([`api`]).
//! - The path has no empty, `.` or `..` segment.
//! - The token is the job's: `secrets.hf_token`, or the `secrets.values`
//!   entry named by `?secret=<name>`. Never the fleet's own Hub token (the
//!   one workers download base models with): the uploader does not read
//!   one, and nothing here looks at the environment.
//! - The Hub's endpoint is the fleet's (`[destinations.hf] endpoint`): a
//!   tenant names a repository, never a server.
//!
//! [`Destinations::probe`] asks the Hub who the token is (`whoami-v2`) and
//! whether the repository exists, and answers whether the token may write
//! there or create it — without creating anything.

pub mod api;

use super::{DestinationError, Destinations, ProbeError, ProbeFailure};
use crate::redact::display_url;
use api::{HubApi, HubApiError, Whoami};
use trainyard_proto::v1::Secrets;

/// The default branch.
pub const MAIN: &str = "main";
/// The Hub's limit on each part of a repository id.
const MAX_NAME: usize = 96;
const MAX_BRANCH: usize = 100;
const MAX_PATH: usize = 1000;

/// The fleet's settings for `hf://` destinations.
#[derive(Clone, Debug)]
pub struct HfRules {
    /// The Hub every `hf://` destination is written to.
    pub endpoint: String,
}

impl Default for HfRules {
    fn default() -> Self {
        Self {
            endpoint: crate::config::HfDestinationsConfig::default().endpoint,
        }
    }
}

/// Why an `hf://` destination cannot be used. Messages name it without its
/// query.
#[derive(Debug, thiserror::Error)]
pub enum HfUriError {
    #[error("{uri}: {problem}")]
    BadRepo { uri: String, problem: String },
    #[error("{uri}: {problem}")]
    BadBranch { uri: String, problem: String },
    #[error("{uri}: the path {problem}")]
    BadPath { uri: String, problem: String },
    #[error("{uri}: only the query ?secret=<name> is understood")]
    BadQuery { uri: String },
    #[error(
        "{uri} needs a Hugging Face token with write access: set secrets.hf_token, or name a \
         secrets.values entry with ?secret=<name>"
    )]
    NoToken { uri: String },
    #[error("{uri}: the fleet's hub endpoint is invalid: {problem}")]
    Endpoint { uri: String, problem: String },
}

/// An `hf://` destination taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfTarget {
    /// `namespace/name`.
    pub repo: String,
    /// `main` unless the URI names one.
    pub branch: String,
    /// Folder in the repository the files go to; empty: the root.
    pub path: String,
    /// The `secrets.values` entry holding the token; `None`: `hf_token`.
    pub secret: Option<String>,
}

impl HfTarget {
    pub fn namespace(&self) -> &str {
        self.repo.split('/').next().unwrap_or_default()
    }

    /// Where `name` goes in the repository.
    pub fn path_of(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.path)
        }
    }

    /// `hf://repo@<revision>/<path>`: a file at a commit or branch, the
    /// revision quoted ([`quote_revision`]).
    pub fn uri_of(&self, revision: &str, path_in_repo: &str) -> String {
        format!(
            "hf://{}@{}/{path_in_repo}",
            self.repo,
            quote_revision(revision)
        )
    }
}

/// A revision as it goes after `@` in an `hf://` URI: every byte but
/// ASCII letters, digits and `-_.~` percent-encoded, so `exp/run-1` is
/// `exp%2Frun-1` (huggingface_hub `hf_file_system.py`, `safe_revision`:
/// `quote(revision, safe="")`). Commit ids and plain branch names are
/// unchanged.
pub fn quote_revision(revision: &str) -> String {
    let mut out = String::with_capacity(revision.len());
    for b in revision.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `uri` is an `hf://` destination.
pub fn is_hf(uri: &str) -> bool {
    uri.starts_with("hf://")
}

/// Whether `license` can be a model card's license tag: a Hub license id
/// (`apache-2.0`, `openrail++`, `other`, …), checked for its form only.
pub fn valid_license(license: &str) -> bool {
    (1..=64).contains(&license.len())
        && license
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.+".contains(&b))
}

/// Takes an `hf://` URI apart and checks each part.
pub fn parse(uri: &str) -> Result<HfTarget, HfUriError> {
    let shown = || display_url(uri);
    let rest = uri.strip_prefix("hf://").unwrap_or(uri);
    let (location, query) = match rest.split_once('?') {
        Some((location, query)) => (location, Some(query)),
        None => (rest, None),
    };
    let secret = match query {
        None => None,
        Some(query) => match query.strip_prefix("secret=") {
            Some(name)
                if !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
            {
                Some(name.to_owned())
            }
            _ => return Err(HfUriError::BadQuery { uri: shown() }),
        },
    };
    let bad_repo = |problem: &str| HfUriError::BadRepo {
        uri: shown(),
        problem: problem.to_owned(),
    };
    let mut parts = location.splitn(3, '/');
    let namespace = parts.next().unwrap_or_default();
    let second = parts
        .next()
        .ok_or_else(|| bad_repo("name a repository as hf://<user or organisation>/<repository>"))?;
    let after = parts.next();
    let (name, branch) = match second.split_once('@') {
        Some((name, branch)) => (name, Some(branch)),
        None => (second, None),
    };
    check_repo_part(namespace, "the user or organisation").map_err(|p| bad_repo(&p))?;
    check_repo_part(name, "the repository name").map_err(|p| bad_repo(&p))?;
    if name.ends_with(".git") {
        return Err(bad_repo("the repository name must not end with .git"));
    }
    let branch = match branch {
        None => MAIN.to_owned(),
        Some(raw) => {
            let bad_branch = |problem: String| HfUriError::BadBranch {
                uri: shown(),
                problem,
            };
            let branch = crate::percent_decode(raw).ok_or_else(|| {
                bad_branch("the branch is not valid percent-encoding (write '/' as %2F)".into())
            })?;
            check_branch(&branch).map_err(bad_branch)?;
            branch
        }
    };
    let path = after.unwrap_or_default().trim_end_matches('/');
    check_path(path).map_err(|problem| HfUriError::BadPath {
        uri: shown(),
        problem,
    })?;
    Ok(HfTarget {
        repo: format!("{namespace}/{name}"),
        branch,
        path: path.to_owned(),
        secret,
    })
}

fn check_repo_part(part: &str, what: &str) -> Result<(), String> {
    if part.is_empty() || part.len() > MAX_NAME {
        return Err(format!("{what} must be 1 to {MAX_NAME} characters"));
    }
    if !part
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{what} may hold only ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
        return Err(format!("{what} must not start or end with '-' or '.'"));
    }
    if part.contains("--") || part.contains("..") {
        return Err(format!("{what} must not contain '--' or '..'"));
    }
    Ok(())
}

/// A decoded branch name: see the module docs.
fn check_branch(branch: &str) -> Result<(), String> {
    if branch.is_empty() || branch.len() > MAX_BRANCH {
        return Err(format!("the branch must be 1 to {MAX_BRANCH} characters"));
    }
    if !branch
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    {
        return Err(
            "the branch may hold only ASCII letters, digits, '-', '_', '.' and '/' (as %2F)".into(),
        );
    }
    if branch.starts_with('-') || branch.ends_with('.') || branch.contains("..") {
        return Err("the branch must not start with '-', end with '.', or hold '..'".into());
    }
    if branch
        .split('/')
        .any(|part| part.is_empty() || part.starts_with('.') || part.ends_with(".lock"))
    {
        return Err(
            "no part of the branch between '/' may be empty, start with '.' or end with '.lock'"
                .into(),
        );
    }
    if branch.split('/').next() == Some("refs") {
        return Err("refs/… names pull requests and conversions on the Hub, not branches".into());
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    if path.len() > MAX_PATH {
        return Err(format!("is longer than {MAX_PATH} characters"));
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return Err("must not hold control characters or '\\'".into());
    }
    for segment in path.split('/') {
        match segment {
            "" => return Err("must not hold an empty segment ('//')".into()),
            "." | ".." => return Err("must not contain '.' or '..'".into()),
            ".git" => return Err("must not name the .git folder".into()),
            _ => {}
        }
    }
    Ok(())
}

/// The job's token for `target`: the named secret, else `hf_token`.
fn token<'a>(target: &HfTarget, secrets: Option<&'a Secrets>) -> Option<&'a str> {
    let secrets = secrets?;
    match &target.secret {
        Some(name) => secrets.values.get(name).map(String::as_str),
        None => Some(secrets.hf_token.as_str()),
    }
    .filter(|t| !t.is_empty())
}

/// An `hf://` destination opened for writing: where, and a client of the
/// fleet's Hub with the job's token.
#[derive(Clone, Debug)]
pub struct HfDestination {
    pub target: HfTarget,
    pub api: HubApi,
}

impl Destinations {
    /// `uri` is a valid `hf://` destination and the job has a token for it.
    pub(super) fn check_hf(
        &self,
        uri: &str,
        secrets: Option<&Secrets>,
    ) -> Result<HfTarget, DestinationError> {
        let target = parse(uri)?;
        if token(&target, secrets).is_none() {
            return Err(HfUriError::NoToken {
                uri: display_url(uri),
            }
            .into());
        }
        Ok(target)
    }

    /// Opens an `hf://` destination: its parts, and a client of the
    /// fleet's Hub holding the job's token.
    pub fn open_hf(
        &self,
        uri: &str,
        secrets: Option<&Secrets>,
    ) -> Result<HfDestination, DestinationError> {
        let target = self.check_hf(uri, secrets)?;
        let token = token(&target, secrets).unwrap_or_default();
        let api = HubApi::new(&self.hf.endpoint, token).map_err(|e| HfUriError::Endpoint {
            uri: display_url(uri),
            problem: e.to_string(),
        })?;
        Ok(HfDestination { target, api })
    }

    /// Whether the job's token may write to the repository, or create it:
    /// `whoami-v2`, then the repository's info. Creates nothing.
    pub(super) async fn probe_hf(
        &self,
        uri: &str,
        secrets: Option<&Secrets>,
    ) -> Result<(), ProbeError> {
        let refused = |e: DestinationError| ProbeError::new(ProbeFailure::Refused, e.to_string());
        let HfDestination { target, api } = self.open_hf(uri, secrets).map_err(refused)?;
        let shown = display_url(uri);
        let failed = |e: HubApiError| {
            let failure = if e.is_auth() {
                ProbeFailure::Denied
            } else if e.is_retryable() {
                ProbeFailure::Unavailable
            } else {
                ProbeFailure::Refused
            };
            tracing::info!(uri = %shown, error = %e, "hub destination probe failed");
            ProbeError::new(failure, format!("destination {shown} is not writable: {e}"))
        };
        let whoami = api.whoami().await.map_err(failed)?;
        if let Err(why) = may_write(&whoami, &target) {
            return Err(ProbeError::new(
                ProbeFailure::Denied,
                format!("destination {shown} is not writable: {why}"),
            ));
        }
        api.repo_exists(&target.repo).await.map_err(failed)?;
        Ok(())
    }
}

/// Whether the token `whoami` describes may write to (or create) the
/// repository of `target`, else why not.
pub fn may_write(whoami: &Whoami, target: &HfTarget) -> Result<(), String> {
    let namespace = target.namespace();
    let role = whoami.role.as_deref().unwrap_or("write");
    if role == "read" {
        return Err(format!("the token of {} is read-only", whoami.name));
    }
    if role == "fineGrained" {
        let allowed = whoami.scoped.iter().any(|scope| {
            let entity = match scope.entity_type.as_str() {
                "user" | "org" => scope.entity_name == namespace,
                "model" => scope.entity_name == target.repo,
                _ => false,
            };
            entity && scope.permissions.iter().any(|p| p == "repo.write")
        });
        return if allowed {
            Ok(())
        } else {
            Err(format!(
                "the fine-grained token of {} has no repo.write permission on {namespace} or {}",
                whoami.name, target.repo
            ))
        };
    }
    if whoami.name == namespace {
        return Ok(());
    }
    match whoami.orgs.iter().find(|org| org.name == namespace) {
        Some(org) if org.role.as_deref() == Some("read") => Err(format!(
            "{} may only read in the organisation {namespace}",
            whoami.name
        )),
        Some(_) => Ok(()),
        None => Err(format!(
            "the token belongs to {}, who is not {namespace} nor a member of it",
            whoami.name
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_taken_apart() {
        let t = parse("hf://me/my-lora").unwrap();
        assert_eq!(
            (t.repo.as_str(), t.branch.as_str(), t.path.as_str()),
            ("me/my-lora", "main", "")
        );
        assert_eq!(t.secret, None);
        let t = parse("hf://acme-org/Flux_LoRA.v2@dev/loras/style/?secret=HF_WRITE").unwrap();
        assert_eq!(t.repo, "acme-org/Flux_LoRA.v2");
        assert_eq!(t.branch, "dev");
        assert_eq!(t.path, "loras/style");
        assert_eq!(t.secret.as_deref(), Some("HF_WRITE"));
        assert_eq!(t.path_of("a.safetensors"), "loras/style/a.safetensors");
        assert_eq!(
            t.uri_of("abc", "loras/style/a.safetensors"),
            "hf://acme-org/Flux_LoRA.v2@abc/loras/style/a.safetensors"
        );
        assert_eq!(parse("hf://me/r/sub").unwrap().path, "sub");
    }

    #[test]
    fn a_branch_holding_a_slash_is_written_with_2f_as_hf_file_system_reads_it() {
        let t = parse("hf://me/lora@exp%2Frun-1/loras/v1").unwrap();
        assert_eq!(
            (t.branch.as_str(), t.path.as_str()),
            ("exp/run-1", "loras/v1")
        );
        assert_eq!(
            parse("hf://me/lora@exp%2frun-1").unwrap().branch,
            "exp/run-1"
        );
        // Unencoded, the first '/' after the branch starts the path.
        let t = parse("hf://me/lora@exp/run-1").unwrap();
        assert_eq!((t.branch.as_str(), t.path.as_str()), ("exp", "run-1"));
        // Written back quoted, so the URI parses to the same place.
        let t = parse("hf://me/lora@a%2Fb%2Fc/x").unwrap();
        let uri = t.uri_of(&t.branch, "x/f.safetensors");
        assert_eq!(uri, "hf://me/lora@a%2Fb%2Fc/x/f.safetensors");
        let again = parse(&uri).unwrap();
        assert_eq!(
            (again.branch.as_str(), again.path.as_str()),
            ("a/b/c", "x/f.safetensors")
        );
        assert_eq!(quote_revision("0123abcdef"), "0123abcdef");
        assert_eq!(quote_revision("v1.0_rc-2~x"), "v1.0_rc-2~x");

        let branch = |uri: &str| matches!(parse(uri), Err(HfUriError::BadBranch { .. }));
        for uri in [
            "hf://me/r@exp%2F",
            "hf://me/r@%2Fexp",
            "hf://me/r@a%2F%2Fb",
            "hf://me/r@a%2F.b",
            "hf://me/r@a.lock%2Fb",
            "hf://me/r@refs%2Fpr%2F1",
            "hf://me/r@refs/pr/1",
            "hf://me/r@a%zz",
            "hf://me/r@a%2",
            "hf://me/r@a%3Fb",
            "hf://me/r@a%C3%A9",
            "hf://me/r@a%FF",
        ] {
            assert!(branch(uri), "{uri}: {:?}", parse(uri));
        }
    }

    #[test]
    fn bad_repositories_branches_and_paths_are_refused() {
        let repo = |uri: &str| matches!(parse(uri), Err(HfUriError::BadRepo { .. }));
        for uri in [
            "hf://me",
            "hf://me/",
            "hf:///repo",
            "hf://-me/repo",
            "hf://me/repo-",
            "hf://me/re--po",
            "hf://me/re..po",
            "hf://me/.repo",
            "hf://me/repo.git",
            "hf://me/re po",
            "hf://me/répo",
            "hf://me:pw@host/repo",
        ] {
            assert!(repo(uri), "{uri}: {:?}", parse(uri));
        }
        let long = format!("hf://me/{}", "a".repeat(97));
        assert!(repo(&long));
        assert!(parse(&format!("hf://me/{}", "a".repeat(96))).is_ok());

        let branch = |uri: &str| matches!(parse(uri), Err(HfUriError::BadBranch { .. }));
        for uri in [
            "hf://me/r@",
            "hf://me/r@.hidden",
            "hf://me/r@-x",
            "hf://me/r@a..b",
            "hf://me/r@x.lock",
            "hf://me/r@a~1",
            "hf://me/r@a:b",
        ] {
            assert!(branch(uri), "{uri}: {:?}", parse(uri));
        }

        let path = |uri: &str| matches!(parse(uri), Err(HfUriError::BadPath { .. }));
        for uri in [
            "hf://me/r/../x",
            "hf://me/r/a/../../x",
            "hf://me/r@main/./x",
            "hf://me/r/a//b",
            "hf://me/r/.git/config",
            "hf://me/r/a\\b",
        ] {
            assert!(path(uri), "{uri}: {:?}", parse(uri));
        }
        for uri in [
            "hf://me/r?token=x",
            "hf://me/r?secret=",
            "hf://me/r?secret=a&b",
        ] {
            assert!(
                matches!(parse(uri), Err(HfUriError::BadQuery { .. })),
                "{uri}"
            );
        }
    }

    #[test]
    fn licenses_are_hub_ids() {
        for ok in ["other", "apache-2.0", "openrail++", "cc-by-nc-4.0"] {
            assert!(valid_license(ok), "{ok}");
        }
        for bad in ["", "MIT", "mit\nx: y", "a b", &"a".repeat(65)] {
            assert!(!valid_license(bad), "{bad}");
        }
    }

    #[test]
    fn the_token_is_the_jobs_and_required() {
        let rules = Destinations::default();
        let none = rules.check_hf("hf://me/r", None).unwrap_err();
        assert!(matches!(
            none,
            DestinationError::Hf(HfUriError::NoToken { .. })
        ));
        let secrets = Secrets {
            hf_token: "hf_job".into(),
            values: [("WRITE".to_string(), "hf_named".to_string())].into(),
        };
        let opened = rules.open_hf("hf://me/r", Some(&secrets)).unwrap();
        assert_eq!(opened.api.token(), "hf_job");
        let opened = rules
            .open_hf("hf://me/r?secret=WRITE", Some(&secrets))
            .unwrap();
        assert_eq!(opened.api.token(), "hf_named");
        assert!(
            rules
                .check_hf("hf://me/r?secret=MISSING", Some(&secrets))
                .is_err()
        );
        assert_eq!(opened.api.endpoint(), "https://huggingface.co");
    }

    fn whoami(role: Option<&str>) -> Whoami {
        Whoami {
            name: "me".into(),
            orgs: vec![
                api::WhoamiOrg {
                    name: "team".into(),
                    role: Some("write".into()),
                },
                api::WhoamiOrg {
                    name: "readers".into(),
                    role: Some("read".into()),
                },
            ],
            role: role.map(str::to_owned),
            scoped: Vec::new(),
        }
    }

    #[test]
    fn write_access_follows_the_tokens_role_and_namespaces() {
        let target = |uri: &str| parse(uri).unwrap();
        let write = whoami(Some("write"));
        assert!(may_write(&write, &target("hf://me/x")).is_ok());
        assert!(may_write(&write, &target("hf://team/x")).is_ok());
        assert!(may_write(&write, &target("hf://readers/x")).is_err());
        assert!(may_write(&write, &target("hf://stranger/x")).is_err());
        assert!(may_write(&whoami(Some("read")), &target("hf://me/x")).is_err());

        let mut fine = whoami(Some("fineGrained"));
        fine.scoped = vec![api::WhoamiScope {
            entity_type: "model".into(),
            entity_name: "me/allowed".into(),
            permissions: vec!["repo.content.read".into(), "repo.write".into()],
        }];
        assert!(may_write(&fine, &target("hf://me/allowed")).is_ok());
        assert!(may_write(&fine, &target("hf://me/other")).is_err());
    }
}
