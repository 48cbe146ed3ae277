//! How much trainer output one job may publish as log events: a byte
//! budget for the whole job, over all its attempts (what earlier attempts
//! spent comes with the task's claim, [`trainyard_proto::v1::TaskClaim::log_bytes`]),
//! and a byte rate (a token bucket holding [`BURST_SECS`] seconds of it). Past the budget no more trainer lines go
//! out as events; over the rate lines are dropped until the bucket refills.
//! Either way the dropped bytes are counted for the notes that say so, and
//! the attempt's full log artifact in the store (capped by
//! `worker.trainer_log_max_bytes`) keeps every line.

use std::time::{Duration, Instant};

/// Seconds of the rate a burst may use at once.
pub const BURST_SECS: u64 = 4;

/// The limits of one job's log events; 0 means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogLimits {
    pub budget_bytes: u64,
    pub bytes_per_sec: u64,
}

/// What to do with one trainer line.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Publish it.
    Pass,
    /// Drop it: over the rate for now.
    OverRate,
    /// Drop it: the budget is spent. `first` on the line that spent it,
    /// when the budget's note is due.
    Exhausted { first: bool },
}

pub struct LogBudget {
    limits: LogLimits,
    spent: u64,
    tokens: u64,
    refilled: Instant,
    exhausted: bool,
    /// Bytes dropped over the budget, for the closing note.
    pub dropped_over_budget: u64,
    /// Bytes dropped over the rate since the last note about it.
    pub dropped_over_rate: u64,
}

impl LogBudget {
    /// A budget of which earlier attempts of the job spent `already` bytes.
    pub fn new(limits: LogLimits, already: u64, now: Instant) -> LogBudget {
        LogBudget {
            limits,
            spent: already,
            tokens: limits.bytes_per_sec.saturating_mul(BURST_SECS),
            refilled: now,
            exhausted: false,
            dropped_over_budget: 0,
            dropped_over_rate: 0,
        }
    }

    pub fn limits(&self) -> LogLimits {
        self.limits
    }

    /// Bytes passed so far, earlier attempts' included.
    pub fn spent(&self) -> u64 {
        self.spent
    }

    /// Accounts a line of `bytes` at `now`.
    pub fn admit(&mut self, bytes: u64, now: Instant) -> Admit {
        if self.exhausted {
            self.dropped_over_budget += bytes;
            return Admit::Exhausted { first: false };
        }
        if self.limits.budget_bytes > 0 && self.spent + bytes > self.limits.budget_bytes {
            self.exhausted = true;
            self.dropped_over_budget += bytes;
            return Admit::Exhausted { first: true };
        }
        if self.limits.bytes_per_sec > 0 {
            self.refill(now);
            if bytes > self.tokens {
                self.dropped_over_rate += bytes;
                return Admit::OverRate;
            }
            self.tokens -= bytes;
        }
        self.spent += bytes;
        Admit::Pass
    }

    fn refill(&mut self, now: Instant) {
        let rate = self.limits.bytes_per_sec;
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = (elapsed.as_micros() as u64).saturating_mul(rate) / 1_000_000;
        if earned > 0 {
            let cap = rate.saturating_mul(BURST_SECS);
            self.tokens = self.tokens.saturating_add(earned).min(cap);
            // Keep the remainder: time that earned nothing is not lost.
            let used = Duration::from_micros(earned.saturating_mul(1_000_000) / rate);
            self.refilled += used;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_spent_once_and_then_everything_is_dropped() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(
            LogLimits {
                budget_bytes: 100,
                bytes_per_sec: 0,
            },
            0,
            t0,
        );
        assert_eq!(b.admit(60, t0), Admit::Pass);
        assert_eq!(b.admit(30, t0), Admit::Pass);
        assert_eq!(b.admit(20, t0), Admit::Exhausted { first: true });
        // Even a line that would have fit: the budget is over.
        assert_eq!(b.admit(5, t0), Admit::Exhausted { first: false });
        assert_eq!(b.dropped_over_budget, 25);
    }

    #[test]
    fn the_rate_drops_lines_until_the_bucket_refills() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(
            LogLimits {
                budget_bytes: 0,
                bytes_per_sec: 100,
            },
            0,
            t0,
        );
        // A burst of BURST_SECS seconds passes, then nothing.
        assert_eq!(b.admit(400, t0), Admit::Pass);
        assert_eq!(b.admit(1, t0), Admit::OverRate);
        assert_eq!(b.dropped_over_rate, 1);
        // Half a second earns 50 bytes.
        let later = t0 + Duration::from_millis(500);
        assert_eq!(b.admit(60, later), Admit::OverRate);
        assert_eq!(b.admit(50, later), Admit::Pass);
        // A long pause refills no more than the burst.
        let much_later = t0 + Duration::from_secs(3600);
        assert_eq!(b.admit(400, much_later), Admit::Pass);
        assert_eq!(b.admit(1, much_later), Admit::OverRate);
    }

    #[test]
    fn what_earlier_attempts_spent_counts_against_the_jobs_budget() {
        let t0 = Instant::now();
        let limits = LogLimits {
            budget_bytes: 100,
            bytes_per_sec: 0,
        };
        let mut b = LogBudget::new(limits, 90, t0);
        assert_eq!(b.admit(10, t0), Admit::Pass);
        assert_eq!(b.spent(), 100);
        assert_eq!(b.admit(1, t0), Admit::Exhausted { first: true });
        // An attempt that starts with the budget spent passes nothing.
        let mut spent = LogBudget::new(limits, 100, t0);
        assert_eq!(spent.admit(1, t0), Admit::Exhausted { first: true });
        // Nor does one past it (a crash between renewals undercounts,
        // never a limit lowered: it is still spent).
        let mut over = LogBudget::new(limits, 5_000, t0);
        assert_eq!(over.admit(1, t0), Admit::Exhausted { first: true });
    }

    #[test]
    fn no_limits_pass_everything() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(LogLimits::default(), 0, t0);
        for _ in 0..1000 {
            assert_eq!(b.admit(1 << 20, t0), Admit::Pass);
        }
    }
}
