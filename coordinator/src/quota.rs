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
//! - **Running tasks per stage and pool** (`[quotas.max_running_tasks]`):
//!   a tenant with its quota of tasks out in a stage (for training: in
//!   the job's pool) has its next job enter that stage without a task: the
//!   record moves on (its state event is sent) and carries a
//!   [`JobRecord::quota_hold`] saying which slot it waits for
//!   ([`hold_at_stage`]); a job held this way at training has no
//!   `training_at_ms` until its task goes out, so waiting spends no GPU
//!   time. At submission, a full prepare stage holds the job `QUEUED` like
//!   the running quota. When one of the tenant's jobs leaves a stage (its
//!   next stage starts, or it ends) and on every reconciler pass, its
//!   oldest held jobs whose slot has room get their task.
//! - **GPU-hours per day**: a tenant whose jobs trained
//!   `max_gpu_hours_per_day` or more in the last 24 hours ([`gpu_hours`])
//!   has its next job held `QUEUED` the same way; held jobs start only
//!   when the rolling window has room again (the reconciler's pass checks).
//!   A job trains on one worker, so its GPU time is its train stage's wall
//!   time: from `times.training_at_ms` to `delivering_at_ms` (or
//!   `finished_at_ms` when it ended in training; now while it trains).
//!   A budget is checked before a job starts, not while it trains: the
//!   last job may pass it by its own length.
//!
//! - **Caption review**: a job in `AWAITING_REVIEW` counts for none of
//!   these. It has no task (no stage or pool slot), spends no GPU time (its
//!   `training_at_ms` is set only on approval) and is not a running job, so
//!   a job nobody reviews never keeps its tenant's other jobs waiting.
//!   Approval ([`approve`]) needs a running slot: a tenant running its
//!   `max_running_jobs` has the approval refused (RESOURCE_EXHAUSTED, with
//!   the reason; the job keeps waiting and is approved again later), so
//!   reviews never let a tenant run more jobs than its quota. The approved
//!   job enters training like any prepared job, held at its pool's task
//!   quota ([`hold_at_stage`]) when that is full.
//!
//! Counting reads every record of the tenant (its keys in `ty_jobs`), so a
//! submission costs one read per job the tenant keeps (finished ones
//! until their TTL). Coordinator replicas count apart: two replicas
//! starting jobs for one tenant at the same moment may pass the running
//! quota by one each; a CAS makes sure each held job starts once.

use crate::job::Effect;
use trainyard_core::config::{Quota, TaskSlot};
use trainyard_proto::v1::{JobRecord, JobState, Stage};

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

/// A record that waits for a slot: a running one, or a stage's.
pub fn is_held(record: &JobRecord) -> bool {
    !record.quota_hold.is_empty() && !record.state().is_final()
}

/// A record held before its first task: it holds no running slot.
fn held_at_admission(record: &JobRecord) -> bool {
    is_held(record) && record.stage() == Stage::Prepare
}

/// A record that holds one of its tenant's running slots: started, not
/// final, not awaiting caption review (a job held at a later stage keeps
/// its slot).
pub fn is_running(record: &JobRecord) -> bool {
    !record.state().is_final()
        && record.state() != JobState::AwaitingReview
        && !held_at_admission(record)
}

/// Why the approval of `job` (awaiting review) must wait, if it must: its
/// tenant, with `records`, runs its `max_running_jobs` already.
pub fn approve(records: &[JobRecord], quota: &Quota, job: &str) -> Option<String> {
    let max = quota.max_running_jobs?;
    let running = records
        .iter()
        .filter(|r| r.job_id != job && is_running(r))
        .count();
    (running >= max as usize).then(|| {
        format!(
            "the tenant runs {running} jobs, its quota is {max} (quotas.max_running_jobs); approve again when one ends"
        )
    })
}

