//! The services' Prometheus endpoints after a real job: each service runs
//! as its own process with `/metrics` on a port of its own; after one job
//! each endpoint parses (prometheus-parse) and holds its stage's metrics with
//! sane values, and a real Prometheus server (Debian's `prometheus`, which
//! `scripts/test` installs) scrapes all four and answers a query through its
//! HTTP API.
//!
//! Needs `cargo build --workspace --bins` first (the binaries beside the
//! test executable).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use trainyard_proto::v1::JobState;
use trainyard_tests::chaos::{Chaos, Service, free_port};
use trainyard_tests::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(240);

async fn scrape(port: u16) -> prometheus_parse::Scrape {
    prom::scrape(format!("127.0.0.1:{port}")).await
}

fn at_least(
    scrape: &prometheus_parse::Scrape,
    service: &str,
    name: &str,
    labels: &[(&str, &str)],
    min: f64,
) {
    let value = prom::total(scrape, name, labels)
        .unwrap_or_else(|| panic!("{service}: no {name}{labels:?} in {:#?}", names(scrape)));
    assert!(
        value >= min,
        "{service}: {name}{labels:?} = {value}, want ≥ {min}"
    );
}

fn names(scrape: &prometheus_parse::Scrape) -> Vec<String> {
    let mut names: Vec<String> = scrape.samples.iter().map(|s| s.metric.clone()).collect();
    names.dedup();
    names
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// One instant-vector query through Prometheus' HTTP API: label sets and values.
async fn query(port: u16, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let body = reqwest::get(format!(
        "http://127.0.0.1:{port}/api/v1/query?query={}",
        percent_encode(expr)
    ))
    .await
    .and_then(|r| r.error_for_status())
    .expect("query answered")
    .text()
    .await
    .expect("body");
    let reply: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(reply["status"], "success", "{reply}");
    reply["data"]["result"]
        .as_array()
        .expect("a vector")
        .iter()
        .map(|r| {
            let labels = serde_json::from_value(r["metric"].clone()).expect("labels");
            let value = r["value"][1]
                .as_str()
                .expect("value")
                .parse()
                .expect("number");
            (labels, value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_its_metrics_and_prometheus_scrapes_them() {
    let mut chaos = Chaos::empty(|config| {
        config.telemetry.metrics_host = "127.0.0.1".into();
        config.coordinator.backlog_interval_secs = 1;
    })
    .await;
    let mut ports = BTreeMap::new();
    for service in [
        Service::Coordinator,
        Service::Captioner,
        Service::Worker,
        Service::Uploader,
    ] {
        let port = free_port();
        let name = chaos.spawn_with(service, |c| c.telemetry.metrics_port = port);
        ports.insert(service.binary(), (name, port));
    }
    chaos.wait_ready().await;

    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let job = submit(
        &mut client,
        with_destination(spec(&sample, 30), &chaos.outputs_dir()),
    )
    .await
    .job_id;
    watch_all(&mut client, &job, JOB_TIMEOUT).await;
    assert_eq!(get(&mut client, &job).await.state(), JobState::Succeeded);

    // Each endpoint: the stage's own metrics, with values a job leaves.
    let coordinator = scrape(ports["ty-coordinator"].1).await;
    let c = "coordinator";
    at_least(
        &coordinator,
        c,
        "trainyard_jobs_submitted_total",
        &[("tenant", "acme"), ("backend", "reference")],
        1.0,
    );
    at_least(
        &coordinator,
        c,
        "trainyard_jobs_finished_total",
        &[("state", "succeeded")],
        1.0,
    );
    // The backlog poller (every second here) reports every stage consumer;
    // nothing waits once the job is done.
    let coordinator_port = ports["ty-coordinator"].1;
    wait_for("an empty backlog for every stage", JOB_TIMEOUT, || async {
        let scraped = scrape(coordinator_port).await;
        ["prepare", "train", "deliver"]
            .iter()
            .all(|stage| {
                prom::total(&scraped, "trainyard_stage_backlog", &[("stage", stage)]) == Some(0.0)
            })
            .then_some(())
    })
    .await;
    for (service, stage) in [
        ("ty-captioner", "prepare"),
        ("ty-worker", "train"),
        ("ty-uploader", "deliver"),
    ] {
        let scraped = scrape(ports[service].1).await;
        let labels = [("stage", stage), ("outcome", "ok")];
        at_least(
            &scraped,
            service,
            "trainyard_stage_duration_seconds_count",
            &labels,
            1.0,
        );
        let took = prom::total(&scraped, "trainyard_stage_duration_seconds_sum", &labels).unwrap();
        assert!(
            took > 0.0 && took < JOB_TIMEOUT.as_secs_f64(),
            "{service}: {took} s"
        );
        at_least(
            &scraped,
            service,
            "trainyard_queue_wait_seconds_count",
            &[("stage", stage)],
            1.0,
        );
        at_least(
            &scraped,
            service,
            "trainyard_worker_slots",
            &[("stage", stage)],
            1.0,
        );
    }
    let worker = scrape(ports["ty-worker"].1).await;
    at_least(
        &worker,
        "worker",
        "trainyard_model_cache_misses_total",
        &[],
        1.0,
    );
    at_least(
        &worker,
        "worker",
        "trainyard_artifact_uploaded_bytes_total",
        &[("stage", "train")],
        1.0,
    );
    at_least(
        &worker,
        "worker",
        "trainyard_artifact_downloaded_bytes_total",
        &[("stage", "train")],
        1.0,
    );
    // The job ended: its per-job series are gone.
    assert_eq!(
        prom::total(&worker, "trainyard_job_step", &[("job_id", &job)]),
        None
    );

    // A real Prometheus scrapes all four and answers through its API.
    let prom_dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = ports
        .values()
        .map(|(_, port)| format!("'127.0.0.1:{port}'"))
        .collect();
    let config = prom_dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: trainyard\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let web = free_port();
    let log = std::fs::File::create(prom_dir.path().join("prometheus.log")).unwrap();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("Debian's prometheus is installed (scripts/test installs it)"),
    );
    let up = wait_for(
        "Prometheus scraped all four services",
        JOB_TIMEOUT,
        || async {
            let up = reqwest::get(format!("http://127.0.0.1:{web}/-/ready"))
                .await
                .ok()?;
            up.status().is_success().then_some(())?;
            let up = query(web, "up == 1").await;
            (up.len() == 4).then_some(up)
        },
    )
    .await;
    assert_eq!(up.len(), 4, "{up:?}");
    let finished = wait_for("jobs finished in Prometheus", JOB_TIMEOUT, || async {
        let found = query(
            web,
            "sum(trainyard_jobs_finished_total{state=\"succeeded\"})",
        )
        .await;
        found.first().map(|(_, v)| *v).filter(|v| *v >= 1.0)
    })
    .await;
    assert_eq!(finished, 1.0);
    let stages = query(
        web,
        "sum by (stage) (trainyard_stage_duration_seconds_count{outcome=\"ok\"})",
    )
    .await;
    let stages: BTreeMap<String, f64> = stages
        .into_iter()
        .map(|(labels, v)| (labels["stage"].clone(), v))
        .collect();
    for stage in ["prepare", "train", "deliver"] {
        assert!(stages.get(stage).is_some_and(|v| *v >= 1.0), "{stages:?}");
    }
    chaos.stop().await;
}
