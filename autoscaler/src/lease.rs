//! What the autoscaler keeps in its `ty_autoscaler` bucket: the leader's
//! lease (several replicas run, one plans at a time) and each pool's
//! planner memory, so a new leader continues where the last one stopped.
//!
//! The lease is the `leader` key: its holder and when it expires. A
//! replica takes it by compare-and-set (create when absent, update at the
//! read revision when it is its own or expired) at the start of every
//! pass, and acts in that pass only when it holds it. A leader that stops
//! renewing loses it `lease_ms` later; one whose renewal fails stops
//! acting at once.
//!
//! A pool's memory (`memory.<pool>`) is written by compare-and-set too,
//! before the machines it names are started: a leader deposed in between
//! fails the write and starts nothing.
//!
//! What a leader learns is kept there too, so a failover does not lose it:
//! seconds per training step (`learnt`, [`crate::backlog::StepCosts`]) and
//! the hosts it avoids, with until when (`avoid`, [`AvoidedHosts`]). The
//! leader merges what it learnt into the stored value and writes it by
//! compare-and-set ([`persist`]); a replica taking the lease reads both.
//!
//! The stop flag (`stop`) is set when the provider reports the account's
//! spend limit: from then on no pool starts a machine (releases, drains
//! and reaping go on) until an operator clears it (`yard fleet resume`).

use async_nats::jetstream::kv;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::plan::Memory;

/// The lease's key.
pub const LEADER_KEY: &str = "leader";

/// The lease's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    pub holder: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
}

/// Whether `me` may take the lease now, given its current value.
pub fn may_take(current: Option<&LeaseValue>, me: &str, now_ms: i64) -> bool {
    match current {
        None => true,
        Some(lease) => lease.holder == me || lease.expires_at_ms <= now_ms,
    }
}

/// Why a bucket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("kv: {0}")]
    Kv(String),
    #[error("another replica wrote first")]
    Lost,
}

fn kv_err(e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Kv(e.to_string())
}

/// One replica's view of the lease.
pub struct Lease {
    kv: kv::Store,
    holder: String,
    ttl_ms: i64,
}

impl Lease {
    pub fn new(kv: kv::Store, holder: String, ttl_ms: u64) -> Self {
        Self {
            kv,
            holder,
            ttl_ms: ttl_ms.max(1) as i64,
        }
    }

    /// This replica's name in the lease.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes or renews the lease; `Ok(false)` when another replica holds it.
    pub async fn acquire(&self, now_ms: i64) -> Result<bool, LeaseError> {
        let entry = self.kv.entry(LEADER_KEY).await.map_err(kv_err)?;
        let live = entry.as_ref().filter(|e| e.operation == kv::Operation::Put);
        let current = live.and_then(|e| serde_json::from_slice::<LeaseValue>(&e.value).ok());
        if !may_take(current.as_ref(), &self.holder, now_ms) {
            return Ok(false);
        }
        let value = serde_json::to_vec(&LeaseValue {
            holder: self.holder.clone(),
            expires_at_ms: now_ms + self.ttl_ms,
        })
        .map_err(kv_err)?;
        let written = match &entry {
            Some(e) => self
                .kv
                .update(LEADER_KEY, value.into(), e.revision)
                .await
                .is_ok(),
            None => self.kv.create(LEADER_KEY, value.into()).await.is_ok(),
        };
        Ok(written)
    }

    /// Gives the lease up (a clean shutdown), if this replica holds it.
    pub async fn release(&self) {
        if let Ok(Some(entry)) = self.kv.entry(LEADER_KEY).await
            && entry.operation == kv::Operation::Put
            && serde_json::from_slice::<LeaseValue>(&entry.value)
                .is_ok_and(|l| l.holder == self.holder)
            && let Err(error) = self
                .kv
                .purge_expect_revision(LEADER_KEY, Some(entry.revision))
                .await
        {
            tracing::debug!(%error, "could not give the lease up");
        }
    }
}

/// A pool's memory as kept in the bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMemory {
    pub last_up_ms: i64,
    pub last_down_ms: i64,
    /// The index of the next machine's name (`<fleet>-<pool>-<index>`):
    /// never reused, so a launch repeated after a failover finds its
    /// machine instead of starting another.
    pub next_index: u64,
    /// The planner's last machine price seen ([`Memory::price_millis`]).
    #[serde(default)]
    pub price_millis: u64,
}

