//! The planner, pure: one pool's observation and policy in, a decision
//! out. No I/O and no clock of its own (the observation carries `now`),
//! so the service and `ty-sim` run the same code and tests need no server.
//!
//! How many machines a pool wants:
//!
//! - no task anywhere (none pending, none out): `min_workers`;
//! - otherwise `ceil(work / target_drain)`, where work is the estimated
//!   seconds of what is pending and running (a training task weighed by
//!   its steps × the backend's seconds per step, a CPU task by the pool's
//!   `seconds_per_task`), at least one, and no more than the tasks there
//!   are to run (`tasks / tasks_per_worker`, rounded up);
//! - bounded by `min_workers`, `max_workers` and `max_dollars_per_hour`.
//!
//! What it does about it:
//!
//! - **up**: when fewer machines live (pending or running) than wanted, it
//!   starts the difference, at most `scale_up_step` at a time and not
//!   within `scale_up_cooldown_secs` of the last scale-up — except from
//!   zero, which starts at once (the first task of an empty pool);
//! - **down**: only when the want fell more than the `hysteresis`
//!   fraction below what lives (or to zero with no task left), and not within `scale_down_cooldown_secs`
//!   of the last change; then it releases idle machines, those idle
//!   longest first and only once idle for `idle_secs`. Busy machines are
//!   never released: they are drained (their worker stops taking tasks,
//!   saves and hands its task back) only when the pool runs more than
//!   `max_workers` or its dollar cap allows;
//! - machines that exited (preempted, crashed) are released at once and
//!   not counted, so the same pass replaces them;
//! - the dollar cap is worked out at the price of the live machines, else
//!   the last price seen ([`Memory::price_millis`]), else the policy's
//!   `max_price_per_gpu`; with none of them known, machines start one at
//!   a time until a price is seen.

use std::fmt;
use trainyard_core::config::PoolPolicy;

/// What one machine does, as its worker's registry entry and its
/// provider say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// Asked for, its worker not registered yet.
    Starting,
    /// Registered, no task.
    Idle,
    /// Running a task.
    Busy,
    /// Told to stop taking tasks; its task is being handed back.
    Draining,
    /// Gone without being released (preempted, crashed, vanished).
    Exited,
}

/// One machine of the pool.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineView {
    pub name: String,
    pub activity: Activity,
    /// Since when it does what it does (idle since, busy since, asked for
    /// at), in ms since the epoch.
    pub since_ms: i64,
    pub dollars_per_hour: f64,
}

/// A pool's backlog.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Backlog {
    /// Tasks waiting for a machine.
    pub pending: u64,
    /// Tasks out (being worked on or about to be).
    pub ack_pending: u64,
    /// The estimated seconds of work of all of them.
    pub work_secs: f64,
}

impl Backlog {
    pub fn tasks(&self) -> u64 {
        self.pending + self.ack_pending
    }
}

/// What the planner sees of a pool in one pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub now_ms: i64,
    pub backlog: Backlog,
    pub machines: Vec<MachineView>,
}

/// What the planner remembers of a pool between passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// The last pass that started machines, ms since the epoch (0: never).
    pub last_up_ms: i64,
    /// The last pass that released or drained machines.
    pub last_down_ms: i64,
    /// What one machine of the pool cost the last time one was seen, in
    /// thousandths of a dollar an hour (0: never seen): the dollar cap
    /// still holds when the pool is at zero.
    pub price_millis: u64,
}

