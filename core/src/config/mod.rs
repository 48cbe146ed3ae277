//! Layered configuration, loaded and validated once at start-up:
//! built-in defaults → a TOML file → `TY_<SECTION>__<KEY>` environment
//! variables → `--set section.key=value` flags (a nested key:
//! `TY_STORE__S3__REGION`, `--set store.s3.region=…`). Unknown keys are errors, so
//! a typo never silently falls back to a default.
//!
//! One file configures every service; each reads its own section plus
//! `nats`, `store` and `telemetry`. `deploy/trainyard.toml` documents every key.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid toml: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("override {0:?} is not of the form section.key=value")]
    BadOverride(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub store: StoreConfig,
    pub coordinator: CoordinatorConfig,
    pub captioner: CaptionerConfig,
    pub worker: WorkerConfig,
    pub uploader: UploaderConfig,
    pub retry: RetryConfig,
    pub telemetry: TelemetryConfig,
    pub webhooks: WebhooksConfig,
    pub destinations: DestinationsConfig,
    pub secrets: SecretsConfig,
    pub quotas: QuotasConfig,
    pub autoscaler: AutoscalerConfig,
    pub runtime: RuntimeConfig,
}

mod autoscaler;
mod caption;
mod destinations;
mod nats;
mod observe;
mod quotas;
mod retry;
mod runtime;
mod secrets;
mod services;
mod store;

pub use autoscaler::*;
pub use caption::*;
pub use destinations::*;
pub use nats::*;
pub use observe::*;
pub use quotas::*;
pub use retry::*;
pub use runtime::*;
pub use secrets::*;
pub use services::*;
pub use store::*;

