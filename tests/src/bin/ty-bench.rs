//! `ty-bench`: the numbers of BENCHMARKS.md, measured on a real fleet of
//! separate processes (nats-server and the four service binaries built
//! beside this one): idle RSS of each service, time from submit to the first
//! training step, and wall time of the sample job end to end.
//!
//! Run: `cargo build --release --bins && target/release/ty-bench [--steps 200] [--runs 3]`
//!
//! `ty-bench tracing [--jobs 12] [--steps 20] [--rounds 2]`: the pipeline's
//! throughput (jobs through all four stages at once) with OpenTelemetry off
//! (`OTEL_SDK_DISABLED`), with context propagation only (no endpoint, the
//! default) and with spans and metrics exported over OTLP to a receiver in
//! this process.
//!
//! `ty-bench bus [--jobs 12] [--steps 20] [--rounds 2] [--runs 3]`: submit →
//! first training step and the pipeline's throughput on an open bus and on
//! one with identities and TLS (`yard fleet init`'s files).
//!
//! `ty-bench captions [--images 64] [--latency-ms 50]`: captioning
//! throughput against the OpenAI-compatible stand-in at concurrency 1, 4
//! and 16, and the caption cache's hit path cost per image (`captions`).
//!
//! `ty-bench gpu-smoke [--only kohya,trl] [--steps 4] [--timeout 1800]`: on a
//! machine with its trainers installed, each backend trains a few steps
//! through this fleet and a pass/fail table is printed (`smoke`; README's
//! "GPU smoke test").

#[path = "ty-bench/captions.rs"]
mod captions;
#[path = "ty-bench/fleet.rs"]
mod fleet;
#[path = "ty-bench/smoke.rs"]
mod smoke;

use fleet::Fleet;
use futures::StreamExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use trainyard_proto::v1::{JobState, Stage, SubmitRequest, WatchRequest, job_event::Kind};
use trainyard_tests::spec;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn arg(name: &str, default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Submits `jobs` jobs at once and waits for all of them; the wall time.
async fn run_batch(fleet: &Fleet, jobs: u32, steps: u32) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut waits = Vec::new();
    for _ in 0..jobs {
        let mut client = fleet.client();
        let job = client
            .submit(SubmitRequest {
                spec: Some(spec(&fleet.store.uri(&fleet::upload_key("sample")), steps)),
            })
            .await?
            .into_inner()
            .job
            .expect("job");
        waits.push(tokio::spawn(async move {
            let mut events = client
                .watch(WatchRequest {
                    job_id: job.job_id.clone(),
                })
                .await?
                .into_inner();
            while let Some(event) = events.next().await {
                if let Some(Kind::State(s)) = event?.kind
                    && s.state().is_final()
                {
                    anyhow::ensure!(
                        s.state() == JobState::Succeeded,
                        "job ended {:?}",
                        s.state()
                    );
                }
            }
            anyhow::Ok(())
        }));
    }
    for wait in waits {
        wait.await??;
    }
    Ok(started.elapsed())
}

/// The telemetry work of handling one message, measured alone: extract the
/// context from the task's headers, open the process span, open a send
/// span for the result and inject its context, with one log line inside.
async fn per_message_cost(env: &[(&str, String)], messages: u32) -> anyhow::Result<Duration> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use trainyard_core::telemetry::{Telemetry, TelemetrySettings, propagation};
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .chain([("TY_LOG".to_string(), "warn".to_string())])
        .collect();
    let settings = TelemetrySettings::resolve("ty-bench", &Default::default(), &env)?;
    let (telemetry, dispatch) = Telemetry::start(&settings)?;
    let mut incoming = async_nats::HeaderMap::new();
    incoming.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let job = propagation::JobAttrs {
        job_id: Some("j-0123456789abcdef0123456789abcdef"),
        tenant: Some("acme"),
        stage: Some("train"),
        attempt: Some(1),
    };
    let took = tracing::dispatcher::with_default(&dispatch, || {
        let started = Instant::now();
        for _ in 0..messages {
            let process = propagation::process_span(Some(&incoming), "ty.task.train.default", job);
            let _in = process.enter();
            tracing::info!("handled");
            let send = propagation::send_span("ty.result.train", job);
            let mut out = async_nats::HeaderMap::new();
            propagation::inject_nats(&send.context(), &mut out);
            std::hint::black_box(out);
        }
        started.elapsed()
    });
    telemetry.shutdown().await;
    Ok(took / messages)
}

/// `ty-bench tracing`: throughput with telemetry off, propagating, exporting.
async fn tracing_overhead() -> anyhow::Result<()> {
    let jobs = arg("--jobs", 12);
    let steps = arg("--steps", 20);
    let rounds = arg("--rounds", 2);
    let receiver = trainyard_tests::otlp::OtlpReceiver::start().await;
    let modes: [(&str, Vec<(&str, String)>); 3] = [
        (
            "off (OTEL_SDK_DISABLED)",
            vec![("OTEL_SDK_DISABLED", "true".into())],
        ),
        ("propagation only (no endpoint)", vec![]),
        (
            "OTLP export (spans + metrics)",
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
                ("OTEL_METRIC_EXPORT_INTERVAL", "1000".into()),
            ],
        ),
    ];
    println!("telemetry work per message handled (process span, send span, inject, one log line)");
    for (name, env) in &modes {
        let cost = per_message_cost(env, 50_000).await?;
        println!("  {name:<34} {:>8.2} µs", cost.as_secs_f64() * 1e6);
    }
    println!("pipeline throughput, {jobs} jobs × {steps} steps at once, best of {rounds} rounds");
    println!("  {:<34} {:>10} {:>10}", "telemetry", "wall", "jobs/min");
    for (name, env) in &modes {
        let fleet = Fleet::start(env).await?;
        // A first job builds the base model and warms the cache.
        run_batch(&fleet, 1, steps).await?;
        let mut best = Duration::MAX;
        for _ in 0..rounds {
            best = best.min(run_batch(&fleet, jobs, steps).await?);
        }
        println!(
            "  {:<34} {:>8.2} s {:>10.1}",
            name,
            best.as_secs_f64(),
            f64::from(jobs) * 60.0 / best.as_secs_f64()
        );
        drop(fleet);
    }
    println!("  spans received over OTLP: {}", receiver.spans().len());
    Ok(())
}

