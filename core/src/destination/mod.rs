//! Delivery destinations: where a job's outputs go besides the artifact
//! store (`file:///abs/dir`, an absolute path, `s3://bucket/prefix`,
//! `gs://bucket/prefix`, `az://container/prefix` or `azure://…`).
//!
//! One type decides which destinations a job may use and opens them, so
//! the coordinator (at submission), preflight (which probes them before a
//! GPU is held) and the uploader (which writes to them) can never disagree
//! about what is allowed. Destinations are denied by default:
//!
//! - A local folder must lie inside one of `[uploader] allowed_local_roots`
//!   (an empty list allows none), with symlinks and `..` resolved: `..` is
//!   refused outright, and the folder (or, when it does not exist yet, its
//!   nearest existing parent) is canonicalised, as are the roots. The check
//!   is made again when the folder is opened for writing, and once more on
//!   the folder the store opened, since the disk may have changed since
//!   submission. A folder outside the roots gets the same answer whether
//!   or not it exists, and is never touched.
//! - An `s3://` destination never uses the artifact store's `[store.s3]`
//!   keys nor the machine's environment or instance role: it uses the keys
//!   its job supplies in `secrets.values` ([`secret_keys`]) or a fleet
//!   credential named in its URI (`s3://bucket/prefix?credential=<name>`,
//!   `[destinations.credentials.<name>]`) that lists the job's tenant.
//!   `gs://` and `az://` follow the same rule (`remote.rs`): a service
//!   account's JSON key, or an account name with its key or a SAS token,
//!   from the job's `secrets.values` or a named fleet credential; never
//!   `[store.gcs]`, `[store.azure]`, the `GOOGLE_*`/`AZURE_*` environment,
//!   the metadata server or a managed identity.
//! - A job-supplied endpoint (`AWS_ENDPOINT_URL`, `GOOGLE_STORAGE_BASE_URL`
//!   or a key's `gcs_base_url`, `AZURE_STORAGE_ENDPOINT`) and whatever a
//!   job's bucket name resolves to go through the address guard
//!   ([`crate::netguard`]): no private, loopback or link-local address, on
//!   any redirect hop, unless `[destinations] allow_private_endpoints`.
//!   A fleet credential's endpoint is the operator's, and trusted.
//! - No destination may overlap the artifact store: not its bucket (of the
//!   same cloud), not its folder.
//!
//! [`Destinations::probe`] answers "could the uploader write here now?"
//! without leaving anything behind: a local folder is checked where it is
//! (or, when it does not exist yet, at the nearest existing parent the
//! uploader would create it under) by creating and removing a probe file;
//! a bucket (S3, GCS, Azure) gets a real put and delete of a small probe
//! object.
//!
//! `hf://org/repo[@branch][/path]` destinations (a Hugging Face model
//! repository, with the job's token, on the fleet's Hub) are in [`hf`].

use crate::config::{Config, DestinationCredential};
use crate::redact::display_url;
use crate::store::{ArtifactStore, StoreError};
use bytes::Bytes;
use remote::Cloud;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use trainyard_proto::v1::Secrets;

pub mod chain;
pub mod hf;
mod remote;

/// The `secrets.values` keys a bucket destination's job credentials are
/// read from (each cloud's own names).
pub mod secret_keys {
    pub const ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
    pub const SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
    /// Optional: temporary credentials.
    pub const SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
    /// Optional: an S3-compatible server; unset: AWS.
    pub const ENDPOINT_URL: &str = "AWS_ENDPOINT_URL";
    /// Optional: unset: `us-east-1`.
    pub const REGION: &str = "AWS_REGION";
    /// `gs://`: a service account's JSON key, whole.
    pub const GCS_SERVICE_ACCOUNT_KEY: &str = "GOOGLE_SERVICE_ACCOUNT_KEY";
    /// `gs://`, optional: a GCS-compatible server; unset: the key's
    /// `gcs_base_url`, else Google's.
    pub const GCS_BASE_URL: &str = "GOOGLE_STORAGE_BASE_URL";
    /// `az://`: the storage account's name.
    pub const AZURE_ACCOUNT: &str = "AZURE_STORAGE_ACCOUNT_NAME";
    /// `az://`: the account's key (or give [`AZURE_SAS_TOKEN`]).
    pub const AZURE_ACCOUNT_KEY: &str = "AZURE_STORAGE_ACCOUNT_KEY";
    /// `az://`: a SAS token for the container (such a destination cannot
    /// sign download URLs).
    pub const AZURE_SAS_TOKEN: &str = "AZURE_STORAGE_SAS_TOKEN";
    /// `az://`, optional: the account's blob endpoint; unset:
    /// `https://<account>.blob.core.windows.net`.
    pub const AZURE_ENDPOINT: &str = "AZURE_STORAGE_ENDPOINT";
}

