//! Durable cancels and deadlines. A cancel message on
//! `ty.control.<job>.cancel` is core NATS: sent before the task's token is
//! registered, or while this runtime reconnects, it is lost. The job record
//! is not: the coordinator makes it final (CANCELLED, or FAILED past its
//! deadline) before it sends the message. So the runtime reads the record
//! again right after registering a task's cancel token and on every
//! heartbeat, and stops the handler when [`stop_reason`] says so; it also
//! stops a task past its job's deadline by its own clock, whether or not
//! the reconciler has failed the job yet. The message stays the fast path.

use trainyard_proto::v1::{JobRecord, JobState};

/// When a job must be done by (ms since the epoch), from its spec's
/// `timeout_secs` counted from its creation, pushed back by the time it
/// spent waiting for caption review (`review_paused_ms`); `None` without a
/// timeout, and while it waits in `AWAITING_REVIEW` (its clock is paused).
/// The one deadline rule: the reconciler and the stage runtime both use it.
pub fn deadline_ms(record: &JobRecord) -> Option<i64> {
    let timeout = record.spec.as_ref()?.timeout_secs;
    if timeout == 0 || record.state() == JobState::AwaitingReview {
        return None;
    }
    let timeout_ms = i64::try_from(timeout.saturating_mul(1000)).unwrap_or(i64::MAX);
    let paused = i64::try_from(record.review_paused_ms).unwrap_or(i64::MAX);
    Some(
        record
            .created_at_ms
            .saturating_add(timeout_ms)
            .saturating_add(paused),
    )
}

/// Why a running task of this job must stop, read from its record at
/// `now_ms`; `None` to go on.
pub(super) fn stop_reason(record: &JobRecord, now_ms: i64) -> Option<&'static str> {
    if record.state().is_final() {
        return Some(match record.state() {
            trainyard_proto::v1::JobState::Cancelled => "job cancelled",
            _ => "job already finished",
        });
    }
    if deadline_ms(record).is_some_and(|deadline| now_ms >= deadline) {
        return Some("job past its deadline");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::JobSpec;

    fn record(state: JobState, timeout_secs: u64) -> JobRecord {
        JobRecord {
            state: state as i32,
            created_at_ms: 1_000_000,
            spec: Some(JobSpec {
                timeout_secs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_final_record_or_a_passed_deadline_stops_the_task() {
        let now = 1_000_000 + 5_000;
        assert_eq!(stop_reason(&record(JobState::Training, 0), now), None);
        assert_eq!(stop_reason(&record(JobState::Training, 10), now), None);
        assert_eq!(
            stop_reason(&record(JobState::Training, 5), now),
            Some("job past its deadline")
        );
        assert_eq!(
            stop_reason(&record(JobState::Cancelled, 0), now),
            Some("job cancelled")
        );
        assert_eq!(
            stop_reason(&record(JobState::Failed, 0), now),
            Some("job already finished")
        );
        assert_eq!(deadline_ms(&record(JobState::Queued, 2)), Some(1_002_000));
        assert_eq!(
            deadline_ms(&record(JobState::Queued, u64::MAX)),
            Some(i64::MAX)
        );
    }

    #[test]
    fn time_in_review_does_not_count_against_the_deadline() {
        let now = 1_000_000 + 5_000;
        // Waiting for review: never past its deadline.
        let waiting = record(JobState::AwaitingReview, 1);
        assert_eq!(deadline_ms(&waiting), None);
        assert_eq!(stop_reason(&waiting, i64::MAX), None);
        // Approved after 4.5 s of review: 5 s of timeout end at 9.5 s.
        let mut approved = record(JobState::Training, 5);
        approved.review_paused_ms = 4_500;
        assert_eq!(deadline_ms(&approved), Some(1_009_500));
        assert_eq!(stop_reason(&approved, now), None);
        assert_eq!(
            stop_reason(&approved, 1_009_500),
            Some("job past its deadline")
        );
    }
}
