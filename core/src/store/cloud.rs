//! `gs://` and `az://` stores: Google Cloud Storage and Azure Blob Storage
//! through `object_store`'s clients, opened like an S3 one — the fleet's
//! store from `[store.gcs]` / `[store.azure]` over the `GOOGLE_*` /
//! `AZURE_*` environment, a destination from a builder that knows only its
//! job's (or a fleet credential's) keys. Both sign GET URLs: GCS with the
//! service account's key (V4), Azure with the account key (service SAS).

use super::{ArtifactStore, StoreError};
use crate::config::{AzureOptions, GcsOptions, StoreConfig};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path as StorePath;
use std::sync::Arc;

/// The scheme an Azure store's root is written with (`azure://` is read
/// as the same).
const AZ: &str = "az://";

/// `gs://bucket/prefix` → `(bucket, prefix)`; `az://` or `azure://`
/// likewise for a container.
pub(crate) fn split_cloud(uri: &str) -> Option<(Cloud, &str, &str)> {
    let (cloud, rest) = if let Some(rest) = uri.strip_prefix("gs://") {
        (Cloud::Gcs, rest)
    } else if let Some(rest) = uri
        .strip_prefix(AZ)
        .or_else(|| uri.strip_prefix("azure://"))
    {
        (Cloud::Azure, rest)
    } else {
        return None;
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    Some((cloud, bucket, prefix))
}

/// Which cloud a `gs://` or `az://` URI names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cloud {
    Gcs,
    Azure,
}

impl ArtifactStore {
    /// Opens the fleet's store `config.uri`: a local folder, or an `s3://`,
    /// `gs://` or `az://` one reached with `[store.s3]`, `[store.gcs]` or
    /// `[store.azure]` over the environment.
    pub fn open_config(config: &StoreConfig) -> Result<Self, StoreError> {
        let uri = config.uri.as_str();
        match split_cloud(uri) {
            Some((_, "", _)) => Err(StoreError::BadUri(uri.into())),
            Some((Cloud::Gcs, bucket, prefix)) => {
                Self::open_gcs(gcs_builder(bucket, &config.gcs), prefix)
            }
            Some((Cloud::Azure, container, prefix)) => {
                Self::open_azure(azure_builder(container, &config.azure), prefix)
            }
            None => Self::open_with(uri, &config.s3),
        }
    }

    /// `gs://<the builder's bucket>/<prefix>`, reached exactly as `builder`
    /// says.
    pub fn open_gcs(builder: GoogleCloudStorageBuilder, prefix: &str) -> Result<Self, StoreError> {
        let bucket = builder
            .get_config_value(&GoogleConfigKey::Bucket)
            .unwrap_or_default();
        let store = Arc::new(builder.build()?);
        Ok(Self::remote(
            format!("gs://{bucket}"),
            prefix,
            store.clone(),
            store,
        ))
    }

    /// `az://<the builder's container>/<prefix>`, reached exactly as
    /// `builder` says.
    pub fn open_azure(builder: MicrosoftAzureBuilder, prefix: &str) -> Result<Self, StoreError> {
        let container = builder
            .get_config_value(&AzureConfigKey::ContainerName)
            .unwrap_or_default();
        let store = Arc::new(builder.build()?);
        Ok(Self::remote(
            format!("{AZ}{container}"),
            prefix,
            store.clone(),
            store,
        ))
    }

    fn remote(
        base: String,
        prefix: &str,
        store: Arc<dyn object_store::ObjectStore>,
        signer: Arc<dyn object_store::signer::Signer>,
    ) -> Self {
        let prefix = prefix.trim_matches('/');
        Self {
            root: format!("{base}/{prefix}").trim_end_matches('/').to_string(),
            store,
            prefix: StorePath::from(prefix),
            stage: None,
            signer: Some(signer),
        }
    }
}

/// The fleet store's GCS client: the `GOOGLE_*` environment, then every
/// field set in `options` on top.
fn gcs_builder(bucket: &str, options: &GcsOptions) -> GoogleCloudStorageBuilder {
    let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
    if let Some(key) = &options.service_account_key {
        builder = builder.with_service_account_key(key);
    }
    if let Some(path) = &options.service_account_path {
        builder = builder.with_service_account_path(path);
    }
    if let Some(url) = &options.base_url {
        builder = builder.with_base_url(url);
    }
    builder
}

/// The fleet store's Azure client: the `AZURE_*` environment, then every
/// field set in `options` on top.
fn azure_builder(container: &str, options: &AzureOptions) -> MicrosoftAzureBuilder {
    let mut builder = MicrosoftAzureBuilder::from_env().with_container_name(container);
    if let Some(account) = &options.account {
        builder = builder.with_account(account);
    }
    if let Some(key) = &options.access_key {
        builder = builder.with_access_key(key);
    }
    if let Some(sas) = &options.sas_token {
        builder = builder.with_config(AzureConfigKey::SasKey, sas);
    }
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let plain_http = options
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    builder.with_allow_http(options.allow_http.unwrap_or(plain_http))
}
