//! The autoscaler's passes: every `interval_ms`, the replica holding the
//! lease reads each pool's backlog and machines, asks the planner, and
//! acts — starts machines (named `<fleet>-<pool>-<index>`, the index kept
//! in the pool's memory so a repeated launch finds its machine), releases
//! idle and exited ones, drains busy ones it must, and reaps the fleet's
//! machines no configured pool wants once their worker is gone. A launch
//! refused for the account's spend limit sets the stop flag
//! ([`crate::lease::StopFlag`]): no pool starts anything until an operator
//! clears it, and each such pass is recorded as `spend_stop`.
//!
//! A drain is a request, not a stop: each pass while a machine drains, its
//! service is asked again ([`subject::drain`]; it stops taking tasks and
//! hands its running ones back as on shutdown, its trainer saving through
//! its backend's graceful stop), and the machine is released only once its
//! fresh registry entry says `draining` with no task running (or the entry
//! is gone), or after `drain_timeout_secs` anyway (the decision's error
//! says so). A machine whose entry says `draining` is draining for any
//! replica, so a new leader carries on a drain the last one began.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trainyard_core::config::{AutoscalerConfig, PoolPolicy};
use trainyard_core::registry::{self, Entry};
use trainyard_core::runtime::DrainReply;
use trainyard_core::topology::subject;

use crate::activity::{DrainStep, activity_of, drain_step, view};
use crate::backlog::{BacklogReader, StepCosts, stage_of_pool};
use crate::lease::{
    AVOID_KEY, AvoidedHosts, LEARNT_KEY, Lease, STOP_SPEND_LIMIT, StopFlag, persist, read_json,
    read_memory, read_stop, set_stop, write_memory,
};
use crate::plan::{self, Activity, MachineView, Observation};
use crate::provider::{Launch, Machine, MachineState, Provider, ProviderError};
use crate::record::{self, DecisionRecord, MachineRecord};

/// The buckets and handles one replica works with.
pub struct Buckets {
    /// Core NATS, for drain requests.
    pub nats: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    /// `ty_workers`: the registry.
    pub workers: kv::Store,
    /// `ty_autoscaler`: lease and memory.
    pub state: kv::Store,
    /// `ty_fleet`: decisions and machines per pool.
    pub fleet: kv::Store,
}

/// One autoscaler replica.
pub struct Autoscaler {
    config: AutoscalerConfig,
    provider: Arc<dyn Provider>,
    buckets: Buckets,
    lease: Lease,
    backlog: BacklogReader,
    /// When each machine's registry entry was last seen.
    last_entry: HashMap<String, i64>,
    /// Hosts to avoid until then (ms).
    avoid: BTreeMap<String, i64>,
    /// Machines this replica drains, and since when (ms); released once
    /// their service says it drained.
    draining: HashMap<String, i64>,
    /// Drained machines whose release is under way.
    releasing: Arc<Mutex<HashSet<String>>>,
    /// Drain requests and releases under way.
    drains: TaskTracker,
    /// The last decision recorded per pool.
    last: HashMap<String, DecisionRecord>,
    /// The machines last recorded per pool.
    last_machines: HashMap<String, Vec<MachineRecord>>,
    leading: bool,
}

/// A machine name's part for a pool (`train.a100` → `train-a100`).
fn name_part(pool: &str) -> String {
    pool.replace('.', "-")
}

/// The name of a pool's `index`th machine.
pub fn machine_name(fleet: &str, pool: &str, index: u64) -> String {
    format!("{fleet}-{}-{index}", name_part(pool))
}

impl Autoscaler {
    pub fn new(
        config: AutoscalerConfig,
        provider: Arc<dyn Provider>,
        buckets: Buckets,
        holder: String,
    ) -> Self {
        let lease = Lease::new(buckets.state.clone(), holder, config.lease_ms);
        let backlog = BacklogReader::new(buckets.js.clone());
        Self {
            config,
            provider,
            buckets,
            lease,
            backlog,
            last_entry: HashMap::new(),
            avoid: BTreeMap::new(),
            draining: HashMap::new(),
            releasing: Arc::default(),
            drains: TaskTracker::new(),
            last: HashMap::new(),
            last_machines: HashMap::new(),
            leading: false,
        }
    }