/// Why a destination may not be used at all. Messages name the destination
/// without credentials or query.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("{uri} is not a file:///, s3://, gs://, az:// or absolute path destination")]
    BadUri { uri: String },
    #[error("{uri} must not contain '..'")]
    ParentDir { uri: String },
    #[error("{uri} is not inside an allowed destination root")]
    OutsideRoots { uri: String },
    #[error("{uri} overlaps the fleet's artifact store")]
    StoreOverlap { uri: String },
    #[error(
        "{uri} needs credentials: set secrets.values {needs}, or name a fleet credential \
         with ?credential=<name>; the fleet's own keys are never used for destinations"
    )]
    NoCredentials { uri: String, needs: &'static str },
    #[error("{uri}: no destination credential {name:?} is open to this tenant")]
    UnknownCredential { uri: String, name: String },
    #[error("{uri}: only the query ?credential=<name> is understood")]
    BadQuery { uri: String },
    #[error("{uri}: the endpoint {key}: {problem}")]
    Endpoint {
        uri: String,
        key: &'static str,
        problem: String,
    },
    #[error("destination {uri}: {source}")]
    Open { uri: String, source: StoreError },
    #[error(transparent)]
    Hf(#[from] hf::HfUriError),
}

/// What a failed probe means for the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The destination is not allowed, or is not a writable folder/bucket.
    Refused,
    /// The credentials were refused.
    Denied,
    /// It could not be checked now (network, server trouble): worth a retry.
    Unavailable,
}

/// A failed probe: what it means and a message naming the destination.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProbeError {
    pub failure: ProbeFailure,
    pub message: String,
}

impl ProbeError {
    fn new(failure: ProbeFailure, message: impl Into<String>) -> Self {
        Self {
            failure,
            message: message.into(),
        }
    }
}

/// The rules for opening destinations: the allowed local roots, the
/// artifact store they must not overlap, and the fleet's destination
/// credentials.
#[derive(Clone, Debug, Default)]
pub struct Destinations {
    allowed_roots: Vec<PathBuf>,
    store: StoreLocation,
    credentials: BTreeMap<String, DestinationCredential>,
    allow_private_endpoints: bool,
    hf: hf::HfRules,
}

/// Where the artifact store is.
#[derive(Clone, Debug, Default)]
enum StoreLocation {
    #[default]
    Unknown,
    Local(PathBuf),
    Bucket(Cloud, String),
}

/// A destination URI, taken apart.
enum Parsed<'a> {
    Local(&'a Path),
    Bucket(Bucket<'a>),
}

/// A bucket destination (`s3://`, `gs://`, `az://`), taken apart.
#[derive(Clone, Copy)]
struct Bucket<'a> {
    cloud: Cloud,
    bucket: &'a str,
    prefix: &'a str,
    credential: Option<&'a str>,
}

fn parse(uri: &str) -> Result<Parsed<'_>, DestinationError> {
    let shown = || display_url(uri);
    if let Some((cloud, rest)) = Cloud::strip(uri) {
        let (location, query) = match rest.split_once('?') {
            Some((location, query)) => (location, Some(query)),
            None => (rest, None),
        };
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() || bucket.contains(['@', ':', '#']) {
            return Err(DestinationError::BadUri { uri: shown() });
        }
        if prefix.split('/').any(|segment| segment == "..") {
            return Err(DestinationError::ParentDir { uri: shown() });
        }
        let credential = match query {
            None => None,
            Some(query) => match query.strip_prefix("credential=") {
                Some(name) if !name.is_empty() && !name.contains(['&', '=']) => Some(name),
                _ => return Err(DestinationError::BadQuery { uri: shown() }),
            },
        };
        return Ok(Parsed::Bucket(Bucket {
            cloud,
            bucket,
            prefix,
            credential,
        }));
    }
    let path = uri
        .strip_prefix("file://")
        .or_else(|| uri.starts_with('/').then_some(uri))
        .map(Path::new)
        .filter(|p| p.is_absolute())
        .ok_or_else(|| DestinationError::BadUri { uri: shown() })?;
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(DestinationError::ParentDir { uri: shown() });
    }
    Ok(Parsed::Local(path))
}

/// Whether `uri` is a bucket destination (`s3://`, `gs://`, `az://`)
/// written with its job's own keys, not a fleet credential's: only the
/// uploader, while it holds them, can sign download URLs for its copies
/// (the coordinator never holds a final job's keys).
pub fn uses_job_keys(uri: &str) -> bool {
    matches!(parse(uri), Ok(Parsed::Bucket(b)) if b.credential.is_none())
}

