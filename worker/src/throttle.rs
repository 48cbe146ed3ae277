//! Which parsed training metrics go out as `metric` job events: every
//! value is offered, and a metric is sent at most once per step and at
//! most `per_second` times a second; a value offered while its metric must
//! wait replaces the one waiting (the latest wins) and goes out when the
//! metric may send again, or at [`MetricThrottle::flush`] when the run
//! ends. A fast trainer thus costs a few events a second per metric, and
//! the series still ends on the run's last value.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One metric's sending state.
#[derive(Default)]
struct Series {
    sent_step: Option<u32>,
    sent_at: Option<Instant>,
    waiting: Option<(f64, u32)>,
}

pub struct MetricThrottle {
    gap: Duration,
    series: BTreeMap<String, Series>,
}

/// A metric event to send: name, value, step.
pub type Due = (String, f64, u32);

impl MetricThrottle {
    /// At most `per_second` events of each metric a second; 0 means no
    /// rate limit (still one per step).
    pub fn new(per_second: u32) -> Self {
        let gap = match per_second {
            0 => Duration::ZERO,
            n => Duration::from_secs(1) / n,
        };
        Self {
            gap,
            series: BTreeMap::new(),
        }
    }

    /// Offers a parsed value; a value of a step already sent is dropped.
    pub fn offer(&mut self, name: &str, value: f64, step: u32) {
        let series = self.series.entry(name.to_string()).or_default();
        if series.sent_step == Some(step) {
            return;
        }
        series.waiting = Some((value, step));
    }

    /// The waiting values that may go out at `now`, marked as sent.
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        let gap = self.gap;
        self.take(
            |series| {
                series
                    .sent_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= gap)
            },
            now,
        )
    }

    /// Every waiting value, whatever the rate: the run has ended.
    pub fn flush(&mut self, now: Instant) -> Vec<Due> {
        self.take(|_| true, now)
    }

    fn take(&mut self, may: impl Fn(&Series) -> bool, now: Instant) -> Vec<Due> {
        let mut out = Vec::new();
        for (name, series) in &mut self.series {
            if series.waiting.is_some() && may(series) {
                let (value, step) = series.waiting.take().expect("checked");
                series.sent_step = Some(step);
                series.sent_at = Some(now);
                out.push((name.clone(), value, step));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_metric_per_step_and_per_gap_the_latest_wins() {
        let mut t = MetricThrottle::new(2);
        let t0 = Instant::now();
        t.offer("loss", 1.0, 1);
        t.offer("learning_rate", 0.1, 1);
        assert_eq!(
            t.due(t0),
            [
                ("learning_rate".to_string(), 0.1, 1),
                ("loss".to_string(), 1.0, 1)
            ]
        );
        // The same step again: already sent, dropped.
        t.offer("loss", 0.9, 1);
        assert!(t.due(t0 + Duration::from_secs(5)).is_empty());
        // Within the gap the latest value waits, replacing older ones.
        t.offer("loss", 0.8, 2);
        t.offer("loss", 0.7, 3);
        assert!(t.due(t0 + Duration::from_millis(100)).is_empty());
        assert_eq!(
            t.due(t0 + Duration::from_millis(500)),
            [("loss".to_string(), 0.7, 3)]
        );
        // The end of the run sends what waits, whatever the rate.
        t.offer("loss", 0.6, 4);
        assert!(t.due(t0 + Duration::from_millis(600)).is_empty());
        assert_eq!(
            t.flush(t0 + Duration::from_millis(600)),
            [("loss".to_string(), 0.6, 4)]
        );
        assert!(t.flush(t0 + Duration::from_secs(9)).is_empty());
    }

    #[test]
    fn without_a_rate_every_step_goes_out() {
        let mut t = MetricThrottle::new(0);
        let now = Instant::now();
        for step in 1..=5 {
            t.offer("loss", f64::from(step), step);
            assert_eq!(t.due(now), [("loss".to_string(), f64::from(step), step)]);
        }
    }
}