impl PoolMemory {
    pub fn planner(&self) -> Memory {
        Memory {
            last_up_ms: self.last_up_ms,
            last_down_ms: self.last_down_ms,
            price_millis: self.price_millis,
        }
    }
}

/// The key of a pool's memory.
pub fn memory_key(pool: &str) -> String {
    format!("memory.{pool}")
}

/// Reads a pool's memory and its revision (0: none yet).
pub async fn read_memory(kv: &kv::Store, pool: &str) -> Result<(PoolMemory, u64), LeaseError> {
    match kv.entry(memory_key(pool)).await.map_err(kv_err)? {
        Some(e) if e.operation == kv::Operation::Put => Ok((
            serde_json::from_slice(&e.value).unwrap_or_default(),
            e.revision,
        )),
        Some(e) => Ok((PoolMemory::default(), e.revision)),
        None => Ok((PoolMemory::default(), 0)),
    }
}

/// Writes a pool's memory at `revision` (0: create); the new revision.
pub async fn write_memory(
    kv: &kv::Store,
    pool: &str,
    memory: &PoolMemory,
    revision: u64,
) -> Result<u64, LeaseError> {
    let value = serde_json::to_vec(memory).map_err(kv_err)?;
    let key = memory_key(pool);
    if revision == 0 {
        kv.create(&key, value.into())
            .await
            .map_err(|_| LeaseError::Lost)
    } else {
        kv.update(&key, value.into(), revision)
            .await
            .map_err(|_| LeaseError::Lost)
    }
}

/// The key of the seconds per step learnt from finished trainings.
pub const LEARNT_KEY: &str = "learnt";

/// The key of the hosts avoided.
pub const AVOID_KEY: &str = "avoid";

/// Hosts to avoid (where machines exited), each until when (ms since the
/// Unix epoch).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvoidedHosts {
    #[serde(default)]
    pub hosts: BTreeMap<String, i64>,
}

impl AvoidedHosts {
    /// Both lists as one, each host until the later of its two times,
    /// without those over by `now_ms`.
    pub fn merged(a: &AvoidedHosts, b: &AvoidedHosts, now_ms: i64) -> AvoidedHosts {
        let mut hosts = a.hosts.clone();
        for (host, until) in &b.hosts {
            let at = hosts.entry(host.clone()).or_insert(*until);
            *at = (*at).max(*until);
        }
        hosts.retain(|_, until| *until > now_ms);
        AvoidedHosts { hosts }
    }
}

/// Reads the JSON value under `key` and its revision (0: none yet); no
/// value when there is none or it does not parse.
pub async fn read_json<T: DeserializeOwned>(
    kv: &kv::Store,
    key: &str,
) -> Result<(Option<T>, u64), LeaseError> {
    match kv.entry(key).await.map_err(kv_err)? {
        Some(e) if e.operation == kv::Operation::Put => {
            let value = serde_json::from_slice(&e.value)
                .inspect_err(|error| tracing::warn!(key, %error, "unreadable value; replaced"))
                .ok();
            Ok((value, e.revision))
        }
        Some(e) => Ok((None, e.revision)),
        None => Ok((None, 0)),
    }
}

/// Writes `value` under `key` at `revision` (0: create); the new revision.
pub async fn write_json<T: Serialize>(
    kv: &kv::Store,
    key: &str,
    value: &T,
    revision: u64,
) -> Result<u64, LeaseError> {
    let json = serde_json::to_vec(value).map_err(kv_err)?;
    if revision == 0 {
        kv.create(key, json.into())
            .await
            .map_err(|_| LeaseError::Lost)
    } else {
        kv.update(key, json.into(), revision)
            .await
            .map_err(|_| LeaseError::Lost)
    }
}

