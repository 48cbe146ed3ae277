//! A discrete-event fleet simulator: the same jobs run through two fleets
//! on a simulated clock, and what each costs and how long jobs take come
//! out.
//!
//! - [`monolithic`]: every job runs all its steps (cold start, fetch,
//!   base-model download, caption, train, upload) on one GPU machine,
//!   scaled like a serverless endpoint (one machine per job up to the GPU
//!   count, released after an idle timeout); a preempted spot machine's
//!   job starts over.
//! - [`staged`]: Trainyard's layout. Prepare (fetch + caption) and deliver
//!   (upload) run on CPU pools, training on a GPU pool; all three are sized
//!   by the autoscaler's own planner ([`crate::plan::plan`]) every
//!   planning interval, from observations built as the service builds
//!   them. A preempted training task resumes elsewhere from its last
//!   checkpoint.
//!
//! Time is integer milliseconds; the clock starts at a fixed epoch so the
//! planner's "never" (0) stays distinct from the first pass. One seed
//! fixes the arrivals (shared by both fleets) and each fleet's own draws.

pub mod monolithic;
mod queue;
pub mod rng;
pub mod staged;
#[cfg(test)]
mod tests;

use rng::Rng;
use serde::Serialize;
use trainyard_core::config::PoolPolicy;

/// The simulated clock's zero, in ms since the Unix epoch.
pub const EPOCH_MS: i64 = 1_800_000_000_000;

/// A GPU class's prices, dollars per GPU-hour (assumptions, stated in
/// `BENCHMARKS.md`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GpuClass {
    pub name: &'static str,
    pub on_demand: f64,
    pub spot: f64,
}

/// The GPU classes the simulator knows, by short name.
pub const GPU_CLASSES: [(&str, GpuClass); 3] = [
    (
        "4090",
        GpuClass {
            name: "RTX 4090",
            on_demand: 0.69,
            spot: 0.35,
        },
    ),
    (
        "a100",
        GpuClass {
            name: "A100 80GB",
            on_demand: 1.99,
            spot: 1.05,
        },
    ),
    (
        "h100",
        GpuClass {
            name: "H100",
            on_demand: 2.99,
            spot: 1.50,
        },
    ),
];

/// A GPU class by short name (`4090`, `a100`, `h100`).
pub fn gpu_class(name: &str) -> Option<GpuClass> {
    GPU_CLASSES
        .iter()
        .find(|(short, _)| short.eq_ignore_ascii_case(name))
        .map(|(_, class)| *class)
}

/// How long each step takes, in seconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Durations {
    pub gpu_cold_start: f64,
    pub cpu_cold_start: f64,
    pub fetch: f64,
    /// The base model's download, on a cache miss only.
    pub model_download: f64,
    pub caption: f64,
    /// Training is uniform in `[train_min, train_max]`.
    pub train_min: f64,
    pub train_max: f64,
    pub upload: f64,
}

impl Default for Durations {
    fn default() -> Self {
        Self {
            gpu_cold_start: 150.0,
            cpu_cold_start: 30.0,
            fetch: 30.0,
            model_download: 300.0,
            caption: 120.0,
            train_min: 600.0,
            train_max: 1800.0,
            upload: 45.0,
        }
    }
}

impl Durations {
    /// The mean of one job's steps, cold start and download left out.
    pub fn mean_job_secs(&self) -> f64 {
        self.fetch + self.caption + (self.train_min + self.train_max) / 2.0 + self.upload
    }
}

