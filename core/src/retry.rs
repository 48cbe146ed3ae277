//! Retry policy: what the stage runtime does with a failed task.
//!
//! A policy comes from the stage's `[retry.<stage>]` config section, with a
//! job's `JobSpec.retry` laid over it ([`Policy::resolve`]). For a failure
//! on delivery `k` (from 1) the runtime asks [`Policy::decide`]:
//!
//! - the error is not retryable, or its kind is in `non_retryable` →
//!   [`Decision::Fail`]: DLQ copy, failed result, TERM, the job is FAILED
//!   at once;
//! - `k` reached `max_attempts` → [`Decision::GiveUp`]: DLQ copy, failed
//!   result, TERM (the cap is counted here on deliveries, not by the
//!   server, whose max-deliveries advisory nobody may hear);
//! - otherwise [`Decision::Retry`]: NAK with the delay `initial ×
//!   multiplier^(k-1)` capped at `max_delay`, spread by ±`jitter` (by
//!   `backoff::ExponentialBackoff`) and never above `max_delay`; a server's
//!   `Retry-After` (carried as the handler's delay) is a lower bound.
//!
//! The fleet caps every delay: `[retry] fleet_max_delay_ms` bounds the
//! job's `initial_delay_ms` and `max_delay_ms` and a server's `Retry-After`
//! alike, so a tenant cannot choose to hold its tasks back for a day.

use crate::config::{RetryConfig, RetryPolicyConfig, parse_error_kind};
use backoff::backoff::Backoff as _;
use std::time::Duration;
use trainyard_proto::v1::{self, ErrorKind, JobError, Stage};

/// The longest a server's `Retry-After` may hold a task back.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// One stage's effective retry policy for one job.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub initial_delay: Duration,
    pub multiplier: f64,
    pub max_delay: Duration,
    pub max_attempts: u32,
    pub jitter: f64,
    pub non_retryable: Vec<ErrorKind>,
    /// The longest a handler's hint (a server's `Retry-After`) may hold the
    /// task back: [`MAX_RETRY_AFTER`], or the fleet's maximum if lower.
    pub max_hint: Duration,
}

/// What to do with a failed delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// NAK with this delay.
    Retry(Duration),
    /// A fatal error: dead-letter and fail the job now.
    Fail,
    /// Out of attempts: dead-letter and fail the job.
    GiveUp,
}

impl Policy {
    pub fn from_config(config: &RetryPolicyConfig) -> Self {
        Self {
            initial_delay: Duration::from_millis(config.initial_delay_ms),
            multiplier: config.multiplier.max(1.0),
            max_delay: Duration::from_millis(config.max_delay_ms.max(config.initial_delay_ms)),
            max_attempts: config.max_attempts.max(1),
            jitter: config.jitter.clamp(0.0, 0.99),
            non_retryable: config
                .non_retryable
                .iter()
                .filter_map(|k| parse_error_kind(k))
                .collect(),
            max_hint: MAX_RETRY_AFTER,
        }
    }

    /// The stage's policy from `config` with a job's override laid over it
    /// (when the override names this stage or no stage), attempts limited
    /// to `ceiling` (`nats.max_deliver`), every delay and hint limited to
    /// the fleet's maximum.
    pub fn resolve(
        config: &RetryConfig,
        job: Option<&v1::RetryPolicy>,
        stage: Stage,
        ceiling: u32,
    ) -> Self {
        let mut policy = Self::from_config(config.for_stage(stage));
        if let Some(job) = job
            && (job.stages.is_empty() || job.stages.contains(&(stage as i32)))
        {
            if job.initial_delay_ms > 0 {
                policy.initial_delay = Duration::from_millis(job.initial_delay_ms);
            }
            if job.multiplier >= 1.0 && job.multiplier.is_finite() {
                policy.multiplier = job.multiplier;
            }
            if job.max_delay_ms > 0 {
                policy.max_delay = Duration::from_millis(job.max_delay_ms);
            }
            if job.max_attempts > 0 {
                policy.max_attempts = job.max_attempts;
            }
            if let Some(jitter) = job.jitter {
                policy.jitter = jitter.clamp(0.0, 0.99);
            }
            if !job.non_retryable.is_empty() {
                policy.non_retryable = job.non_retryable().collect();
            }
            policy.max_delay = policy.max_delay.max(policy.initial_delay);
        }
        policy.max_attempts = policy.max_attempts.clamp(1, ceiling.max(1));
        policy.capped(config.fleet_max_delay())
    }

