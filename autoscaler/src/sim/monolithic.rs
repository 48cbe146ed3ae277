//! The monolithic fleet: a serverless-style endpoint where each job runs
//! all its steps on one GPU machine. A job takes an idle warm machine if
//! there is one, else starts a new one (up to the GPU count), else waits
//! in line; a machine idle for the endpoint's idle timeout is released.
//! The handler keeps no checkpoint: a preempted job starts over.

use super::queue::Queue;
use super::rng::Rng;
use super::{EPOCH_MS, Fleet, JobSpec, Report, Scenario, ms};
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Cold-starting, for this job.
    Starting(u32),
    Busy {
        job: u32,
        start: i64,
        train_start: i64,
    },
    Idle,
    Gone,
}

#[derive(Clone, Debug)]
struct Machine {
    state: State,
    token: u32,
    launched_ms: i64,
    spot: bool,
    /// The base models on its disk, one bit each.
    models: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(u32),
    Ready(u32),
    Done(u32, u32),
    IdleOut(u32, u32),
    Preempt(u32),
    Requeue(u32),
}

struct Sim<'a> {
    s: &'a Scenario,
    jobs: &'a [JobSpec],
    rng: Rng,
    queue: Queue<Event>,
    machines: Vec<Machine>,
    waiting: VecDeque<u32>,
    idle: Vec<(u32, u32)>,
    live: u32,
    latencies: Vec<i64>,
    report: Report,
}

/// Runs the monolithic fleet on `jobs`.
pub fn run(scenario: &Scenario, jobs: &[JobSpec]) -> Report {
    let mut sim = Sim {
        s: scenario,
        jobs,
        rng: Rng::new(scenario.seed ^ 0x0304_011C),
        queue: Queue::default(),
        machines: Vec::new(),
        waiting: VecDeque::new(),
        idle: Vec::new(),
        live: 0,
        latencies: Vec::with_capacity(jobs.len()),
        report: Report {
            fleet: Some(Fleet::Monolithic),
            gpus: scenario.gpus,
            jobs_submitted: jobs.len() as u64,
            ..Report::default()
        },
    };
    if let Some(first) = jobs.first() {
        sim.queue.push(first.arrive_ms, Event::Arrive(0));
    }
    // A run that cannot drain (an overloaded fleet) stops three days on.
    let horizon = EPOCH_MS + ms(scenario.hours * 3600.0) + ms(72.0 * 3600.0);
    let mut end = EPOCH_MS + ms(scenario.hours * 3600.0);
    while let Some((now, event)) = sim.queue.pop() {
        if now > horizon {
            break;
        }
        if sim.handle(now, event) {
            end = end.max(now);
        }
    }
    for id in 0..sim.machines.len() {
        if sim.machines[id].state != State::Gone {
            sim.release(id as u32, end);
        }
    }
    let mut report = sim.report;
    report.set_latencies(sim.latencies);
    report.end_secs = (end - EPOCH_MS) as f64 / 1000.0;
    report
}

