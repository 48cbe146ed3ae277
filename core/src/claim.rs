//! Attempt fencing: which stage runtime holds a task.
//!
//! JetStream delivers at least once: a task comes back after `ack_wait`
//! when its holder is slow, stopped (SIGSTOP) or cut off, and the old
//! holder may wake up and finish. So before running a task the runtime
//! takes a claim in `ty_claims` (`<tenant>.<job>.<stage>`) by
//! compare-and-set, renews its lease with every in-progress ack, checks it
//! once more before reporting, and puts it in the result. The coordinator
//! applies a result only while its claim is still the live one.
//!
//! Claims are written only by stage runtimes and job records only by the
//! coordinator: one kind of writer per document. The lease is wall-clock
//! time of the holder; clocks of the fleet must agree to well within
//! `ack_wait` (NTP does).
//!
//! [`decide`] and [`admits`] are pure and tested without a server; [`Claims`]
//! does the KV work around them.

use async_nats::jetstream::kv;
use prost::Message as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use trainyard_proto::v1::{Stage, TaskClaim};
use trainyard_proto::{Attempt, JobId, TenantId};

/// Extra wait past another holder's lease before trying again, so a
/// renewal in flight lands first.
pub const BUSY_MARGIN: Duration = Duration::from_millis(500);

/// What a runtime may do with a task, given the claim stored for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take it: no claim, or one released, of another attempt or expired.
    Take,
    /// Another runtime holds it under a live lease: try again after this.
    Busy(Duration),
}

/// Whether a runtime may claim `attempt` of a task now.
pub fn decide(stored: Option<&TaskClaim>, attempt: Attempt, now_ms: i64) -> Decision {
    let Some(claim) = stored else {
        return Decision::Take;
    };
    if claim.released || claim.attempt != attempt.0 || claim.lease_until_ms <= now_ms {
        return Decision::Take;
    }
    let left = Duration::from_millis((claim.lease_until_ms - now_ms) as u64);
    Decision::Busy(left + BUSY_MARGIN)
}

/// Why a result is not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the result's claim is no longer the live one")]
    Superseded,
    #[error("the result carries no claim while a live claim holds the task")]
    Unclaimed,
}

/// Whether a result reported under `carried` (its claim, if any) may be
/// applied, given the claim stored now. A result with a claim counts only
/// while that same claim (token, worker, attempt) is stored; a failure
/// reported before any claim was taken counts unless a live claim of the
/// same attempt exists, whose holder will report instead.
pub fn admits(
    carried: Option<&TaskClaim>,
    attempt: Attempt,
    stored: Option<&TaskClaim>,
    now_ms: i64,
) -> Result<(), Rejected> {
    match (carried, stored) {
        (Some(carried), Some(stored))
            if carried.token == stored.token
                && carried.worker_id == stored.worker_id
                && carried.attempt == stored.attempt
                && carried.attempt == attempt.0 =>
        {
            Ok(())
        }
        (Some(_), _) => Err(Rejected::Superseded),
        (None, stored) => match decide(stored, attempt, now_ms) {
            Decision::Take => Ok(()),
            Decision::Busy(_) => Err(Rejected::Unclaimed),
        },
    }
}

/// A claim this runtime holds, with the KV revision it last wrote.
#[derive(Clone, Debug)]
pub struct Held {
    pub claim: TaskClaim,
    pub revision: u64,
    /// The claim was taken over from a holder of the same attempt whose
    /// lease ran out without a release (it died or froze).
    pub took_over: bool,
    /// Log event bytes the job has published from this stage over all its
    /// attempts: starts at the replaced claim's
    /// [`TaskClaim::log_bytes`], raised by whoever publishes the task's
    /// logs, written into the claim with each renewal and the release.
    pub log_bytes: Arc<AtomicU64>,
    key: String,
}

