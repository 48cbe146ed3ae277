//! Bucket destinations — `s3://`, `gs://`, `az://` (or `azure://`) — opened
//! with the keys the module rules allow and nothing else: the named fleet
//! credential (`?credential=<name>`, listing the tenant), else the job's
//! own `secrets.values` ([`super::secret_keys`]). Each builder starts empty
//! (`new()`, never `from_env()`), and is always handed explicit keys, so no
//! client falls back to the environment, an instance role, the metadata
//! server or a managed identity. A job's own client resolves every name
//! through the address guard, on every redirect hop; its endpoint is
//! checked before anything is built.

use super::{Bucket, DestinationError, Destinations, secret_keys};
use crate::config::DestinationCredential;
use crate::netguard::{Guard, GuardedResolver};
use crate::redact::display_url;
use crate::store::ArtifactStore;
use object_store::ClientOptions;
use object_store::aws::AmazonS3Builder;
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::client::{ClientConfigKey, HttpClient, HttpConnector};
use object_store::gcp::GoogleCloudStorageBuilder;
use std::sync::Arc;
use std::time::Duration;
use trainyard_proto::v1::Secrets;

/// Which service a bucket destination is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cloud {
    S3,
    Gcs,
    Azure,
}

impl Cloud {
    /// The cloud `uri` names and the rest after its scheme.
    pub(crate) fn strip(uri: &str) -> Option<(Cloud, &str)> {
        [
            ("s3://", Cloud::S3),
            ("gs://", Cloud::Gcs),
            ("az://", Cloud::Azure),
            ("azure://", Cloud::Azure),
        ]
        .into_iter()
        .find_map(|(scheme, cloud)| uri.strip_prefix(scheme).map(|rest| (cloud, rest)))
    }

    /// What a job must put in `secrets.values` to use it.
    fn needs(self) -> &'static str {
        match self {
            Cloud::S3 => "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            Cloud::Gcs => "GOOGLE_SERVICE_ACCOUNT_KEY",
            Cloud::Azure => {
                "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN)"
            }
        }
    }

    fn label(self) -> &'static str {
        match self {
            Cloud::S3 => "S3",
            Cloud::Gcs => "GCS",
            Cloud::Azure => "MicrosoftAzure",
        }
    }
}