/// Why the decision is what it is: a metric label and a span attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// As many machines live as wanted.
    Steady,
    /// More wanted: machines started.
    ScaleUp,
    /// The first task of a pool at zero: started without waiting.
    ScaleFromZero,
    /// More wanted, but the last scale-up is too recent.
    UpCooldown,
    /// More wanted, but `max_workers` or the dollar cap is reached.
    AtCap,
    /// Fewer wanted: idle machines released.
    ScaleDown,
    /// Fewer wanted, but within the hysteresis band or the cool-down, or
    /// no machine has been idle long enough.
    HoldDown,
    /// Over `max_workers` or the dollar cap with busy machines: drained.
    Drain,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Steady => "steady",
            Reason::ScaleUp => "scale_up",
            Reason::ScaleFromZero => "scale_from_zero",
            Reason::UpCooldown => "up_cooldown",
            Reason::AtCap => "at_cap",
            Reason::ScaleDown => "scale_down",
            Reason::HoldDown => "hold_down",
            Reason::Drain => "drain",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with a pool now.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Machines wanted, after the policy's bounds.
    pub wanted: u32,
    /// Machines living (pending or running, exited ones not counted).
    pub live: u32,
    /// Machines to start.
    pub launch: u32,
    /// Machines to release now (idle ones, and exited ones).
    pub release: Vec<String>,
    /// Busy machines to drain (released once their task is handed back).
    pub drain: Vec<String>,
    pub reason: Reason,
    /// The memory to keep for the next pass.
    pub memory: Memory,
}

/// Machines the dollar cap allows, at `price` each (`u32::MAX`: no cap).
fn affordable(policy: &PoolPolicy, price: f64) -> u32 {
    if policy.max_dollars_per_hour <= 0.0 || price <= 0.0 {
        return u32::MAX;
    }
    (policy.max_dollars_per_hour / price).floor().max(0.0) as u32
}

/// The machines a backlog wants, before the cool-downs.
pub fn wanted(policy: &PoolPolicy, backlog: &Backlog, price: f64) -> u32 {
    let tasks = backlog.tasks();
    let demand = if tasks == 0 {
        0
    } else {
        let drain = policy.target_drain_secs.max(1) as f64;
        let by_work = (backlog.work_secs / drain).ceil().max(1.0) as u64;
        let per = u64::from(policy.tasks_per_worker.max(1));
        let by_tasks = tasks.div_ceil(per);
        by_work.min(by_tasks).min(u64::from(u32::MAX)) as u32
    };
    let cap = policy.max_workers.min(affordable(policy, price));
    demand.max(policy.min_workers).min(cap)
}

