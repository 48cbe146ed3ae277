//! The job state machine, pure: `transition(record, event, now) -> Decision`.
//! No I/O here; the result loop stores the new record by compare-and-set and
//! then carries out the effects. Tested without any server.
//!
//! `QUEUED → PREPARING → TRAINING → DELIVERING → SUCCEEDED`, and from any
//! non-final state `FAILED` or `CANCELLED`. A result counts only for the
//! record's current stage and attempt; anything else is ignored, so a
//! redelivered or late result changes nothing.
//!
//! Caption review (`caption.review`): the prepare result moves the job to
//! `AWAITING_REVIEW` instead of `TRAINING`, still at the prepare stage and
//! with no task at all ([`current_task`] is `None`), so nothing holds a GPU
//! or a consumer slot and the reconciler has nothing to republish. Its
//! deadline is paused ([`trainyard_core::runtime::deadline_ms`]); on
//! [`Event::Approve`] the time spent waiting is added to
//! `review_paused_ms` and the job moves on exactly as an unreviewed job's
//! prepare result would have moved it. Rejecting is [`Event::Cancel`].
//! Every prepared job has `captions_version` 1 (`UpdateCaptions` raises it).

use trainyard_proto::v1::{
    Checkpoint, DeliverTask, JobRecord, JobState, PrepareTask, Stage, StageResult, StateChanged,
    TrainTask, stage_result::Outcome,
};

/// What happened to a job.
#[derive(Clone, Debug)]
pub enum Event {
    /// A stage reported on an attempt (boxed: a result is large).
    Result(Box<StageResult>),
    /// A client asked to cancel.
    Cancel { reason: String },
    /// A client approved the captions of a job in `AWAITING_REVIEW` (the
    /// API checks the version first).
    Approve,
}

/// A task to publish.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    Prepare(PrepareTask),
    Train(TrainTask),
    Deliver(DeliverTask),
}

/// What the shell must do once the new record is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    Publish(Box<Task>),
    EmitState(StateChanged),
    /// Tell running stages to stop this job now.
    SendCancel,
}

#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Store this record, then run the effects.
    Apply(Box<JobRecord>, Vec<Effect>),
    /// Nothing to change (stale, duplicate or late event).
    Ignore(&'static str),
}

/// The record a new submission starts with. Its prepare task is published
/// right after it is stored, unless the record carries a
/// [`JobRecord::quota_hold`] (see [`crate::quota`]).
pub fn submitted(mut record: JobRecord, now_ms: i64) -> (JobRecord, Vec<Effect>) {
    record.state = JobState::Queued as i32;
    record.stage = Stage::Prepare as i32;
    record.attempt = 1;
    record.created_at_ms = now_ms;
    record.updated_at_ms = now_ms;
    record.times.get_or_insert_default().queued_at_ms = now_ms;
    let mut effects = vec![Effect::EmitState(state_changed(&record))];
    effects.extend(current_task(&record).map(|task| Effect::Publish(Box::new(task))));
    (record, effects)
}

pub fn transition(record: &JobRecord, event: &Event, now_ms: i64) -> Decision {
    let state = record.state();
    if state.is_final() {
        return Decision::Ignore("job already finished");
    }
    match event {
        Event::Cancel { reason } => {
            let mut next = record.clone();
            next.state = JobState::Cancelled as i32;
            next.cancel_reason = reason.clone();
            finish(&mut next, now_ms);
            let effects = vec![Effect::SendCancel, Effect::EmitState(state_changed(&next))];
            Decision::Apply(Box::new(next), effects)
        }
        Event::Result(result) => on_result(record, result, now_ms),
        Event::Approve => approve(record, now_ms),
    }
}

/// `AWAITING_REVIEW → TRAINING`: the train task published as for an
/// unreviewed job, the time in review added to the paused time.
fn approve(record: &JobRecord, now_ms: i64) -> Decision {
    if record.state() != JobState::AwaitingReview {
        return Decision::Ignore("job is not awaiting review");
    }
    let mut next = record.clone();
    let times = next.times.get_or_insert_default();
    let waited = now_ms.saturating_sub(times.awaiting_review_at_ms).max(0);
    next.review_paused_ms = next.review_paused_ms.saturating_add(waited as u64);
    into_training(&mut next, now_ms);
    advance(next)
}

/// The record moved to the first attempt of training.
fn into_training(next: &mut JobRecord, now_ms: i64) {
    next.updated_at_ms = now_ms;
    next.state = JobState::Training as i32;
    next.stage = Stage::Train as i32;
    next.attempt = 1;
    next.times.get_or_insert_default().training_at_ms = now_ms;
}

