//! The `[store]` section: the artifact store and how `s3://` is reached.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The artifact store: `file:///abs/dir`, a local path,
    /// `s3://bucket/prefix`, `gs://bucket/prefix` or `az://container/prefix`.
    pub uri: String,
    /// How an `s3://` store is reached (destinations never use it).
    pub s3: S3Options,
    /// How a `gs://` store is reached (destinations never use it).
    pub gcs: GcsOptions,
    /// How an `az://` store is reached (destinations never use it).
    pub azure: AzureOptions,
    /// Largest base model a spec may name in the store (a `.safetensors`
    /// below its tenant's prefix), checked before it is fetched. Datasets
    /// read from the store are capped by `[captioner] max_dataset_bytes`
    /// and `max_files`.
    pub max_model_bytes: u64,
    /// Most bytes one `Upload` call may store (a client's dataset, through
    /// the API); past it the call is refused and nothing is kept.
    pub max_upload_bytes: u64,
    /// Most files one `Upload` call may store.
    pub max_upload_files: u64,
    /// How long a presigned URL from `CreateUpload` or `CreateDownload`
    /// stays good, in seconds (an `s3://` store only; 1 to 604800).
    pub presign_expiry_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            uri: ".trainyard/store".into(),
            s3: S3Options::default(),
            gcs: GcsOptions::default(),
            azure: AzureOptions::default(),
            max_model_bytes: 64 << 30,
            max_upload_bytes: 4 << 30,
            max_upload_files: 20_000,
            presign_expiry_secs: 900,
        }
    }
}

/// The `[store.s3]` table. Every field is optional: an unset one falls back
/// to the standard `AWS_*` environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`,
/// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`, …), then to `object_store`'s defaults.
/// Debug output and `--print-config` never show the secret.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Options {
    /// Endpoint URL of an S3-compatible server, e.g. `http://127.0.0.1:9000`
    /// (MinIO, moto, Ceph…). Unset: AWS itself, or `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Region, e.g. `eu-west-1`. Unset: `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Access key id. Unset: `AWS_ACCESS_KEY_ID`, else the instance's role.
    pub access_key_id: Option<String>,
    /// Secret access key (redacted when printed). Unset: `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// Allow plain `http://` endpoints. Unset: `AWS_ALLOW_HTTP`, else true
    /// exactly when the endpoint starts with `http://`.
    pub allow_http: Option<bool>,
    /// Address buckets as `https://<bucket>.<endpoint>` instead of
    /// `https://<endpoint>/<bucket>`. Unset: `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`,
    /// else path style.
    pub virtual_hosted_style: Option<bool>,
}

/// What a secret is printed as.
pub const REDACTED: &str = "[redacted]";

impl S3Options {
    /// A copy safe to show: the secret, when set, is replaced by [`REDACTED`].
    pub fn redacted(&self) -> S3Options {
        let mut shown = self.clone();
        if shown.secret_access_key.is_some() {
            shown.secret_access_key = Some(REDACTED.into());
        }
        shown
    }
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("S3Options")
            .field("endpoint", &shown.endpoint)
            .field("region", &shown.region)
            .field("access_key_id", &shown.access_key_id)
            .field("secret_access_key", &shown.secret_access_key)
            .field("allow_http", &shown.allow_http)
            .field("virtual_hosted_style", &shown.virtual_hosted_style)
            .finish()
    }
}

/// The `[store.gcs]` table: how a `gs://` artifact store is reached. Unset
/// fields fall back to the `GOOGLE_*` environment (`GOOGLE_SERVICE_ACCOUNT`,
/// `GOOGLE_SERVICE_ACCOUNT_KEY`, `GOOGLE_APPLICATION_CREDENTIALS`), then to
/// the machine's instance credentials.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcsOptions {
    /// A service account's JSON key, inline (redacted when printed).
    pub service_account_key: Option<String>,
    /// A service account's JSON key file.
    pub service_account_path: Option<String>,
    /// A GCS-compatible server, e.g. an emulator's `http://127.0.0.1:4443`.
    pub base_url: Option<String>,
}

impl GcsOptions {
    /// A copy safe to show: the inline key, when set, is [`REDACTED`].
    pub fn redacted(&self) -> GcsOptions {
        let mut shown = self.clone();
        if shown.service_account_key.is_some() {
            shown.service_account_key = Some(REDACTED.into());
        }
        shown
    }
}

impl std::fmt::Debug for GcsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("GcsOptions")
            .field("service_account_key", &shown.service_account_key)
            .field("service_account_path", &shown.service_account_path)
            .field("base_url", &shown.base_url)
            .finish()
    }
}

/// The `[store.azure]` table: how an `az://` artifact store is reached.
/// Unset fields fall back to the `AZURE_*` environment
/// (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, …), then to
/// the machine's managed identity.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AzureOptions {
    /// The storage account's name.
    pub account: Option<String>,
    /// The account's key (redacted when printed).
    pub access_key: Option<String>,
    /// A SAS token instead of the key (redacted when printed).
    pub sas_token: Option<String>,
    /// The account's blob endpoint, e.g. Azurite's
    /// `http://127.0.0.1:10000/devstoreaccount1`. Unset:
    /// `https://<account>.blob.core.windows.net`.
    pub endpoint: Option<String>,
    /// Allow a plain `http://` endpoint. Unset: true exactly when the
    /// endpoint starts with `http://`.
    pub allow_http: Option<bool>,
}

impl AzureOptions {
    /// A copy safe to show: the key and token, when set, are [`REDACTED`].
    pub fn redacted(&self) -> AzureOptions {
        let mut shown = self.clone();
        for secret in [&mut shown.access_key, &mut shown.sas_token] {
            if secret.is_some() {
                *secret = Some(REDACTED.into());
            }
        }
        shown
    }
}

impl std::fmt::Debug for AzureOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("AzureOptions")
            .field("account", &shown.account)
            .field("access_key", &shown.access_key)
            .field("sas_token", &shown.sas_token)
            .field("endpoint", &shown.endpoint)
            .field("allow_http", &shown.allow_http)
            .finish()
    }
}