/// Where a client's keys came from.
enum Keys<'a> {
    Fleet(&'a DestinationCredential),
    Job(&'a Secrets),
}

impl Destinations {
    /// Opens a bucket destination with the keys it may use.
    pub(super) fn open_bucket(
        &self,
        tenant: &str,
        uri: &str,
        target: Bucket<'_>,
        secrets: Option<&Secrets>,
    ) -> Result<ArtifactStore, DestinationError> {
        let shown = || display_url(uri);
        let no_keys = || DestinationError::NoCredentials {
            uri: shown(),
            needs: target.cloud.needs(),
        };
        let keys = match target.credential {
            Some(name) => Keys::Fleet(
                self.credentials
                    .get(name)
                    .filter(|c| c.tenants.iter().any(|t| t == tenant))
                    .ok_or_else(|| DestinationError::UnknownCredential {
                        uri: shown(),
                        name: name.to_owned(),
                    })?,
            ),
            None => Keys::Job(secrets.ok_or_else(no_keys)?),
        };
        let guard = Guard {
            allow_private: self.allow_private_endpoints,
            trusted_hosts: Arc::from([]),
            max_redirects: 3,
        };
        let job = Job {
            uri,
            guard: guard.clone(),
        };
        let prefix = target.prefix;
        let opened = match (target.cloud, keys) {
            (Cloud::S3, Keys::Fleet(c)) => {
                ArtifactStore::open_s3(s3_fleet(target.bucket, c), prefix)
            }
            (Cloud::S3, Keys::Job(s)) => {
                let builder = job.s3(target.bucket, s).ok_or_else(no_keys)??;
                ArtifactStore::open_s3(builder, prefix)
            }
            (Cloud::Gcs, Keys::Fleet(c)) => {
                let key = c.gcs_service_account_key.as_deref().ok_or_else(no_keys)?;
                let mut builder = GoogleCloudStorageBuilder::new()
                    .with_bucket_name(target.bucket)
                    .with_service_account_key(key);
                if let Some(endpoint) = &c.endpoint {
                    builder = builder.with_base_url(endpoint);
                }
                let base = c.endpoint.clone().or_else(|| base_in_key(key));
                let http = c.allow_http.unwrap_or(plain_http(base.as_deref()));
                builder = builder.with_client_options(ClientOptions::new().with_allow_http(http));
                ArtifactStore::open_gcs(builder, prefix)
            }
            (Cloud::Gcs, Keys::Job(s)) => {
                let builder = job.gcs(target.bucket, s).ok_or_else(no_keys)??;
                ArtifactStore::open_gcs(builder, prefix)
            }
            (Cloud::Azure, Keys::Fleet(c)) => {
                let account = c.azure_account.as_deref().ok_or_else(no_keys)?;
                let builder = azure_builder(
                    target.bucket,
                    account,
                    c.azure_access_key.as_deref(),
                    c.azure_sas_token.as_deref(),
                    c.endpoint.as_deref(),
                )
                .ok_or_else(no_keys)?;
                let http = c.allow_http.unwrap_or(plain_http(c.endpoint.as_deref()));
                ArtifactStore::open_azure(builder.with_allow_http(http), prefix)
            }
            (Cloud::Azure, Keys::Job(s)) => {
                let builder = job.azure(target.bucket, s).ok_or_else(no_keys)??;
                ArtifactStore::open_azure(builder, prefix)
            }
        };
        opened.map_err(|source| DestinationError::Open {
            uri: shown(),
            source,
        })
    }
}

/// A job's own keys: every endpoint checked and reached through the guard.
struct Job<'a> {
    uri: &'a str,
    guard: Guard,
}

type Built<B> = Option<Result<B, DestinationError>>;

fn value<'s>(secrets: &'s Secrets, key: &str) -> Option<&'s str> {
    secrets
        .values
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The server a service account's key names (`gcs_base_url`), if any.
fn base_in_key(key: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(key)
        .ok()?
        .get("gcs_base_url")?
        .as_str()
        .map(str::to_owned)
}

fn plain_http(endpoint: Option<&str>) -> bool {
    endpoint.is_some_and(|e| e.starts_with("http://"))
}

