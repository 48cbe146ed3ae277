//! What to do with a task message, decided without doing it: a [`Plan`]
//! names the dead letter to write, the result to report, whether to
//! release the claim and how to settle the message. [`plan`] makes the
//! plan for a task whose handler ran; `admit.rs` makes the plans that end
//! a task before it runs. `execute.rs` carries a plan out.
//!
//! The settle table (see the module doc of `runtime` for the picture):
//!
//! | how it ended | dead letter | report | release | settle |
//! |---|---|---|---|---|
//! | claim lost (while running or at the check after) | – | – | – | leave |
//! | `Ok` | – | result (required) | – | ACK if the claim holds, else leave |
//! | `Ok`, the report not stored | – | – | yes | NAK 5 s |
//! | `Retry`, the policy retries | – | the handler's report, if any | yes | DEFER (policy delay, ≥ the hint, ≤ the fleet's maximum) |
//! | `Retry`, a fatal kind / out of attempts | yes | failed result | – | TERM |
//! | `Fail` | yes | failed result | – | TERM |
//! | `Cancelled` (or `Fail`/`Retry` once the cancel token fired) | – | – | – | TERM |
//! | `Interrupted` | – | – | yes | NAK, no delay |

use super::stage::{StageError, job_error};
use crate::retry::{Decision, Policy};
use std::time::Duration;
use trainyard_proto::v1::{ErrorKind, JobError, Stage, TaskClaim, stage_result::Outcome};

/// How long a task whose result could not be stored waits before it is
/// delivered again.
pub(super) const UNREPORTED_DELAY: Duration = Duration::from_secs(5);
/// How long a task held past its cap (a store unreadable) waits before it
/// is delivered again.
pub(super) const HELD_TOO_LONG_DELAY: Duration = Duration::from_secs(2);

/// How the runtime leaves a task message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settle {
    /// ACK, once the claim proved still this runtime's after the report
    /// ([`Settle::fenced`]).
    Ack,
    Nak(Option<Duration>),
    /// Hand the task back to run again after this delay without holding a
    /// slot of the stage's consumer meanwhile: republish it as a schedule
    /// due then (counting this message's deliveries), then ACK this
    /// message. If the schedule cannot be stored: NAK with the delay.
    Defer(Duration),
    Term,
    /// Leave the message alone: it belongs to the claim's new holder.
    Leave,
}

impl Settle {
    /// The settle after the claim was checked once more: an ACK of a
    /// runtime that lost its claim (frozen between report and ack) would
    /// remove the message the new holder is working on.
    pub(super) fn fenced(self, still_held: bool) -> Settle {
        match self {
            Settle::Ack if !still_held => Settle::Leave,
            other => other,
        }
    }
}

/// Which `Nats-Msg-Id` a report is stored under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReportId {
    /// The attempt's result, under the claim's token
    /// ([`crate::topology::result_msg_id`]).
    Result,
    /// The report a retry of this delivery carries
    /// ([`crate::topology::retry_report_msg_id`]).
    Retry { delivered: u32 },
}

/// A stage result to publish.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Report {
    pub outcome: Outcome,
    pub id: ReportId,
    /// The claim it was reached under; none before a claim was taken.
    pub claim: Option<TaskClaim>,
    /// The message may be settled as planned only once this is stored;
    /// otherwise the plan becomes [`Plan::unreported`].
    pub required: bool,
}

/// A dead letter to write.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Letter {
    pub reason: String,
    pub kind: ErrorKind,
}

/// Why a plan is what it is: what the executor logs and counts.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Why {
    /// Undecodable, or ids that do not parse.
    Poison,
    OutOfDeliveries,
    /// Nothing to do: the job is final, the attempt stale, no record.
    Dropped(&'static str),
    /// Another runtime holds the claim under a live lease.
    Busy,
    /// A store stayed unreadable past the hold's cap.
    HeldTooLong,
    Done,
    Retry {
        kind: ErrorKind,
        delay: Duration,
        message: String,
    },
    /// The handler failed the task.
    Failed,
    /// The handler asked for a retry the policy refuses (a fatal kind).
    Fatal,
    GaveUp,
    Cancelled,
    Interrupted,
    /// The claim is another runtime's: when it was found lost.
    ClaimLost(&'static str),
}

/// What the runtime does with a task message, in this order: dead letter,
/// report, release, settle.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Plan {
    pub why: Why,
    pub dead_letter: Option<Letter>,
    pub report: Option<Report>,
    pub release: bool,
    pub settle: Settle,
    /// The outcome label of the stage-duration metric, for a plan made
    /// after the handler ran.
    pub finished: Option<&'static str>,
}

impl Plan {
    /// Only a settle.
    pub(super) fn settle(why: Why, settle: Settle) -> Plan {
        Plan {
            why,
            dead_letter: None,
            report: None,
            release: false,
            settle,
            finished: None,
        }
    }

    /// The plan once its required report could not be stored: hand the
    /// task back (release the claim, NAK after a pause) so a later
    /// delivery reports it.
    pub(super) fn unreported(self) -> Plan {
        Plan {
            report: None,
            release: true,
            settle: Settle::Nak(Some(UNREPORTED_DELAY)),
            ..self
        }
    }

    /// A task held past its cap while a store could not be read.
    pub(super) fn held_too_long() -> Plan {
        Plan::settle(Why::HeldTooLong, Settle::Nak(Some(HELD_TOO_LONG_DELAY)))
    }