impl Config {
    /// Loads the layers in order: defaults, `file`, the process environment,
    /// then `overrides` (`section.key=value`).
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env, overrides)
    }

    /// [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut layered = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            layered = text
                .parse::<toml::Table>()
                .map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source: Box::new(source),
                })?;
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("TY_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let (section, key) = (
                section.to_lowercase(),
                key.to_lowercase().replace("__", "."),
            );
            // A token table comes whole: its keys are digests, which no
            // variable name can carry, and one merged into the file's
            // would keep tokens the environment meant to replace.
            if section == "coordinator" && key.starts_with("tokens.") {
                return Err(ConfigError::Invalid(format!(
                    "{name}: set the whole table, TY_COORDINATOR__TOKENS='{{ \"sha256:…\" = \"tenant\" }}'"
                )));
            }
            set_path(&mut layered, &section, &key, value);
        }
        for item in overrides {
            let (path, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::BadOverride(item.clone()))?;
            let (section, key) = path
                .split_once('.')
                .ok_or_else(|| ConfigError::BadOverride(item.clone()))?;
            set_path(&mut layered, section, key, value);
        }
        let config: Config = toml::Value::Table(layered)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.nats.url.is_empty() {
            return bad("nats.url is empty");
        }
        if self.store.uri.is_empty() {
            return bad("store.uri is empty");
        }
        self.captioner
            .caption
            .validate()
            .map_err(ConfigError::Invalid)?;
        if self.store.max_model_bytes == 0
            || self.store.max_upload_bytes == 0
            || self.store.max_upload_files == 0
        {
            return bad(
                "store.max_model_bytes, max_upload_bytes and max_upload_files must be at least 1",
            );
        }
        if !(1..=604_800).contains(&self.store.presign_expiry_secs) {
            return bad("store.presign_expiry_secs must be from 1 to 604800 (seven days)");
        }
        if !(1..=604_800).contains(&self.coordinator.download_url_ttl_secs) {
            return bad("coordinator.download_url_ttl_secs must be from 1 to 604800 (seven days)");
        }
        for (key, tenant) in &self.coordinator.tokens {
            if crate::auth::parse_token_key(key).is_none() {
                return bad(
                    "coordinator.tokens holds a key that is not \"sha256:<64 hex>\": tokens are kept \
                     hashed, never plain; `yard token new --tenant <tenant>` prints a token and its line",
                );
            }
            if trainyard_proto::TenantId::parse(tenant).is_err() {
                return bad("coordinator.tokens maps to a tenant that is not a valid id");
            }
        }
        if self.coordinator.tls_cert_file.is_some() != self.coordinator.tls_key_file.is_some() {
            return bad("coordinator.tls_cert_file and coordinator.tls_key_file go together");
        }
        if self.worker.pool.is_empty()
            || !self
                .worker
                .pool
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("worker.pool may hold only ascii letters, digits, '-' and '_'");
        }
        if self.nats.nkey_seed_file.is_some() && self.nats.creds_file.is_some() {
            return bad("nats.nkey_seed_file and nats.creds_file are exclusive: set one");
        }
        if self.nats.tls_cert_file.is_some() != self.nats.tls_key_file.is_some() {
            return bad("nats.tls_cert_file and nats.tls_key_file go together");
        }
        if let Some(prefix) = &self.nats.inbox_prefix
            && (prefix.is_empty()
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return bad("nats.inbox_prefix may hold only ascii letters, digits, '-' and '_'");
        }
        let video = &self.captioner.video;
        if !(video.max_clip_seconds.is_finite() && video.max_clip_seconds > 0.0)
            || video.max_clip_frames == 0
            || video.max_clip_bytes == 0
            || video.max_clip_side == 0
            || video.probe_timeout_secs == 0
        {
            return bad(
                "captioner.video: max_clip_seconds, max_clip_frames, max_clip_bytes, max_clip_side \
                 and probe_timeout_secs must be above 0",
            );
        }
        if self.nats.max_deliver == 0 {
            return bad("nats.max_deliver must be at least 1");
        }
        if self.nats.max_ack_pending == 0 {
            return bad("nats.max_ack_pending must be at least 1");
        }
        if self.retry.fleet_max_delay_ms == 0 {
            return bad("retry.fleet_max_delay_ms must be at least 1");
        }
        if let Some(name) = self
            .quotas
            .tenants
            .keys()
            .find(|name| trainyard_proto::TenantId::parse(name).is_err())
        {
            return bad(&format!("quotas.tenants: {name:?} is not a tenant name"));
        }
        let gpu_hours = std::iter::once(("quotas", self.quotas.max_gpu_hours_per_day)).chain(
            self.quotas
                .tenants
                .iter()
                .filter_map(|(name, own)| own.max_gpu_hours_per_day.map(|h| (name.as_str(), h))),
        );
        for (name, hours) in gpu_hours {
            if !hours.is_finite() || hours < 0.0 {
                return bad(&format!(
                    "{name}: max_gpu_hours_per_day must be a number of hours, 0 or more (0 is no limit)"
                ));
            }
        }
        for (stage, policy) in [
            ("prepare", &self.retry.prepare),
            ("train", &self.retry.train),
            ("deliver", &self.retry.deliver),
        ] {
            if policy.max_attempts == 0 {
                return bad(&format!("retry.{stage}.max_attempts must be at least 1"));
            }
            if !(policy.multiplier >= 1.0 && policy.multiplier.is_finite()) {
                return bad(&format!("retry.{stage}.multiplier must be at least 1"));
            }
            if !(0.0..1.0).contains(&policy.jitter) {
                return bad(&format!("retry.{stage}.jitter must be in [0, 1)"));
            }
            if policy.max_delay_ms < policy.initial_delay_ms {
                return bad(&format!(
                    "retry.{stage}.max_delay_ms must not be below initial_delay_ms"
                ));
            }
            if let Some(kind) = policy
                .non_retryable
                .iter()
                .find(|k| parse_error_kind(k).is_none())
            {
                return bad(&format!(
                    "retry.{stage}.non_retryable: unknown error kind {kind:?}"
                ));
            }
        }
        self.autoscaler
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let hooks = &self.webhooks;
        if hooks.timeout_secs == 0 || hooks.max_attempts == 0 {
            return bad("webhooks.timeout_secs and webhooks.max_attempts must be at least 1");
        }
        if hooks.max_delay_ms < hooks.initial_delay_ms {
            return bad("webhooks.max_delay_ms must not be below initial_delay_ms");
        }
        // A publish retried after a lost ack (a result after a redelivery, a
        // task republished by the reconciler) must still be deduplicated.
        if self.nats.dedup_window_secs <= self.nats.ack_wait_secs.max(1)
            || self.nats.dedup_window_secs <= self.coordinator.stale_after_secs
        {
            return bad(
                "nats.dedup_window_secs must be longer than nats.ack_wait_secs and coordinator.stale_after_secs",
            );
        }
        // NATS refuses a stream whose dedup window outlasts its messages.
        if self.nats.event_max_age_secs.max(60) < self.nats.dedup_window_secs {
            return bad("nats.event_max_age_secs must be at least nats.dedup_window_secs");
        }
        if !(1024..=256 << 10).contains(&self.coordinator.max_spec_bytes) {
            return bad("coordinator.max_spec_bytes must be between 1024 and 262144");
        }
        // Room for a few of the largest events (a log event is up to 256 KiB).
        if self.nats.event_max_bytes < 1 << 20 || self.nats.dlq_max_bytes < 1 << 20 {
            return bad("nats.event_max_bytes and nats.dlq_max_bytes must be at least 1048576");
        }
        if crate::destination::hf::api::HubApi::new(&self.destinations.hf.endpoint, "").is_err() {
            return bad("destinations.hf.endpoint must be an http(s) URL");
        }
        for (name, credential) in &self.destinations.credentials {
            if credential.access_key_id.is_empty() || credential.secret_access_key.is_empty() {
                return bad(&format!(
                    "destinations.credentials.{name} needs access_key_id and secret_access_key"
                ));
            }
            if credential
                .tenants
                .iter()
                .any(|t| trainyard_proto::TenantId::parse(t).is_err())
            {
                return bad(&format!(
                    "destinations.credentials.{name}.tenants holds a tenant that is not a valid id"
                ));
            }
        }
        if self
            .uploader
            .allowed_local_roots
            .iter()
            .any(|r| !r.is_absolute())
        {
            return bad("uploader.allowed_local_roots must be absolute paths");
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return bad("telemetry.log_format must be \"text\" or \"json\"");
        }
        Ok(())
    }

    /// The configuration as TOML, for `--print-config`, secrets redacted.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.store.s3 = shown.store.s3.redacted();
        shown.store.gcs = shown.store.gcs.redacted();
        shown.store.azure = shown.store.azure.redacted();
        shown.webhooks = shown.webhooks.redacted();
        for credential in shown.destinations.credentials.values_mut() {
            *credential = credential.redacted();
        }
        toml::to_string_pretty(&shown).unwrap_or_default()
    }
}