#[cfg(test)]
impl Held {
    /// A claim as if just taken, for tests of what the runtime decides with one.
    pub(crate) fn for_tests(claim: TaskClaim) -> Held {
        Held {
            log_bytes: Arc::new(AtomicU64::new(claim.log_bytes)),
            claim,
            revision: 1,
            took_over: false,
            key: String::new(),
        }
    }
}

/// How acquiring went.
#[derive(Debug)]
pub enum Acquire {
    Held(Held),
    /// Another runtime holds it; try again after this.
    Busy(Duration),
    /// The bucket could not be read or written; try again shortly.
    Unavailable(String),
}

/// How a renewal went.
#[derive(Debug, PartialEq, Eq)]
pub enum Renew {
    Renewed,
    /// Someone else wrote the claim: it is theirs now.
    Lost,
    /// The bucket did not answer; the lease still runs until its end.
    Unavailable(String),
}

/// The claims bucket, as the stage runtime uses it.
#[derive(Clone)]
pub struct Claims {
    kv: kv::Store,
    lease: Duration,
}

impl Claims {
    /// `lease` is how long a claim lives without renewal (the consumer's `ack_wait`).
    pub fn new(kv: kv::Store, lease: Duration) -> Self {
        Self { kv, lease }
    }

    /// The claim stored for a task, if any.
    pub async fn stored(
        kv: &kv::Store,
        tenant: &TenantId,
        job: &JobId,
        stage: Stage,
    ) -> Result<Option<TaskClaim>, kv::EntryError> {
        let key = crate::topology::claim_key(tenant, job, stage);
        let entry = kv.entry(key).await?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| TaskClaim::decode(e.value).ok()))
    }

    /// Takes the claim on `attempt` of a task for `worker_id`, by CAS.
    pub async fn acquire(
        &self,
        tenant: &TenantId,
        job: &JobId,
        stage: Stage,
        attempt: Attempt,
        worker_id: &str,
    ) -> Acquire {
        let key = crate::topology::claim_key(tenant, job, stage);
        let entry = match self.kv.entry(key.clone()).await {
            Ok(entry) => entry,
            Err(error) => return Acquire::Unavailable(error.to_string()),
        };
        let stored = entry
            .as_ref()
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| TaskClaim::decode(e.value.clone()).ok());
        let now = crate::now_ms();
        if let Decision::Busy(wait) = decide(stored.as_ref(), attempt, now) {
            return Acquire::Busy(wait);
        }
        let took_over = stored
            .as_ref()
            .is_some_and(|c| c.attempt == attempt.0 && !c.released);
        let claim = TaskClaim {
            stage: stage as i32,
            attempt: attempt.0,
            worker_id: worker_id.to_string(),
            token: uuid::Uuid::now_v7().simple().to_string(),
            lease_until_ms: now + self.lease.as_millis() as i64,
            released: false,
            // The job's log bytes go on across attempts and takeovers.
            log_bytes: stored.as_ref().map(|c| c.log_bytes).unwrap_or(0),
        };
        let value = claim.encode_to_vec().into();
        let written = match &entry {
            None => self.kv.create(&key, value).await.map_err(|e| {
                (
                    e.kind() == kv::CreateErrorKind::AlreadyExists,
                    e.to_string(),
                )
            }),
            // Deleted or purged entries are replaced on their revision too.
            Some(entry) => self
                .kv
                .update(&key, value, entry.revision)
                .await
                .map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
        };
        match written {
            Ok(revision) => Acquire::Held(Held {
                log_bytes: Arc::new(AtomicU64::new(claim.log_bytes)),
                claim,
                revision,
                took_over,
                key,
            }),
            // Another runtime won the race: its lease is fresh.
            Err((true, _)) => Acquire::Busy(self.lease + BUSY_MARGIN),
            Err((false, error)) => Acquire::Unavailable(error),
        }
    }

    /// Extends the lease by CAS on the revision this runtime last wrote.
    pub async fn renew(&self, held: &mut Held) -> Renew {
        let mut next = held.claim.clone();
        next.lease_until_ms = crate::now_ms() + self.lease.as_millis() as i64;
        self.write(held, next).await
    }

    /// Hands the claim back so the next delivery need not wait for the lease.
    pub async fn release(&self, held: &mut Held) -> Renew {
        let mut next = held.claim.clone();
        next.released = true;
        self.write(held, next).await
    }

    async fn write(&self, held: &mut Held, mut next: TaskClaim) -> Renew {
        next.log_bytes = next.log_bytes.max(held.log_bytes.load(Ordering::Relaxed));
        match self
            .kv
            .update(&held.key, next.encode_to_vec().into(), held.revision)
            .await
        {
            Ok(revision) => {
                held.revision = revision;
                held.claim = next;
                Renew::Renewed
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Renew::Lost,
            Err(error) => Renew::Unavailable(error.to_string()),
        }
    }
}