/// Submits one job and follows it; the time to its first training step.
async fn first_step(fleet: &Fleet, steps: u32) -> anyhow::Result<Duration> {
    let mut client = fleet.client();
    let started = Instant::now();
    let job = client
        .submit(SubmitRequest {
            spec: Some(spec(&fleet.store.uri("uploads/sample"), steps)),
        })
        .await?
        .into_inner()
        .job
        .expect("job");
    let mut events = client
        .watch(WatchRequest {
            job_id: job.job_id.clone(),
        })
        .await?
        .into_inner();
    let mut first = None;
    while let Some(event) = events.next().await {
        match event?.kind {
            Some(Kind::Progress(p)) if p.stage() == Stage::Train && p.step > 0 => {
                first.get_or_insert(started.elapsed());
            }
            Some(Kind::State(s)) if s.state().is_final() => {
                anyhow::ensure!(
                    s.state() == JobState::Succeeded,
                    "job ended {:?}",
                    s.state()
                );
            }
            _ => {}
        }
    }
    first.ok_or_else(|| anyhow::anyhow!("no training step seen"))
}

/// `ty-bench bus`: the cost of identities and TLS on the bus.
async fn bus_overhead() -> anyhow::Result<()> {
    let jobs = arg("--jobs", 12);
    let steps = arg("--steps", 20);
    let rounds = arg("--rounds", 2);
    let runs = arg("--runs", 3);
    println!(
        "submit → first step (median of {runs}) and {jobs} jobs × {steps} steps at once (best of {rounds})"
    );
    println!(
        "  {:<24} {:>12} {:>10} {:>10}",
        "bus", "first step", "wall", "jobs/min"
    );
    for (name, secured) in [("open (insecure_dev)", false), ("nkeys + TLS", true)] {
        let fleet = Fleet::start_with(fleet::FleetOptions {
            secured,
            ..Default::default()
        })
        .await?;
        // A first job builds the base model and warms the cache.
        run_batch(&fleet, 1, steps).await?;
        let mut firsts = Vec::new();
        for _ in 0..runs {
            firsts.push(first_step(&fleet, steps).await?);
        }
        firsts.sort();
        let mut best = Duration::MAX;
        for _ in 0..rounds {
            best = best.min(run_batch(&fleet, jobs, steps).await?);
        }
        println!(
            "  {:<24} {:>10.3} s {:>8.2} s {:>10.1}",
            name,
            firsts[firsts.len() / 2].as_secs_f64(),
            best.as_secs_f64(),
            f64::from(jobs) * 60.0 / best.as_secs_f64()
        );
        drop(fleet);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    match std::env::args().nth(1).as_deref() {
        Some("tracing") => return tracing_overhead().await.map(|()| ExitCode::SUCCESS),
        Some("bus") => return bus_overhead().await.map(|()| ExitCode::SUCCESS),
        Some("captions") => {
            return captions::main(arg("--images", 64), arg("--latency-ms", 50))
                .await
                .map(|()| ExitCode::SUCCESS);
        }
        Some("gpu-smoke") => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            let code = smoke::main(&args).await;
            return Ok(ExitCode::from(code));
        }
        _ => {}
    }
    let steps = arg("--steps", 200);
    let runs = arg("--runs", 3);
    let fleet = Fleet::start(&[]).await?;
    let (nats, services, store) = (&fleet.nats, &fleet.services, &fleet.store);
    // Let start-up allocations settle before reading idle memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("idle RSS");
    for service in services {
        println!("  {:<16} {:>7} KiB", service.1, rss_kib(service.0.id()));
    }
    println!("  {:<16} {:>7} KiB", "nats-server", rss_kib(nats.pid()));

    let mut client = fleet.client();
    println!("\nsample job, {steps} steps (run 1 also generates the base model)");
    println!("  run  submit→first step  submit→succeeded  worker peak RSS");
    for run in 1..=runs {
        let started = Instant::now();
        let job = client
            .submit(SubmitRequest {
                spec: Some(spec(&store.uri(&fleet::upload_key("sample")), steps)),
            })
            .await?
            .into_inner()
            .job
            .expect("job");
        let mut events = client
            .watch(WatchRequest {
                job_id: job.job_id.clone(),
            })
            .await?
            .into_inner();
        let mut first_step = None;
        let mut peak = 0;
        let worker_pid = services[2].0.id();
        while let Some(event) = events.next().await {
            peak = peak.max(rss_kib(worker_pid));
            match event?.kind {
                Some(Kind::Progress(p)) if p.stage() == Stage::Train && p.step > 0 => {
                    first_step.get_or_insert(started.elapsed());
                }
                Some(Kind::State(s)) if s.state().is_final() => {
                    anyhow::ensure!(
                        s.state() == JobState::Succeeded,
                        "job ended {:?}",
                        s.state()
                    );
                }
                _ => {}
            }
        }
        println!(
            "  {run:>3}  {:>14.2} s  {:>14.2} s  {:>12} KiB",
            first_step.unwrap_or_default().as_secs_f64(),
            started.elapsed().as_secs_f64(),
            peak
        );
    }
    Ok(ExitCode::SUCCESS)
}
