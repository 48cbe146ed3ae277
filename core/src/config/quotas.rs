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
    /// Tasks of one tenant running at once in each stage, and in each
    /// training pool (`[quotas.max_running_tasks]`): a job whose next
    /// stage is full for its tenant enters it without its task
    /// ([`JobRecord::quota_hold`](trainyard_proto::v1::JobRecord)) and gets
    /// it when one of the tenant's tasks there ends.
    pub max_running_tasks: TaskQuotas,
    /// Per-tenant limits, by tenant name.
    pub tenants: BTreeMap<String, TenantQuotas>,
}

/// Tasks of one tenant at once per stage (`[quotas.max_running_tasks]`);
/// unset or `0` is no limit. `train` holds in each pool on its own (a
/// tenant with `train = 2` may train two jobs in `flux` and two in
/// `sdxl`); `pools` sets one pool's own limit in its place.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TaskQuotas {
    pub prepare: Option<u32>,
    pub train: Option<u32>,
    pub deliver: Option<u32>,
    /// Training tasks in one pool, by pool name, in place of `train`.
    pub pools: BTreeMap<String, u32>,
}

/// Where a task runs, for [`TaskQuotas`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskSlot {
    Prepare,
    /// Training, in a pool.
    Train(String),
    Deliver,
}

impl std::fmt::Display for TaskSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskSlot::Prepare => f.write_str("prepare"),
            TaskSlot::Train(pool) => write!(f, "train in pool {pool}"),
            TaskSlot::Deliver => f.write_str("deliver"),
        }
    }
}

impl TaskQuotas {
    /// The limit of `slot`; `None` is no limit.
    pub fn limit(&self, slot: &TaskSlot) -> Option<u32> {
        match slot {
            TaskSlot::Prepare => self.prepare,
            TaskSlot::Train(pool) => self.pools.get(pool).copied().or(self.train),
            TaskSlot::Deliver => self.deliver,
        }
        .filter(|n| *n > 0)
    }

    /// The config key that sets `slot`'s limit, for messages.
    pub fn key(&self, slot: &TaskSlot) -> String {
        match slot {
            TaskSlot::Train(pool) if self.pools.contains_key(pool) => {
                format!("quotas.max_running_tasks.pools.{pool}")
            }
            TaskSlot::Train(_) => "quotas.max_running_tasks.train".into(),
            TaskSlot::Prepare => "quotas.max_running_tasks.prepare".into(),
            TaskSlot::Deliver => "quotas.max_running_tasks.deliver".into(),
        }
    }

    /// Whether any stage has a limit.
    pub fn any(&self) -> bool {
        [self.prepare, self.train, self.deliver]
            .into_iter()
            .any(|n| n.is_some_and(|n| n > 0))
            || self.pools.values().any(|n| *n > 0)
    }

    /// `own` laid over these: its stages and pools where it sets them.
    fn overlaid(&self, own: &TaskQuotas) -> TaskQuotas {
        let mut pools = self.pools.clone();
        pools.extend(own.pools.clone());
        TaskQuotas {
            prepare: own.prepare.or(self.prepare),
            train: own.train.or(self.train),
            deliver: own.deliver.or(self.deliver),
            pools,
        }
    }
}

impl Default for QuotasConfig {
    fn default() -> Self {
        Self {
            max_queued_jobs: 1_000,
            max_running_jobs: 100,
            max_gpu_hours_per_day: 0.0,
            max_running_tasks: TaskQuotas::default(),
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
    /// Laid over the section's `max_running_tasks`, stage by stage and
    /// pool by pool.
    pub max_running_tasks: TaskQuotas,
}

/// One tenant's effective limits; `None` is no limit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Quota {
    pub max_queued_jobs: Option<u32>,
    pub max_running_jobs: Option<u32>,
    /// GPU-hours in any 24 hours.
    pub max_gpu_hours_per_day: Option<f64>,
    /// Tasks at once per stage and pool.
    pub max_running_tasks: TaskQuotas,
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
            max_running_tasks: match own {
                Some(own) => self.max_running_tasks.overlaid(&own.max_running_tasks),
                None => self.max_running_tasks.clone(),
            },
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
                max_running_tasks: TaskQuotas::default(),
            }
        );
        assert_eq!(
            config.for_tenant("big"),
            Quota {
                max_queued_jobs: Some(10),
                max_running_jobs: None,
                max_gpu_hours_per_day: Some(2.5),
                max_running_tasks: TaskQuotas::default(),
            }
        );
        config.max_gpu_hours_per_day = 0.0;
        assert_eq!(config.for_tenant("acme").max_gpu_hours_per_day, None);
    }

    #[test]
    fn task_limits_by_stage_and_pool_lie_over_the_defaults() {
        let config: QuotasConfig = toml::from_str(
            r#"
            [max_running_tasks]
            prepare = 4
            train = 2
            pools = { flux = 1 }
            [tenants.big.max_running_tasks]
            train = 8
            deliver = 3
            pools = { sdxl = 0 }
            "#,
        )
        .unwrap();
        let train = |pool: &str| TaskSlot::Train(pool.into());
        let acme = config.for_tenant("acme").max_running_tasks;
        let rows = [
            (&acme, TaskSlot::Prepare, Some(4)),
            (&acme, train("default"), Some(2)),
            (&acme, train("flux"), Some(1)),
            (&acme, TaskSlot::Deliver, None),
        ];
        for (quotas, slot, want) in rows {
            assert_eq!(quotas.limit(&slot), want, "acme {slot}");
        }
        assert_eq!(
            acme.key(&train("flux")),
            "quotas.max_running_tasks.pools.flux"
        );
        assert_eq!(acme.key(&train("wan")), "quotas.max_running_tasks.train");
        assert!(acme.any());
        let big = config.for_tenant("big").max_running_tasks;
        let rows = [
            (TaskSlot::Prepare, Some(4)),
            (train("default"), Some(8)),
            // The fleet's pool limit still holds where the tenant sets none,
            (train("flux"), Some(1)),
            // and 0 lifts it where the tenant does.
            (train("sdxl"), None),
            (TaskSlot::Deliver, Some(3)),
        ];
        for (slot, want) in rows {
            assert_eq!(big.limit(&slot), want, "big {slot}");
        }
        assert!(
            !QuotasConfig::default()
                .for_tenant("x")
                .max_running_tasks
                .any()
        );
    }
}
