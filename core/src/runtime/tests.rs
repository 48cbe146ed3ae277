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

fn term() -> Got {
    Got::Settle(only(Settle::Term))
}

/// Letter, failed result without a claim (when the job is known), TERM.
fn poison(job_known: bool) -> Got {
    let mut shape = failed(ErrorKind::Poison, false);
    if !job_known {
        shape.report = None;
    }
    Got::Settle(shape)
}

/// Checks rows of (what, how admission went, how it should); returns how many.
fn check_admits(rows: Vec<(&str, Got, Got)>) -> usize {
    let count = rows.len();
    for (row, got, want) in rows {
        assert_eq!(got, want, "{row}");
    }
    count
}

#[test]
fn admit_table_decode() {
    let m = meta();
    let decode = |payload: &[u8], header: Option<&TaskMeta>| {
        got(admit::task::<TrainTask>(payload, header, STAGE))
    };
    let rows = vec![
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
            "a good task goes on",
            decode(&task_bytes("acme", "j-1"), None),
            Got::Run,
        ),
    ];
    assert_eq!(check_admits(rows), 5);
}

#[test]
fn admit_table_record() {
    let m = meta();
    let check = |read, delivered| got(admit::record(read, &m, STAGE, delivered, MAX_ATTEMPTS));
    let down = || RecordRead::Unavailable("timed out".into());
    let rows = vec![
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
            check(down(), 1),
            Got::Hold("job record"),
        ),
        ("a live record: go on", check(live(), 1), Got::Run),
    ];
    assert_eq!(check_admits(rows), 9);
}

