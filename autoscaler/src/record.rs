//! What the autoscaler decided, for people: each pool's entry in the
//! `ty_fleet` bucket (its machines now and its last decisions, read by
//! `yard fleet`), a tracing event per decision with its inputs, and the
//! autoscaler's metrics.

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

use crate::plan::{Activity, Backlog, Decision, MachineView};
use crate::provider::Machine;
use trainyard_core::registry::Entry;

/// Decisions kept per pool.
pub const KEPT_DECISIONS: usize = 50;

/// One decision, as stored and logged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub at_ms: i64,
    pub pending: u64,
    pub ack_pending: u64,
    pub work_secs: f64,
    pub live: u32,
    pub busy: u32,
    pub wanted: u32,
    pub launch: Vec<String>,
    pub release: Vec<String>,
    pub drain: Vec<String>,
    /// The planner's reason, or `no_data` when the backlog could not be read.
    pub reason: String,
    /// What went wrong (no data, a provider error), if anything.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl DecisionRecord {
    /// The record of a planner decision.
    pub fn of(
        now_ms: i64,
        backlog: &Backlog,
        machines: &[MachineView],
        decision: &Decision,
        launched: Vec<String>,
    ) -> Self {
        Self {
            at_ms: now_ms,
            pending: backlog.pending,
            ack_pending: backlog.ack_pending,
            work_secs: backlog.work_secs,
            live: decision.live,
            busy: machines
                .iter()
                .filter(|m| m.activity == Activity::Busy)
                .count() as u32,
            wanted: decision.wanted,
            launch: launched,
            release: decision.release.clone(),
            drain: decision.drain.clone(),
            reason: decision.reason.as_str().to_string(),
            error: String::new(),
        }
    }

    /// Whether it says something the previous one did not (its time aside).
    pub fn news_after(&self, previous: Option<&DecisionRecord>) -> bool {
        let Some(previous) = previous else {
            return true;
        };
        !self.launch.is_empty()
            || !self.release.is_empty()
            || !self.drain.is_empty()
            || self.reason != previous.reason
            || self.wanted != previous.wanted
            || self.live != previous.live
            || self.error != previous.error
    }
}

/// One machine in a pool's entry. The fields after `dollars_per_hour`
/// came later: a record written before them reads them as empty.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub name: String,
    /// `starting`, `idle`, `busy`, `draining`, `exited`.
    pub activity: String,
    pub since_ms: i64,
    pub dollars_per_hour: f64,
    /// Its GPU type as its provider names it (empty: none or unknown).
    #[serde(default)]
    pub gpu_type: String,
    /// GPUs of that type (0: unknown).
    #[serde(default)]
    pub gpu_count: u32,
    /// A spot machine, which its provider may take back.
    #[serde(default)]
    pub interruptible: bool,
    /// The host or data centre it runs on, when its provider says.
    #[serde(default)]
    pub host: String,
    /// The jobs whose tasks its service runs now (its registry entry's).
    #[serde(default)]
    pub jobs: Vec<String>,
}

impl MachineRecord {
    /// The record of `machine` doing what `view` says, with its service's
    /// registry `entry` if any; `gpu_count` is its pool's (machines are
    /// started with it).
    pub fn of(
        machine: &Machine,
        view: &MachineView,
        entry: Option<&Entry>,
        gpu_count: u32,
    ) -> Self {
        Self {
            name: machine.name.clone(),
            activity: activity_name(view.activity).into(),
            since_ms: view.since_ms,
            dollars_per_hour: machine.dollars_per_hour,
            gpu_type: machine.gpu_type.clone(),
            gpu_count: if machine.gpu_type.is_empty() {
                0
            } else {
                gpu_count
            },
            interruptible: machine.interruptible,
            host: machine.host.clone(),
            jobs: match view.activity {
                Activity::Busy | Activity::Draining => {
                    entry.map(|e| e.jobs.clone()).unwrap_or_default()
                }
                _ => Vec::new(),
            },
        }
    }

    /// Whether it says something `other` does not, the clock aside (a
    /// busy machine's `since_ms` follows its heartbeat).
    pub fn differs(&self, other: &MachineRecord) -> bool {
        let a = Self {
            since_ms: 0,
            ..self.clone()
        };
        let b = Self {
            since_ms: 0,
            ..other.clone()
        };
        a != b
    }
}

/// Whether two lists of machines differ, the clock aside.
pub fn machines_differ(a: &[MachineRecord], b: &[MachineRecord]) -> bool {
    a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.differs(y))
}

/// A pool's entry in `ty_fleet`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub pool: String,
    pub updated_at_ms: i64,
    pub machines: Vec<MachineRecord>,
    /// Oldest first.
    pub decisions: VecDeque<DecisionRecord>,
}

/// An activity's name.
pub fn activity_name(activity: Activity) -> &'static str {
    match activity {
        Activity::Starting => "starting",
        Activity::Idle => "idle",
        Activity::Busy => "busy",
        Activity::Draining => "draining",
        Activity::Exited => "exited",
    }
}

impl PoolRecord {
    /// Adds a decision (dropping the oldest past [`KEPT_DECISIONS`]) and
    /// sets the machines.
    pub fn push(&mut self, decision: DecisionRecord, machines: Vec<MachineRecord>) {
        self.updated_at_ms = decision.at_ms;
        self.machines = machines;
        self.decisions.push_back(decision);
        while self.decisions.len() > KEPT_DECISIONS {
            self.decisions.pop_front();
        }
    }
}

/// The key of a pool's entry.
pub fn fleet_key(pool: &str) -> String {
    pool.to_string()
}

