//! The `[autoscaler]` section, read by `ty-autoscaler`: which provider
//! starts machines, and each pool's policy. A pool is a stage's fleet:
//! `prepare`, `deliver`, or `train.<pool>` for a training pool.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The `[autoscaler]` section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscalerConfig {
    /// `local` (child processes on this machine), `runpod` or
    /// `kubernetes`; empty: the autoscaler refuses to start.
    pub provider: String,
    /// Milliseconds between two planning passes.
    pub interval_ms: u64,
    /// The name tag every machine of this fleet carries (`<fleet>-…`): the
    /// autoscaler lists, adopts and reaps only machines with it.
    pub fleet_name: String,
    /// The leader's lease in `ty_autoscaler` (milliseconds): several
    /// replicas may run, one plans at a time; a leader that stops renewing
    /// is replaced after this.
    pub lease_ms: u64,
    /// A running machine whose worker has not registered (or whose entry
    /// expired) this long is counted as vanished: released and replaced.
    pub vanished_after_ms: u64,
    /// A machine that vanished (preempted, or lost) makes its host and
    /// data centre avoided this long for new machines.
    pub avoid_host_secs: u64,
    /// A busy machine being drained is released once its service says it
    /// drained (taking nothing, running nothing), or after this many
    /// seconds anyway (recorded as the decision's error): more than a
    /// worker's drain grace, its trainer's stop grace and the upload of
    /// its last checkpoint.
    pub drain_timeout_secs: u64,
    /// The prior of a training step's duration, in seconds, per backend
    /// (`reference`, `kohya`, …) or per `backend/gpu type`; learnt from
    /// finished jobs' summaries as they come.
    pub seconds_per_step: BTreeMap<String, f64>,
    /// The prior for a backend with none above.
    pub default_seconds_per_step: f64,
    /// Each pool's policy, by pool (`prepare`, `deliver`, `train.<pool>`).
    pub pools: BTreeMap<String, PoolPolicy>,
    pub local: LocalProviderConfig,
    pub runpod: RunpodConfig,
    pub kubernetes: KubernetesConfig,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        Self {
            provider: String::new(),
            interval_ms: 2_000,
            fleet_name: "trainyard".into(),
            lease_ms: 10_000,
            vanished_after_ms: 10_000,
            avoid_host_secs: 1_800,
            drain_timeout_secs: 300,
            seconds_per_step: BTreeMap::new(),
            default_seconds_per_step: 1.5,
            pools: BTreeMap::new(),
            local: LocalProviderConfig::default(),
            runpod: RunpodConfig::default(),
            kubernetes: KubernetesConfig::default(),
        }
    }
}

/// Environment keys that carry a worker's credentials: on RunPod each must
/// be a RunPod secret reference (`{{ RUNPOD_SECRET_<name> }}`), resolved
/// by RunPod when the pod boots, so the autoscaler never holds them.
pub const RUNPOD_CREDENTIAL_KEYS: [&str; 2] = ["TY_NKEY_SEED", "TY_SECRETS_KEY"];

/// Why an `[autoscaler]` section is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AutoscalerConfigError {
    /// A pod env value is a credential in plain text.
    #[error(
        "{place}: env {key} holds {what} in plain text; put it in a RunPod secret and write \
         {key} = \"{{{{ RUNPOD_SECRET_<name> }}}}\" (deploy/runpod/README.md)"
    )]
    PlaintextCredential {
        /// `autoscaler.runpod` or `autoscaler.pools.<pool>`.
        place: String,
        key: String,
        /// What it looks like (`an nkey seed`, `a private key`, …).
        what: &'static str,
    },
}

/// Whether `value` is one RunPod secret reference and nothing else.
pub fn is_runpod_secret_ref(value: &str) -> bool {
    runpod_secret_name(value).is_some()
}

/// The secret named by `{{ RUNPOD_SECRET_<name> }}` (spaces inside the
/// braces optional), if `value` is exactly one reference.
pub fn runpod_secret_name(value: &str) -> Option<&str> {
    let inner = value.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    let name = inner.strip_prefix("RUNPOD_SECRET_")?;
    (!name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    .then_some(name)
}

/// What a literal credential in `value` looks like, if it looks like one:
/// an nkey seed (`S` + type letter + base32, 58 characters) or a PEM
/// private key.
pub fn literal_credential(value: &str) -> Option<&'static str> {
    let v = value.trim();
    let bytes = v.as_bytes();
    let seed = bytes.len() == 58
        && bytes[0] == b'S'
        && matches!(bytes[1], b'U' | b'A' | b'O' | b'N' | b'C' | b'X')
        && bytes
            .iter()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(b));
    if seed {
        Some("an nkey seed")
    } else if v.contains("-----BEGIN") && v.contains("PRIVATE KEY") {
        Some("a private key")
    } else {
        None
    }
}