    /// This policy with every delay and hint at most `fleet_max`.
    pub fn capped(mut self, fleet_max: Duration) -> Self {
        self.initial_delay = self.initial_delay.min(fleet_max);
        self.max_delay = self.max_delay.min(fleet_max);
        self.max_hint = self.max_hint.min(fleet_max);
        self
    }

    /// Whether `error` ends the job at once.
    pub fn is_fatal(&self, error: &JobError) -> bool {
        !error.retryable || self.non_retryable.contains(&error.kind())
    }

    /// The decision for a failure on delivery `delivered` (from 1); `hint`
    /// is the least delay the handler asked for (a server's `Retry-After`).
    pub fn decide(&self, error: &JobError, delivered: u32, hint: Duration) -> Decision {
        if self.is_fatal(error) {
            Decision::Fail
        } else if delivered >= self.max_attempts {
            Decision::GiveUp
        } else {
            Decision::Retry(self.delay(delivered, hint))
        }
    }

    /// The delay after delivery `delivered` (from 1) failed.
    pub fn delay(&self, delivered: u32, hint: Duration) -> Duration {
        let mut backoff = backoff::ExponentialBackoff {
            current_interval: self.initial_delay,
            initial_interval: self.initial_delay,
            randomization_factor: self.jitter,
            multiplier: self.multiplier,
            max_interval: self.max_delay,
            max_elapsed_time: None,
            ..Default::default()
        };
        let mut delay = self.initial_delay;
        for _ in 0..delivered.clamp(1, 64) {
            delay = backoff.next_backoff().unwrap_or(self.max_delay);
        }
        delay.min(self.max_delay).max(hint.min(self.max_hint))
    }