#[test]
fn admit_table_deliveries_and_claim() {
    let m = meta();
    let check = |read, delivered| got(admit::record(read, &m, STAGE, delivered, MAX_ATTEMPTS));
    let rows = vec![
        (
            "out of deliveries: letter, failed result without a claim, TERM",
            check(live(), MAX_ATTEMPTS + 1),
            poison(true),
        ),
        (
            "out of deliveries, job cancelled: the record first, TERM without a letter",
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
    assert_eq!(check_admits(rows), 8);
}

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

/// How a handler ended, for a row: on delivery 1, the cancel token not
/// fired, the claim held at the check, unless a row says otherwise.
fn ended(result: Result<Outcome, StageError>) -> Ended {
    Ended {
        result: Some(result),
        cancelled: false,
        still_held: true,
        delivered: 1,
    }
}

impl Ended {
    fn on(self, delivered: u32) -> Ended {
        Ended { delivered, ..self }
    }

    fn cancelled(self) -> Ended {
        Ended {
            cancelled: true,
            ..self
        }
    }

    /// The claim found lost at the check after the handler.
    fn lost(self) -> Ended {
        Ended {
            still_held: false,
            ..self
        }
    }
}

fn planned(ended: Ended) -> Plan {
    plan::plan(ended, &policy(), STAGE, &claim())
}

/// Checks rows of (what, how the handler ended, the plan's shape, the
/// stage-duration label); returns how many.
fn check_plans(rows: Vec<(&str, Ended, Shape, &str)>) -> usize {
    let count = rows.len();
    for (row, ended, want, label) in rows {
        let plan = planned(ended);
        assert_eq!(shape(&plan), want, "{row}");
        assert_eq!(plan.finished, Some(label), "{row}");
    }
    count
}

/// Ok: the result under the claim, required before the ACK.
fn done() -> Shape {
    Shape {
        report: Some(Sent {
            what: "result",
            id: ReportId::Result,
            claimed: true,
            required: true,
        }),
        ..only(Settle::Ack)
    }
}

#[test]
fn plan_table_ok_and_fail() {
    let rows = vec![
        ("Ok: result, then ACK", ended(ok()), done(), "ok"),
        (
            "Fail: letter, failed result under the claim, TERM",
            ended(Err(StageError::fail(ErrorKind::InvalidSpec, "no"))),
            failed(ErrorKind::InvalidSpec, true),
            "failed",
        ),
        (
            "Interrupted: release, NAK without delay",
            ended(Err(StageError::Interrupted)),
            retried(Settle::Nak(None), None),
            "interrupted",
        ),
    ];
    assert_eq!(check_plans(rows), 3);
}

#[test]
fn plan_table_retry() {
    let rows = vec![
        (
            "Retry: release, NAK 100 ms",
            ended(Err(retry(0))),
            retried(nak(100), None),
            "retry",
        ),
        (
            "Retry on delivery 2: NAK 200 ms",
            ended(Err(retry(0))).on(2),
            retried(nak(200), None),
            "retry",
        ),
        (
            "Retry with a Retry-After above the backoff: NAK after it",
            ended(Err(retry(7_000))),
            retried(nak(7_000), None),
            "retry",
        ),
        (
            "Retry on the last delivery: gave up (letter, failed result, TERM)",
            ended(Err(retry(0))).on(MAX_ATTEMPTS),
            failed(ErrorKind::Fetch, true),
            "retry",
        ),
        (
            "Retry of a non-retryable error: letter, failed result, TERM",
            ended(Err(StageError::Retry {
                error: fetch_error(false),
                delay: Duration::ZERO,
            })),
            failed(ErrorKind::Fetch, true),
            "retry",
        ),
        (
            "Retry of a kind the policy never retries: letter, failed result, TERM",
            ended(Err(StageError::retry(
                ErrorKind::BadDataset,
                "x",
                Duration::ZERO,
            ))),
            failed(ErrorKind::BadDataset, true),
            "retry",
        ),
    ];
    assert_eq!(check_plans(rows), 6);
}

#[test]
fn plan_table_retry_with_a_report() {
    let rows = vec![
        (
            "the report under the claim, release, NAK",
            ended(Err(retry_reporting())),
            retried(nak(100), Some(1)),
            "retry",
        ),
        (
            "on delivery 2: reported under delivery 2's id",
            ended(Err(retry_reporting())).on(2),
            retried(nak(200), Some(2)),
            "retry",
        ),
        (
            "out of attempts: no report, gave up",
            ended(Err(retry_reporting())).on(MAX_ATTEMPTS),
            failed(ErrorKind::Oom, true),
            "retry",
        ),
        (
            "a kind the policy never retries: no report, failed",
            ended(Err(StageError::RetryWithReport {
                error: job_error(ErrorKind::BadDataset, "x", true),
                delay: Duration::ZERO,
                report: Box::new(ok().unwrap()),
            })),
            failed(ErrorKind::BadDataset, true),
            "retry",
        ),
    ];
    assert_eq!(check_plans(rows), 4);
}

#[test]
fn plan_table_cancel() {
    let term = || only(Settle::Term);
    let rows = vec![
        (
            "Cancelled: TERM, no letter",
            ended(Err(StageError::Cancelled)),
            term(),
            "cancelled",
        ),
        (
            "Cancelled with the claim lost: TERM (the job is final)",
            ended(Err(StageError::Cancelled)).cancelled().lost(),
            term(),
            "cancelled",
        ),
        (
            "Fail after the cancel fired: cancelled",
            ended(Err(StageError::fail(ErrorKind::Trainer, "killed"))).cancelled(),
            term(),
            "cancelled",
        ),
        (
            "Retry after the cancel fired: cancelled",
            ended(Err(retry(0))).cancelled(),
            term(),
            "cancelled",
        ),
        (
            "Retry with a report after the cancel fired: nothing reported",
            ended(Err(retry_reporting())).cancelled(),
            term(),
            "cancelled",
        ),
        (
            "Ok after the cancel fired still counts",
            ended(ok()).cancelled(),
            done(),
            "ok",
        ),
        (
            "Interrupted after the cancel fired: still handed back",
            ended(Err(StageError::Interrupted)).cancelled(),
            retried(Settle::Nak(None), None),
            "interrupted",
        ),
    ];
    assert_eq!(check_plans(rows), 7);
}

#[test]
fn plan_table_claim_lost() {
    let leave = || only(Settle::Leave);
    let while_running = Ended {
        result: None,
        ..ended(ok()).cancelled()
    };
    let rows = vec![
        (
            "while running: nothing",
            while_running,
            leave(),
            "claim_lost",
        ),
        (
            "before reporting Ok: nothing",
            ended(ok()).lost(),
            leave(),
            "claim_lost",
        ),
        (
            "before reporting a Fail: no letter, nothing",
            ended(Err(StageError::fail(ErrorKind::Trainer, "x"))).lost(),
            leave(),
            "claim_lost",
        ),
        (
            "before a Retry: no release, nothing",
            ended(Err(retry(0))).lost(),
            leave(),
            "claim_lost",
        ),
        (
            "before a Retry with a report: nothing reported",
            ended(Err(retry_reporting())).lost(),
            leave(),
            "claim_lost",
        ),
        (
            "before an Interrupted: nothing",
            ended(Err(StageError::Interrupted)).lost(),
            leave(),
            "claim_lost",
        ),
    ];
    assert_eq!(check_plans(rows), 6);
}

/// What happens to a plan after its own steps: a required report not
/// stored, a claim lost between the report and the ACK.
#[test]
fn settle_after_the_report_table() {
    let ok = planned(ended(ok()));
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
    assert_eq!(rows.len(), 4);
    for (row, got, want) in rows {
        assert_eq!(got, want, "{row}");
    }
}

#[test]
fn giving_up_says_after_how_many_deliveries() {
    let plan = planned(ended(Err(retry(0))).on(MAX_ATTEMPTS));
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
    let plan = planned(ended(Err(retry_reporting())));
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
    let fatal = StageError::retry(ErrorKind::BadDataset, "x", Duration::ZERO);
    let plan = planned(ended(Err(fatal)));
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