    /// Runs passes until `shutdown`; then gives the lease up and waits
    /// for drains under way.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let every = std::time::Duration::from_millis(self.config.interval_ms.max(50));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            self.pass(trainyard_core::now_ms()).await;
        }
        self.lease.release().await;
        self.drains.close();
        self.drains.wait().await;
    }

    /// One pass.
    pub async fn pass(&mut self, now: i64) {
        match self.lease.acquire(now).await {
            Ok(true) => {
                if !self.leading {
                    tracing::info!(holder = %self.lease.holder(), "autoscaler lease taken");
                    self.adopt(now).await;
                }
                self.leading = true;
            }
            Ok(false) => {
                if self.leading {
                    tracing::warn!("autoscaler lease lost; not acting");
                }
                self.leading = false;
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot renew the autoscaler lease; not acting");
                self.leading = false;
                return;
            }
        }
        let machines = match self.provider.list().await {
            Ok(machines) => machines,
            Err(error) => {
                tracing::warn!(%error, provider = self.provider.name(), "cannot list machines");
                return;
            }
        };
        let entries: HashMap<String, Entry> = match registry::entries(&self.buckets.workers).await {
            Ok(entries) => entries
                .into_iter()
                .map(|e| (e.worker_id.clone(), e))
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the registry");
                return;
            }
        };
        for name in entries.keys() {
            self.last_entry.insert(name.clone(), now);
        }
        self.avoid.retain(|_, until| *until > now);
        match self.backlog.learn_from_deliveries(&self.config).await {
            Ok(true) => self.keep_learnt().await,
            Ok(false) => {}
            Err(error) => tracing::debug!(%error, "cannot read finished trainings"),
        }
        let pools: Vec<(String, PoolPolicy)> = self
            .config
            .pools
            .iter()
            .map(|(p, policy)| (p.clone(), policy.clone()))
            .collect();
        for (pool, policy) in &pools {
            let mine: Vec<&Machine> = machines.iter().filter(|m| &m.pool == pool).collect();
            if !self.pool_pass(now, pool, policy, &mine, &entries).await {
                return; // deposed: stop acting at once
            }
        }
        self.reap_orphans(&machines, &entries).await;
        let known: HashSet<&str> = machines.iter().map(|m| m.name.as_str()).collect();
        self.last_entry
            .retain(|name, _| known.contains(name.as_str()));
        self.draining
            .retain(|name, _| known.contains(name.as_str()));
    }

    /// One pool's pass; `false` when the lease turned out lost.
    async fn pool_pass(
        &mut self,
        now: i64,
        pool: &str,
        policy: &PoolPolicy,
        machines: &[&Machine],
        entries: &HashMap<String, Entry>,
    ) -> bool {
        let mut views: Vec<MachineView> = machines
            .iter()
            .map(|m| {
                let (activity, since) = activity_of(
                    m,
                    entries.get(&m.name),
                    self.last_entry.get(&m.name).copied().unwrap_or(0),
                    self.draining.contains_key(&m.name),
                    self.config.vanished_after_ms as i64,
                    now,
                );
                view(m, activity, since)
            })
            .collect();
        // No data (the backlog cannot be read): nothing is started or
        // released on a guess; only the pool's floor (`min_workers`) is kept
        // and exited machines replaced.
        let (backlog, no_data) = match self
            .backlog
            .read(&self.config, pool, policy.seconds_per_task)
            .await
        {
            Ok(backlog) => (backlog, None),
            Err(error) => (plan::Backlog::default(), Some(error.to_string())),
        };
        let (mut memory, revision) = match read_memory(&self.buckets.state, pool).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(pool, %error, "cannot read the pool's memory");
                return true;
            }
        };
        let observation = Observation {
            now_ms: now,
            backlog,
            machines: views.clone(),
        };
        let mut decision = plan::plan(policy, &observation, memory.planner());
        if no_data.is_some() {
            let exited: Vec<String> = views
                .iter()
                .filter(|v| v.activity == Activity::Exited)
                .map(|v| v.name.clone())
                .collect();
            decision.release.retain(|name| exited.contains(name));
            decision.drain.clear();
            decision.memory.last_down_ms = memory.last_down_ms;
        }
        // The spend limit stopped scale-up: nothing starts until an
        // operator clears the flag (releases and drains go on).
        let stopped = if decision.launch > 0 {
            self.spend_stop().await
        } else {
            None
        };
        if stopped.is_some() {
            decision.launch = 0;
            decision.memory.last_up_ms = memory.last_up_ms;
        }
        // Busy machines to drain now, and those draining already (by this
        // replica, or by their entry): each is asked again, or released.
        let to_drain: Vec<Machine> = views
            .iter_mut()
            .filter(|v| v.activity == Activity::Draining || decision.drain.contains(&v.name))
            .filter_map(|v| {
                v.activity = Activity::Draining;
                let machine = machines.iter().find(|m| m.name == v.name)?;
                (machine.state != MachineState::Exited).then(|| (*machine).clone())
            })
            .collect();
        let names: Vec<String> = (0..u64::from(decision.launch))
            .map(|i| machine_name(&self.config.fleet_name, pool, memory.next_index + i))
            .collect();
        let next = crate::lease::PoolMemory {
            last_up_ms: decision.memory.last_up_ms,
            last_down_ms: decision.memory.last_down_ms,
            next_index: memory.next_index + u64::from(decision.launch),
            price_millis: decision.memory.price_millis,
        };
        if next != memory {
            // Written before acting: a deposed leader fails here.
            if write_memory(&self.buckets.state, pool, &next, revision)
                .await
                .is_err()
            {
                tracing::warn!(
                    pool,
                    "the pool's memory changed under this replica; not acting"
                );
                self.leading = false;
                return false;
            }
            memory = next;
        }
        tracing::trace!(pool, next_index = memory.next_index, "pool memory");
        // Exited machines' hosts are avoided for a while (kept in the
        // bucket when one is new, so the next leader avoids them too).
        let mut newly_avoided = false;
        for machine in machines {
            let exited = views
                .iter()
                .any(|v| v.name == machine.name && v.activity == Activity::Exited);
            if exited && !machine.host.is_empty() && self.provider.name() != "local" {
                newly_avoided |= self
                    .avoid
                    .insert(
                        machine.host.clone(),
                        now + self.config.avoid_host_secs as i64 * 1000,
                    )
                    .is_none();
            }
        }
        if newly_avoided {
            self.keep_avoided(now).await;
        }
        let mut record = DecisionRecord::of(now, &backlog, &views, &decision, names.clone());
        let mut errors = Vec::new();
        let mut spend_stop = stopped;
        for name in &names {
            let launch = self.launch_of(pool, policy, name);
            match self.provider.launch(&launch).await {
                Ok(_) => {}
                Err(ProviderError::SpendLimit(message)) => {
                    errors.push(format!("launch {name}: spend limit: {message}"));
                    spend_stop = Some(self.stop_for_spend(now, pool, &message).await);
                    break; // not one more create
                }
                Err(error) => errors.push(format!("launch {name}: {error}")),
            }
        }
        for name in &decision.release {
            let Some(machine) = machines.iter().find(|m| &m.name == name) else {
                continue;
            };
            // An idle machine that took a task since the registry was read stays.
            if machine.state != MachineState::Exited
                && let Ok(Some(now_entry)) = self.fresh_entry(name).await
                && now_entry.busy_slots > 0
            {
                continue;
            }
            if let Err(error) = self.provider.release(machine).await {
                errors.push(format!("release {name}: {error}"));
            }
        }
        for machine in &to_drain {
            match self.drain(machine, now).await {
                DrainStep::Ask => {}
                DrainStep::Release => record.release.push(machine.name.clone()),
                DrainStep::ReleaseLate => {
                    record.release.push(machine.name.clone());
                    errors.push(format!(
                        "drain {}: not drained after {}s; released anyway",
                        machine.name, self.config.drain_timeout_secs
                    ));
                }
            }
        }
        if let Some(error) = no_data {
            record.reason = "no_data".into();
            errors.insert(0, error);
        }
        if let Some(flag) = spend_stop {
            record.reason = SPEND_STOP_REASON.into();
            errors.push(format!(
                "scale-up stopped since {} by pool {} ({}): `yard fleet resume` clears it",
                flag.at_ms, flag.pool, flag.reason
            ));
        }
        record.error = errors.join("; ");
        let listed = machines
            .iter()
            .zip(&views)
            .map(|(m, v)| MachineRecord::of(m, v, entries.get(&m.name), policy.gpu_count))
            .collect();
        self.record(pool, record, &views, listed).await;
        true
    }

    /// Takes in what earlier leaders learnt (on taking the lease): the
    /// seconds per step and the hosts avoided kept in `ty_autoscaler`.
    async fn adopt(&mut self, now: i64) {
        let state = &self.buckets.state;
        match read_json::<StepCosts>(state, LEARNT_KEY).await {
            Ok((Some(stored), _)) => {
                self.backlog.costs = StepCosts::merged(&self.backlog.costs, &stored);
            }
            Ok((None, _)) => {}
            Err(error) => tracing::warn!(%error, "cannot read the seconds per step learnt"),
        }
        match read_json::<AvoidedHosts>(state, AVOID_KEY).await {
            Ok((Some(stored), _)) => {
                let mine = AvoidedHosts {
                    hosts: std::mem::take(&mut self.avoid),
                };
                self.avoid = AvoidedHosts::merged(&mine, &stored, now).hosts;
            }
            Ok((None, _)) => {}
            Err(error) => tracing::warn!(%error, "cannot read the hosts avoided"),
        }
        tracing::debug!(avoid = ?self.avoid, costs = ?self.backlog.costs, "what earlier leaders learnt");
    }

    /// Keeps the seconds per step learnt in `ty_autoscaler` (a failure is
    /// logged: the next thing learnt writes again).
    async fn keep_learnt(&self) {
        let kept = persist(
            &self.buckets.state,
            LEARNT_KEY,
            &self.backlog.costs,
            StepCosts::merged,
        )
        .await;
        if let Err(error) = kept {
            tracing::warn!(%error, "cannot keep the seconds per step learnt");
        }
    }

    /// Keeps the hosts avoided in `ty_autoscaler` (a failure is logged).
    async fn keep_avoided(&self, now: i64) {
        let mine = AvoidedHosts {
            hosts: self.avoid.clone(),
        };
        let kept = persist(&self.buckets.state, AVOID_KEY, &mine, |stored, ours| {
            AvoidedHosts::merged(stored, ours, now)
        })
        .await;
        if let Err(error) = kept {
            tracing::warn!(%error, "cannot keep the hosts avoided");
        }
    }

    /// The stop flag, if set (unreadable: not stopped, and said so).
    async fn spend_stop(&self) -> Option<StopFlag> {
        match read_stop(&self.buckets.state).await {
            Ok(flag) => flag,
            Err(error) => {
                tracing::warn!(%error, "cannot read the stop flag");
                None
            }
        }
    }

    /// Sets the stop flag for a spend limit met by `pool`'s launch; the
    /// flag in force (the first one set wins).
    async fn stop_for_spend(&self, now: i64, pool: &str, message: &str) -> StopFlag {
        let flag = StopFlag {
            reason: STOP_SPEND_LIMIT.into(),
            message: message.to_string(),
            pool: pool.to_string(),
            at_ms: now,
        };
        match set_stop(&self.buckets.state, &flag).await {
            Ok(true) => {
                tracing::error!(
                    pool,
                    message,
                    "spend limit reached: scale-up stopped until `yard fleet resume`"
                );
                flag
            }
            Ok(false) => self.spend_stop().await.unwrap_or(flag),
            Err(error) => {
                tracing::warn!(pool, %error, "cannot write the stop flag");
                flag
            }
        }
    }

    /// A machine's registry entry as of now.
    async fn fresh_entry(&self, name: &str) -> Result<Option<Entry>, async_nats::Error> {
        let key = trainyard_core::topology::worker_key(name);
        Ok(self
            .buckets
            .workers
            .get(key)
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// What to start for one machine of `pool`.
    fn launch_of(&self, pool: &str, policy: &PoolPolicy, name: &str) -> Launch {
        Launch {
            name: name.to_string(),
            pool: pool.to_string(),
            env: machine_env(pool, policy, name),
            gpu_types: policy.gpu_types.clone(),
            gpu_count: policy.gpu_count,
            interruptible: policy.interruptible,
            bid_per_gpu: policy.bid_per_gpu,
            max_price_per_gpu: policy.max_price_per_gpu,
            avoid_hosts: self.avoid.keys().cloned().collect(),
        }
    }

    /// One pass of a machine's drain: released (by a task of its own)
    /// once its fresh registry entry says it drained — `draining`, no task
    /// running — or is gone, or once `drain_timeout_secs` passed since
    /// this replica began or found the drain; else its service is asked
    /// (again) to drain.
    async fn drain(&mut self, machine: &Machine, now: i64) -> DrainStep {
        let name = machine.name.clone();
        if self.releasing.lock().expect("releasing").contains(&name) {
            return DrainStep::Ask; // its release is under way
        }
        let since = *self.draining.entry(name.clone()).or_insert_with(|| {
            tracing::info!(machine = %name, "draining a busy machine");
            now
        });
        let fresh = self.fresh_entry(&name).await.map_err(|error| {
            tracing::warn!(machine = %name, %error, "cannot read a draining machine's entry");
        });
        let timeout_ms =
            i64::try_from(self.config.drain_timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let fresh = fresh.as_ref().map(Option::as_ref).map_err(|_| ());
        let step = drain_step(fresh, since, now, timeout_ms);
        match step {
            DrainStep::Ask => {
                self.ask_to_drain(machine);
                return step;
            }
            DrainStep::ReleaseLate => {
                tracing::warn!(machine = %name, "not drained in time; releasing it anyway")
            }
            DrainStep::Release => {}
        }
        self.releasing
            .lock()
            .expect("releasing")
            .insert(name.clone());
        let (provider, releasing, machine) = (
            self.provider.clone(),
            self.releasing.clone(),
            machine.clone(),
        );
        // Tracked: `run` waits for it. The machine stays listed (and
        // draining) until released; a failed release is tried again.
        self.drains.spawn(async move {
            match provider.release(&machine).await {
                Ok(()) => tracing::info!(machine = %machine.name, "drained machine released"),
                Err(error) => {
                    tracing::warn!(machine = %machine.name, %error, "cannot release a drained machine")
                }
            }
            releasing.lock().expect("releasing").remove(&machine.name);
        });
        step
    }

    /// Sends a machine's service a drain request (by a task of its own,
    /// waiting [`DRAIN_REQUEST_WAIT`] at most for the answer).
    fn ask_to_drain(&self, machine: &Machine) {
        let Some(subject) = crate::backlog::stage_of_pool(&machine.pool)
            .and_then(|(stage, pool)| subject::drain(stage, pool, &machine.name))
        else {
            tracing::warn!(machine = %machine.name, pool = %machine.pool, "no drain subject for this machine; released after the drain timeout");
            return;
        };
        let (client, name) = (self.buckets.nats.clone(), machine.name.clone());
        // Tracked; ends with the answer or the wait.
        self.drains.spawn(async move {
            let answer =
                tokio::time::timeout(DRAIN_REQUEST_WAIT, client.request(subject, "".into())).await;
            match answer {
                Ok(Ok(reply)) => match serde_json::from_slice::<DrainReply>(&reply.payload) {
                    Ok(reply) => {
                        tracing::debug!(machine = %name, busy_slots = reply.busy_slots, "draining")
                    }
                    Err(error) => {
                        tracing::warn!(machine = %name, %error, "a drain reply that does not parse")
                    }
                },
                // Not answered (not listening yet, or gone): the next pass asks again.
                Ok(Err(error)) => {
                    tracing::debug!(machine = %name, %error, "drain request not answered")
                }
                Err(_) => tracing::debug!(machine = %name, "drain request not answered in time"),
            }
        });
    }

    /// Releases the fleet's machines no configured pool wants whose
    /// worker is gone (or idle).
    async fn reap_orphans(&self, machines: &[Machine], entries: &HashMap<String, Entry>) {
        for machine in machines {
            if self.config.pools.contains_key(&machine.pool) {
                continue;
            }
            let gone = entries.get(&machine.name).is_none_or(|e| e.busy_slots == 0);
            if gone {
                tracing::info!(machine = %machine.name, pool = %machine.pool, "reaping an orphan machine");
                if let Err(error) = self.provider.release(machine).await {
                    tracing::warn!(machine = %machine.name, %error, "cannot reap");
                }
            }
        }
    }

    /// Logs and stores a decision when it says something new, and the
    /// pool's machines when they changed (a machine taking a job).
    async fn record(
        &mut self,
        pool: &str,
        decision: DecisionRecord,
        views: &[MachineView],
        machines: Vec<MachineRecord>,
    ) {
        let news = decision.news_after(self.last.get(pool));
        let moved = self
            .last_machines
            .get(pool)
            .is_none_or(|last| record::machines_differ(last, &machines));
        if !news && !moved {
            return;
        }
        let mut stored = record::read_pool(&self.buckets.fleet, pool).await;
        stored.pool = pool.to_string();
        if news {
            record::trace(pool, &decision);
            record::count(pool, &decision, views);
            stored.push(decision.clone(), machines.clone());
            self.last.insert(pool.to_string(), decision);
        } else {
            stored.updated_at_ms = decision.at_ms;
            stored.machines = machines.clone();
        }
        record::write_pool(&self.buckets.fleet, &stored).await;
        self.last_machines.insert(pool.to_string(), machines);
    }
}

/// The environment of a machine of `pool` named `name`: the pool's own,
/// the service's id (the machine's name), its training pool, and on an
/// interruptible machine a trainer stop grace that fits the provider's
/// notice (RunPod gives a spot pod 5 s from SIGTERM to SIGKILL: the worker
/// hands its task back with its last uploaded checkpoint — uploads are
/// continuous — after at most 2 s of the trainer's own save), unless the
/// pool's env sets one.
pub fn machine_env(pool: &str, policy: &PoolPolicy, name: &str) -> BTreeMap<String, String> {
    let mut env = policy.env.clone();
    env.insert("TY_RUNTIME__WORKER_ID".into(), name.to_string());
    if let Some((trainyard_proto::v1::Stage::Train, gpu_pool)) = stage_of_pool(pool) {
        env.insert("TY_WORKER__POOL".into(), gpu_pool.to_string());
        if policy.interruptible {
            env.entry("TY_WORKER__STOP_GRACE_SECS".into())
                .or_insert_with(|| SPOT_STOP_GRACE_SECS.to_string());
        }
    }
    env
}

/// The decision reason of a pass that would have started machines while
/// scale-up is stopped (the spend limit).
pub const SPEND_STOP_REASON: &str = "spend_stop";

/// How long a drain request waits for its answer.
const DRAIN_REQUEST_WAIT: Duration = Duration::from_secs(2);

/// A spot worker's trainer stop grace, in seconds (see [`machine_env`]).
pub const SPOT_STOP_GRACE_SECS: u64 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_gets_its_id_pool_and_on_spot_a_short_stop_grace() {
        let policy = PoolPolicy {
            env: [("TY_EXTRA".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        let env = machine_env("train.flux", &policy, "yard-train.flux-3");
        assert_eq!(env["TY_RUNTIME__WORKER_ID"], "yard-train.flux-3");
        assert_eq!(env["TY_WORKER__POOL"], "flux");
        assert_eq!(env["TY_EXTRA"], "1");
        assert!(!env.contains_key("TY_WORKER__STOP_GRACE_SECS"));
        let spot = PoolPolicy {
            interruptible: true,
            ..policy.clone()
        };
        assert_eq!(
            machine_env("train.flux", &spot, "m")["TY_WORKER__STOP_GRACE_SECS"],
            "2"
        );
        let own = PoolPolicy {
            env: [("TY_WORKER__STOP_GRACE_SECS".to_string(), "1".to_string())].into(),
            ..spot
        };
        assert_eq!(
            machine_env("train.flux", &own, "m")["TY_WORKER__STOP_GRACE_SECS"],
            "1"
        );
        assert!(!machine_env("prepare", &policy, "m").contains_key("TY_WORKER__POOL"));
    }

    #[test]
    fn machine_names_carry_the_fleet_and_the_pool() {
        assert_eq!(machine_name("yard", "train.a100", 7), "yard-train-a100-7");
        assert_eq!(machine_name("yard", "prepare", 0), "yard-prepare-0");
    }
}