/// Reads a pool's entry (empty when none or unreadable).
pub async fn read_pool(kv: &kv::Store, pool: &str) -> PoolRecord {
    match kv.get(fleet_key(pool)).await {
        Ok(Some(value)) => serde_json::from_slice(&value).unwrap_or_default(),
        _ => PoolRecord {
            pool: pool.to_string(),
            ..Default::default()
        },
    }
}

/// Writes a pool's entry; a failure is logged (the record is a view).
pub async fn write_pool(kv: &kv::Store, record: &PoolRecord) {
    let result = match serde_json::to_vec(record) {
        Ok(json) => kv
            .put(fleet_key(&record.pool), json.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(error) = result {
        tracing::warn!(pool = %record.pool, %error, "cannot write the pool's fleet record");
    }
}

/// The tracing event of a decision, with its inputs.
pub fn trace(pool: &str, d: &DecisionRecord) {
    let span = tracing::info_span!(
        "autoscaler.decision",
        pool,
        pending = d.pending,
        ack_pending = d.ack_pending,
        work_secs = d.work_secs,
        live = d.live,
        busy = d.busy,
        wanted = d.wanted,
        launch = ?d.launch,
        release = ?d.release,
        drain = ?d.drain,
        reason = %d.reason,
    );
    let _entered = span.enter();
    if d.error.is_empty() {
        tracing::info!("decision");
    } else {
        tracing::warn!(error = %d.error, "decision");
    }
}

/// The decision's metrics: decisions by reason, machines by activity.
pub fn count(pool: &str, d: &DecisionRecord, machines: &[MachineView]) {
    let m = trainyard_core::telemetry::metrics();
    m.autoscaler_decision(pool, &d.reason);
    for activity in [
        Activity::Starting,
        Activity::Idle,
        Activity::Busy,
        Activity::Draining,
        Activity::Exited,
    ] {
        let n = machines.iter().filter(|v| v.activity == activity).count();
        m.autoscaler_machines(pool, activity_name(activity), n as u64);
    }
    let dollars: f64 = machines
        .iter()
        .filter(|v| v.activity != Activity::Exited)
        .map(|v| v.dollars_per_hour)
        .sum();
    m.autoscaler_dollars(pool, dollars);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reason: &str, launch: &[&str]) -> DecisionRecord {
        DecisionRecord {
            at_ms: 1,
            pending: 0,
            ack_pending: 0,
            work_secs: 0.0,
            live: 1,
            busy: 0,
            wanted: 1,
            launch: launch.iter().map(|s| s.to_string()).collect(),
            release: vec![],
            drain: vec![],
            reason: reason.into(),
            error: String::new(),
        }
    }

    #[test]
    fn only_news_is_recorded_and_the_log_is_bounded() {
        let steady = record("steady", &[]);
        assert!(steady.news_after(None));
        assert!(!record("steady", &[]).news_after(Some(&steady)));
        assert!(record("hold_down", &[]).news_after(Some(&steady)));
        assert!(record("steady", &["m"]).news_after(Some(&steady)));
        let mut pool = PoolRecord::default();
        for _ in 0..KEPT_DECISIONS + 5 {
            pool.push(steady.clone(), vec![]);
        }
        assert_eq!(pool.decisions.len(), KEPT_DECISIONS);
    }

    #[test]
    fn a_machine_record_says_what_it_runs_and_reads_from_before() {
        let machine = Machine {
            id: "pod1".into(),
            name: "yard-train-flux-0".into(),
            pool: "train.flux".into(),
            gpu_type: "NVIDIA A100 80GB PCIe".into(),
            dollars_per_hour: 1.64,
            interruptible: true,
            state: crate::provider::MachineState::Running,
            created_at_ms: 1,
            host: "EU-RO-1".into(),
        };
        let entry = Entry {
            worker_id: machine.name.clone(),
            stage: "train".into(),
            pool: "flux".into(),
            slots: 1,
            busy_slots: 1,
            idle_since: 0,
            draining: false,
            started_at: 1,
            updated_at: 2,
            jobs: vec!["job-1".into()],
        };
        let busy = MachineView {
            name: machine.name.clone(),
            activity: Activity::Busy,
            since_ms: 2,
            dollars_per_hour: 1.64,
        };
        let record = MachineRecord::of(&machine, &busy, Some(&entry), 2);
        assert_eq!(
            (
                record.gpu_type.as_str(),
                record.gpu_count,
                record.interruptible,
                record.host.as_str(),
                record.jobs.as_slice()
            ),
            (
                "NVIDIA A100 80GB PCIe",
                2,
                true,
                "EU-RO-1",
                &["job-1".to_string()][..]
            )
        );
        let idle = MachineView {
            activity: Activity::Idle,
            ..busy
        };
        let was_idle = MachineRecord::of(&machine, &idle, Some(&entry), 2);
        assert!(was_idle.jobs.is_empty(), "an idle machine runs no job");
        assert!(record.differs(&was_idle));
        let later = MachineRecord {
            since_ms: 99,
            ..record.clone()
        };
        assert!(!machines_differ(std::slice::from_ref(&record), &[later]));
        let cpu = Machine {
            gpu_type: String::new(),
            ..machine
        };
        assert_eq!(MachineRecord::of(&cpu, &idle, None, 1).gpu_count, 0);
        let old = r#"{"name":"m","activity":"idle","since_ms":1,"dollars_per_hour":0.5}"#;
        let old: MachineRecord = serde_json::from_str(old).expect("a record from before");
        assert_eq!((old.gpu_count, old.jobs.len()), (0, 0));
    }
}
