//! The `[quotas]` section: how much of the fleet one tenant may hold.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `[quotas]` section. A tenant's limits are the defaults here, with
/// its own `[quotas.tenants.<tenant>]` laid over them. `0` is no limit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    /// Jobs of one tenant waiting `QUEUED` (started or held) at once; a
    /// submission past it is refused with RESOURCE_EXHAUSTED.
    pub max_queued_jobs: u32,
    /// Jobs of one tenant running at once (their first task published, not
    /// yet final); a submission past it is stored `QUEUED` and held, and
    /// started when one of the tenant's jobs ends.
    pub max_running_jobs: u32,
    /// GPU-hours one tenant may spend in any 24 hours (a fraction is
    /// fine, `0.5` is half an hour); past it, its next job is stored
    /// `QUEUED` and held until the rolling window has room again. A job
    /// trains on one worker: its GPU time is its train stage's wall time
    /// (from `training_at_ms` to its end, or now while it trains), counted
    /// from the tenant's records in `ty_jobs`. `0` is no limit.
    pub max_gpu_hours_per_day: f64,
    /// Per-tenant limits, by tenant name.
    pub tenants: BTreeMap<String, TenantQuotas>,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        Self {
            max_queued_jobs: 1_000,
            max_running_jobs: 100,
            max_gpu_hours_per_day: 0.0,
            tenants: BTreeMap::new(),
        }
    }
}

/// One tenant's own limits (`[quotas.tenants.<tenant>]`); a key left out
/// is the section's default.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantQuotas {
    pub max_queued_jobs: Option<u32>,
    pub max_running_jobs: Option<u32>,
    pub max_gpu_hours_per_day: Option<f64>,
}

/// One tenant's effective limits; `None` is no limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quota {
    pub max_queued_jobs: Option<u32>,
    pub max_running_jobs: Option<u32>,
    /// GPU-hours in any 24 hours.
    pub max_gpu_hours_per_day: Option<f64>,
}

impl QuotasConfig {
    /// The limits of `tenant`.
    pub fn for_tenant(&self, tenant: &str) -> Quota {
        let own = self.tenants.get(tenant);
        let limit = |n: u32| (n > 0).then_some(n);
        Quota {
            max_queued_jobs: limit(
                own.and_then(|t| t.max_queued_jobs)
                    .unwrap_or(self.max_queued_jobs),
            ),
            max_running_jobs: limit(
                own.and_then(|t| t.max_running_jobs)
                    .unwrap_or(self.max_running_jobs),
            ),
            max_gpu_hours_per_day: Some(
                own.and_then(|t| t.max_gpu_hours_per_day)
                    .unwrap_or(self.max_gpu_hours_per_day),
            )
            .filter(|h| *h > 0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_own_limits_lie_over_the_defaults() {
        let mut config = QuotasConfig {
            max_queued_jobs: 10,
            max_running_jobs: 2,
            ..Default::default()
        };
        config.tenants.insert(
            "big".into(),
            TenantQuotas {
                max_running_jobs: Some(0),
                max_gpu_hours_per_day: Some(2.5),
                ..Default::default()
            },
        );
        config.max_gpu_hours_per_day = 1.0;
        assert_eq!(
            config.for_tenant("acme"),
            Quota {
                max_queued_jobs: Some(10),
                max_running_jobs: Some(2),
                max_gpu_hours_per_day: Some(1.0),
            }
        );
        assert_eq!(
            config.for_tenant("big"),
            Quota {
                max_queued_jobs: Some(10),
                max_running_jobs: None,
                max_gpu_hours_per_day: Some(2.5),
            }
        );
        config.max_gpu_hours_per_day = 0.0;
        assert_eq!(config.for_tenant("acme").max_gpu_hours_per_day, None);
    }
}