impl AutoscalerConfig {
    /// Checks what the loader cannot: with the `runpod` provider, no pod
    /// env value (`[autoscaler.runpod] env`, each pool's `env`) is a
    /// literal nkey seed or private key, and the credential keys
    /// ([`RUNPOD_CREDENTIAL_KEYS`]) are RunPod secret references.
    pub fn validate(&self) -> Result<(), AutoscalerConfigError> {
        if self.provider != "runpod" {
            return Ok(());
        }
        let places = std::iter::once(("autoscaler.runpod".to_string(), &self.runpod.env)).chain(
            self.pools
                .iter()
                .map(|(pool, policy)| (format!("autoscaler.pools.{pool:?}"), &policy.env)),
        );
        for (place, env) in places {
            for (key, value) in env {
                let what = literal_credential(value).or_else(|| {
                    (RUNPOD_CREDENTIAL_KEYS.contains(&key.as_str()) && !is_runpod_secret_ref(value))
                        .then_some("a credential")
                });
                if let Some(what) = what {
                    return Err(AutoscalerConfigError::PlaintextCredential {
                        place,
                        key: key.clone(),
                        what,
                    });
                }
            }
        }
        Ok(())
    }
}

/// How one pool is sized (`[autoscaler.pools.<pool>]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolPolicy {
    /// Machines kept even when idle.
    pub min_workers: u32,
    /// Machines at most.
    pub max_workers: u32,
    /// Tasks one machine runs at once (the stage's concurrency there).
    pub tasks_per_worker: u32,
    /// The backlog should drain within this many seconds: machines wanted
    /// = estimated seconds of work / this (at least one per task out).
    pub target_drain_secs: u64,
    /// Seconds of work one task of a CPU stage is counted as (training
    /// tasks are weighed by their steps instead).
    pub seconds_per_task: f64,
    /// Machines started at most in one pass.
    pub scale_up_step: u32,
    /// Seconds after a scale-up before the next one (scale from zero does
    /// not wait).
    pub scale_up_cooldown_secs: u64,
    /// Seconds after any scale change before machines are released.
    pub scale_down_cooldown_secs: u64,
    /// A machine idle this long may be released (to `min_workers`, zero
    /// by default).
    pub idle_secs: u64,
    /// Machines are released only once the want is more than this
    /// fraction below what runs (0.25: four machines shrink when two or
    /// fewer are wanted), or zero with no task left.
    pub hysteresis: f64,
    /// Dollars an hour this pool may cost at most (0: no cap); scale-up
    /// stops at it.
    pub max_dollars_per_hour: f64,
    /// GPU types, in order of preference (provider ids, opaque strings
    /// such as `NVIDIA GeForce RTX 4090`); the next is tried when one is
    /// out of stock. Empty for CPU pools.
    pub gpu_types: Vec<String>,
    /// GPUs per machine.
    pub gpu_count: u32,
    /// Interruptible (spot) machines, bid at `bid_per_gpu` dollars an hour
    /// (0: the type's minimum bid).
    pub interruptible: bool,
    pub bid_per_gpu: f64,
    /// A GPU type dearer than this (dollars per GPU-hour) is not taken
    /// (0: any price).
    pub max_price_per_gpu: f64,
    /// Extra environment of the pool's machines.
    pub env: BTreeMap<String, String>,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        Self {
            min_workers: 0,
            max_workers: 1,
            tasks_per_worker: 1,
            target_drain_secs: 900,
            seconds_per_task: 60.0,
            scale_up_step: 4,
            scale_up_cooldown_secs: 30,
            scale_down_cooldown_secs: 60,
            idle_secs: 300,
            hysteresis: 0.2,
            max_dollars_per_hour: 0.0,
            gpu_types: Vec::new(),
            gpu_count: 1,
            interruptible: false,
            bid_per_gpu: 0.0,
            max_price_per_gpu: 0.0,
            env: BTreeMap::new(),
        }
    }
}

/// `[autoscaler.local]`: services as child processes of the autoscaler.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalProviderConfig {
    /// Where `ty-worker`, `ty-captioner` and `ty-uploader` are; empty: next
    /// to the autoscaler's own binary.
    pub bin_dir: Option<PathBuf>,
    /// The config file the children read (`--config`); empty: the
    /// autoscaler's own.
    pub config_file: Option<PathBuf>,
    /// Where each child's output goes (`<name>.log`); empty: inherited.
    pub log_dir: Option<PathBuf>,
}