/// Sets `section.key` to `raw`, read as a TOML value when it parses as one
/// (numbers, booleans, arrays, inline tables) and as a string otherwise.
/// A dotted key reaches into a nested table (`store` + `s3.endpoint`).
fn set_path(table: &mut toml::Table, section: &str, key: &str, raw: &str) {
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts = std::iter::once(section).chain(key.split('.')).peekable();
    let mut current = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            current.insert(part.to_string(), value);
            return;
        }
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(inner) = entry else {
            return;
        };
        current = inner;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ty.toml");
        std::fs::write(
            &file,
            "[nats]\nurl = \"nats://file:1\"\nmax_deliver = 7\n[worker]\npool = \"a100\"\n",
        )
        .unwrap();
        let env = vec![("TY_NATS__URL".to_string(), "nats://env:2".to_string())];
        let config =
            Config::load_from(Some(&file), &env, &["worker.pool=h100".to_string()]).unwrap();
        assert_eq!(config.nats.url, "nats://env:2");
        assert_eq!(config.nats.max_deliver, 7);
        assert_eq!(config.worker.pool, "h100");
        assert_eq!(config.captioner.concurrency, 2);
    }

    #[test]
    fn stuck_limits_are_overridden_per_backend() {
        let mut stuck = StuckConfig {
            stuck_after_secs: 60,
            first_step_secs: 600,
            silent_secs: 0,
            ..Default::default()
        };
        stuck.backends.insert(
            "kohya".into(),
            StuckOverride {
                first_step_secs: Some(3600),
                ..Default::default()
            },
        );
        let kohya = stuck.limits("kohya");
        assert_eq!(kohya.first_step, Some(Duration::from_secs(3600)));
        assert_eq!(kohya.step, Some(Duration::from_secs(60)));
        assert_eq!(kohya.silent, None);
        assert_eq!(kohya.gpu_idle, Some(Duration::from_secs(15 * 60)));
        assert_eq!(StuckConfig::default().limits("reference").gpu_idle, None);
        assert_eq!(
            stuck.limits("trl").first_step,
            Some(Duration::from_secs(600))
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = Config::load_from(None, &[], &["nats.nope=1".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
        let err = Config::load_from(None, &[], &["worker.pool=a.b".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
        let err = Config::load_from(None, &[], &["nats".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::BadOverride(_)));
        let err =
            Config::load_from(None, &[], &["nats.dedup_window_secs=60".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
        let err =
            Config::load_from(None, &[], &["nats.event_max_age_secs=300".to_string()]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid(m) if m.contains("event_max_age_secs")),
            "{err}"
        );
        for expiry in ["0", "604801"] {
            let set = format!("store.presign_expiry_secs={expiry}");
            let err = Config::load_from(None, &[], &[set]).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid(m) if m.contains("presign_expiry_secs")),
                "{err}"
            );
        }
    }

    #[test]
    fn quotas_layer_per_tenant_and_names_are_checked() {
        let config = Config::load_from(
            None,
            &[("TY_QUOTAS__MAX_RUNNING_JOBS".into(), "3".into())],
            &[
                "quotas.tenants.acme={ max_queued_jobs = 7, max_gpu_hours_per_day = 0.25 }"
                    .to_string(),
            ],
        )
        .unwrap();
        let acme = config.quotas.for_tenant("acme");
        assert_eq!(acme.max_gpu_hours_per_day, Some(0.25));
        assert_eq!(acme.max_queued_jobs, Some(7));
        assert_eq!(acme.max_running_jobs, Some(3));
        assert_eq!(
            config.quotas.for_tenant("globex").max_queued_jobs,
            Some(1000)
        );
        for bad in [
            "quotas.tenants.\"a b\"={ max_queued_jobs = 1 }",
            "quotas.nope=1",
            "quotas.max_gpu_hours_per_day=-1",
            "quotas.max_gpu_hours_per_day=nan",
            "quotas.tenants.acme={ max_gpu_hours_per_day = -0.5 }",
            "retry.fleet_max_delay_ms=0",
            "nats.max_ack_pending=0",
            "captioner.video.max_clip_seconds=0",
            "captioner.video.max_clip_seconds=nan",
            "captioner.video.max_clip_frames=0",
            "captioner.video.nope=1",
        ] {
            let err = Config::load_from(None, &[], &[bad.to_string()]).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn the_documented_config_file_is_the_defaults() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/trainyard.toml");
        let documented = Config::load_from(Some(&file), &[], &[]).unwrap();
        assert_eq!(documented.to_toml(), Config::default().to_toml());
    }

    #[test]
    fn destination_credentials_are_checked_and_their_secrets_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("trainyard.toml");
        std::fs::write(
            &file,
            r#"
[uploader]
allowed_local_roots = ["/srv/deliveries"]
[destinations.credentials.deliveries]
tenants = ["acme"]
access_key_id = "AKIDDEST"
secret_access_key = "dest-s3cr3t"
session_token = "dest-t0ken"
"#,
        )
        .unwrap();
        let config = Config::load_from(Some(&file), &[], &[]).unwrap();
        let credential = &config.destinations.credentials["deliveries"];
        assert_eq!(credential.tenants, ["acme"]);
        for shown in [config.to_toml(), format!("{config:?}")] {
            assert!(!shown.contains("dest-s3cr3t") && !shown.contains("dest-t0ken"));
            assert!(shown.contains("AKIDDEST"));
        }
        for bad in [
            "destinations.credentials.x={ tenants = [\"acme\"], access_key_id = \"a\" }",
            "destinations.credentials.x={ tenants = [\"no such\"], access_key_id = \"a\", secret_access_key = \"b\" }",
            "uploader.allowed_local_roots=[\"relative\"]",
        ] {
            let err = Config::load_from(None, &[], &[bad.to_string()]).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn s3_options_layer_and_the_secret_is_never_shown() {
        let env = vec![
            (
                "TY_STORE__S3__ENDPOINT".to_string(),
                "http://127.0.0.1:9000".to_string(),
            ),
            (
                "TY_STORE__S3__SECRET_ACCESS_KEY".to_string(),
                "s3cr3t-value".to_string(),
            ),
        ];
        let config = Config::load_from(
            None,
            &env,
            &[
                "store.s3.allow_http=true".to_string(),
                "store.s3.access_key_id=AKIDEXAMPLE".to_string(),
            ],
        )
        .unwrap();
        let s3 = &config.store.s3;
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.secret_access_key.as_deref(), Some("s3cr3t-value"));
        assert_eq!(s3.access_key_id.as_deref(), Some("AKIDEXAMPLE"));
        assert_eq!(s3.allow_http, Some(true));
        assert_eq!(s3.region, None);
        assert!(!config.to_toml().contains("s3cr3t-value"));
        assert!(config.to_toml().contains(REDACTED));
        assert!(!format!("{config:?}").contains("s3cr3t-value"));
        assert!(format!("{config:?}").contains("AKIDEXAMPLE"));
        let err = Config::load_from(None, &[], &["store.s3.endpoit=x".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
    }

    #[test]
    fn the_webhook_secret_is_never_shown() {
        let env = vec![(
            "TY_WEBHOOKS__SECRET".to_string(),
            "whsec_c2VjcmV0LXNpZ25pbmcta2V5".to_string(),
        )];
        let config = Config::load_from(None, &env, &["webhooks.max_attempts=3".into()]).unwrap();
        assert_eq!(config.webhooks.secret, "whsec_c2VjcmV0LXNpZ25pbmcta2V5");
        assert_eq!(config.webhooks.max_attempts, 3);
        // A legacy fleet secret still turns webhooks on; it signs nothing.
        assert!(config.webhooks.is_enabled());
        assert!(!Config::default().webhooks.is_enabled());
        assert!(!config.to_toml().contains("c2VjcmV0LXNpZ25pbmcta2V5"));
        assert!(!format!("{config:?}").contains("c2VjcmV0LXNpZ25pbmcta2V5"));
        assert!(format!("{config:?}").contains(REDACTED));
    }

    #[test]
    fn retry_policies_layer_and_are_checked() {
        let config = Config::load_from(
            None,
            &[("TY_RETRY__TRAIN__MAX_ATTEMPTS".into(), "9".into())],
            &[
                "retry.prepare.initial_delay_ms=250".to_string(),
                "retry.deliver.non_retryable=[\"auth\"]".to_string(),
            ],
        )
        .unwrap();
        assert_eq!(config.retry.train.max_attempts, 9);
        assert_eq!(config.retry.prepare.initial_delay_ms, 250);
        assert_eq!(config.retry.deliver.non_retryable, vec!["auth".to_string()]);
        assert_eq!(config.retry.prepare.max_attempts, 5);
        assert_eq!(
            parse_error_kind("bad_dataset"),
            Some(trainyard_proto::v1::ErrorKind::BadDataset)
        );
        assert_eq!(
            error_kind_name(trainyard_proto::v1::ErrorKind::DeadlineExceeded),
            "deadline_exceeded"
        );
        for bad in [
            "retry.train.max_attempts=0",
            "retry.train.multiplier=0.5",
            "retry.train.jitter=1.5",
            "retry.train.max_delay_ms=1",
            "retry.train.non_retryable=[\"nope\"]",
            "retry.train.nope=1",
        ] {
            let err = Config::load_from(None, &[], &[bad.to_string()]).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}");
        }
    }

    #[test]
    fn tokens_are_hashed_and_an_env_table_replaces_the_files() {
        let (acme, globex) = (
            crate::auth::token_key("ty_a"),
            crate::auth::token_key("ty_G"),
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ty.toml");
        std::fs::write(
            &file,
            format!("[coordinator.tokens]\n{acme:?} = \"acme\"\n"),
        )
        .unwrap();
        let config = Config::load_from(Some(&file), &[], &[]).unwrap();
        assert_eq!(config.coordinator.tokens[&acme], "acme");
        // The environment's table replaces the file's, its keys and tenants as given.
        let upper = globex.to_uppercase().replace("SHA256:", "sha256:");
        let env = vec![(
            "TY_COORDINATOR__TOKENS".to_string(),
            format!("{{ {upper:?} = \"GloBex\" }}"),
        )];
        let config = Config::load_from(Some(&file), &env, &[]).unwrap();
        assert_eq!(
            config.coordinator.tokens.keys().collect::<Vec<_>>(),
            [&upper]
        );
        assert_eq!(config.coordinator.tokens[&upper], "GloBex");
        // One entry by variable name would merge (and lose case): refused.
        let env = vec![("TY_COORDINATOR__TOKENS__X".to_string(), "acme".to_string())];
        let err = Config::load_from(Some(&file), &env, &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        // A plain token is refused, and the message never shows it.
        let err = Config::load_from(
            None,
            &[],
            &["coordinator.tokens={ plain-s3cret = \"acme\" }".to_string()],
        )
        .unwrap_err();
        assert!(matches!(&err, ConfigError::Invalid(m) if m.contains("sha256:")));
        assert!(!err.to_string().contains("plain-s3cret"));
        // No tokens at all loads (only the coordinator needs them).
        assert!(
            Config::load_from(None, &[], &[])
                .unwrap()
                .coordinator
                .tokens
                .is_empty()
        );
        let err = Config::load_from(None, &[], &["coordinator.tls_cert_file=\"/c.pem\"".into()])
            .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
    }

    #[test]
    fn printed_config_loads_back() {
        let config = Config::default();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ty.toml");
        std::fs::write(&file, config.to_toml()).unwrap();
        let again = Config::load_from(Some(&file), &[], &[]).unwrap();
        assert_eq!(again.to_toml(), config.to_toml());
    }
}
