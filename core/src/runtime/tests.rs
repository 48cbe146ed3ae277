//! The runtime's decisions, row by row, without a server: every row of the
//! admit table (decode, job record, delivery cap, claim) and of the settle
//! table (how the handler ended × the retry policy × the cancel token × the
//! claim). The end-to-end suites (`fencing`, `retry`, `failures`,
//! `outage`, `faults`) prove the executor does what a plan says.

use super::admit::{self, RecordRead, Stop};
use super::plan::{self, Ended, Plan, Report, ReportId, Settle, Why};
use super::stage::{StageError, TaskMeta, job_error};
use crate::claim::{Acquire, Held};
use crate::config::RetryPolicyConfig;
use crate::retry::Policy;
use prost::Message as _;
use std::time::Duration;
use trainyard_proto::v1::{
    self, ErrorKind, JobRecord, JobState, Stage, StageStarted, TaskClaim, TrainTask,
    stage_result::Outcome,
};
use trainyard_proto::{Attempt, JobId, TenantId};

const STAGE: Stage = Stage::Train;
/// The policy of every plan row: 100 ms doubling, 3 attempts, no jitter,
/// `bad_dataset` never retried.
const MAX_ATTEMPTS: u32 = 3;

fn policy() -> Policy {
    Policy::from_config(&RetryPolicyConfig {
        initial_delay_ms: 100,
        multiplier: 2.0,
        max_delay_ms: 1_000,
        max_attempts: MAX_ATTEMPTS,
        jitter: 0.0,
        non_retryable: vec!["bad_dataset".into()],
    })
}

fn meta() -> TaskMeta {
    TaskMeta {
        tenant: TenantId::parse("acme").unwrap(),
        job: JobId::parse("j-1").unwrap(),
        attempt: Attempt(2),
    }
}

fn claim() -> TaskClaim {
    TaskClaim {
        stage: STAGE as i32,
        attempt: 2,
        worker_id: "w-1".into(),
        token: "t-1".into(),
        lease_until_ms: 1,
        released: false,
    }
}

/// What a plan does, in the terms of the settle table.
#[derive(Debug, PartialEq)]
struct Shape {
    /// The dead letter's kind.
    letter: Option<ErrorKind>,
    report: Option<Sent>,
    release: bool,
    settle: Settle,
}

/// A report, as a row sees it.
#[derive(Debug, PartialEq)]
struct Sent {
    /// "result" (a handler's outcome), "failed" or "adjusted".
    what: &'static str,
    id: ReportId,
    claimed: bool,
    required: bool,
}

fn shape(plan: &Plan) -> Shape {
    Shape {
        letter: plan.dead_letter.as_ref().map(|l| l.kind),
        report: plan.report.as_ref().map(|r: &Report| Sent {
            what: match r.outcome {
                Outcome::Failed(_) => "failed",
                Outcome::Adjusted(_) => "adjusted",
                _ => "result",
            },
            id: r.id,
            claimed: r.claim.is_some(),
            required: r.required,
        }),
        release: plan.release,
        settle: plan.settle,
    }
}

/// Only a settle.
fn only(settle: Settle) -> Shape {
    Shape {
        letter: None,
        report: None,
        release: false,
        settle,
    }
}

/// Dead letter, failed result (under the claim or none), TERM.
fn failed(kind: ErrorKind, claimed: bool) -> Shape {
    Shape {
        letter: Some(kind),
        report: Some(Sent {
            what: "failed",
            id: ReportId::Result,
            claimed,
            required: false,
        }),
        release: false,
        settle: Settle::Term,
    }
}

fn nak(ms: u64) -> Settle {
    Settle::Nak(Some(Duration::from_millis(ms)))
}

/// Release, then NAK; with the handler's report first when `reported`.
fn retried(settle: Settle, reported: Option<u32>) -> Shape {
    Shape {
        report: reported.map(|delivered| Sent {
            what: "adjusted",
            id: ReportId::Retry { delivered },
            claimed: true,
            required: false,
        }),
        release: true,
        ..only(settle)
    }
}

// ---- admit ----------------------------------------------------------------

