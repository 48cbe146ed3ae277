//! Per-tenant quotas (`[quotas]`): decided from the tenant's records
//! without doing anything ([`admit`], [`to_start`]), carried out by the
//! submit path and [`crate::effects::Effects::start_held`].
//!
//! - **Queued jobs**: a tenant with `max_queued_jobs` jobs `QUEUED` (held
//!   or started) has its next submission refused with RESOURCE_EXHAUSTED.
//! - **Running jobs**: a tenant with `max_running_jobs` jobs running (first
//!   task published, not final) has its next job stored `QUEUED` with a
//!   [`JobRecord::quota_hold`] and no task. When one of the tenant's jobs
//!   ends (any final state, by any path that runs its final state effect)
//!   and on every reconciler pass, its oldest held jobs are started, as
//!   many as it has running slots free: the hold is cleared by CAS, then
//!   the prepare task published.
//!
//! Counting reads every record of the tenant (its keys in `ty_jobs`), so a
//! submission costs one read per job the tenant keeps (finished ones
//! until their TTL). Coordinator replicas count apart: two replicas
//! starting jobs for one tenant at the same moment may pass the running
//! quota by one each; a CAS makes sure each held job starts once.

use trainyard_core::config::Quota;
use trainyard_proto::v1::{JobRecord, JobState};

/// What a submission gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Stored and its first task published.
    Start,
    /// Stored `QUEUED` without a task: the reason.
    Hold(String),
    /// Refused: the reason.
    Refuse(String),
}

/// A record that waits for a running slot.
pub fn is_held(record: &JobRecord) -> bool {
    !record.quota_hold.is_empty() && !record.state().is_final()
}

/// A record that holds one of its tenant's running slots.
pub fn is_running(record: &JobRecord) -> bool {
    !record.state().is_final() && record.quota_hold.is_empty()
}

/// The admission of a new job of a tenant with `records` under `quota`.
pub fn admit(records: &[JobRecord], quota: Quota) -> Admission {
    let queued = records
        .iter()
        .filter(|r| r.state() == JobState::Queued)
        .count();
    if let Some(max) = quota.max_queued_jobs
        && queued >= max as usize
    {
        return Admission::Refuse(format!(
            "the tenant has {queued} queued jobs, its quota is {max} (quotas.max_queued_jobs)"
        ));
    }
    let running = records.iter().filter(|r| is_running(r)).count();
    match quota.max_running_jobs {
        Some(max) if running >= max as usize => Admission::Hold(format!(
            "waiting for a running slot: the tenant runs {running} jobs, its quota is {max} (quotas.max_running_jobs)"
        )),
        _ => Admission::Start,
    }
}

/// The held jobs to start now, oldest first: as many as the tenant has
/// running slots free.
pub fn to_start(records: &[JobRecord], quota: Quota) -> Vec<&JobRecord> {
    let running = records.iter().filter(|r| is_running(r)).count();
    let free = match quota.max_running_jobs {
        Some(max) => (max as usize).saturating_sub(running),
        None => usize::MAX,
    };
    let mut held: Vec<&JobRecord> = records.iter().filter(|r| is_held(r)).collect();
    held.sort_by_key(|r| (r.created_at_ms, r.job_id.clone()));
    held.truncate(free);
    held
}

/// The record of a held job once started (its hold cleared); `None` when
/// it is not held any more (another replica started it, or it ended).
pub fn started(record: &JobRecord, now_ms: i64) -> Option<JobRecord> {
    if !is_held(record) || record.state() != JobState::Queued {
        return None;
    }
    let mut next = record.clone();
    next.quota_hold.clear();
    next.updated_at_ms = now_ms;
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: i64, state: JobState, held: bool) -> JobRecord {
        JobRecord {
            job_id: format!("j-{n}"),
            tenant: "acme".into(),
            state: state as i32,
            created_at_ms: n,
            quota_hold: if held { "quota".into() } else { String::new() },
            ..Default::default()
        }
    }

    fn quota(queued: u32, running: u32) -> Quota {
        Quota {
            max_queued_jobs: (queued > 0).then_some(queued),
            max_running_jobs: (running > 0).then_some(running),
        }
    }

    #[test]
    fn admission_table() {
        use JobState::*;
        let rows: Vec<(&str, Vec<JobRecord>, Quota, &str)> = vec![
            ("no jobs", vec![], quota(2, 1), "start"),
            (
                "no limits",
                vec![job(1, Training, false); 5],
                quota(0, 0),
                "start",
            ),
            (
                "at the running quota: held",
                vec![job(1, Training, false)],
                quota(5, 1),
                "hold",
            ),
            (
                "finished jobs hold no slot",
                vec![job(1, Succeeded, false), job(2, Failed, false)],
                quota(5, 1),
                "start",
            ),
            (
                "held jobs hold no running slot",
                vec![job(1, Queued, true)],
                quota(5, 1),
                "start",
            ),
            (
                "at the queued quota (held ones count): refused",
                vec![job(1, Queued, false), job(2, Queued, true)],
                quota(2, 5),
                "refuse",
            ),
            (
                "running jobs past QUEUED do not count as queued",
                vec![job(1, Training, false), job(2, Preparing, false)],
                quota(2, 5),
                "start",
            ),
        ];
        for (row, records, quota, want) in rows {
            let got = match admit(&records, quota) {
                Admission::Start => "start",
                Admission::Hold(_) => "hold",
                Admission::Refuse(_) => "refuse",
            };
            assert_eq!(got, want, "{row}");
        }
    }

    #[test]
    fn the_oldest_held_jobs_start_as_slots_free() {
        use JobState::*;
        let records = vec![
            job(5, Queued, true),
            job(3, Queued, true),
            job(1, Training, false),
            job(4, Queued, true),
            job(2, Cancelled, true),
        ];
        let ids = |q| {
            to_start(&records, q)
                .iter()
                .map(|r| r.job_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(quota(0, 1)), Vec::<String>::new());
        assert_eq!(ids(quota(0, 3)), ["j-3", "j-4"]);
        assert_eq!(ids(quota(0, 0)), ["j-3", "j-4", "j-5"]);
        let held = job(3, Queued, true);
        let next = started(&held, 9).unwrap();
        assert!(next.quota_hold.is_empty());
        assert_eq!(started(&next, 10), None, "started once");
        assert_eq!(started(&job(2, Cancelled, true), 10), None);
    }
}