impl Job<'_> {
    /// `endpoint`, refused unless the address guard allows it.
    fn endpoint(&self, key: &'static str, endpoint: &str) -> Result<(), DestinationError> {
        let problem = |problem: String| DestinationError::Endpoint {
            uri: display_url(self.uri),
            key,
            problem,
        };
        let url =
            url::Url::parse(endpoint).map_err(|e| problem(format!("is not a valid url: {e}")))?;
        self.guard
            .check_url(&url)
            .map_err(|refusal| problem(refusal.to_string()))
    }

    fn connector(&self, cloud: Cloud) -> GuardedConnector {
        GuardedConnector {
            guard: self.guard.clone(),
            label: cloud.label(),
        }
    }

    fn s3(&self, bucket: &str, secrets: &Secrets) -> Built<AmazonS3Builder> {
        let id = value(secrets, secret_keys::ACCESS_KEY_ID)?;
        let secret = value(secrets, secret_keys::SECRET_ACCESS_KEY)?;
        let endpoint = value(secrets, secret_keys::ENDPOINT_URL);
        Some((|| {
            if let Some(endpoint) = endpoint {
                self.endpoint(secret_keys::ENDPOINT_URL, endpoint)?;
            }
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_access_key_id(id)
                .with_secret_access_key(secret)
                .with_region(value(secrets, secret_keys::REGION).unwrap_or("us-east-1"))
                .with_http_connector(self.connector(Cloud::S3))
                .with_allow_http(plain_http(endpoint));
            if let Some(token) = value(secrets, secret_keys::SESSION_TOKEN) {
                builder = builder.with_token(token);
            }
            if let Some(endpoint) = endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            Ok(builder)
        })())
    }

    fn gcs(&self, bucket: &str, secrets: &Secrets) -> Built<GoogleCloudStorageBuilder> {
        let key = value(secrets, secret_keys::GCS_SERVICE_ACCOUNT_KEY)?;
        Some((|| {
            // The key itself may name a server (`gcs_base_url`): it is the
            // job's too, and checked like one given on its own.
            let in_key = base_in_key(key);
            let base = value(secrets, secret_keys::GCS_BASE_URL).map(str::to_owned);
            for endpoint in [&base, &in_key].into_iter().flatten() {
                self.endpoint(secret_keys::GCS_BASE_URL, endpoint)?;
            }
            let base = base.or(in_key);
            let mut builder = GoogleCloudStorageBuilder::new()
                .with_bucket_name(bucket)
                .with_service_account_key(key)
                .with_http_connector(self.connector(Cloud::Gcs))
                .with_client_options(
                    ClientOptions::new().with_allow_http(plain_http(base.as_deref())),
                );
            if let Some(base) = &base {
                builder = builder.with_base_url(base);
            }
            Ok(builder)
        })())
    }

    fn azure(&self, container: &str, secrets: &Secrets) -> Built<MicrosoftAzureBuilder> {
        let account = value(secrets, secret_keys::AZURE_ACCOUNT)?;
        let endpoint = value(secrets, secret_keys::AZURE_ENDPOINT);
        let builder = azure_builder(
            container,
            account,
            value(secrets, secret_keys::AZURE_ACCOUNT_KEY),
            value(secrets, secret_keys::AZURE_SAS_TOKEN),
            endpoint,
        )?;
        Some((|| {
            if let Some(endpoint) = endpoint {
                self.endpoint(secret_keys::AZURE_ENDPOINT, endpoint)?;
            }
            Ok(builder
                .with_http_connector(self.connector(Cloud::Azure))
                .with_allow_http(plain_http(endpoint)))
        })())
    }
}

/// An S3 client that knows only a fleet credential (the operator's own
/// endpoint, trusted): never the environment, the instance role, or
/// `[store.s3]`.
fn s3_fleet(bucket: &str, c: &DestinationCredential) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_access_key_id(&c.access_key_id)
        .with_secret_access_key(&c.secret_access_key)
        .with_region(c.region.as_deref().unwrap_or("us-east-1"));
    if let Some(token) = &c.session_token {
        builder = builder.with_token(token);
    }
    if let Some(endpoint) = &c.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(virtual_hosted) = c.virtual_hosted_style {
        builder = builder.with_virtual_hosted_style_request(virtual_hosted);
    }
    builder.with_allow_http(c.allow_http.unwrap_or(plain_http(c.endpoint.as_deref())))
}

/// An Azure client with an account and its key or a SAS token (`None`
/// without either: it would fall back to a managed identity).
fn azure_builder(
    container: &str,
    account: &str,
    key: Option<&str>,
    sas: Option<&str>,
    endpoint: Option<&str>,
) -> Option<MicrosoftAzureBuilder> {
    let mut builder = MicrosoftAzureBuilder::new()
        .with_account(account)
        .with_container_name(container);
    builder = match (key, sas) {
        (Some(key), _) => builder.with_access_key(key),
        (None, Some(sas)) => builder.with_config(AzureConfigKey::SasKey, sas),
        (None, None) => return None,
    };
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint.to_owned());
    }
    Some(builder)
}

/// HTTP for a job's own endpoint: every name resolved through the address
/// guard, every redirect hop checked.
#[derive(Debug)]
struct GuardedConnector {
    guard: Guard,
    label: &'static str,
}

impl HttpConnector for GuardedConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let allow_http = options
            .get_config_value(&ClientConfigKey::AllowHttp)
            .is_some_and(|v| v == "true");
        let client = reqwest::Client::builder()
            .dns_resolver(GuardedResolver(self.guard.clone()))
            .redirect(self.guard.clone().redirect_policy())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .https_only(!allow_http)
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: self.label,
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(client))
    }
}