/// One simulated scenario: the arrivals, the steps, the prices and both
/// fleets' settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scenario {
    pub seed: u64,
    /// GPU machines at most (one GPU each), in both fleets.
    pub gpus: u32,
    /// Jobs arrive during this many hours; the run goes on until they
    /// are all delivered and the fleets have shrunk back.
    pub hours: f64,
    /// The mean arrival rate (Poisson).
    pub jobs_per_hour: f64,
    /// The diurnal swing of the rate: `rate × (1 + diurnal × sin(2πt/24h))`.
    pub diurnal: f64,
    pub gpu: GpuClass,
    /// A CPU machine's price, dollars an hour.
    pub cpu_dollars_per_hour: f64,
    /// The fraction of the staged fleet's GPU machines started as spot
    /// (interruptible).
    pub spot_share: f64,
    /// The same for the monolithic fleet.
    pub mono_spot_share: f64,
    /// Preemptions per spot GPU-hour.
    pub preempt_per_gpu_hour: f64,
    /// Seconds of training between two checkpoints (staged fleet).
    pub checkpoint_secs: f64,
    pub durations: Durations,
    /// The base models' popularity (one weight each); a machine's disk
    /// keeps every model it downloaded.
    pub model_popularity: Vec<f64>,
    /// Seconds before a preempted machine's task is handed to another
    /// (the ack wait / vanished-worker detection).
    pub vanish_secs: f64,
    /// The monolithic endpoint's idle timeout.
    pub serverless_idle_secs: f64,
    /// Seconds between two planning passes (staged fleet).
    pub plan_interval_secs: f64,
    pub train_pool: PoolPolicy,
    pub prepare_pool: PoolPolicy,
    pub deliver_pool: PoolPolicy,
}

impl Scenario {
    /// The default scenario for `gpus` GPU machines over `hours`, with
    /// arrivals at `load` of what the GPUs could run back to back
    /// (`load × gpus / mean job seconds`).
    pub fn new(gpus: u32, hours: f64, seed: u64, load: f64) -> Self {
        let durations = Durations::default();
        let jobs_per_hour = load * f64::from(gpus) * 3600.0 / durations.mean_job_secs();
        let step = (gpus / 20).max(4);
        let train_pool = PoolPolicy {
            min_workers: 0,
            max_workers: gpus,
            tasks_per_worker: 1,
            target_drain_secs: 900,
            scale_up_step: step,
            scale_up_cooldown_secs: 30,
            scale_down_cooldown_secs: 60,
            idle_secs: 300,
            hysteresis: 0.2,
            interruptible: true,
            ..PoolPolicy::default()
        };
        let cpu = |seconds_per_task: f64, target_drain_secs: u64| PoolPolicy {
            min_workers: 0,
            max_workers: gpus,
            tasks_per_worker: 1,
            target_drain_secs,
            seconds_per_task,
            scale_up_step: step,
            scale_up_cooldown_secs: 30,
            scale_down_cooldown_secs: 60,
            idle_secs: 300,
            hysteresis: 0.2,
            ..PoolPolicy::default()
        };
        Self {
            seed,
            gpus,
            hours,
            jobs_per_hour,
            diurnal: 0.0,
            gpu: GPU_CLASSES[1].1,
            cpu_dollars_per_hour: 0.10,
            spot_share: 0.5,
            mono_spot_share: 0.5,
            preempt_per_gpu_hour: 0.05,
            checkpoint_secs: 300.0,
            prepare_pool: cpu(durations.fetch + durations.caption, 300),
            deliver_pool: cpu(durations.upload, 120),
            durations,
            model_popularity: vec![0.55, 0.25, 0.15, 0.05],
            vanish_secs: 30.0,
            serverless_idle_secs: 60.0,
            plan_interval_secs: 10.0,
            train_pool,
        }
    }
}

/// One job as submitted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobSpec {
    pub arrive_ms: i64,
    pub train_ms: i64,
    /// The base model, an index into the popularity list.
    pub model: u8,
}

/// Seconds to milliseconds.
pub(crate) fn ms(secs: f64) -> i64 {
    (secs * 1000.0).round() as i64
}

