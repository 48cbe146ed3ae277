//! The autoscaler's metrics (`ty-autoscaler`): its decisions, and each
//! pool's machines and what they cost.

use super::{Kind, MetricDef, Metrics};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Meter};

def!(
    DECISIONS,
    "trainyard_autoscaler_decisions_total",
    "trainyard.autoscaler.decisions",
    "{decision}",
    Counter,
    ["pool", "reason"],
    "Autoscaler decisions recorded (a change of want, machines or reason), by pool and reason."
);
def!(
    MACHINES,
    "trainyard_autoscaler_machines",
    "trainyard.autoscaler.machines",
    "{machine}",
    Gauge,
    ["pool", "state"],
    "A pool's machines by activity (starting, idle, busy, draining, exited)."
);
def!(
    DOLLARS,
    "trainyard_autoscaler_dollars_per_hour",
    "trainyard.autoscaler.dollars_per_hour",
    "{USD/h}",
    Gauge,
    ["pool"],
    "What a pool's live machines cost, in dollars an hour."
);

/// The autoscaler's instruments.
pub(super) struct Instruments {
    decisions: Counter<u64>,
    machines: Gauge<f64>,
    dollars: Gauge<f64>,
}

impl Instruments {
    pub(super) fn new(meter: &Meter) -> Self {
        let gauge = |d: MetricDef| {
            meter
                .f64_gauge(d.otel_name)
                .with_unit(d.unit)
                .with_description(d.help)
                .build()
        };
        Self {
            decisions: meter
                .u64_counter(DECISIONS.otel_name)
                .with_unit(DECISIONS.unit)
                .with_description(DECISIONS.help)
                .build(),
            machines: gauge(MACHINES),
            dollars: gauge(DOLLARS),
        }
    }
}

impl Metrics {
    /// One decision recorded for `pool`.
    pub fn autoscaler_decision(&self, pool: &str, reason: &str) {
        self.autoscaler.decisions.add(
            1,
            &[
                KeyValue::new("pool", pool.to_string()),
                KeyValue::new("reason", reason.to_string()),
            ],
        );
    }

    /// `pool`'s machines in `state` now.
    pub fn autoscaler_machines(&self, pool: &str, state: &'static str, count: u64) {
        self.autoscaler.machines.record(
            count as f64,
            &[
                KeyValue::new("pool", pool.to_string()),
                KeyValue::new("state", state),
            ],
        );
    }

    /// What `pool`'s live machines cost now.
    pub fn autoscaler_dollars(&self, pool: &str, dollars_per_hour: f64) {
        self.autoscaler
            .dollars
            .record(dollars_per_hour, &[KeyValue::new("pool", pool.to_string())]);
    }
}
