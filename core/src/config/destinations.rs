//! The `[destinations]` section: fleet-held credentials for `s3://`, `gs://`
//! and `az://` destinations.

use super::REDACTED;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `[destinations]` section: fleet-held credentials for `s3://`
/// destinations. A destination never uses `[store.s3]`; it uses the keys
/// its job supplies in `secrets.values`, or one of these, named in its URI
/// (`s3://bucket/prefix?credential=<name>`) by a tenant listed in it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationsConfig {
    pub credentials: BTreeMap<String, DestinationCredential>,
    /// Let a job's own S3 endpoint (`AWS_ENDPOINT_URL`) be a private,
    /// loopback or link-local address. Off: the address guard refuses them.
    pub allow_private_endpoints: bool,
    /// `hf://` destinations.
    pub hf: HfDestinationsConfig,
}

/// The `[destinations.hf]` table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HfDestinationsConfig {
    /// The Hub every `hf://` destination is written to (the fleet's, never
    /// a tenant's choice). Unset: `https://huggingface.co`.
    pub endpoint: String,
}

impl Default for HfDestinationsConfig {
    fn default() -> Self {
        Self {
            endpoint: "https://huggingface.co".into(),
        }
    }
}

/// One `[destinations.credentials.<name>]` table.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationCredential {
    /// Tenants whose jobs may use it.
    pub tenants: Vec<String>,
    pub access_key_id: String,
    /// Redacted when printed.
    pub secret_access_key: String,
    /// Redacted when printed.
    pub session_token: Option<String>,
    /// Endpoint of an S3-compatible server; unset: AWS.
    pub endpoint: Option<String>,
    /// Unset: `us-east-1`.
    pub region: Option<String>,
    /// Unset: true exactly when the endpoint starts with `http://`.
    pub allow_http: Option<bool>,
    pub virtual_hosted_style: Option<bool>,
    /// `gs://`: a service account's JSON key (redacted when printed). Its
    /// `gcs_base_url` (or `endpoint`) names a GCS-compatible server.
    pub gcs_service_account_key: Option<String>,
    /// `az://`: the storage account's name.
    pub azure_account: Option<String>,
    /// `az://`: the account's key (redacted when printed).
    pub azure_access_key: Option<String>,
    /// `az://`: a SAS token instead of the key (redacted when printed).
    pub azure_sas_token: Option<String>,
}

impl DestinationCredential {
    /// A copy safe to show: secrets replaced by [`REDACTED`].
    pub fn redacted(&self) -> DestinationCredential {
        let mut shown = self.clone();
        if !shown.secret_access_key.is_empty() {
            shown.secret_access_key = REDACTED.into();
        }
        for secret in [
            &mut shown.session_token,
            &mut shown.gcs_service_account_key,
            &mut shown.azure_access_key,
            &mut shown.azure_sas_token,
        ] {
            if secret.is_some() {
                *secret = Some(REDACTED.into());
            }
        }
        shown
    }
}

impl std::fmt::Debug for DestinationCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("DestinationCredential")
            .field("tenants", &shown.tenants)
            .field("access_key_id", &shown.access_key_id)
            .field("secret_access_key", &shown.secret_access_key)
            .field("session_token", &shown.session_token)
            .field("endpoint", &shown.endpoint)
            .field("region", &shown.region)
            .field("allow_http", &shown.allow_http)
            .field("virtual_hosted_style", &shown.virtual_hosted_style)
            .field("gcs_service_account_key", &shown.gcs_service_account_key)
            .field("azure_account", &shown.azure_account)
            .field("azure_access_key", &shown.azure_access_key)
            .field("azure_sas_token", &shown.azure_sas_token)
            .finish()
    }
}