/// Whether a job's spec asks for its captions to be reviewed.
pub fn wants_review(record: &JobRecord) -> bool {
    record
        .spec
        .as_ref()
        .and_then(|s| s.caption.as_ref())
        .is_some_and(|c| c.review)
}

fn on_result(record: &JobRecord, result: &StageResult, now_ms: i64) -> Decision {
    if result.stage != record.stage || result.attempt != record.attempt {
        return Decision::Ignore("result for another stage or attempt");
    }
    if record.state() == JobState::AwaitingReview {
        // Prepared already (a redelivered prepare result): no task is out.
        return Decision::Ignore("job awaiting review");
    }
    let Some(outcome) = &result.outcome else {
        return Decision::Ignore("result without an outcome");
    };
    let mut next = record.clone();
    next.updated_at_ms = now_ms;
    let times = next.times.get_or_insert_default();
    match (record.stage(), outcome) {
        (Stage::Prepare, Outcome::Started(_)) => {
            if record.state() != JobState::Queued {
                return Decision::Ignore("prepare already started");
            }
            next.state = JobState::Preparing as i32;
            times.preparing_at_ms = now_ms;
            let effects = vec![Effect::EmitState(state_changed(&next))];
            Decision::Apply(Box::new(next), effects)
        }
        (_, Outcome::Started(_)) => Decision::Ignore("start of a later stage changes no state"),
        (Stage::Train, Outcome::Adjusted(adjusted)) => {
            let training = adjusted.training.as_deref().cloned();
            if record.effective_training == training {
                return Decision::Ignore("adjustment already recorded");
            }
            next.adjustments.push(adjusted.note.clone());
            next.effective_training = training;
            Decision::Apply(Box::new(next), Vec::new())
        }
        (_, Outcome::Failed(error)) => {
            next.state = JobState::Failed as i32;
            next.error = Some(error.clone());
            finish(&mut next, now_ms);
            let effects = vec![Effect::EmitState(state_changed(&next))];
            Decision::Apply(Box::new(next), effects)
        }
        (Stage::Prepare, Outcome::Prepared(out)) => {
            next.dataset_uri = out.dataset_uri.clone();
            next.image_count = out.image_count;
            next.video_count = out.video_count;
            next.captions_version = 1;
            if wants_review(record) {
                next.state = JobState::AwaitingReview as i32;
                times.awaiting_review_at_ms = now_ms;
                let effects = vec![Effect::EmitState(state_changed(&next))];
                return Decision::Apply(Box::new(next), effects);
            }
            into_training(&mut next, now_ms);
            advance(next)
        }
        (Stage::Train, Outcome::Trained(out)) => {
            next.artifacts = out.artifacts.clone();
            next.summary = out.summary.clone();
            if out.last_checkpoint.is_some() {
                next.latest_checkpoint = out.last_checkpoint.clone();
            }
            next.state = JobState::Delivering as i32;
            next.stage = Stage::Deliver as i32;
            next.attempt = 1;
            times.delivering_at_ms = now_ms;
            advance(next)
        }
        (Stage::Deliver, Outcome::Delivered(out)) => {
            next.delivered = out.files.clone();
            next.manifest_uri = out.manifest_uri.clone();
            next.state = JobState::Succeeded as i32;
            finish(&mut next, now_ms);
            let effects = vec![Effect::EmitState(state_changed(&next))];
            Decision::Apply(Box::new(next), effects)
        }
        _ => Decision::Ignore("outcome does not belong to the stage"),
    }
}

fn advance(next: JobRecord) -> Decision {
    let mut effects = vec![Effect::EmitState(state_changed(&next))];
    effects.extend(current_task(&next).map(|t| Effect::Publish(Box::new(t))));
    Decision::Apply(Box::new(next), effects)
}

fn finish(record: &mut JobRecord, now_ms: i64) {
    record.updated_at_ms = now_ms;
    record.times.get_or_insert_default().finished_at_ms = now_ms;
}

pub fn state_changed(record: &JobRecord) -> StateChanged {
    StateChanged {
        state: record.state,
        stage: record.stage,
        attempt: record.attempt,
        error: record.error.clone(),
    }
}