/// Writes `merge(stored, ours)` under `key` by compare-and-set, reading
/// again once when another write came in between; the value written.
pub async fn persist<T, F>(kv: &kv::Store, key: &str, ours: &T, merge: F) -> Result<T, LeaseError>
where
    T: Serialize + DeserializeOwned + Default,
    F: Fn(&T, &T) -> T,
{
    let mut tries = 2;
    loop {
        let (stored, revision) = read_json::<T>(kv, key).await?;
        let value = merge(&stored.unwrap_or_default(), ours);
        match write_json(kv, key, &value, revision).await {
            Ok(_) => return Ok(value),
            Err(LeaseError::Lost) if tries > 1 => tries -= 1,
            Err(error) => return Err(error),
        }
    }
}

/// The stop flag's key.
pub const STOP_KEY: &str = "stop";

/// Why scale-up stopped: set by the pass that met the provider's spend
/// limit, cleared only by an operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopFlag {
    /// `spend_limit`.
    pub reason: String,
    /// What the provider said.
    pub message: String,
    /// The pool whose launch met the limit.
    pub pool: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// The reason a spend limit sets.
pub const STOP_SPEND_LIMIT: &str = "spend_limit";

/// The stop flag, if set.
pub async fn read_stop(kv: &kv::Store) -> Result<Option<StopFlag>, LeaseError> {
    match kv.entry(STOP_KEY).await.map_err(kv_err)? {
        Some(e) if e.operation == kv::Operation::Put => {
            // A flag we cannot read still stops: better idle than overspent.
            Ok(Some(serde_json::from_slice(&e.value).unwrap_or(StopFlag {
                reason: "unreadable".into(),
                message: String::from_utf8_lossy(&e.value).into_owned(),
                pool: String::new(),
                at_ms: 0,
            })))
        }
        _ => Ok(None),
    }
}

/// Sets the stop flag unless one is set already (the first reason stays);
/// `Ok(true)` when this call set it.
pub async fn set_stop(kv: &kv::Store, flag: &StopFlag) -> Result<bool, LeaseError> {
    let value = serde_json::to_vec(flag).map_err(kv_err)?;
    match kv.entry(STOP_KEY).await.map_err(kv_err)? {
        Some(e) if e.operation == kv::Operation::Put => Ok(false),
        Some(e) => kv
            .update(STOP_KEY, value.into(), e.revision)
            .await
            .map(|_| true)
            .map_err(|_| LeaseError::Lost),
        None => kv
            .create(STOP_KEY, value.into())
            .await
            .map(|_| true)
            .map_err(|_| LeaseError::Lost),
    }
}

/// Clears the stop flag; the flag that was set, if any.
pub async fn clear_stop(kv: &kv::Store) -> Result<Option<StopFlag>, LeaseError> {
    let current = read_stop(kv).await?;
    if current.is_some() {
        kv.delete(STOP_KEY).await.map_err(kv_err)?;
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avoided_hosts_merge_to_the_later_time_and_drop_the_past() {
        let a = AvoidedHosts {
            hosts: [("EU-RO-1".to_string(), 5_000), ("US-TX-3".to_string(), 900)].into(),
        };
        let b = AvoidedHosts {
            hosts: [
                ("EU-RO-1".to_string(), 7_000),
                ("CA-MTL-1".to_string(), 3_000),
            ]
            .into(),
        };
        let merged = AvoidedHosts::merged(&a, &b, 1_000);
        assert_eq!(
            merged.hosts,
            [
                ("CA-MTL-1".to_string(), 3_000),
                ("EU-RO-1".to_string(), 7_000)
            ]
            .into()
        );
        assert_eq!(merged, AvoidedHosts::merged(&b, &a, 1_000), "either way");
        let json = serde_json::to_string(&merged).expect("json");
        assert_eq!(json, r#"{"hosts":{"CA-MTL-1":3000,"EU-RO-1":7000}}"#);
        assert_eq!(
            serde_json::from_str::<AvoidedHosts>(&json).expect("read back"),
            merged
        );
    }

    #[test]
    fn the_lease_goes_to_its_holder_or_anyone_once_expired() {
        let held = LeaseValue {
            holder: "a".into(),
            expires_at_ms: 1_000,
        };
        assert!(may_take(None, "b", 0));
        assert!(may_take(Some(&held), "a", 500));
        assert!(!may_take(Some(&held), "b", 999));
        assert!(may_take(Some(&held), "b", 1_000));
    }
}