/// `path` with symlinks resolved: its nearest existing ancestor
/// canonicalised, the missing rest appended. `None` when an entry exists
/// but cannot be resolved (a dangling symlink: creating the folder would
/// follow it wherever it points).
fn resolve(path: &Path) -> Option<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut missing = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(mut resolved) => {
                resolved.extend(missing.iter().rev());
                return Some(resolved);
            }
            Err(_) if std::fs::symlink_metadata(&existing).is_ok() => return None,
            Err(_) => {
                missing.push(existing.file_name()?.to_owned());
                existing = existing.parent()?.to_owned();
            }
        }
    }
}

/// Whether `a` and `b` are the same folder or one holds the other.
fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

impl Destinations {
    /// `allowed_roots` empty allows no local destination; `store_uri` is
    /// the artifact store no destination may overlap.
    pub fn new(
        allowed_roots: Vec<PathBuf>,
        store_uri: &str,
        credentials: BTreeMap<String, DestinationCredential>,
    ) -> Self {
        let store = match parse(store_uri) {
            Ok(Parsed::Bucket(b)) => StoreLocation::Bucket(b.cloud, b.bucket.to_owned()),
            Ok(Parsed::Local(path)) => StoreLocation::Local(path.to_owned()),
            // A relative store path: the folder it names from here.
            Err(_) if !store_uri.contains("://") && !store_uri.is_empty() => {
                std::path::absolute(store_uri)
                    .map(StoreLocation::Local)
                    .unwrap_or_default()
            }
            Err(_) => StoreLocation::Unknown,
        };
        Self {
            allowed_roots,
            store,
            credentials,
            allow_private_endpoints: false,
            hf: hf::HfRules::default(),
        }
    }

    /// Lets job-supplied S3, GCS and Azure endpoints be private addresses (a fleet on
    /// one private network, the tests' loopback S3 server).
    pub fn allow_private_endpoints(mut self, allow: bool) -> Self {
        self.allow_private_endpoints = allow;
        self
    }

    /// The Hub `hf://` destinations are written to.
    pub fn hf_endpoint(mut self, endpoint: &str) -> Self {
        self.hf.endpoint = endpoint.to_owned();
        self
    }

    /// The rules `config` sets: `[uploader] allowed_local_roots`, the
    /// artifact store `store.uri`, `[destinations.credentials]`,
    /// `[destinations.hf] endpoint`.
    pub fn from_config(config: &Config) -> Self {
        Self::new(
            config.uploader.allowed_local_roots.clone(),
            &config.store.uri,
            config.destinations.credentials.clone(),
        )
        .allow_private_endpoints(config.destinations.allow_private_endpoints)
        .hf_endpoint(&config.destinations.hf.endpoint)
    }

    /// Whether `tenant`'s job (with `secrets`) may use `uri`: a local
    /// folder inside an allowed root once symlinks are resolved, a bucket
    /// destination outside the store's bucket with credentials of its own.
    /// Touches no folder outside the roots.
    pub fn check(
        &self,
        tenant: &str,
        uri: &str,
        secrets: Option<&Secrets>,
    ) -> Result<(), DestinationError> {
        if hf::is_hf(uri) {
            return self.check_hf(uri, secrets).map(|_| ());
        }
        match parse(uri)? {
            Parsed::Local(path) => self.confine(uri, path).map(|_| ()),
            Parsed::Bucket(b) => {
                if matches!(&self.store, StoreLocation::Bucket(cloud, store)
                    if *cloud == b.cloud && store == b.bucket)
                {
                    return Err(DestinationError::StoreOverlap {
                        uri: display_url(uri),
                    });
                }
                self.open_bucket(tenant, uri, b, secrets).map(|_| ())
            }
        }
    }

    /// The resolved folder of a local destination, when it lies inside an
    /// allowed root and outside the artifact store.
    fn confine(&self, uri: &str, path: &Path) -> Result<PathBuf, DestinationError> {
        let outside = || DestinationError::OutsideRoots {
            uri: display_url(uri),
        };
        // Decided on the text first: a folder outside every root is never
        // looked at, so the answer cannot tell whether it exists.
        if !self.allowed_roots.iter().any(|root| path.starts_with(root)) {
            return Err(outside());
        }
        let resolved = resolve(path).ok_or_else(outside)?;
        let inside = self
            .allowed_roots
            .iter()
            .filter_map(|root| resolve(root))
            .any(|root| resolved.starts_with(root));
        if !inside {
            return Err(outside());
        }
        if let StoreLocation::Local(store) = &self.store
            && resolve(store).is_none_or(|store| overlaps(&store, &resolved))
        {
            return Err(DestinationError::StoreOverlap {
                uri: display_url(uri),
            });
        }
        Ok(resolved)
    }