    /// The range [`Policy::delay`] falls in without a hint (1 ms of slack
    /// below for float rounding).
    pub fn bounds(&self, delivered: u32) -> (Duration, Duration) {
        let exponent = delivered.clamp(1, 64) - 1;
        let nominal = (self.initial_delay.as_secs_f64() * self.multiplier.powi(exponent as i32))
            .min(self.max_delay.as_secs_f64());
        let low = (nominal * (1.0 - self.jitter) - 0.001).max(0.0);
        let high = (nominal * (1.0 + self.jitter)).min(self.max_delay.as_secs_f64());
        (Duration::from_secs_f64(low), Duration::from_secs_f64(high))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;
    use crate::runtime::job_error;

    fn policy(initial_ms: u64, multiplier: f64, max_ms: u64, jitter: f64) -> Policy {
        Policy::from_config(&RetryPolicyConfig {
            initial_delay_ms: initial_ms,
            multiplier,
            max_delay_ms: max_ms,
            max_attempts: 5,
            jitter,
            non_retryable: vec!["bad_dataset".into()],
        })
    }

    #[test]
    fn delays_grow_per_attempt_within_the_jitter() {
        let p = policy(1_000, 2.0, 60_000, 0.25);
        for attempt in 1..=5u32 {
            let nominal = 1_000.0 * 2f64.powi(attempt as i32 - 1);
            let (low, high) = p.bounds(attempt);
            assert!((low.as_secs_f64() * 1000.0 - nominal * 0.75).abs() < 2.0);
            assert!((high.as_secs_f64() * 1000.0 - nominal * 1.25).abs() < 2.0);
            for _ in 0..200 {
                let d = p.delay(attempt, Duration::ZERO);
                assert!(
                    d >= low && d <= high,
                    "attempt {attempt}: {d:?} not in {low:?}..{high:?}"
                );
            }
        }
    }

    #[test]
    fn without_jitter_the_delays_are_exact() {
        let p = policy(500, 3.0, 60_000, 0.0);
        let delays: Vec<u128> = (1..=4)
            .map(|k| p.delay(k, Duration::ZERO).as_millis())
            .collect();
        assert_eq!(delays, vec![500, 1_500, 4_500, 13_500]);
    }

    #[test]
    fn the_cap_holds_even_with_jitter() {
        let p = policy(1_000, 10.0, 5_000, 0.5);
        for attempt in 3..=20 {
            for _ in 0..100 {
                let d = p.delay(attempt, Duration::ZERO);
                assert!(d <= Duration::from_secs(5), "{d:?}");
                assert!(d >= Duration::from_millis(2_499), "{d:?}");
            }
        }
        assert_eq!(p.bounds(9).1, Duration::from_secs(5));
    }

    #[test]
    fn retry_after_is_a_lower_bound() {
        let p = policy(100, 2.0, 1_000, 0.1);
        assert_eq!(p.delay(1, Duration::from_secs(7)), Duration::from_secs(7));
        assert!(p.delay(4, Duration::from_millis(10)) >= Duration::from_millis(719));
        assert_eq!(p.delay(1, Duration::from_secs(1 << 20)), MAX_RETRY_AFTER);
    }

    #[test]
    fn decisions_classify_and_count_deliveries() {
        let p = policy(100, 2.0, 1_000, 0.0);
        let fetch = job_error(ErrorKind::Fetch, "503", true);
        assert_eq!(
            p.decide(&fetch, 1, Duration::ZERO),
            Decision::Retry(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(&fetch, 4, Duration::ZERO),
            Decision::Retry(Duration::from_millis(800))
        );
        assert_eq!(p.decide(&fetch, 5, Duration::ZERO), Decision::GiveUp);
        let fatal = job_error(ErrorKind::Fetch, "404", false);
        assert_eq!(p.decide(&fatal, 1, Duration::ZERO), Decision::Fail);
        let listed = job_error(ErrorKind::BadDataset, "flaky?", true);
        assert_eq!(p.decide(&listed, 1, Duration::ZERO), Decision::Fail);
    }

    #[test]
    fn a_job_override_applies_to_its_stages_and_stays_under_the_ceiling() {
        let config = RetryConfig::default();
        let job = v1::RetryPolicy {
            stages: vec![Stage::Prepare as i32],
            initial_delay_ms: 300,
            multiplier: 1.5,
            max_delay_ms: 0,
            max_attempts: 50,
            jitter: Some(0.0),
            non_retryable: vec![ErrorKind::Fetch as i32],
        };
        let prepare = Policy::resolve(&config, Some(&job), Stage::Prepare, 8);
        assert_eq!(prepare.initial_delay, Duration::from_millis(300));
        assert_eq!(prepare.multiplier, 1.5);
        assert_eq!(prepare.max_delay, Duration::from_millis(60_000));
        assert_eq!(prepare.max_attempts, 8);
        assert_eq!(prepare.jitter, 0.0);
        assert_eq!(prepare.non_retryable, vec![ErrorKind::Fetch]);
        let train = Policy::resolve(&config, Some(&job), Stage::Train, 8);
        assert_eq!(
            train,
            Policy::from_config(&config.train).capped(config.fleet_max_delay())
        );
    }

    #[test]
    fn the_fleet_caps_a_jobs_delays_and_a_servers_retry_after() {
        let config = RetryConfig {
            fleet_max_delay_ms: 30_000,
            ..RetryConfig::default()
        };
        // A day between tries, as a tenant may ask.
        let job = v1::RetryPolicy {
            initial_delay_ms: 86_400_000,
            max_delay_ms: 86_400_000,
            jitter: Some(0.0),
            ..Default::default()
        };
        let policy = Policy::resolve(&config, Some(&job), Stage::Prepare, 5);
        let cap = Duration::from_secs(30);
        assert_eq!(policy.initial_delay, cap);
        assert_eq!(policy.max_delay, cap);
        let fetch = job_error(ErrorKind::Fetch, "503", true);
        for delivered in 1..5 {
            assert_eq!(
                policy.decide(&fetch, delivered, Duration::ZERO),
                Decision::Retry(cap)
            );
            // An hour's Retry-After from the tenant's own server.
            assert_eq!(
                policy.decide(&fetch, delivered, MAX_RETRY_AFTER),
                Decision::Retry(cap)
            );
        }
        // Without a job override the stage's own policy is capped too.
        let plain = Policy::resolve(&config, None, Stage::Train, 5);
        assert_eq!(plain.max_delay, cap);
        assert_eq!(plain.delay(1, Duration::from_secs(45)), cap);
    }
}