/// The pool a job trains in.
pub fn pool_of(record: &JobRecord) -> String {
    record
        .spec
        .as_ref()
        .map(|s| s.pool.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("default")
        .to_string()
}

/// The slot the task of a record's current stage runs in.
pub fn slot_of(record: &JobRecord) -> Option<TaskSlot> {
    match record.stage() {
        Stage::Prepare => Some(TaskSlot::Prepare),
        Stage::Train => Some(TaskSlot::Train(pool_of(record))),
        Stage::Deliver => Some(TaskSlot::Deliver),
        Stage::Unspecified => None,
    }
}

/// Whether a record's task is out in `slot` (published, not held, not
/// awaiting review).
fn occupies(record: &JobRecord, slot: &TaskSlot) -> bool {
    !record.state().is_final()
        && record.state() != JobState::AwaitingReview
        && record.quota_hold.is_empty()
        && slot_of(record).as_ref() == Some(slot)
}

/// Why `slot` has no room for one more task of the tenant with
/// `records`, if it has none; the job `except` is not counted.
fn slot_full(
    records: &[JobRecord],
    quota: &Quota,
    slot: &TaskSlot,
    except: &str,
) -> Option<String> {
    let max = quota.max_running_tasks.limit(slot)?;
    let out = records
        .iter()
        .filter(|r| r.job_id != except && occupies(r, slot))
        .count();
    (out >= max as usize).then(|| {
        format!(
            "waiting for a task slot ({slot}): the tenant has {out} tasks there, its quota is {max} ({})",
            quota.max_running_tasks.key(slot)
        )
    })
}

/// Holds `next`, a record just moved into a new stage by a result,
/// when its tenant (with `records`) has that stage's quota of tasks out:
/// its hold set, its task's publish dropped from `effects`, and (at
/// training) no `training_at_ms` until the task goes out. Returns whether
/// it did.
pub fn hold_at_stage(
    records: &[JobRecord],
    quota: &Quota,
    next: &mut JobRecord,
    effects: &mut Vec<Effect>,
) -> bool {
    if next.state().is_final() || next.state() == JobState::AwaitingReview {
        return false;
    }
    let Some(reason) =
        slot_of(next).and_then(|slot| slot_full(records, quota, &slot, &next.job_id))
    else {
        return false;
    };
    next.quota_hold = reason;
    if next.stage() == Stage::Train
        && let Some(times) = next.times.as_mut()
    {
        times.training_at_ms = 0;
    }
    effects.retain(|e| !matches!(e, Effect::Publish(_)));
    true
}

/// A day, the window of `max_gpu_hours_per_day`.
pub const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// The GPU-hours `records` trained in the 24 hours up to `now_ms`: each
/// train stage's span, cut to the window.
pub fn gpu_hours(records: &[JobRecord], now_ms: i64) -> f64 {
    let since = now_ms - DAY_MS;
    let ms: i64 = records
        .iter()
        .filter_map(|r| {
            let times = r.times.as_ref()?;
            let start = times.training_at_ms;
            if start <= 0 {
                return None;
            }
            let end = [times.delivering_at_ms, times.finished_at_ms]
                .into_iter()
                .find(|t| *t >= start)
                .unwrap_or(if r.state().is_final() { start } else { now_ms });
            Some((end.min(now_ms) - start.max(since)).max(0))
        })
        .sum();
    ms as f64 / 3_600_000.0
}

/// Why `quota`'s GPU budget holds the tenant's next job, if it does.
fn gpu_budget_spent(records: &[JobRecord], quota: &Quota, now_ms: i64) -> Option<String> {
    let max = quota.max_gpu_hours_per_day?;
    let used = gpu_hours(records, now_ms);
    (used >= max).then(|| {
        format!(
            "GPU budget spent: {used:.4} of {max} GPU-hours in the last 24 h (quotas.max_gpu_hours_per_day)"
        )
    })
}

/// The admission of a new job of a tenant with `records` under `quota`
/// at `now_ms`.
pub fn admit(records: &[JobRecord], quota: &Quota, now_ms: i64) -> Admission {
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
        _ => match slot_full(records, quota, &TaskSlot::Prepare, "")
            .or_else(|| gpu_budget_spent(records, quota, now_ms))
        {
            Some(reason) => Admission::Hold(reason),
            None => Admission::Start,
        },
    }
}