    /// Opens `uri` as a store for writing (a local folder is created when
    /// missing), after [`Destinations::check`] again on the disk as it is
    /// now, and once more on the folder the store opened.
    pub fn open(
        &self,
        tenant: &str,
        uri: &str,
        secrets: Option<&Secrets>,
    ) -> Result<ArtifactStore, DestinationError> {
        self.check(tenant, uri, secrets)?;
        let open_error = |source| DestinationError::Open {
            uri: display_url(uri),
            source,
        };
        match parse(uri)? {
            Parsed::Local(path) => {
                let resolved = self.confine(uri, path)?;
                let store =
                    ArtifactStore::open(&resolved.display().to_string()).map_err(open_error)?;
                let opened = store.root().strip_prefix("file://").unwrap_or(store.root());
                self.confine(uri, Path::new(opened))?;
                Ok(store)
            }
            Parsed::Bucket(b) => self.open_bucket(tenant, uri, b, secrets),
        }
    }

    /// Checks that the uploader could write to `uri` now; see the module docs.
    pub async fn probe(
        &self,
        tenant: &str,
        uri: &str,
        secrets: Option<&Secrets>,
    ) -> Result<(), ProbeError> {
        if hf::is_hf(uri) {
            return self.probe_hf(uri, secrets).await;
        }
        let refused = |e: DestinationError| ProbeError::new(ProbeFailure::Refused, e.to_string());
        match parse(uri).map_err(refused)? {
            Parsed::Local(path) => {
                let (this, uri, path) = (self.clone(), uri.to_owned(), path.to_owned());
                tokio::task::spawn_blocking(move || {
                    let resolved = this.confine(&uri, &path).map_err(refused)?;
                    probe_local(&uri, &resolved)
                })
                .await
                .map_err(|e| ProbeError::new(ProbeFailure::Unavailable, e.to_string()))?
            }
            Parsed::Bucket(_) => {
                let store = self.open(tenant, uri, secrets).map_err(refused)?;
                probe_remote(uri, &store).await
            }
        }
    }
}

async fn probe_remote(uri: &str, store: &ArtifactStore) -> Result<(), ProbeError> {
    let key = probe_name();
    let written = store.put_bytes(&key, Bytes::from_static(b"ok\n")).await;
    let result = match written {
        Ok(_) => store.delete(&key).await,
        Err(e) => Err(e),
    };
    result.map_err(|e| {
        let failure = match &e {
            StoreError::Backend(
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. },
            ) => ProbeFailure::Denied,
            StoreError::Backend(object_store::Error::NotFound { .. })
            | StoreError::BadUri(_)
            | StoreError::NotFound(_) => ProbeFailure::Refused,
            _ => ProbeFailure::Unavailable,
        };
        let why = match failure {
            ProbeFailure::Denied => "the credentials may not write there",
            ProbeFailure::Refused => "the bucket does not exist or cannot hold objects",
            ProbeFailure::Unavailable => "could not be reached",
        };
        let shown = display_url(uri);
        tracing::info!(uri = %shown, error = %e, "destination probe failed");
        ProbeError::new(
            failure,
            format!("destination {shown} is not writable: {why} ({})", brief(&e)),
        )
    })
}

/// The gist of a store error: the HTTP status an S3 server answered with,
/// else the first line (servers append whole XML bodies).
fn brief(error: &StoreError) -> String {
    let text = error.to_string();
    if let Some((_, rest)) = text.split_once("status code: ") {
        let status = rest.split(':').next().unwrap_or(rest).trim();
        return format!("the server answered {status}");
    }
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(200).collect()
}

fn probe_name() -> String {
    format!(".trainyard-probe-{}", uuid::Uuid::now_v7().simple())
}

/// Blocking: the folder, or the nearest existing parent it would be made
/// under, is a folder a probe file can be created in and removed from.
fn probe_local(uri: &str, path: &Path) -> Result<(), ProbeError> {
    let refused = |why: String| {
        ProbeError::new(
            ProbeFailure::Refused,
            format!("destination {uri} is not writable: {why}"),
        )
    };
    let mut existing = path;
    let meta = loop {
        match std::fs::metadata(existing) {
            Ok(meta) => break meta,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                match existing.parent() {
                    Some(parent) => existing = parent,
                    None => return Err(refused(format!("no part of {} exists", path.display()))),
                }
            }
            Err(e) => return Err(refused(format!("{}: {e}", existing.display()))),
        }
    };
    if !meta.is_dir() {
        return Err(refused(if existing == path {
            format!("{} is a file, not a folder", path.display())
        } else {
            format!(
                "{} is a file, so {} cannot be created",
                existing.display(),
                path.display()
            )
        }));
    }
    let probe = existing.join(probe_name());
    std::fs::File::create_new(&probe).map_err(|e| {
        refused(format!(
            "cannot create a file in {}: {e}",
            existing.display()
        ))
    })?;
    std::fs::remove_file(&probe)
        .map_err(|e| refused(format!("cannot remove {}: {e}", probe.display())))
}

#[cfg(test)]
mod tests;