impl Held {
    /// The lease has run out by this runtime's own clock.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.claim.lease_until_ms <= now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(attempt: u32, worker: &str, token: &str, lease_until_ms: i64) -> TaskClaim {
        TaskClaim {
            stage: Stage::Train as i32,
            attempt,
            worker_id: worker.into(),
            token: token.into(),
            lease_until_ms,
            released: false,
            log_bytes: 0,
        }
    }

    #[test]
    fn a_free_task_is_taken() {
        assert_eq!(decide(None, Attempt(1), 1_000), Decision::Take);
    }

    #[test]
    fn a_live_lease_of_another_holder_makes_the_task_busy_until_it_ends() {
        let held = claim(1, "w-a", "t1", 5_000);
        assert_eq!(
            decide(Some(&held), Attempt(1), 4_000),
            Decision::Busy(Duration::from_secs(1) + BUSY_MARGIN)
        );
    }

    #[test]
    fn an_expired_released_or_older_claim_is_taken_over() {
        let expired = claim(1, "w-a", "t1", 5_000);
        assert_eq!(decide(Some(&expired), Attempt(1), 5_000), Decision::Take);
        let mut released = claim(1, "w-a", "t1", 9_000);
        released.released = true;
        assert_eq!(decide(Some(&released), Attempt(1), 5_000), Decision::Take);
        let older = claim(1, "w-a", "t1", 9_000);
        assert_eq!(decide(Some(&older), Attempt(2), 5_000), Decision::Take);
    }

    #[test]
    fn a_result_counts_only_under_the_live_claim() {
        let live = claim(1, "w-b", "t2", 9_000);
        assert_eq!(admits(Some(&live), Attempt(1), Some(&live), 5_000), Ok(()));
        // A zombie still carrying the claim the task was taken from.
        let zombie = claim(1, "w-a", "t1", 4_000);
        assert_eq!(
            admits(Some(&zombie), Attempt(1), Some(&live), 5_000),
            Err(Rejected::Superseded)
        );
        // The same worker under an older claim (a redelivery it took again).
        let same_worker_old = claim(1, "w-b", "t0", 4_000);
        assert_eq!(
            admits(Some(&same_worker_old), Attempt(1), Some(&live), 5_000),
            Err(Rejected::Superseded)
        );
        // A claim of another attempt, or no claim stored at all.
        assert_eq!(
            admits(Some(&live), Attempt(2), Some(&live), 5_000),
            Err(Rejected::Superseded)
        );
        assert_eq!(
            admits(Some(&live), Attempt(1), None, 5_000),
            Err(Rejected::Superseded)
        );
    }

    #[test]
    fn an_unclaimed_failure_counts_unless_a_live_claim_holds_the_task() {
        assert_eq!(admits(None, Attempt(1), None, 5_000), Ok(()));
        let live = claim(1, "w-b", "t2", 9_000);
        assert_eq!(
            admits(None, Attempt(1), Some(&live), 5_000),
            Err(Rejected::Unclaimed)
        );
        assert_eq!(admits(None, Attempt(1), Some(&live), 9_000), Ok(()));
    }
}
