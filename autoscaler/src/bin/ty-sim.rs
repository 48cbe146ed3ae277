//! `ty-sim`: runs the monolithic and the staged fleet on the same
//! simulated jobs for each GPU count and prints what a job costs and how
//! long it takes in each. The staged fleet is sized by the autoscaler's
//! own planner.

use anyhow::{Context, bail};
use clap::Parser;
use std::time::Instant;
use trainyard_autoscaler::sim::{self, Report, Scenario};

/// Fleet simulator: monolithic GPU handler vs Trainyard's staged fleet.
#[derive(Debug, Parser)]
#[command(name = "ty-sim", version)]
struct Args {
    /// GPU counts (each fleet's GPU machines at most), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    gpus: Vec<u32>,
    /// Hours of arrivals.
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Arrival rate as a fraction of what the GPUs could run back to back.
    #[arg(long, default_value_t = 0.65)]
    load: f64,
    /// The diurnal swing of the arrival rate (0: flat).
    #[arg(long, default_value_t = 0.0)]
    diurnal: f64,
    /// The fraction of GPU machines started as spot (both fleets).
    #[arg(long, default_value_t = 0.5)]
    spot_share: f64,
    /// The monolithic fleet's spot fraction, if not `--spot-share`.
    #[arg(long)]
    mono_spot_share: Option<f64>,
    /// The training pool's `target_drain_secs` (staged fleet).
    #[arg(long, default_value_t = 900)]
    train_drain_secs: u64,
    /// Spot preemptions per GPU-hour.
    #[arg(long, default_value_t = 0.05)]
    preempt_per_hour: f64,
    /// Training seconds between checkpoints (staged fleet).
    #[arg(long, default_value_t = 300.0)]
    checkpoint_secs: f64,
    /// GPU class: 4090, a100 or h100.
    #[arg(long, default_value = "a100")]
    gpu_class: String,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(gpu) = sim::gpu_class(&args.gpu_class) else {
        bail!("unknown gpu class {:?} (4090, a100, h100)", args.gpu_class);
    };
    let mono_spot_share = args.mono_spot_share.unwrap_or(args.spot_share);
    if !(0.0..=1.0).contains(&args.spot_share) || !(0.0..=1.0).contains(&mono_spot_share) {
        bail!("spot shares must be within 0 and 1");
    }
    let mut rows = Vec::new();
    for &gpus in &args.gpus {
        let mut scenario = Scenario::new(gpus, args.hours, args.seed, args.load);
        scenario.gpu = gpu;
        scenario.diurnal = args.diurnal;
        scenario.spot_share = args.spot_share;
        scenario.mono_spot_share = mono_spot_share;
        scenario.train_pool.target_drain_secs = args.train_drain_secs;
        scenario.preempt_per_gpu_hour = args.preempt_per_hour;
        scenario.checkpoint_secs = args.checkpoint_secs;
        let started = Instant::now();
        let (mono, staged) = sim::run_both(&scenario);
        let wall = started.elapsed().as_secs_f64();
        if args.json {
            for report in [&mono, &staged] {
                let line = serde_json::json!({
                    "report": report,
                    "gpu_dollars_per_job": report.gpu_dollars_per_job(),
                    "cpu_dollars_per_job": report.cpu_dollars_per_job(),
                    "gpu_busy_fraction": report.gpu_busy_fraction(),
                    "cache_hit_rate": report.cache_hit_rate(),
                    "jobs_per_hour": scenario.jobs_per_hour,
                    "wall_secs": wall,
                });
                println!("{}", serde_json::to_string(&line).context("json")?);
            }
        } else {
            eprintln!(
                "{gpus} GPUs: {:.0} jobs/h, simulated in {wall:.2} s",
                scenario.jobs_per_hour
            );
        }
        rows.push((mono, staged));
    }
    if !args.json {
        print_table(&args, gpu.name, &rows);
    }
    Ok(())
}

fn print_table(args: &Args, gpu: &str, rows: &[(Report, Report)]) {
    println!(
        "{gpu}, {} h of arrivals at load {} (diurnal {}), spot share staged {} / monolithic {}, {} preemptions/GPU-h, checkpoint {} s, train pool target_drain_secs {}, seed {}",
        args.hours,
        args.load,
        args.diurnal,
        args.spot_share,
        args.mono_spot_share.unwrap_or(args.spot_share),
        args.preempt_per_hour,
        args.checkpoint_secs,
        args.train_drain_secs,
        args.seed
    );
    println!(
        "| fleet | GPUs | jobs done | GPU $/job | CPU $/job | staged/mono GPU $ | p50 min | p95 min | GPU busy | lost GPU-min | preemptions | cache hit | peak GPUs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (mono, staged) in rows {
        let ratio = staged.gpu_dollars_per_job() / mono.gpu_dollars_per_job();
        for (report, ratio) in [(mono, String::new()), (staged, format!("{ratio:.2}"))] {
            println!(
                "| {} | {} | {}/{} | {:.3} | {:.4} | {} | {:.1} | {:.1} | {:.1} % | {:.0} | {} | {:.0} % | {} |",
                report.fleet.map_or("?", |f| f.as_str()),
                report.gpus,
                report.jobs_finished,
                report.jobs_submitted,
                report.gpu_dollars_per_job(),
                report.cpu_dollars_per_job(),
                ratio,
                report.latency_p50_secs / 60.0,
                report.latency_p95_secs / 60.0,
                report.gpu_busy_fraction() * 100.0,
                report.lost_gpu_secs / 60.0,
                report.preemptions,
                report.cache_hit_rate() * 100.0,
                report.peak_gpu_machines,
            );
        }
    }
}
