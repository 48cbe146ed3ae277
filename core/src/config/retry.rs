//! The `[retry]` section.

use serde::{Deserialize, Serialize};

/// The `[retry]` section: how each stage tries a failed task again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// The longest any retry of any stage waits, in milliseconds, whatever
    /// a job's `spec.retry` or a server's `Retry-After` asks for: a tenant
    /// never chooses how long its tasks are held back beyond this.
    pub fleet_max_delay_ms: u64,
    pub prepare: RetryPolicyConfig,
    pub train: RetryPolicyConfig,
    pub deliver: RetryPolicyConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            fleet_max_delay_ms: 600_000,
            prepare: RetryPolicyConfig {
                initial_delay_ms: 2_000,
                multiplier: 2.0,
                max_delay_ms: 60_000,
                max_attempts: 5,
                jitter: 0.2,
                non_retryable: fatal_kinds(),
            },
            train: RetryPolicyConfig {
                initial_delay_ms: 10_000,
                multiplier: 2.0,
                max_delay_ms: 300_000,
                max_attempts: 5,
                jitter: 0.2,
                non_retryable: fatal_kinds(),
            },
            deliver: RetryPolicyConfig {
                initial_delay_ms: 5_000,
                multiplier: 2.0,
                max_delay_ms: 120_000,
                max_attempts: 5,
                jitter: 0.2,
                non_retryable: fatal_kinds(),
            },
        }
    }
}

fn fatal_kinds() -> Vec<String> {
    ["invalid_spec", "auth", "poison"]
        .map(String::from)
        .to_vec()
}

impl RetryConfig {
    /// [`RetryConfig::fleet_max_delay_ms`] as a duration (at least 1 ms).
    pub fn fleet_max_delay(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.fleet_max_delay_ms.max(1))
    }

    pub fn for_stage(&self, stage: trainyard_proto::v1::Stage) -> &RetryPolicyConfig {
        use trainyard_proto::v1::Stage;
        match stage {
            Stage::Train => &self.train,
            Stage::Deliver => &self.deliver,
            _ => &self.prepare,
        }
    }
}

/// One stage's retry policy (`[retry.prepare]`, `[retry.train]`,
/// `[retry.deliver]`); see [`crate::retry`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicyConfig {
    /// Delay before the second delivery, in milliseconds.
    pub initial_delay_ms: u64,
    /// Each further delay is the previous one times this.
    pub multiplier: f64,
    /// No delay is longer than this, in milliseconds.
    pub max_delay_ms: u64,
    /// Deliveries of one task, the first included, before the job fails.
    pub max_attempts: u32,
    /// Fraction (0..1) by which each delay is spread at random.
    pub jitter: f64,
    /// Error kinds that fail the job at once even when the stage called the
    /// error transient: invalid_spec, bad_dataset, fetch, model, trainer,
    /// oom, storage, poison, auth, deadline_exceeded, internal. Errors the
    /// stage called permanent (a bad dataset, an unknown model, a refused
    /// token) are fatal whatever this lists.
    pub non_retryable: Vec<String>,
}

impl Default for RetryPolicyConfig {
    fn default() -> Self {
        RetryConfig::default().prepare
    }
}

/// An error kind's config name (`ErrorKind::BadDataset` → `bad_dataset`).
pub fn error_kind_name(kind: trainyard_proto::v1::ErrorKind) -> String {
    kind.as_str_name()
        .trim_start_matches("ERROR_KIND_")
        .to_lowercase()
}

/// The error kind a config name stands for.
pub fn parse_error_kind(name: &str) -> Option<trainyard_proto::v1::ErrorKind> {
    trainyard_proto::v1::ErrorKind::from_str_name(&format!("ERROR_KIND_{}", name.to_uppercase()))
        .filter(|k| *k != trainyard_proto::v1::ErrorKind::Unspecified)
}