/// The task of the record's current stage and attempt; `None` when final,
/// awaiting review or held by its tenant's quota. Publishing it again is
/// safe: its dedup id is the same.
pub fn current_task(record: &JobRecord) -> Option<Task> {
    if record.state().is_final()
        || record.state() == JobState::AwaitingReview
        || !record.quota_hold.is_empty()
    {
        return None;
    }
    let spec = record.spec.clone();
    let (job_id, tenant, attempt) = (record.job_id.clone(), record.tenant.clone(), record.attempt);
    Some(match record.stage() {
        Stage::Prepare => Task::Prepare(PrepareTask {
            job_id,
            tenant,
            attempt,
            spec,
        }),
        Stage::Train => Task::Train(TrainTask {
            job_id,
            tenant,
            attempt,
            spec,
            dataset_uri: record.dataset_uri.clone(),
            resume_from: record
                .latest_checkpoint
                .clone()
                .filter(|c: &Checkpoint| !c.uri.is_empty()),
        }),
        Stage::Deliver => Task::Deliver(DeliverTask {
            job_id,
            tenant,
            attempt,
            spec,
            artifacts: record.artifacts.clone(),
            summary: record.summary.clone(),
            dataset_uri: record.dataset_uri.clone(),
            // Set by `Effects::publish_task_acked`, from the fleet's config.
            download_url_ttl_secs: 0,
        }),
        Stage::Unspecified => return None,
    })
}