impl Sim<'_> {
    /// Handles one event; false if it was stale.
    fn handle(&mut self, now: i64, event: Event) -> bool {
        match event {
            Event::Arrive(job) => {
                if let Some(next) = self.jobs.get(job as usize + 1) {
                    self.queue.push(next.arrive_ms, Event::Arrive(job + 1));
                }
                self.waiting.push_back(job);
                self.dispatch(now);
            }
            Event::Requeue(job) => {
                self.waiting.push_front(job);
                self.dispatch(now);
            }
            Event::Ready(m) => match self.machines[m as usize].state {
                State::Starting(job) => self.start(m, job, now),
                _ => return false,
            },
            Event::Done(m, token) => {
                let machine = &self.machines[m as usize];
                let State::Busy { job, .. } = machine.state else {
                    return false;
                };
                if machine.token != token {
                    return false;
                }
                let spec = self.jobs[job as usize];
                self.report.jobs_finished += 1;
                self.report.train_secs += spec.train_ms as f64 / 1000.0;
                self.latencies.push(now - spec.arrive_ms);
                if let Some(next) = self.waiting.pop_front() {
                    self.start(m, next, now);
                } else {
                    let machine = &mut self.machines[m as usize];
                    machine.state = State::Idle;
                    machine.token += 1;
                    let token = machine.token;
                    self.idle.push((m, token));
                    self.queue.push(
                        now + ms(self.s.serverless_idle_secs),
                        Event::IdleOut(m, token),
                    );
                }
            }
            Event::IdleOut(m, token) => {
                let machine = &self.machines[m as usize];
                if machine.state != State::Idle || machine.token != token {
                    return false;
                }
                self.release(m, now);
            }
            Event::Preempt(m) => {
                let state = self.machines[m as usize].state;
                let job = match state {
                    State::Gone => return false,
                    State::Idle => None,
                    State::Starting(job) => Some(job),
                    State::Busy {
                        job,
                        start,
                        train_start,
                    } => {
                        let lost_train = (now - train_start).max(0) as f64 / 1000.0;
                        self.report.preemptions_busy += 1;
                        self.report.lost_gpu_secs += (now - start) as f64 / 1000.0;
                        self.report.lost_train_secs += lost_train;
                        self.report.max_lost_train_secs =
                            self.report.max_lost_train_secs.max(lost_train);
                        Some(job)
                    }
                };
                self.report.preemptions += 1;
                self.release(m, now);
                if let Some(job) = job {
                    self.queue
                        .push(now + ms(self.s.vanish_secs), Event::Requeue(job));
                }
            }
        }
        true
    }

    /// Gives waiting jobs to idle machines, then to new ones.
    fn dispatch(&mut self, now: i64) {
        while let Some(&job) = self.waiting.front() {
            if let Some(m) = self.pop_idle() {
                self.waiting.pop_front();
                self.start(m, job, now);
            } else if self.live < self.s.gpus {
                self.waiting.pop_front();
                self.launch(job, now);
            } else {
                return;
            }
        }
    }

    fn pop_idle(&mut self) -> Option<u32> {
        while let Some((m, token)) = self.idle.pop() {
            let machine = &self.machines[m as usize];
            if machine.state == State::Idle && machine.token == token {
                return Some(m);
            }
        }
        None
    }

    fn launch(&mut self, job: u32, now: i64) {
        let id = self.machines.len() as u32;
        let spot = self.rng.chance(self.s.mono_spot_share);
        self.machines.push(Machine {
            state: State::Starting(job),
            token: 0,
            launched_ms: now,
            spot,
            models: 0,
        });
        self.live += 1;
        self.report.gpu_machines_started += 1;
        self.report.peak_gpu_machines = self.report.peak_gpu_machines.max(self.live);
        self.queue
            .push(now + ms(self.s.durations.gpu_cold_start), Event::Ready(id));
        if spot && self.s.preempt_per_gpu_hour > 0.0 {
            let after = self.rng.exponential(3600.0 / self.s.preempt_per_gpu_hour);
            if after < 1e9 {
                self.queue.push(now + ms(after), Event::Preempt(id));
            }
        }
    }

    /// Runs all of `job`'s steps on machine `m`.
    fn start(&mut self, m: u32, job: u32, now: i64) {
        let d = &self.s.durations;
        let spec = self.jobs[job as usize];
        let machine = &mut self.machines[m as usize];
        let bit = 1u64 << spec.model;
        let download = if machine.models & bit == 0 {
            machine.models |= bit;
            self.report.cache_misses += 1;
            ms(d.model_download)
        } else {
            self.report.cache_hits += 1;
            0
        };
        let train_start = now + ms(d.fetch) + download + ms(d.caption);
        let done = train_start + spec.train_ms + ms(d.upload);
        machine.state = State::Busy {
            job,
            start: now,
            train_start,
        };
        machine.token += 1;
        self.queue.push(done, Event::Done(m, machine.token));
    }

    /// Stops billing machine `m` at `now`.
    fn release(&mut self, m: u32, now: i64) {
        let machine = &mut self.machines[m as usize];
        let secs = (now - machine.launched_ms) as f64 / 1000.0;
        let price = if machine.spot {
            self.s.gpu.spot
        } else {
            self.s.gpu.on_demand
        };
        self.report.gpu_billed_secs += secs;
        self.report.gpu_dollars += secs / 3600.0 * price;
        machine.state = State::Gone;
        self.live -= 1;
    }
}