/// `[autoscaler.runpod]`: pods through RunPod's API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunpodConfig {
    /// The GraphQL endpoint.
    pub graphql_url: String,
    /// The REST (v2) endpoint.
    pub rest_url: String,
    /// A file holding the API key (never the key itself in the config).
    pub api_key_file: Option<PathBuf>,
    /// The worker image.
    pub image: String,
    /// `SECURE` or `COMMUNITY`.
    pub cloud_type: String,
    /// A network volume for the model cache, mounted at `volume_mount_path`.
    pub network_volume_id: String,
    pub volume_mount_path: String,
    pub container_disk_gb: u32,
    /// Data centres machines may run in (empty: any).
    pub data_center_ids: Vec<String>,
    /// Environment every pod gets (the fleet's NATS URL, store, …).
    /// Credentials only as RunPod secret references, resolved by RunPod
    /// when the pod boots: each pool's `env` names its role's seed
    /// (`TY_NKEY_SEED = "{{ RUNPOD_SECRET_ty_worker_flux_nk }}"`); a literal
    /// seed or private key is refused ([`AutoscalerConfig::validate`]).
    pub env: BTreeMap<String, String>,
}

impl Default for RunpodConfig {
    fn default() -> Self {
        Self {
            graphql_url: "https://api.runpod.io/graphql".into(),
            rest_url: "https://api.runpod.io/v2".into(),
            api_key_file: None,
            image: String::new(),
            cloud_type: "SECURE".into(),
            network_volume_id: String::new(),
            volume_mount_path: "/models".into(),
            container_disk_gb: 50,
            data_center_ids: Vec::new(),
            env: BTreeMap::new(),
        }
    }
}

/// `[autoscaler.kubernetes]`: a Deployment's replicas per pool.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// The API server; empty: in-cluster (`KUBERNETES_SERVICE_HOST`).
    pub api_url: String,
    pub namespace: String,
    /// The service account token and the API server's CA; empty: the
    /// in-cluster files.
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// The Deployment of each pool, by pool.
    pub deployments: BTreeMap<String, String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            api_url: String::new(),
            namespace: "trainyard".into(),
            token_file: None,
            ca_file: None,
            deployments: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU";

    fn runpod(env: &[(&str, &str)], pool_env: &[(&str, &str)]) -> AutoscalerConfig {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let mut config = AutoscalerConfig {
            provider: "runpod".into(),
            ..Default::default()
        };
        config.runpod.env = map(env);
        config.pools.insert(
            "train.flux".into(),
            PoolPolicy {
                env: map(pool_env),
                ..Default::default()
            },
        );
        config
    }

    #[test]
    fn secret_references_pass_and_literal_credentials_are_refused() {
        let ok = runpod(
            &[("TY_NATS__URL", "tls://bus:4222")],
            &[
                ("TY_NKEY_SEED", "{{ RUNPOD_SECRET_ty_train_flux_seed }}"),
                ("TY_SECRETS_KEY", "{{RUNPOD_SECRET_ty_secrets_key}}"),
                ("TY_NATS_CA_PEM", "-----BEGIN CERTIFICATE-----\nMIIB\n"),
            ],
        );
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(runpod_secret_name("{{ RUNPOD_SECRET_a_b }}"), Some("a_b"));
        let cases = [
            runpod(&[], &[("TY_NKEY_SEED", SEED)]),
            runpod(&[("ANY", SEED)], &[]),
            runpod(&[("TLS_KEY", "-----BEGIN PRIVATE KEY-----\nMIIE\n")], &[]),
            runpod(&[], &[("TY_SECRETS_KEY", "c2VjcmV0")]),
            runpod(&[], &[("TY_NKEY_SEED", "x {{ RUNPOD_SECRET_a }}")]),
        ];
        for config in cases {
            assert!(
                matches!(
                    config.validate(),
                    Err(AutoscalerConfigError::PlaintextCredential { .. })
                ),
                "{config:?}"
            );
        }
        let Err(AutoscalerConfigError::PlaintextCredential { place, key, .. }) =
            runpod(&[], &[("TY_NKEY_SEED", SEED)]).validate()
        else {
            panic!("refused");
        };
        assert_eq!(
            (place.as_str(), key.as_str()),
            ("autoscaler.pools.\"train.flux\"", "TY_NKEY_SEED")
        );
        // Other providers pass their env to processes they start themselves.
        let local = AutoscalerConfig {
            provider: "local".into(),
            ..runpod(&[("ANY", SEED)], &[])
        };
        assert_eq!(local.validate(), Ok(()));
    }
}