/// The held jobs whose task may go out at `now_ms`, oldest first. A job
/// held before its first task needs a running slot, room in the prepare
/// stage and GPU budget left; one held at a later stage only room in its
/// stage (for training, in its pool). A job whose slot is full does not
/// keep a later one waiting for another slot.
pub fn to_start<'a>(records: &'a [JobRecord], quota: &Quota, now_ms: i64) -> Vec<&'a JobRecord> {
    let budget_spent = gpu_budget_spent(records, quota, now_ms).is_some();
    let mut running = records.iter().filter(|r| is_running(r)).count();
    let mut out_in: std::collections::HashMap<TaskSlot, usize> = Default::default();
    for slot in records
        .iter()
        .filter(|r| {
            !r.state().is_final()
                && r.state() != JobState::AwaitingReview
                && r.quota_hold.is_empty()
        })
        .filter_map(slot_of)
    {
        *out_in.entry(slot).or_default() += 1;
    }
    let mut held: Vec<&JobRecord> = records.iter().filter(|r| is_held(r)).collect();
    held.sort_by_key(|r| (r.created_at_ms, r.job_id.clone()));
    let mut start = Vec::new();
    for record in held {
        let Some(slot) = slot_of(record) else {
            continue;
        };
        let first_task = held_at_admission(record);
        if first_task
            && (budget_spent
                || quota
                    .max_running_jobs
                    .is_some_and(|max| running >= max as usize))
        {
            continue;
        }
        let out = out_in.entry(slot.clone()).or_default();
        if quota
            .max_running_tasks
            .limit(&slot)
            .is_some_and(|max| *out >= max as usize)
        {
            continue;
        }
        *out += 1;
        if first_task {
            running += 1;
        }
        start.push(record);
    }
    start
}

