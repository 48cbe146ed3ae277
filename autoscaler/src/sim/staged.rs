//! The staged fleet: prepare (fetch + caption) and deliver (upload) on CPU
//! pools, training on a GPU pool, each sized by [`crate::plan::plan`]
//! every planning interval from an observation built as the service
//! builds it: tasks waiting (`pending`), tasks out to a worker or to a
//! worker that vanished and whose ack wait has not run out
//! (`ack_pending`), the estimated seconds of work (remaining training
//! seconds for the GPU pool, tasks × `seconds_per_task` for CPU pools),
//! and each machine's activity and since when.
//!
//! A worker takes a waiting task when idle (a pull consumer: no cache
//! affinity); the GPU machine downloads the base model only if its disk
//! lacks it. A preempted GPU machine's task resumes elsewhere from its
//! last checkpoint after the ack wait.

use super::queue::Queue;
use super::rng::Rng;
use super::{EPOCH_MS, Fleet, JobSpec, Report, Scenario, ms};
use crate::plan::{Activity, Backlog, MachineView, Memory, Observation, plan};
use std::collections::VecDeque;
use trainyard_core::config::PoolPolicy;

const PREPARE: usize = 0;
const TRAIN: usize = 1;
const DELIVER: usize = 2;
const PREFIX: [&str; 3] = ["p", "g", "d"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Starting,
    Idle,
    Busy,
    /// Preempted, not yet released by the planner.
    Exited,
    Gone,
}

#[derive(Clone, Debug)]
struct Machine {
    pool: usize,
    state: State,
    token: u32,
    launched_ms: i64,
    price: f64,
    models: u64,
    /// Its entry in its pool's observation.
    slot: usize,
    job: u32,
    busy_start: i64,
    train_start: i64,
    /// The job's saved training progress when this machine took it.
    done_from: i64,
}

struct Pool {
    policy: PoolPolicy,
    memory: Memory,
    obs: Observation,
    /// The machine of each observation entry.
    ids: Vec<u32>,
    waiting: VecDeque<u32>,
    /// Tasks out to a worker.
    out: u64,
    /// Tasks of preempted workers, within their ack wait.
    limbo: u64,
    /// Remaining training ms of the waiting and limbo tasks (GPU pool).
    queued_work_ms: i64,
    idle: Vec<(u32, u32)>,
    cold_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(u32),
    Tick,
    Ready(u32),
    Done(u32, u32),
    Preempt(u32),
    Requeue(u32),
}

struct Sim<'a> {
    s: &'a Scenario,
    jobs: &'a [JobSpec],
    /// Each job's saved training progress, ms.
    saved_ms: Vec<i64>,
    rng: Rng,
    queue: Queue<Event>,
    machines: Vec<Machine>,
    pools: [Pool; 3],
    live_gpus: u32,
    latencies: Vec<i64>,
    report: Report,
}

/// Runs the staged fleet on `jobs`.
pub fn run(scenario: &Scenario, jobs: &[JobSpec]) -> Report {
    let pool = |policy: &PoolPolicy, cold: f64| Pool {
        policy: policy.clone(),
        memory: Memory::default(),
        obs: Observation {
            now_ms: EPOCH_MS,
            backlog: Backlog::default(),
            machines: Vec::new(),
        },
        ids: Vec::new(),
        waiting: VecDeque::new(),
        out: 0,
        limbo: 0,
        queued_work_ms: 0,
        idle: Vec::new(),
        cold_ms: ms(cold),
    };
    let d = &scenario.durations;
    let mut sim = Sim {
        s: scenario,
        jobs,
        saved_ms: vec![0; jobs.len()],
        rng: Rng::new(scenario.seed ^ 0x0057_A6ED),
        queue: Queue::default(),
        machines: Vec::new(),
        pools: [
            pool(&scenario.prepare_pool, d.cpu_cold_start),
            pool(&scenario.train_pool, d.gpu_cold_start),
            pool(&scenario.deliver_pool, d.cpu_cold_start),
        ],
        live_gpus: 0,
        latencies: Vec::with_capacity(jobs.len()),
        report: Report {
            fleet: Some(Fleet::Staged),
            gpus: scenario.gpus,
            jobs_submitted: jobs.len() as u64,
            ..Report::default()
        },
    };
    if let Some(first) = jobs.first() {
        sim.queue.push(first.arrive_ms, Event::Arrive(0));
    }
    sim.queue.push(EPOCH_MS, Event::Tick);
    let arrivals_end = EPOCH_MS + ms(scenario.hours * 3600.0);
    let horizon = arrivals_end + ms(72.0 * 3600.0);
    let mut end = arrivals_end;
    while let Some((now, event)) = sim.queue.pop() {
        if now > horizon {
            end = horizon;
            break;
        }
        if event == Event::Tick {
            sim.tick(now);
            if now >= arrivals_end && sim.quiet() {
                end = now;
                break;
            }
            sim.queue
                .push(now + ms(scenario.plan_interval_secs), Event::Tick);
        } else {
            sim.handle(now, event);
        }
    }
    for id in 0..sim.machines.len() {
        if matches!(
            sim.machines[id].state,
            State::Starting | State::Idle | State::Busy
        ) {
            sim.bill(id, end);
        }
    }
    let mut report = sim.report;
    report.set_latencies(sim.latencies);
    report.end_secs = (end - EPOCH_MS) as f64 / 1000.0;
    report
}