/// The jobs of a scenario, in arrival order (the same for both fleets).
pub fn jobs(scenario: &Scenario) -> Vec<JobSpec> {
    let mut rng = Rng::new(scenario.seed ^ 0x0A11_1BA1);
    let d = &scenario.durations;
    let peak = scenario.jobs_per_hour * (1.0 + scenario.diurnal.abs()) / 3600.0;
    let end = scenario.hours * 3600.0;
    let mut out = Vec::new();
    if peak <= 0.0 {
        return out;
    }
    let mut t = 0.0;
    loop {
        t += rng.exponential(1.0 / peak);
        if t >= end {
            return out;
        }
        // Thinning: keep an arrival at the rate of its hour.
        let rate = scenario.jobs_per_hour / 3600.0
            * (1.0 + scenario.diurnal * (std::f64::consts::TAU * t / 86_400.0).sin());
        if !rng.chance(rate / peak) {
            continue;
        }
        out.push(JobSpec {
            arrive_ms: EPOCH_MS + ms(t),
            train_ms: ms(rng.uniform(d.train_min, d.train_max)),
            model: rng.weighted(&scenario.model_popularity) as u8,
        });
    }
}

/// Which fleet a report is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fleet {
    Monolithic,
    Staged,
}

impl Fleet {
    /// The fleet's name in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Fleet::Monolithic => "monolithic",
            Fleet::Staged => "staged",
        }
    }
}

/// What one fleet did with one scenario.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub fleet: Option<Fleet>,
    pub gpus: u32,
    pub jobs_submitted: u64,
    pub jobs_finished: u64,
    /// Dollars billed for GPU machines (start to release or preemption).
    pub gpu_dollars: f64,
    /// Dollars billed for CPU machines.
    pub cpu_dollars: f64,
    pub gpu_billed_secs: f64,
    /// Training seconds of the finished jobs (each job's once).
    pub train_secs: f64,
    /// Seconds of step progress discarded by preemptions (to be redone).
    pub lost_gpu_secs: f64,
    /// Of which training seconds.
    pub lost_train_secs: f64,
    /// The most training seconds one preemption discarded.
    pub max_lost_train_secs: f64,
    /// Preemptions of machines that were running a job or task.
    pub preemptions_busy: u64,
    /// All preemptions.
    pub preemptions: u64,
    pub latency_p50_secs: f64,
    pub latency_p95_secs: f64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub gpu_machines_started: u64,
    pub peak_gpu_machines: u32,
    /// When the run ended, seconds after the first arrival window opened.
    pub end_secs: f64,
}

impl Report {
    /// GPU dollars per finished job.
    pub fn gpu_dollars_per_job(&self) -> f64 {
        self.gpu_dollars / self.jobs_finished.max(1) as f64
    }

    /// CPU dollars per finished job.
    pub fn cpu_dollars_per_job(&self) -> f64 {
        self.cpu_dollars / self.jobs_finished.max(1) as f64
    }

    /// Training seconds over billed GPU seconds.
    pub fn gpu_busy_fraction(&self) -> f64 {
        if self.gpu_billed_secs <= 0.0 {
            0.0
        } else {
            self.train_secs / self.gpu_billed_secs
        }
    }

    /// The base-model cache's hit rate.
    pub fn cache_hit_rate(&self) -> f64 {
        let all = self.cache_hits + self.cache_misses;
        if all == 0 {
            0.0
        } else {
            self.cache_hits as f64 / all as f64
        }
    }

    /// Fills the latency percentiles from every finished job's latency.
    pub(crate) fn set_latencies(&mut self, mut latencies_ms: Vec<i64>) {
        latencies_ms.sort_unstable();
        let pick = |q: f64| -> f64 {
            if latencies_ms.is_empty() {
                return 0.0;
            }
            let i = ((latencies_ms.len() as f64 * q).ceil() as usize).clamp(1, latencies_ms.len());
            latencies_ms[i - 1] as f64 / 1000.0
        };
        self.latency_p50_secs = pick(0.50);
        self.latency_p95_secs = pick(0.95);
    }
}

/// Runs both fleets on a scenario: (monolithic, staged).
pub fn run_both(scenario: &Scenario) -> (Report, Report) {
    let jobs = jobs(scenario);
    (
        monolithic::run(scenario, &jobs),
        staged::run(scenario, &jobs),
    )
}