/// How admission went, in a row's terms.
#[derive(Debug, PartialEq)]
enum Got {
    Run,
    Hold(&'static str),
    Settle(Shape),
}

fn got<T>(admitted: Result<T, Stop>) -> Got {
    match admitted {
        Ok(_) => Got::Run,
        Err(Stop::Hold { store, .. }) => Got::Hold(store),
        Err(Stop::Settle(plan)) => Got::Settle(shape(&plan)),
    }
}

fn task_bytes(tenant: &str, job: &str) -> Vec<u8> {
    TrainTask {
        tenant: tenant.into(),
        job_id: job.into(),
        attempt: 2,
        ..Default::default()
    }
    .encode_to_vec()
}

fn record(state: JobState, stage: Stage, attempt: u32) -> RecordRead {
    let record = JobRecord {
        state: state as i32,
        stage: stage as i32,
        attempt,
        ..Default::default()
    };
    RecordRead::Found(record.encode_to_vec().into())
}

fn live() -> RecordRead {
    record(JobState::Training, STAGE, 2)
}

#[test]
fn admit_table() {
    let m = meta();
    let term = || Got::Settle(only(Settle::Term));
    let poison = |job_known: bool| {
        let mut shape = failed(ErrorKind::Poison, false);
        if !job_known {
            shape.report = None;
        }
        Got::Settle(shape)
    };
    let decode = |payload: &[u8], header: Option<&TaskMeta>| {
        got(admit::task::<TrainTask>(payload, header, STAGE))
    };
    let check = |read, delivered| got(admit::record(read, &m, STAGE, delivered, MAX_ATTEMPTS));
    let rows: Vec<(&str, Got, Got)> = vec![
        (
            "undecodable, ids in its Nats-Msg-Id: letter, failed result, TERM",
            decode(b"\xff\xff\xff", Some(&m)),
            poison(true),
        ),
        (
            "undecodable, no ids anywhere: letter, TERM",
            decode(b"\xff\xff\xff", None),
            poison(false),
        ),
        (
            "a bad job id: letter, failed result, TERM",
            decode(&task_bytes("acme", "not a job id!"), Some(&m)),
            poison(true),
        ),
        (
            "a bad tenant, no header: letter, TERM",
            decode(&task_bytes("", "j-1"), None),
            poison(false),
        ),
        (
            "a good task runs on",
            decode(&task_bytes("acme", "j-1"), None),
            Got::Run,
        ),
        ("no job record: TERM", check(RecordRead::Missing, 1), term()),
        (
            "a record that does not decode: TERM",
            check(RecordRead::Found(vec![0xff, 0xff].into()), 1),
            term(),
        ),
        (
            "job succeeded: TERM",
            check(record(JobState::Succeeded, STAGE, 2), 1),
            term(),
        ),
        (
            "job failed: TERM",
            check(record(JobState::Failed, STAGE, 2), 1),
            term(),
        ),
        (
            "job cancelled: TERM, no letter",
            check(record(JobState::Cancelled, STAGE, 2), 1),
            term(),
        ),
        (
            "a stale attempt: TERM",
            check(record(JobState::Training, STAGE, 3), 1),
            term(),
        ),
        (
            "the job is in another stage: TERM",
            check(record(JobState::Delivering, Stage::Deliver, 2), 1),
            term(),
        ),
        (
            "the jobs bucket does not answer: hold",
            check(RecordRead::Unavailable("timed out".into()), 1),
            Got::Hold("job record"),
        ),
        (
            "out of deliveries: letter, failed result without a claim, TERM",
            check(live(), MAX_ATTEMPTS + 1),
            poison(true),
        ),
        (
            "out of deliveries, job cancelled: the record wins, TERM without a letter",
            check(record(JobState::Cancelled, STAGE, 2), MAX_ATTEMPTS + 1),
            term(),
        ),
        (
            "out of deliveries, the store down: hold (the cap waits for the record)",
            check(
                RecordRead::Unavailable("timed out".into()),
                MAX_ATTEMPTS + 1,
            ),
            Got::Hold("job record"),
        ),
        (
            "the last delivery still runs",
            check(live(), MAX_ATTEMPTS),
            Got::Run,
        ),
        (
            "claim busy: NAK with the lease's delay",
            got(admit::claim(Acquire::Busy(Duration::from_millis(1_500)))),
            Got::Settle(only(nak(1_500))),
        ),
        (
            "claims bucket does not answer: hold",
            got(admit::claim(Acquire::Unavailable("timed out".into()))),
            Got::Hold("claim"),
        ),
        (
            "claim taken: run",
            got(admit::claim(Acquire::Held(Held::for_tests(claim())))),
            Got::Run,
        ),
        (
            "held past the cap: NAK 2 s",
            Got::Settle(shape(&Plan::held_too_long())),
            Got::Settle(only(nak(2_000))),
        ),
    ];
    assert_eq!(rows.len(), ADMIT_ROWS);
    for (row, got, want) in rows {
        assert_eq!(got, want, "{row}");
    }
}

const ADMIT_ROWS: usize = 21;

#[test]
fn admitted_records_and_letters_say_why() {
    let m = meta();
    let Ok(record) = admit::record(live(), &m, STAGE, 1, MAX_ATTEMPTS) else {
        panic!("a live record admits the task");
    };
    assert_eq!(record.attempt, 2, "the record read is handed on");
    let Err(Stop::Settle(plan)) = admit::record(live(), &m, STAGE, 4, MAX_ATTEMPTS) else {
        panic!("out of deliveries");
    };
    assert_eq!(plan.why, Why::OutOfDeliveries);
    assert_eq!(
        plan.dead_letter.unwrap().reason,
        "train task ran out of deliveries (4)"
    );
    let Some(Report {
        outcome: Outcome::Failed(error),
        ..
    }) = plan.report
    else {
        panic!("a failed result");
    };
    assert_eq!(
        (error.kind(), error.retryable, error.stage()),
        (ErrorKind::Poison, false, STAGE)
    );
    let Err(Stop::Settle(plan)) = admit::task::<TrainTask>(b"\xff", Some(&m), STAGE) else {
        panic!("undecodable");
    };
    assert!(plan.dead_letter.unwrap().reason.contains("not a valid"));
    let Err(Stop::Settle(plan)) =
        admit::task::<TrainTask>(&task_bytes("acme", "bad id!"), Some(&m), STAGE)
    else {
        panic!("bad id");
    };
    assert!(plan.dead_letter.unwrap().reason.contains("bad id"));
}

// ---- plan -----------------------------------------------------------------

fn fetch_error(retryable: bool) -> v1::JobError {
    job_error(ErrorKind::Fetch, "503", retryable)
}

fn retry(delay_ms: u64) -> StageError {
    StageError::Retry {
        error: fetch_error(true),
        delay: Duration::from_millis(delay_ms),
    }
}

fn retry_reporting() -> StageError {
    StageError::RetryWithReport {
        error: job_error(ErrorKind::Oom, "out of memory", true),
        delay: Duration::ZERO,
        report: Box::new(Outcome::Adjusted(v1::TrainingAdjusted {
            note: "oom: batch_size 4 → 2".into(),
            delivered: 1,
            ..Default::default()
        })),
    }
}

fn ok() -> Result<Outcome, StageError> {
    Ok(Outcome::Started(StageStarted { delivered: 1 }))
}

/// The plan for a handler that ended with `result` on delivery
/// `delivered`, the cancel token `cancelled`, the claim `held` at the check.
fn planned(
    result: Option<Result<Outcome, StageError>>,
    delivered: u32,
    cancelled: bool,
    held: bool,
) -> Plan {
    let ended = Ended {
        result,
        cancelled,
        still_held: held,
        delivered,
    };
    plan::plan(ended, &policy(), STAGE, &claim())
}

#[test]
fn plan_table() {
    let done = Shape {
        report: Some(Sent {
            what: "result",
            id: ReportId::Result,
            claimed: true,
            required: true,
        }),
        ..only(Settle::Ack)
    };
    let leave = only(Settle::Leave);
    let term = only(Settle::Term);
    // (row, handler result (None: claim lost while running), delivered,
    //  cancel fired, claim held at the check, shape, metric label)
    #[allow(clippy::type_complexity)]
    let rows: Vec<(
        &str,
        Option<Result<Outcome, StageError>>,
        u32,
        bool,
        bool,
        Shape,
        &str,
    )> = vec![
        (
            "Ok: result, then ACK",
            Some(ok()),
            1,
            false,
            true,
            done,
            "ok",
        ),
        (
            "Ok after the cancel fired still counts",
            Some(ok()),
            1,
            true,
            true,
            Shape {
                report: Some(Sent {
                    what: "result",
                    id: ReportId::Result,
                    claimed: true,
                    required: true,
                }),
                ..only(Settle::Ack)
            },
            "ok",
        ),
        (
            "Retry: release, NAK 100 ms",
            Some(Err(retry(0))),
            1,
            false,
            true,
            retried(nak(100), None),
            "retry",
        ),
        (
            "Retry on delivery 2: NAK 200 ms",
            Some(Err(retry(0))),
            2,
            false,
            true,
            retried(nak(200), None),
            "retry",
        ),
        (
            "Retry with a Retry-After above the backoff: NAK after it",
            Some(Err(retry(7_000))),
            1,
            false,
            true,
            retried(nak(7_000), None),
            "retry",
        ),
        (
            "Retry on the last delivery: gave up (letter, failed result, TERM)",
            Some(Err(retry(0))),
            MAX_ATTEMPTS,
            false,
            true,
            failed(ErrorKind::Fetch, true),
            "retry",
        ),
        (
            "Retry of a non-retryable error: letter, failed result, TERM",
            Some(Err(StageError::Retry {
                error: fetch_error(false),
                delay: Duration::ZERO,
            })),
            1,
            false,
            true,
            failed(ErrorKind::Fetch, true),
            "retry",
        ),
        (
            "Retry of a kind the policy never retries: letter, failed result, TERM",
            Some(Err(StageError::retry(
                ErrorKind::BadDataset,
                "x",
                Duration::ZERO,
            ))),
            1,
            false,
            true,
            failed(ErrorKind::BadDataset, true),
            "retry",
        ),
        (
            "Retry with a report: the report under the claim, release, NAK",
            Some(Err(retry_reporting())),
            1,
            false,
            true,
            retried(nak(100), Some(1)),
            "retry",
        ),
        (
            "Retry with a report on delivery 2: reported under delivery 2's id",
            Some(Err(retry_reporting())),
            2,
            false,
            true,
            retried(nak(200), Some(2)),
            "retry",
        ),
        (
            "Retry with a report, out of attempts: no report, gave up",
            Some(Err(retry_reporting())),
            MAX_ATTEMPTS,
            false,
            true,
            failed(ErrorKind::Oom, true),
            "retry",
        ),
        (
            "Fail: letter, failed result under the claim, TERM",
            Some(Err(StageError::fail(ErrorKind::InvalidSpec, "no"))),
            1,
            false,
            true,
            failed(ErrorKind::InvalidSpec, true),
            "failed",
        ),
        (
            "Cancelled: TERM, no letter",
            Some(Err(StageError::Cancelled)),
            1,
            false,
            true,
            only(Settle::Term),
            "cancelled",
        ),
        (
            "Cancelled with the claim lost: TERM (the job is final)",
            Some(Err(StageError::Cancelled)),
            1,
            true,
            false,
            only(Settle::Term),
            "cancelled",
        ),
        (
            "Fail after the cancel fired: cancelled",
            Some(Err(StageError::fail(ErrorKind::Trainer, "killed"))),
            1,
            true,
            true,
            only(Settle::Term),
            "cancelled",
        ),
        (
            "Retry after the cancel fired: cancelled",
            Some(Err(retry(0))),
            1,
            true,
            true,
            only(Settle::Term),
            "cancelled",
        ),
        (
            "Retry with a report after the cancel fired: cancelled, nothing reported",
            Some(Err(retry_reporting())),
            1,
            true,
            true,
            term,
            "cancelled",
        ),
        (
            "Interrupted: release, NAK without delay",
            Some(Err(StageError::Interrupted)),
            1,
            false,
            true,
            retried(Settle::Nak(None), None),
            "interrupted",
        ),
        (
            "Interrupted after the cancel fired: still handed back",
            Some(Err(StageError::Interrupted)),
            1,
            true,
            true,
            retried(Settle::Nak(None), None),
            "interrupted",
        ),
        (
            "claim lost while running: nothing",
            None,
            1,
            true,
            true,
            only(Settle::Leave),
            "claim_lost",
        ),
        (
            "claim lost before reporting Ok: nothing",
            Some(ok()),
            1,
            false,
            false,
            only(Settle::Leave),
            "claim_lost",
        ),
        (
            "claim lost before reporting a Fail: no letter, nothing",
            Some(Err(StageError::fail(ErrorKind::Trainer, "x"))),
            1,
            false,
            false,
            only(Settle::Leave),
            "claim_lost",
        ),
        (
            "claim lost before a Retry: no release, nothing",
            Some(Err(retry(0))),
            1,
            false,
            false,
            only(Settle::Leave),
            "claim_lost",
        ),
        (
            "claim lost before an Interrupted: nothing",
            Some(Err(StageError::Interrupted)),
            1,
            false,
            false,
            leave,
            "claim_lost",
        ),
    ];
    assert_eq!(rows.len(), PLAN_ROWS);
    for (row, result, delivered, cancelled, held, want, label) in rows {
        let plan = planned(result, delivered, cancelled, held);
        assert_eq!(shape(&plan), want, "{row}");
        assert_eq!(plan.finished, Some(label), "{row}");
    }
}

const PLAN_ROWS: usize = 24;

/// What happens to a plan after its own steps: a required report not
/// stored, a claim lost between the report and the ACK.
#[test]
fn settle_after_the_report_table() {
    let ok = planned(Some(ok()), 1, false, true);
    let rows: Vec<(&str, Shape, Shape)> = vec![
        (
            "Ok whose result was not stored: release, NAK 5 s",
            shape(&ok.clone().unreported()),
            retried(nak(5_000), None),
        ),
        (
            "ACK with the claim still held: ACK",
            only(Settle::Ack.fenced(true)),
            only(Settle::Ack),
        ),
        (
            "ACK with the claim lost after the report: no settle",
            only(Settle::Ack.fenced(false)),
            only(Settle::Leave),
        ),
        (
            "a NAK or TERM is not fenced",
            only(Settle::Term.fenced(false)),
            only(Settle::Term),
        ),
    ];
    assert_eq!(rows.len(), SETTLE_ROWS);
    for (row, got, want) in rows {
        assert_eq!(got, want, "{row}");
    }
}

const SETTLE_ROWS: usize = 4;

#[test]
fn giving_up_says_after_how_many_deliveries() {
    let plan = planned(Some(Err(retry(0))), MAX_ATTEMPTS, false, true);
    assert_eq!(plan.why, Why::GaveUp);
    let Some(Report {
        outcome: Outcome::Failed(error),
        claim: Some(claim),
        ..
    }) = plan.report
    else {
        panic!("a failed result under the claim");
    };
    assert_eq!(error.message, "gave up after 3 deliveries: 503");
    assert!(!error.retryable);
    assert_eq!(error.stage(), STAGE, "the result names the stage");
    assert_eq!(claim.token, "t-1");
    assert_eq!(
        plan.dead_letter.map(|l| l.reason),
        Some(error.message.clone())
    );
}

#[test]
fn a_fatal_retry_is_no_longer_retryable_and_a_report_goes_out_as_given() {
    let plan = planned(Some(Err(retry_reporting())), 1, false, true);
    let Some(Report {
        outcome: Outcome::Adjusted(adjusted),
        ..
    }) = plan.report
    else {
        panic!("the handler's report");
    };
    assert_eq!(adjusted.note, "oom: batch_size 4 → 2");
    assert!(matches!(
        plan.why,
        Why::Retry {
            kind: ErrorKind::Oom,
            ..
        }
    ));
    let plan = planned(
        Some(Err(StageError::retry(
            ErrorKind::BadDataset,
            "x",
            Duration::ZERO,
        ))),
        1,
        false,
        true,
    );
    assert_eq!(plan.why, Why::Fatal);
    let Some(Report {
        outcome: Outcome::Failed(error),
        ..
    }) = plan.report
    else {
        panic!("a failed result");
    };
    assert!(!error.retryable);
}

#[test]
fn only_a_cancelled_result_skips_the_claim_check() {
    assert!(!plan::checks_claim(&Err(StageError::Cancelled)));
    for result in [
        ok(),
        Err(retry(0)),
        Err(retry_reporting()),
        Err(StageError::fail(ErrorKind::Trainer, "x")),
        Err(StageError::Interrupted),
    ] {
        assert!(plan::checks_claim(&result), "{result:?}");
    }
}

#[test]
fn stage_errors_show_their_message() {
    assert_eq!(retry(0).to_string(), "503");
    assert_eq!(retry_reporting().to_string(), "out of memory");
    assert_eq!(
        StageError::fail(ErrorKind::InvalidSpec, "training: is required").to_string(),
        "training: is required"
    );
    assert_eq!(StageError::Cancelled.to_string(), "the job was cancelled");
}