/// The decision for one pool.
pub fn plan(policy: &PoolPolicy, observation: &Observation, memory: Memory) -> Decision {
    let now = observation.now_ms;
    let exited: Vec<String> = observation
        .machines
        .iter()
        .filter(|m| m.activity == Activity::Exited)
        .map(|m| m.name.clone())
        .collect();
    let live: Vec<&MachineView> = observation
        .machines
        .iter()
        .filter(|m| !matches!(m.activity, Activity::Exited | Activity::Draining))
        .collect();
    let live_count = live.len() as u32;
    // The price of one more machine: what the live ones cost, on
    // average; else the last one seen; else the policy's price cap.
    let priced: Vec<f64> = live
        .iter()
        .map(|m| m.dollars_per_hour)
        .filter(|p| *p > 0.0)
        .collect();
    let mut memory = memory;
    let price = if priced.is_empty() {
        if memory.price_millis > 0 {
            memory.price_millis as f64 / 1000.0
        } else {
            policy.max_price_per_gpu * f64::from(policy.gpu_count.max(1))
        }
    } else {
        let price = priced.iter().sum::<f64>() / priced.len() as f64;
        memory.price_millis = (price * 1000.0).round() as u64;
        price
    };
    // A dollar cap with no price known: one machine at a time until its
    // price is seen.
    let step = if policy.max_dollars_per_hour > 0.0 && price <= 0.0 {
        1
    } else {
        policy.scale_up_step.max(1)
    };
    let wanted = wanted(policy, &observation.backlog, price);
    let mut decision = Decision {
        wanted,
        live: live_count,
        launch: 0,
        release: exited,
        drain: Vec::new(),
        reason: Reason::Steady,
        memory,
    };
    let secs = |ms: i64| (now - ms) / 1000;
    if wanted > live_count {
        let from_zero = live_count == 0;
        let cooled = memory.last_up_ms == 0
            || secs(memory.last_up_ms) >= policy.scale_up_cooldown_secs as i64;
        if !from_zero && !cooled {
            decision.reason = Reason::UpCooldown;
            return decision;
        }
        decision.launch = (wanted - live_count).min(step);
        decision.reason = if from_zero {
            Reason::ScaleFromZero
        } else {
            Reason::ScaleUp
        };
        decision.memory.last_up_ms = now;
        return decision;
    }
    // More live than the policy's caps allow: drain, idle first.
    let cap = policy.max_workers.min(affordable(policy, price));
    if live_count > cap {
        let over = (live_count - cap) as usize;
        let mut by_cost: Vec<&MachineView> = live.clone();
        // Idle and starting machines first, then busy ones, newest first.
        by_cost.sort_by_key(|m| (m.activity == Activity::Busy, std::cmp::Reverse(m.since_ms)));
        for machine in by_cost.into_iter().take(over) {
            if machine.activity == Activity::Busy {
                decision.drain.push(machine.name.clone());
            } else {
                decision.release.push(machine.name.clone());
            }
        }
        decision.reason = if decision.drain.is_empty() {
            Reason::ScaleDown
        } else {
            Reason::Drain
        };
        decision.memory.last_down_ms = now;
        return decision;
    }
    if wanted == live_count {
        return decision;
    }
    // Fewer wanted than live.
    let band = f64::from(live_count) * (1.0 - policy.hysteresis.clamp(0.0, 1.0));
    let scale_to_zero = wanted == 0 && observation.backlog.tasks() == 0;
    let last_change = memory.last_up_ms.max(memory.last_down_ms);
    let cooled = last_change == 0 || secs(last_change) >= policy.scale_down_cooldown_secs as i64;
    if (!scale_to_zero && f64::from(wanted) >= band) || !cooled {
        decision.reason = Reason::HoldDown;
        return decision;
    }
    let mut idle: Vec<&MachineView> = live
        .iter()
        .copied()
        .filter(|m| m.activity == Activity::Idle && secs(m.since_ms) >= policy.idle_secs as i64)
        .collect();
    idle.sort_by_key(|m| m.since_ms);
    let surplus = (live_count - wanted) as usize;
    let released: Vec<String> = idle
        .into_iter()
        .take(surplus)
        .map(|m| m.name.clone())
        .collect();
    if released.is_empty() {
        decision.reason = Reason::HoldDown;
        return decision;
    }
    decision.release.extend(released);
    decision.reason = Reason::ScaleDown;
    decision.memory.last_down_ms = now;
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    fn policy() -> PoolPolicy {
        PoolPolicy {
            min_workers: 0,
            max_workers: 10,
            target_drain_secs: 600,
            scale_up_step: 3,
            scale_up_cooldown_secs: 30,
            scale_down_cooldown_secs: 60,
            idle_secs: 120,
            hysteresis: 0.25,
            ..Default::default()
        }
    }

    fn machine(name: &str, activity: Activity, since_s: i64) -> MachineView {
        MachineView {
            name: name.into(),
            activity,
            since_ms: since_s * S,
            dollars_per_hour: 0.5,
        }
    }

    fn backlog(pending: u64, ack_pending: u64, work_secs: f64) -> Backlog {
        Backlog {
            pending,
            ack_pending,
            work_secs,
        }
    }

    fn observe(now_s: i64, backlog: Backlog, machines: Vec<MachineView>) -> Observation {
        Observation {
            now_ms: now_s * S,
            backlog,
            machines,
        }
    }

    #[test]
    fn wanted_machines_follow_the_work_within_the_bounds() {
        let p = policy();
        let rows = [
            ("nothing to do", backlog(0, 0, 0.0), 0),
            ("one short task still wants one", backlog(1, 0, 10.0), 1),
            ("work for 2.5 drains", backlog(5, 0, 1500.0), 3),
            ("no more machines than tasks", backlog(2, 0, 60_000.0), 2),
            ("capped at max_workers", backlog(50, 0, 60_000.0), 10),
            ("tasks out count too", backlog(0, 4, 2400.0), 4),
        ];
        for (row, b, want) in rows {
            assert_eq!(wanted(&p, &b, 0.0), want, "{row}");
        }
        let kept = PoolPolicy {
            min_workers: 2,
            ..policy()
        };
        assert_eq!(wanted(&kept, &backlog(0, 0, 0.0), 0.0), 2);
        let capped = PoolPolicy {
            max_dollars_per_hour: 2.0,
            ..policy()
        };
        assert_eq!(wanted(&capped, &backlog(50, 0, 60_000.0), 0.69), 2);
        let shared = PoolPolicy {
            tasks_per_worker: 4,
            ..policy()
        };
        assert_eq!(wanted(&shared, &backlog(9, 0, 90_000.0), 0.0), 3);
    }

    #[test]
    fn the_first_task_of_an_empty_pool_starts_a_machine_at_once() {
        let memory = Memory {
            last_up_ms: 999 * S,
            last_down_ms: 999 * S,
            ..Default::default()
        };
        let d = plan(
            &policy(),
            &observe(1000, backlog(1, 0, 60.0), vec![]),
            memory,
        );
        assert_eq!((d.launch, d.reason), (1, Reason::ScaleFromZero));
        assert_eq!(d.memory.last_up_ms, 1000 * S);
    }

    #[test]
    fn scale_up_is_stepped_and_cooled_down() {
        let p = policy();
        let running = vec![machine("a", Activity::Busy, 0)];
        let big = backlog(20, 1, 20.0 * 600.0);
        let d = plan(&p, &observe(100, big, running.clone()), Memory::default());
        assert_eq!((d.launch, d.reason), (3, Reason::ScaleUp));
        // Ten seconds later the same backlog waits for the cool-down.
        let d = plan(&p, &observe(110, big, running.clone()), d.memory);
        assert_eq!((d.launch, d.reason), (0, Reason::UpCooldown));
        let d = plan(
            &p,
            &observe(131, big, running),
            Memory {
                last_up_ms: 100 * S,
                last_down_ms: 0,
                ..Default::default()
            },
        );
        assert_eq!(d.launch, 3);
    }

    #[test]
    fn idle_machines_go_after_their_idle_time_busy_ones_never() {
        let p = policy();
        let machines = vec![
            machine("busy", Activity::Busy, 0),
            machine("idle-long", Activity::Idle, 100),
            machine("idle-short", Activity::Idle, 950),
        ];
        let d = plan(
            &p,
            &observe(1000, backlog(0, 0, 0.0), machines.clone()),
            Memory::default(),
        );
        assert_eq!(d.release, ["idle-long"]);
        assert!(d.drain.is_empty());
        assert_eq!(d.reason, Reason::ScaleDown);
        // Later, the short one's idle time is up; the busy one stays.
        let machines = vec![
            machine("busy", Activity::Busy, 0),
            machine("idle-short", Activity::Idle, 950),
        ];
        let d = plan(&p, &observe(1200, backlog(0, 1, 60.0), machines), d.memory);
        assert_eq!(d.release, ["idle-short"]);
        assert!(d.drain.is_empty());
    }

    #[test]
    fn a_want_within_the_hysteresis_band_or_the_cool_down_releases_nothing() {
        let p = policy();
        let four: Vec<MachineView> = (0..4)
            .map(|n| machine(&format!("m{n}"), Activity::Idle, 0))
            .collect();
        // 3 of 4 wanted: within the 25 % band.
        let d = plan(
            &p,
            &observe(1000, backlog(3, 0, 3.0 * 600.0), four.clone()),
            Memory::default(),
        );
        assert_eq!((d.release.len(), d.reason), (0, Reason::HoldDown));
        // 2 of 4: below it, the two idle longest go.
        let d = plan(
            &p,
            &observe(1000, backlog(2, 0, 1200.0), four.clone()),
            Memory::default(),
        );
        assert_eq!((d.release.len(), d.reason), (2, Reason::ScaleDown));
        // Not within a minute of the last scale-up.
        let recent = Memory {
            last_up_ms: 980 * S,
            last_down_ms: 0,
            ..Default::default()
        };
        let d = plan(&p, &observe(1000, backlog(0, 0, 0.0), four), recent);
        assert_eq!((d.release.len(), d.reason), (0, Reason::HoldDown));
    }

    #[test]
    fn exited_machines_are_released_and_replaced_in_the_same_pass() {
        let p = policy();
        let machines = vec![
            machine("gone", Activity::Exited, 0),
            machine("busy", Activity::Busy, 0),
        ];
        let d = plan(
            &p,
            &observe(1000, backlog(1, 1, 1200.0), machines),
            Memory::default(),
        );
        assert_eq!(d.release, ["gone"]);
        assert_eq!((d.live, d.launch, d.reason), (1, 1, Reason::ScaleUp));
    }

    #[test]
    fn over_the_cap_idle_machines_go_first_then_busy_ones_are_drained() {
        let p = PoolPolicy {
            max_workers: 1,
            ..policy()
        };
        let machines = vec![
            machine("busy-old", Activity::Busy, 0),
            machine("busy-new", Activity::Busy, 500),
            machine("idle", Activity::Idle, 900),
        ];
        let d = plan(
            &p,
            &observe(1000, backlog(0, 2, 1200.0), machines),
            Memory::default(),
        );
        assert_eq!(d.release, ["idle"]);
        assert_eq!(d.drain, ["busy-new"]);
        assert_eq!(d.reason, Reason::Drain);
    }

    #[test]
    fn the_dollar_cap_holds_from_zero() {
        let p = PoolPolicy {
            max_dollars_per_hour: 2.0,
            ..policy()
        };
        let big = backlog(10, 0, 10.0 * 600.0);
        // No price known: one machine.
        let d = plan(&p, &observe(100, big, vec![]), Memory::default());
        assert_eq!(d.launch, 1);
        // Its price seen once, the cap holds after the pool went to zero.
        let seen = plan(
            &p,
            &observe(200, big, vec![machine("a", Activity::Busy, 0)]),
            d.memory,
        );
        assert_eq!(seen.memory.price_millis, 500);
        let d = plan(&p, &observe(5000, big, vec![]), seen.memory);
        assert_eq!(
            (d.launch, d.wanted),
            (3, 4),
            "$2/h at $0.50 affords 4, stepped by 3"
        );
        // Or the policy's price cap, before any machine was seen.
        let priced = PoolPolicy {
            max_price_per_gpu: 1.0,
            ..p
        };
        let d = plan(&priced, &observe(100, big, vec![]), Memory::default());
        assert_eq!(d.wanted, 2);
    }

    #[test]
    fn a_sawtooth_backlog_does_not_flap() {
        // The backlog jumps between 6 and 0 tasks every 20 s: machines
        // start once and stay through the gaps (idle time, cool-down).
        let p = policy();
        let mut memory = Memory::default();
        let mut machines: Vec<MachineView> = Vec::new();
        let mut launched = 0;
        let mut released = 0;
        for tick in 0..60 {
            let now = 1000 + tick * 5;
            let busy = (now / 20) % 2 == 0;
            let activity = if busy { Activity::Busy } else { Activity::Idle };
            for m in &mut machines {
                if m.activity != activity {
                    m.activity = activity;
                    m.since_ms = now * S;
                }
            }
            let b = if busy {
                backlog(6, 0, 6.0 * 600.0)
            } else {
                backlog(0, 0, 0.0)
            };
            let d = plan(&p, &observe(now, b, machines.clone()), memory);
            memory = d.memory;
            for n in 0..d.launch {
                machines.push(machine(&format!("m{tick}-{n}"), Activity::Starting, now));
            }
            launched += d.launch;
            released += d.release.len();
            machines.retain(|m| !d.release.contains(&m.name));
        }
        assert!(launched <= 6, "{launched} machines started");
        assert_eq!(released, 0, "machines released within the idle time");
    }
}