/// Whether moving from `from` to `to` is a legal transition.
pub fn is_legal(from: JobState, to: JobState) -> bool {
    use JobState::*;
    if from == to {
        return true;
    }
    matches!(
        (from, to),
        (Queued, Preparing)
            | (Queued | Preparing, Training | AwaitingReview)
            | (AwaitingReview, Training)
            | (Training, Delivering)
            | (Delivering, Succeeded)
            | (
                Queued | Preparing | AwaitingReview | Training | Delivering,
                Failed | Cancelled
            )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::{
        DeliverOutput, ErrorKind, JobError, PrepareOutput, StageStarted, TrainOutput,
    };

    fn queued() -> JobRecord {
        submitted(
            JobRecord {
                job_id: "j-1".into(),
                tenant: "acme".into(),
                ..Default::default()
            },
            1,
        )
        .0
    }

    fn result(stage: Stage, attempt: u32, outcome: Outcome) -> Event {
        Event::Result(Box::new(StageResult {
            job_id: "j-1".into(),
            tenant: "acme".into(),
            stage: stage as i32,
            attempt,
            worker_id: "w".into(),
            claim: None,
            outcome: Some(outcome),
        }))
    }

    fn apply(record: &JobRecord, event: Event) -> (JobRecord, Vec<Effect>) {
        match transition(record, &event, 2) {
            Decision::Apply(next, effects) => {
                assert!(is_legal(record.state(), next.state()));
                (*next, effects)
            }
            Decision::Ignore(why) => panic!("ignored: {why}"),
        }
    }

    #[test]
    fn an_oom_adjustment_is_recorded_once_without_a_state_change() {
        let record = JobRecord {
            job_id: "j-1".into(),
            state: JobState::Training as i32,
            stage: Stage::Train as i32,
            attempt: 1,
            ..Default::default()
        };
        let adjusted = |batch: u32, note: &str| {
            result(
                Stage::Train,
                1,
                Outcome::Adjusted(trainyard_proto::v1::TrainingAdjusted {
                    training: Some(Box::new(trainyard_proto::v1::TrainingSettings {
                        batch_size: batch,
                        ..Default::default()
                    })),
                    note: note.into(),
                    delivered: 1,
                }),
            )
        };
        let (next, effects) = apply(&record, adjusted(2, "oom: batch_size 4 → 2"));
        assert!(effects.is_empty());
        assert_eq!(next.state(), JobState::Training);
        assert_eq!(next.adjustments, ["oom: batch_size 4 → 2"]);
        assert_eq!(next.effective_training.as_ref().unwrap().batch_size, 2);
        assert!(matches!(
            transition(&next, &adjusted(2, "oom: batch_size 4 → 2"), 3),
            Decision::Ignore(_)
        ));
        let (next, _) = apply(&next, adjusted(1, "oom: batch_size 2 → 1"));
        assert_eq!(next.adjustments.len(), 2);
        assert_eq!(next.effective_training.unwrap().batch_size, 1);
    }

    #[test]
    fn happy_path_walks_every_state_and_publishes_each_task() {
        let (record, effects) = submitted(JobRecord::default(), 1);
        assert!(matches!(&effects[1], Effect::Publish(t) if matches!(**t, Task::Prepare(_))));
        let mut record = JobRecord {
            job_id: "j-1".into(),
            ..record
        };
        record = apply(
            &record,
            result(
                Stage::Prepare,
                1,
                Outcome::Started(StageStarted { delivered: 1 }),
            ),
        )
        .0;
        assert_eq!(record.state(), JobState::Preparing);
        let (next, effects) = apply(
            &record,
            result(
                Stage::Prepare,
                1,
                Outcome::Prepared(PrepareOutput {
                    dataset_uri: "file:///d".into(),
                    ..Default::default()
                }),
            ),
        );
        assert_eq!(next.state(), JobState::Training);
        assert!(
            effects.iter().any(
                |e| matches!(e, Effect::Publish(t) if matches!(&**t, Task::Train(t) if t.dataset_uri == "file:///d"))
            )
        );
        let (next, effects) = apply(
            &next,
            result(Stage::Train, 1, Outcome::Trained(TrainOutput::default())),
        );
        assert_eq!(next.state(), JobState::Delivering);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Publish(t) if matches!(**t, Task::Deliver(_))))
        );
        let (next, _) = apply(
            &next,
            result(
                Stage::Deliver,
                1,
                Outcome::Delivered(DeliverOutput::default()),
            ),
        );
        assert_eq!(next.state(), JobState::Succeeded);
        assert!(next.times.unwrap().finished_at_ms > 0);
    }

    #[test]
    fn stale_duplicate_and_late_results_are_ignored() {
        let record = queued();
        let prepared = result(
            Stage::Prepare,
            1,
            Outcome::Prepared(PrepareOutput::default()),
        );
        let (training, _) = apply(&record, prepared.clone());
        // The same result again: the record moved on, nothing changes.
        assert!(matches!(
            transition(&training, &prepared, 3),
            Decision::Ignore(_)
        ));
        // A result for an older attempt.
        let old = result(Stage::Train, 0, Outcome::Trained(TrainOutput::default()));
        assert!(matches!(
            transition(&training, &old, 3),
            Decision::Ignore(_)
        ));
        // Anything after a final state.
        let (cancelled, effects) = apply(
            &training,
            Event::Cancel {
                reason: "user".into(),
            },
        );
        assert_eq!(cancelled.state(), JobState::Cancelled);
        assert!(effects.contains(&Effect::SendCancel));
        let late = result(Stage::Train, 1, Outcome::Trained(TrainOutput::default()));
        assert!(matches!(
            transition(&cancelled, &late, 4),
            Decision::Ignore(_)
        ));
        assert!(matches!(
            transition(
                &cancelled,
                &Event::Cancel {
                    reason: String::new()
                },
                4
            ),
            Decision::Ignore(_)
        ));
    }

    #[test]
    fn a_failure_ends_the_job_with_its_error() {
        let error = JobError {
            kind: ErrorKind::BadDataset as i32,
            message: "no usable image: a.png".into(),
            ..Default::default()
        };
        let (failed, _) = apply(
            &queued(),
            result(Stage::Prepare, 1, Outcome::Failed(error.clone())),
        );
        assert_eq!(failed.state(), JobState::Failed);
        assert_eq!(failed.error, Some(error));
        assert_eq!(current_task(&failed), None);
    }

    #[test]
    fn a_job_held_by_its_quota_has_no_task_until_released() {
        let held = JobRecord {
            job_id: "j-1".into(),
            tenant: "acme".into(),
            quota_hold: "waiting for a running slot".into(),
            ..Default::default()
        };
        let (record, effects) = submitted(held, 1);
        assert_eq!(record.state(), JobState::Queued);
        assert_eq!(effects.len(), 1, "a state event only: {effects:?}");
        assert_eq!(current_task(&record), None);
        let started = crate::quota::started(&record, 2).unwrap();
        assert!(matches!(current_task(&started), Some(Task::Prepare(_))));
        // A cancel ends a held job like any other.
        let (cancelled, _) = apply(
            &record,
            Event::Cancel {
                reason: "no".into(),
            },
        );
        assert_eq!(cancelled.state(), JobState::Cancelled);
    }

    fn reviewed(review: bool) -> JobRecord {
        let mut record = queued();
        record.spec = Some(trainyard_proto::v1::JobSpec {
            caption: Some(trainyard_proto::v1::CaptionSettings {
                review,
                ..Default::default()
            }),
            ..Default::default()
        });
        record
    }

    fn prepared() -> Event {
        result(
            Stage::Prepare,
            1,
            Outcome::Prepared(PrepareOutput {
                dataset_uri: "file:///d".into(),
                ..Default::default()
            }),
        )
    }

    fn publishes_train(effects: &[Effect]) -> bool {
        effects
            .iter()
            .any(|e| matches!(e, Effect::Publish(t) if matches!(&**t, Task::Train(t) if t.dataset_uri == "file:///d")))
    }

    /// Each row: whether the spec asks for review → the state a prepare
    /// result leads to, whether a train task goes out.
    #[test]
    fn a_prepare_result_trains_or_waits_for_review() {
        for (review, state, trains) in [
            (false, JobState::Training, true),
            (true, JobState::AwaitingReview, false),
        ] {
            let (next, effects) = apply(&reviewed(review), prepared());
            assert_eq!(next.state(), state, "review {review}");
            assert_eq!(publishes_train(&effects), trains, "review {review}");
            assert_eq!(next.captions_version, 1, "every prepared job has version 1");
            assert_eq!(next.dataset_uri, "file:///d");
            assert!(
                effects
                    .iter()
                    .any(|e| matches!(e, Effect::EmitState(s) if s.state() == state)),
                "a state event for {state:?}"
            );
            let times = next.times.unwrap();
            assert_eq!(times.awaiting_review_at_ms > 0, review);
            assert_eq!(times.training_at_ms > 0, !review);
        }
    }

    #[test]
    fn a_job_in_review_has_no_task_and_ignores_results() {
        let (waiting, _) = apply(&reviewed(true), prepared());
        assert_eq!(waiting.stage(), Stage::Prepare);
        assert_eq!(current_task(&waiting), None, "nothing to republish");
        // The prepare result redelivered changes nothing.
        assert!(matches!(
            transition(&waiting, &prepared(), 3),
            Decision::Ignore(_)
        ));
        let failed = result(
            Stage::Prepare,
            1,
            Outcome::Failed(trainyard_proto::v1::JobError::default()),
        );
        assert!(matches!(
            transition(&waiting, &failed, 3),
            Decision::Ignore(_)
        ));
    }

    #[test]
    fn approve_trains_once_and_counts_the_pause() {
        let (waiting, _) = apply(&reviewed(true), prepared()); // at 2 ms
        let Decision::Apply(training, effects) = transition(&waiting, &Event::Approve, 5_002)
        else {
            panic!("approve ignored");
        };
        assert!(is_legal(waiting.state(), training.state()));
        assert_eq!(training.state(), JobState::Training);
        assert_eq!((training.stage(), training.attempt), (Stage::Train, 1));
        assert_eq!(training.review_paused_ms, 5_000);
        assert_eq!(training.times.unwrap().training_at_ms, 5_002);
        assert!(publishes_train(&effects));
        // Exactly the task an unreviewed job's prepare result publishes.
        let (direct, direct_effects) = apply(&reviewed(false), prepared());
        let without_spec = |record: &JobRecord| match current_task(record) {
            Some(Task::Train(task)) => TrainTask { spec: None, ..task },
            other => panic!("{other:?}"),
        };
        assert_eq!(without_spec(&training), without_spec(&direct));
        assert_eq!(publishes_train(&direct_effects), publishes_train(&effects));
        // A repeat, or an approve of a job never in review, changes nothing.
        assert!(matches!(
            transition(&training, &Event::Approve, 6_000),
            Decision::Ignore(_)
        ));
        assert!(matches!(
            transition(&queued(), &Event::Approve, 6_000),
            Decision::Ignore(_)
        ));
    }

    #[test]
    fn rejecting_in_review_is_a_cancel() {
        let (waiting, _) = apply(&reviewed(true), prepared());
        let (cancelled, effects) = apply(
            &waiting,
            Event::Cancel {
                reason: "captions rejected".into(),
            },
        );
        assert_eq!(cancelled.state(), JobState::Cancelled);
        assert!(effects.iter().any(|e| matches!(e, Effect::EmitState(_))));
        assert!(matches!(
            transition(&cancelled, &Event::Approve, 9),
            Decision::Ignore(_)
        ));
    }

    #[test]
    fn legal_transitions() {
        assert!(is_legal(JobState::Queued, JobState::Preparing));
        assert!(!is_legal(JobState::Succeeded, JobState::Failed));
        assert!(!is_legal(JobState::Training, JobState::Preparing));
        assert!(is_legal(JobState::Preparing, JobState::AwaitingReview));
        assert!(is_legal(JobState::AwaitingReview, JobState::Training));
        assert!(is_legal(JobState::AwaitingReview, JobState::Cancelled));
        assert!(!is_legal(JobState::AwaitingReview, JobState::Delivering));
        assert!(!is_legal(JobState::Training, JobState::AwaitingReview));
    }
}