/// The record of a held job once its task may go out (its hold cleared;
/// at training, its GPU time starts now); `None` when it is not held any
/// more (another replica started it, or it ended).
pub fn started(record: &JobRecord, now_ms: i64) -> Option<JobRecord> {
    if !is_held(record) {
        return None;
    }
    let mut next = record.clone();
    next.quota_hold.clear();
    next.updated_at_ms = now_ms;
    if next.stage() == Stage::Train {
        next.times.get_or_insert_default().training_at_ms = now_ms;
    }
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: i64, state: JobState, held: bool) -> JobRecord {
        let stage = match state {
            JobState::Queued | JobState::Preparing | JobState::AwaitingReview => Stage::Prepare,
            JobState::Delivering | JobState::Succeeded => Stage::Deliver,
            _ => Stage::Train,
        };
        JobRecord {
            job_id: format!("j-{n}"),
            tenant: "acme".into(),
            state: state as i32,
            stage: stage as i32,
            created_at_ms: n,
            quota_hold: if held { "quota".into() } else { String::new() },
            ..Default::default()
        }
    }

    fn quota(queued: u32, running: u32) -> Quota {
        Quota {
            max_queued_jobs: (queued > 0).then_some(queued),
            max_running_jobs: (running > 0).then_some(running),
            max_gpu_hours_per_day: None,
            max_running_tasks: Default::default(),
        }
    }

    fn gpu(hours: f64) -> Quota {
        Quota {
            max_gpu_hours_per_day: Some(hours),
            ..quota(0, 0)
        }
    }

    const H: i64 = 3_600_000;

    /// A job that trained from `start` to `end` hours (0: still training).
    fn trained(n: i64, state: JobState, start: i64, end: i64) -> JobRecord {
        let mut record = job(n, state, false);
        record.times = Some(trainyard_proto::v1::StageTimes {
            training_at_ms: start * H,
            delivering_at_ms: if state == JobState::Failed {
                0
            } else {
                end * H
            },
            finished_at_ms: if state.is_final() { end * H } else { 0 },
            ..Default::default()
        });
        record
    }

    /// A job awaiting caption review holds no running slot, no task slot
    /// and no GPU time; its approval needs a running slot.
    #[test]
    fn a_job_in_review_counts_for_no_quota_until_approved() {
        use JobState::*;
        let waiting = job(1, AwaitingReview, false);
        assert!(!is_running(&waiting));
        let running_one = quota(0, 1);
        // Another job of the tenant starts beside it (running quota 1)…
        assert_eq!(
            admit(std::slice::from_ref(&waiting), &running_one, 0),
            Admission::Start
        );
        // …and in the prepare stage (task quota 1).
        assert_eq!(
            admit(std::slice::from_ref(&waiting), &tasks(1, 1, &[]), 0),
            Admission::Start
        );
        let held = job(2, Queued, true);
        assert_eq!(
            to_start(&[waiting.clone(), held.clone()], &running_one, 0).len(),
            1,
            "a held job starts though one waits for review"
        );
        assert_eq!(gpu_hours(std::slice::from_ref(&waiting), 10 * H), 0.0);
        // Approval: refused while the other job runs, fine once it ended.
        let other = job(2, Training, false);
        let refused = approve(&[waiting.clone(), other.clone()], &running_one, "j-1");
        assert!(
            refused
                .as_deref()
                .is_some_and(|r| r.contains("max_running_jobs")),
            "{refused:?}"
        );
        let ended = job(2, Succeeded, false);
        assert_eq!(
            approve(&[waiting.clone(), ended], &running_one, "j-1"),
            None
        );
        assert_eq!(approve(&[waiting, other], &quota(0, 0), "j-1"), None);
    }

    #[test]
    fn gpu_hours_table() {
        use JobState::*;
        let now = 100 * H;
        let rows: Vec<(&str, Vec<JobRecord>, f64)> = vec![
            ("no jobs", vec![], 0.0),
            ("never trained", vec![job(1, Queued, false)], 0.0),
            ("trained 2 h", vec![trained(1, Succeeded, 90, 92)], 2.0),
            ("failed in training", vec![trained(1, Failed, 95, 96)], 1.0),
            (
                "delivering since 99",
                vec![trained(1, Delivering, 97, 99)],
                2.0,
            ),
            ("still training", vec![trained(1, Training, 98, 0)], 2.0),
            ("older than a day", vec![trained(1, Succeeded, 50, 70)], 0.0),
            (
                "cut at the window",
                vec![trained(1, Succeeded, 70, 80)],
                4.0,
            ),
            (
                "summed",
                vec![trained(1, Succeeded, 90, 92), trained(2, Training, 99, 0)],
                3.0,
            ),
            (
                "final without an end counts nothing",
                vec![trained(1, Cancelled, 99, 0)],
                0.0,
            ),
        ];
        for (row, records, want) in rows {
            assert!((gpu_hours(&records, now) - want).abs() < 1e-9, "{row}");
        }
    }

    #[test]
    fn a_spent_gpu_budget_holds_new_jobs_until_the_window_has_room() {
        use JobState::*;
        let records = vec![trained(1, Succeeded, 90, 92), job(3, Queued, true)];
        let now = 100 * H;
        match admit(&records, &gpu(2.0), now) {
            Admission::Hold(reason) => assert!(reason.starts_with("GPU budget spent"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(admit(&records, &gpu(2.5), now), Admission::Start);
        assert!(to_start(&records, &gpu(2.0), now).is_empty());
        assert_eq!(to_start(&records, &gpu(2.5), now).len(), 1);
        // A day after the training ended, the window has room again.
        let later = 92 * H + DAY_MS;
        assert_eq!(admit(&records, &gpu(2.0), later), Admission::Start);
        assert_eq!(to_start(&records, &gpu(2.0), later).len(), 1);
        // The running quota is checked first and keeps its own reason.
        let running = vec![trained(1, Training, 99, 0)];
        let both = Quota {
            max_running_jobs: Some(1),
            ..gpu(0.5)
        };
        match admit(&running, &both, now) {
            Admission::Hold(reason) => assert!(reason.starts_with("waiting for a running slot")),
            other => panic!("{other:?}"),
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
            let got = match admit(&records, &quota, 0) {
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
            to_start(&records, &q, 0)
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

    /// A job in `stage` of `pool`, its task out (or held).
    fn at(n: i64, stage: Stage, pool: &str, held: bool) -> JobRecord {
        let state = match stage {
            Stage::Prepare => JobState::Preparing,
            Stage::Train => JobState::Training,
            _ => JobState::Delivering,
        };
        JobRecord {
            stage: stage as i32,
            spec: Some(trainyard_proto::v1::JobSpec {
                pool: pool.into(),
                ..Default::default()
            }),
            ..job(n, state, held)
        }
    }

    fn tasks(prepare: u32, train: u32, pools: &[(&str, u32)]) -> Quota {
        Quota {
            max_running_tasks: trainyard_core::config::TaskQuotas {
                prepare: Some(prepare),
                train: Some(train),
                deliver: None,
                pools: pools.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            },
            ..quota(0, 0)
        }
    }

    #[test]
    fn a_job_entering_a_full_stage_is_held_there_without_its_task() {
        use Stage::*;
        let quota = tasks(0, 1, &[("big", 2)]);
        let rows: Vec<(&str, Vec<JobRecord>, JobRecord, bool)> = vec![
            (
                "train slot free",
                vec![],
                at(9, Train, "flux", false),
                false,
            ),
            (
                "one training in the pool",
                vec![at(1, Train, "flux", false)],
                at(9, Train, "flux", false),
                true,
            ),
            (
                "another pool has its own slots",
                vec![at(1, Train, "flux", false)],
                at(9, Train, "sdxl", false),
                false,
            ),
            (
                "a pool's own limit",
                vec![at(1, Train, "big", false)],
                at(9, Train, "big", false),
                false,
            ),
            (
                "held jobs hold no slot",
                vec![at(1, Train, "flux", true)],
                at(9, Train, "flux", false),
                false,
            ),
            (
                "the job itself is not counted",
                vec![at(9, Train, "flux", false)],
                at(9, Train, "flux", false),
                false,
            ),
            (
                "ended jobs hold no slot",
                vec![job(1, JobState::Failed, false)],
                at(9, Train, "flux", false),
                false,
            ),
            (
                "an unlimited stage",
                vec![at(1, Deliver, "flux", false)],
                at(9, Deliver, "flux", false),
                false,
            ),
        ];
        for (row, records, mut next, want) in rows {
            next.times = Some(trainyard_proto::v1::StageTimes {
                training_at_ms: 5,
                ..Default::default()
            });
            let task = Effect::Publish(Box::new(crate::job::Task::Train(Default::default())));
            let mut effects = vec![Effect::SendCancel, task];
            let held = hold_at_stage(&records, &quota, &mut next, &mut effects);
            assert_eq!(held, want, "{row}");
            assert_eq!(effects.len(), if want { 1 } else { 2 }, "{row}");
            if want {
                assert!(
                    next.quota_hold
                        .starts_with("waiting for a task slot (train in pool flux)")
                        && next
                            .quota_hold
                            .ends_with("(quotas.max_running_tasks.train)"),
                    "{row}: {}",
                    next.quota_hold
                );
                assert_eq!(next.times.as_ref().unwrap().training_at_ms, 0, "{row}");
                assert!(is_held(&next) && is_running(&next), "{row}");
                assert_eq!(crate::job::current_task(&next), None, "{row}");
            }
        }
    }

    #[test]
    fn held_jobs_get_their_task_as_their_own_slot_frees() {
        use Stage::*;
        let quota = Quota {
            max_running_jobs: Some(5),
            ..tasks(1, 1, &[])
        };
        let ids = |records: &[JobRecord]| {
            to_start(records, &quota, 0)
                .iter()
                .map(|r| r.job_id.clone())
                .collect::<Vec<_>>()
        };
        // flux full, sdxl free, prepare free, one running slot left (jobs
        // held at training keep theirs).
        let records = vec![
            at(1, Train, "flux", false),
            at(2, Train, "flux", true),
            at(3, Train, "sdxl", true),
            at(4, Train, "sdxl", true),
            job(5, JobState::Queued, true),
            job(6, JobState::Queued, true),
        ];
        assert_eq!(ids(&records), ["j-3", "j-5"]);
        // The flux job ends: the oldest held there gets the slot.
        let mut records = records;
        records[0].state = JobState::Succeeded as i32;
        assert_eq!(ids(&records), ["j-2", "j-3", "j-5"]);
        // A job preparing fills the prepare stage: none starts from QUEUED.
        records.push(at(7, Prepare, "", false));
        assert_eq!(ids(&records), ["j-2", "j-3"]);
        // Released at training, its GPU time starts then.
        let next = started(&records[1], 42).unwrap();
        assert!(next.quota_hold.is_empty());
        assert_eq!(next.times.unwrap().training_at_ms, 42);
        assert!(matches!(
            crate::job::current_task(&started(&records[1], 42).unwrap()),
            Some(crate::job::Task::Train(_))
        ));
    }

    #[test]
    fn a_full_prepare_stage_holds_a_submission_queued() {
        let records = vec![at(1, Stage::Prepare, "", false)];
        match admit(&records, &tasks(1, 0, &[]), 0) {
            Admission::Hold(reason) => assert!(
                reason.starts_with("waiting for a task slot (prepare)"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(admit(&records, &tasks(2, 0, &[]), 0), Admission::Start);
        // A job held at training still holds its running slot.
        let held = vec![at(1, Stage::Train, "flux", true)];
        let one = Quota {
            max_running_jobs: Some(1),
            ..quota(0, 0)
        };
        assert!(matches!(admit(&held, &one, 0), Admission::Hold(_)));
    }
}
