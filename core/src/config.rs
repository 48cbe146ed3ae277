//! Layered configuration, loaded and validated once at start-up:
//! built-in defaults → a TOML file → `TY_<SECTION>__<KEY>` environment
//! variables → `--set section.key=value` flags. Unknown keys are errors, so
//! a typo never silently falls back to a default.
//!
//! One file configures every service; each reads its own section plus
//! `nats`, `store` and `telemetry`. `deploy/trainyard.toml` documents every key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    pub telemetry: TelemetryConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Seconds a task may go without an ack or in-progress ack before redelivery.
    pub ack_wait_secs: u64,
    /// Deliveries of one task before it goes to the dead-letter stream.
    pub max_deliver: u32,
    /// Replicas of every stream and bucket (3 on a cluster).
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub dedup_window_secs: u64,
    /// How long job events are kept.
    pub event_max_age_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            ack_wait_secs: 30,
            max_deliver: 5,
            replicas: 1,
            dedup_window_secs: 600,
            event_max_age_secs: 7 * 24 * 3600,
        }
    }
}

impl NatsConfig {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs.max(1))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The artifact store: `file:///abs/dir`, a local path, or `s3://bucket/prefix`.
    pub uri: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            uri: ".trainyard/store".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC listen address.
    pub grpc_addr: String,
    /// Bearer token → tenant. The default holds one development token.
    pub tokens: BTreeMap<String, String>,
    /// Seconds between reconciler passes.
    pub reconcile_interval_secs: u64,
    /// A running job whose record has not changed for this long, with no task
    /// in flight, gets its task published again.
    pub stale_after_secs: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50051".into(),
            tokens: [("dev-token".to_string(), "dev".to_string())].into(),
            reconcile_interval_secs: 60,
            stale_after_secs: 120,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionerConfig {
    pub work_dir: PathBuf,
    /// Tasks prepared at once.
    pub concurrency: usize,
    /// Allow dataset URLs on private and loopback addresses (development only).
    pub allow_private_urls: bool,
    /// Largest dataset download or unpacked size, in bytes.
    pub max_dataset_bytes: u64,
    /// Most files in one dataset archive.
    pub max_files: usize,
}

impl Default for CaptionerConfig {
    fn default() -> Self {
        Self {
            work_dir: ".trainyard/work/captioner".into(),
            concurrency: 2,
            allow_private_urls: false,
            max_dataset_bytes: 4 << 30,
            max_files: 20_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub work_dir: PathBuf,
    /// The GPU pool this worker takes tasks from (`ty.task.train.<pool>`).
    pub pool: String,
    /// Local cache of base models.
    pub model_cache_dir: PathBuf,
    /// Path of `ty-reference-trainer`; found beside this executable or on PATH when empty.
    pub reference_trainer: Option<PathBuf>,
    /// Trainings at once (one per GPU).
    pub concurrency: usize,
    /// Seconds a trainer gets to save after SIGTERM before SIGKILL.
    pub stop_grace_secs: u64,
    /// Least milliseconds between two progress events of one job.
    pub progress_interval_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            work_dir: ".trainyard/work/worker".into(),
            pool: "default".into(),
            model_cache_dir: ".trainyard/cache/models".into(),
            reference_trainer: None,
            concurrency: 1,
            stop_grace_secs: 5,
            progress_interval_ms: 200,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploaderConfig {
    pub work_dir: PathBuf,
    pub concurrency: usize,
    /// Local folders a job may deliver to; empty allows any (single-user set-ups).
    pub allowed_local_roots: Vec<PathBuf>,
}

impl Default for UploaderConfig {
    fn default() -> Self {
        Self {
            work_dir: ".trainyard/work/uploader".into(),
            concurrency: 4,
            allowed_local_roots: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// "text" or "json".
    pub log_format: String,
    /// A `tracing` filter, e.g. "info,trainyard_worker=debug".
    pub log_filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: "text".into(),
            log_filter: "info".into(),
        }
    }
}

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
            set_path(
                &mut layered,
                &section.to_lowercase(),
                &key.to_lowercase(),
                value,
            );
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
        if self.coordinator.tokens.is_empty() {
            return bad("coordinator.tokens is empty: no client could authenticate");
        }
        for tenant in self.coordinator.tokens.values() {
            if trainyard_proto::TenantId::parse(tenant).is_err() {
                return bad("coordinator.tokens maps to a tenant that is not a valid id");
            }
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
        if self.nats.max_deliver == 0 {
            return bad("nats.max_deliver must be at least 1");
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return bad("telemetry.log_format must be \"text\" or \"json\"");
        }
        Ok(())
    }

    /// The configuration as TOML, for `--print-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Sets `section.key` to `raw`, read as a TOML value when it parses as one
/// (numbers, booleans, arrays, inline tables) and as a string otherwise.
fn set_path(table: &mut toml::Table, section: &str, key: &str, raw: &str) {
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(inner) = entry {
        inner.insert(key.to_string(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn unknown_keys_and_bad_values_are_refused() {
        let err = Config::load_from(None, &[], &["nats.nope=1".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
        let err = Config::load_from(None, &[], &["worker.pool=a.b".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
        let err = Config::load_from(None, &[], &["nats".to_string()]).unwrap_err();
        assert!(matches!(err, ConfigError::BadOverride(_)));
    }

    #[test]
    fn the_documented_config_file_is_the_defaults() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/trainyard.toml");
        let documented = Config::load_from(Some(&file), &[], &[]).unwrap();
        assert_eq!(documented.to_toml(), Config::default().to_toml());
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