    /// A task that failed for good: one dead letter (the reason and kind),
    /// then the failed result (under `claim`, if one was taken), then TERM.
    pub(super) fn failed(
        why: Why,
        mut error: JobError,
        stage: Stage,
        claim: Option<&TaskClaim>,
    ) -> Plan {
        let letter = Letter {
            reason: error.message.clone(),
            kind: error.kind(),
        };
        error.stage = stage as i32;
        Plan {
            dead_letter: Some(letter),
            report: Some(Report {
                outcome: Outcome::Failed(error),
                id: ReportId::Result,
                claim: claim.cloned(),
                required: false,
            }),
            ..Plan::settle(why, Settle::Term)
        }
    }

    /// A task that cannot run at all (undecodable, bad ids, out of
    /// deliveries): dead letter, failed result if the job is known, TERM.
    pub(super) fn poison(why: Why, reason: String, stage: Stage, job_known: bool) -> Plan {
        let mut plan = Plan::failed(
            why,
            job_error(ErrorKind::Poison, reason, false),
            stage,
            None,
        );
        if !job_known {
            plan.report = None;
        }
        plan
    }
}

/// How a claimed task's handler ended, as far as the plan cares.
#[derive(Debug)]
pub(super) struct Ended {
    /// `None`: the claim was lost while the handler ran (the heartbeat
    /// stopped it).
    pub result: Option<Result<Outcome, StageError>>,
    /// The task's cancel token fired while it ran.
    pub cancelled: bool,
    /// The claim was still this runtime's when checked after the handler
    /// (checked only when [`checks_claim`] says so).
    pub still_held: bool,
    /// Deliveries of the message so far, from 1.
    pub delivered: u32,
}

/// Whether the claim must be checked once more before `result` counts. A
/// cancelled task is termed whoever holds the claim: the job is final.
pub(super) fn checks_claim(result: &Result<Outcome, StageError>) -> bool {
    !matches!(result, Err(StageError::Cancelled))
}

/// The plan for a task whose handler ran under `claim`.
pub(super) fn plan(ended: Ended, policy: &Policy, stage: Stage, claim: &TaskClaim) -> Plan {
    let lost = |when| Plan {
        finished: Some("claim_lost"),
        ..Plan::settle(Why::ClaimLost(when), Settle::Leave)
    };
    let Some(result) = ended.result else {
        return lost("while running");
    };
    // The handler's outcome counts only if the claim is still ours.
    if checks_claim(&result) && !ended.still_held {
        return lost("before reporting");
    }
    // A cancel message arrived while it ran: the job is final already, and
    // however the handler ended (a killed trainer looks like a failure)
    // nothing is reported and nothing dead-lettered.
    let result = match result {
        Err(
            StageError::Fail(_) | StageError::Retry { .. } | StageError::RetryWithReport { .. },
        ) if ended.cancelled => Err(StageError::Cancelled),
        other => other,
    };
    let finished = finished_label(&result);
    let plan = match result {
        Ok(outcome) => Plan {
            report: Some(Report {
                outcome,
                id: ReportId::Result,
                claim: Some(claim.clone()),
                required: true,
            }),
            ..Plan::settle(Why::Done, Settle::Ack)
        },
        Err(StageError::Retry { error, delay }) => {
            retry(error, delay, None, ended.delivered, policy, stage, claim)
        }
        Err(StageError::RetryWithReport {
            error,
            delay,
            report,
        }) => retry(
            error,
            delay,
            Some(*report),
            ended.delivered,
            policy,
            stage,
            claim,
        ),
        Err(StageError::Fail(error)) => Plan::failed(Why::Failed, error, stage, Some(claim)),
        Err(StageError::Cancelled) => Plan::settle(Why::Cancelled, Settle::Term),
        Err(StageError::Interrupted) => Plan {
            release: true,
            ..Plan::settle(Why::Interrupted, Settle::Nak(None))
        },
    };
    Plan {
        finished: Some(finished),
        ..plan
    }
}

/// The retry policy applied to a transient failure; the handler's report
/// goes out only when the task is retried.
fn retry(
    mut error: JobError,
    hint: Duration,
    report: Option<Outcome>,
    delivered: u32,
    policy: &Policy,
    stage: Stage,
    claim: &TaskClaim,
) -> Plan {
    match policy.decide(&error, delivered, hint) {
        Decision::Retry(delay) => Plan {
            report: report.map(|outcome| Report {
                outcome,
                id: ReportId::Retry { delivered },
                claim: Some(claim.clone()),
                required: false,
            }),
            release: true,
            ..Plan::settle(
                Why::Retry {
                    kind: error.kind(),
                    delay,
                    message: error.message,
                },
                Settle::Defer(delay),
            )
        },
        Decision::Fail => {
            error.retryable = false;
            Plan::failed(Why::Fatal, error, stage, Some(claim))
        }
        Decision::GiveUp => {
            error.message = format!("gave up after {delivered} deliveries: {}", error.message);
            error.retryable = false;
            Plan::failed(Why::GaveUp, error, stage, Some(claim))
        }
    }
}

/// The outcome label of the stage-duration metric.
fn finished_label(result: &Result<Outcome, StageError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(StageError::Retry { .. } | StageError::RetryWithReport { .. }) => "retry",
        Err(StageError::Fail(_)) => "failed",
        Err(StageError::Cancelled) => "cancelled",
        Err(StageError::Interrupted) => "interrupted",
    }
}