impl Sim<'_> {
    /// Every job delivered and every pool back to its minimum.
    fn quiet(&self) -> bool {
        self.report.jobs_finished == self.jobs.len() as u64
            && self.pools.iter().all(|p| {
                p.obs.machines.len() as u32 <= p.policy.min_workers
                    && p.obs.machines.iter().all(|m| m.activity == Activity::Idle)
            })
    }

    /// One planning pass over every pool.
    fn tick(&mut self, now: i64) {
        for p in 0..self.pools.len() {
            let backlog = self.backlog(p, now);
            let pool = &mut self.pools[p];
            pool.obs.now_ms = now;
            pool.obs.backlog = backlog;
            let decision = plan(&pool.policy, &pool.obs, pool.memory);
            pool.memory = decision.memory;
            for name in decision.release.iter().chain(&decision.drain) {
                let id: usize = name[1..].parse().expect("a machine name the sim gave");
                self.release(id, now);
            }
            for _ in 0..decision.launch {
                self.launch(p, now);
            }
        }
    }

    /// The pool's backlog as the service sees it.
    fn backlog(&self, p: usize, now: i64) -> Backlog {
        let pool = &self.pools[p];
        let pending = pool.waiting.len() as u64;
        let ack_pending = pool.out + pool.limbo;
        let work_secs = if p == TRAIN {
            let running: i64 = pool
                .ids
                .iter()
                .map(|&id| &self.machines[id as usize])
                .filter(|m| m.state == State::Busy)
                .map(|m| {
                    let total = self.jobs[m.job as usize].train_ms;
                    (total - m.done_from - (now - m.train_start).max(0)).max(0)
                })
                .sum();
            (running + pool.queued_work_ms) as f64 / 1000.0
        } else {
            (pending + ack_pending) as f64 * pool.policy.seconds_per_task
        };
        Backlog {
            pending,
            ack_pending,
            work_secs,
        }
    }

    fn handle(&mut self, now: i64, event: Event) {
        match event {
            Event::Arrive(job) => {
                if let Some(next) = self.jobs.get(job as usize + 1) {
                    self.queue.push(next.arrive_ms, Event::Arrive(job + 1));
                }
                self.enqueue(PREPARE, job, now, false);
            }
            Event::Requeue(job) => {
                let remaining = self.remaining_ms(job);
                let pool = &mut self.pools[TRAIN];
                pool.limbo -= 1;
                pool.queued_work_ms -= remaining;
                self.enqueue(TRAIN, job, now, true);
            }
            Event::Ready(m) => {
                if self.machines[m as usize].state == State::Starting {
                    self.set_idle(m as usize, now);
                    let p = self.machines[m as usize].pool;
                    self.dispatch(p, now);
                }
            }
            Event::Done(m, token) => {
                let machine = &self.machines[m as usize];
                if machine.state != State::Busy || machine.token != token {
                    return;
                }
                let (p, job) = (machine.pool, machine.job);
                self.pools[p].out -= 1;
                self.set_idle(m as usize, now);
                match p {
                    PREPARE => self.enqueue(TRAIN, job, now, false),
                    TRAIN => {
                        let spec = self.jobs[job as usize];
                        self.saved_ms[job as usize] = spec.train_ms;
                        self.report.train_secs += spec.train_ms as f64 / 1000.0;
                        self.enqueue(DELIVER, job, now, false);
                    }
                    _ => {
                        self.report.jobs_finished += 1;
                        self.latencies.push(now - self.jobs[job as usize].arrive_ms);
                    }
                }
                self.dispatch(p, now);
            }
            Event::Preempt(m) => self.preempt(m as usize, now),
            Event::Tick => {}
        }
    }

    fn remaining_ms(&self, job: u32) -> i64 {
        self.jobs[job as usize].train_ms - self.saved_ms[job as usize]
    }

    /// A task for `job` into pool `p`'s stream (redelivered ones first).
    fn enqueue(&mut self, p: usize, job: u32, now: i64, front: bool) {
        if p == TRAIN {
            self.pools[TRAIN].queued_work_ms += self.remaining_ms(job);
        }
        let pool = &mut self.pools[p];
        if front {
            pool.waiting.push_front(job);
        } else {
            pool.waiting.push_back(job);
        }
        self.dispatch(p, now);
    }

    /// Idle workers of pool `p` take waiting tasks.
    fn dispatch(&mut self, p: usize, now: i64) {
        while !self.pools[p].waiting.is_empty() {
            let Some(m) = self.pop_idle(p) else {
                return;
            };
            let job = self.pools[p].waiting.pop_front().expect("not empty");
            self.start(m, job, now);
        }
    }

    fn pop_idle(&mut self, p: usize) -> Option<usize> {
        while let Some((m, token)) = self.pools[p].idle.pop() {
            let machine = &self.machines[m as usize];
            if machine.state == State::Idle && machine.token == token {
                return Some(m as usize);
            }
        }
        None
    }

    fn start(&mut self, m: usize, job: u32, now: i64) {
        let d = &self.s.durations;
        let spec = self.jobs[job as usize];
        let p = self.machines[m].pool;
        let saved = self.saved_ms[job as usize];
        let machine = &mut self.machines[m];
        let (train_start, done) = match p {
            PREPARE => (now, now + ms(d.fetch) + ms(d.caption)),
            DELIVER => (now, now + ms(d.upload)),
            _ => {
                let bit = 1u64 << spec.model;
                let download = if machine.models & bit == 0 {
                    machine.models |= bit;
                    self.report.cache_misses += 1;
                    ms(d.model_download)
                } else {
                    self.report.cache_hits += 1;
                    0
                };
                let train_start = now + download;
                (train_start, train_start + spec.train_ms - saved)
            }
        };
        machine.state = State::Busy;
        machine.token += 1;
        machine.job = job;
        machine.busy_start = now;
        machine.train_start = train_start;
        machine.done_from = saved;
        let (token, slot) = (machine.token, machine.slot);
        let pool = &mut self.pools[p];
        pool.out += 1;
        if p == TRAIN {
            pool.queued_work_ms -= spec.train_ms - saved;
        }
        let view = &mut pool.obs.machines[slot];
        view.activity = Activity::Busy;
        view.since_ms = now;
        self.queue.push(done, Event::Done(m as u32, token));
    }

    fn set_idle(&mut self, m: usize, now: i64) {
        let machine = &mut self.machines[m];
        machine.state = State::Idle;
        machine.token += 1;
        let (p, slot, token) = (machine.pool, machine.slot, machine.token);
        let pool = &mut self.pools[p];
        pool.idle.push((m as u32, token));
        let view = &mut pool.obs.machines[slot];
        view.activity = Activity::Idle;
        view.since_ms = now;
    }

    fn launch(&mut self, p: usize, now: i64) {
        let id = self.machines.len();
        let gpu = p == TRAIN;
        let spot = gpu && self.rng.chance(self.s.spot_share);
        let price = match (gpu, spot) {
            (false, _) => self.s.cpu_dollars_per_hour,
            (true, false) => self.s.gpu.on_demand,
            (true, true) => self.s.gpu.spot,
        };
        let pool = &mut self.pools[p];
        let slot = pool.obs.machines.len();
        pool.obs.machines.push(MachineView {
            name: format!("{}{id}", PREFIX[p]),
            activity: Activity::Starting,
            since_ms: now,
            dollars_per_hour: price,
        });
        pool.ids.push(id as u32);
        self.machines.push(Machine {
            pool: p,
            state: State::Starting,
            token: 0,
            launched_ms: now,
            price,
            models: 0,
            slot,
            job: 0,
            busy_start: 0,
            train_start: 0,
            done_from: 0,
        });
        let cold = pool.cold_ms;
        self.queue.push(now + cold, Event::Ready(id as u32));
        if gpu {
            self.live_gpus += 1;
            self.report.gpu_machines_started += 1;
            self.report.peak_gpu_machines = self.report.peak_gpu_machines.max(self.live_gpus);
        }
        if spot && self.s.preempt_per_gpu_hour > 0.0 {
            let after = self.rng.exponential(3600.0 / self.s.preempt_per_gpu_hour);
            if after < 1e9 {
                self.queue.push(now + ms(after), Event::Preempt(id as u32));
            }
        }
    }

    /// Stops billing machine `m` at `now`.
    fn bill(&mut self, m: usize, now: i64) {
        let machine = &self.machines[m];
        let secs = (now - machine.launched_ms) as f64 / 1000.0;
        let dollars = secs / 3600.0 * machine.price;
        if machine.pool == TRAIN {
            self.report.gpu_billed_secs += secs;
            self.report.gpu_dollars += dollars;
            self.live_gpus -= 1;
        } else {
            self.report.cpu_dollars += dollars;
        }
    }

    /// The planner released (or drained) machine `m`.
    fn release(&mut self, m: usize, now: i64) {
        let state = self.machines[m].state;
        match state {
            State::Gone => return,
            State::Exited => {}
            State::Busy => {
                // Drained: the worker saves and hands its task back.
                let machine = &self.machines[m];
                let (p, job) = (machine.pool, machine.job);
                if p == TRAIN {
                    let progress = machine.done_from + (now - machine.train_start).max(0);
                    self.saved_ms[job as usize] = progress.min(self.jobs[job as usize].train_ms);
                }
                self.pools[p].out -= 1;
                self.bill(m, now);
                self.machines[m].state = State::Gone;
                self.remove_view(m);
                self.enqueue(p, job, now, true);
                return;
            }
            State::Starting | State::Idle => self.bill(m, now),
        }
        self.machines[m].state = State::Gone;
        self.remove_view(m);
    }

    fn remove_view(&mut self, m: usize) {
        let (p, slot) = (self.machines[m].pool, self.machines[m].slot);
        let pool = &mut self.pools[p];
        pool.obs.machines.swap_remove(slot);
        pool.ids.swap_remove(slot);
        if let Some(&moved) = pool.ids.get(slot) {
            self.machines[moved as usize].slot = slot;
        }
    }

    /// A spot GPU machine is taken back.
    fn preempt(&mut self, m: usize, now: i64) {
        let state = self.machines[m].state;
        if !matches!(state, State::Starting | State::Idle | State::Busy) {
            return;
        }
        self.report.preemptions += 1;
        self.bill(m, now);
        if state == State::Busy {
            let machine = &self.machines[m];
            let job = machine.job;
            let interval = ms(self.s.checkpoint_secs).max(1);
            let (lost_train, saved) = if now < machine.train_start {
                (0, machine.done_from)
            } else {
                let progress = machine.done_from + (now - machine.train_start);
                let checkpoint = progress / interval * interval;
                let saved = checkpoint.max(machine.done_from);
                (progress - saved, saved)
            };
            let lost_gpu = (now - machine.busy_start) - (saved - machine.done_from);
            self.report.preemptions_busy += 1;
            self.report.lost_gpu_secs += lost_gpu as f64 / 1000.0;
            let lost_train = lost_train as f64 / 1000.0;
            self.report.lost_train_secs += lost_train;
            self.report.max_lost_train_secs = self.report.max_lost_train_secs.max(lost_train);
            self.saved_ms[job as usize] = saved;
            let pool = &mut self.pools[TRAIN];
            pool.out -= 1;
            pool.limbo += 1;
            pool.queued_work_ms += self.jobs[job as usize].train_ms - saved;
            self.queue
                .push(now + ms(self.s.vanish_secs), Event::Requeue(job));
        }
        let machine = &mut self.machines[m];
        machine.state = State::Exited;
        let slot = machine.slot;
        let view = &mut self.pools[TRAIN].obs.machines[slot];
        view.activity = Activity::Exited;
        view.since_ms = now;
    }
}
