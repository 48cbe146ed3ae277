//! `ty-bench gpu-smoke`: the operator's check that a machine's trainers
//! work. Each selected backend whose trainer is installed trains a few steps
//! on the bundled sample (a tiny SFT set for TRL) with the smallest preset
//! of a family it trains, through the real pipeline: the bench's fleet of
//! separate service processes, the job submitted over gRPC, prepared,
//! trained by the worker, delivered to a local folder. A table says, per
//! backend, PASS, FAIL (with the job's error kind and message) or SKIPPED
//! (with what is missing), and the exit code is 1 when a backend that ran
//! failed.
//!
//! What is installed is decided as the worker decides it (`Tools` from
//! `[worker.trainers]`, `not_installed`), plus whether each configured
//! path is really there and, for TRL, whether its Python imports the
//! libraries the driver needs. The fleet reads the same config file as
//! the services would (`--config`, `TY_CONFIG`, `TY_*`), with the operator's
//! `--set worker.…` overrides on top; its NATS, store, ports and token are
//! its own, and its model cache is the configured one, so a second run does
//! not download the models again.

#[path = "smoke/args.rs"]
mod args;
#[path = "smoke/plan.rs"]
mod plan;
#[path = "smoke/report.rs"]
mod report;

use crate::fleet::{Fleet, FleetOptions};
use futures::StreamExt;
use plan::Plan;
use report::{Observed, Row, Verdict};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use trainyard_core::Config;
use trainyard_models::ModelFamily;
use trainyard_proto::v1::{
    CancelRequest, Destination, GetRequest, JobRecord, JobState, ModelRef, Secrets, Stage,
    SubmitRequest, TrainingSettings, WatchRequest, job_event::Kind,
};

/// The SFT sample TRL trains on: prompt/completion rows about the sample's emblem.
const TRL_SAMPLE: &str = include_str!("../../../samples/trl-sft.jsonl");

/// Python modules the TRL driver imports (`backends/drivers/trl_train.py`).
const TRL_MODULES: &str = "trl, peft, transformers, datasets";

/// Runs the smoke test with the arguments after `gpu-smoke`; the exit code.
pub async fn main(args: &[String]) -> u8 {
    let args = match args::parse(args) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{}", args::USAGE);
            return 0;
        }
        Err(e) => {
            eprintln!("ty-bench gpu-smoke: {e}\n\n{}", args::USAGE);
            return 2;
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ty-bench gpu-smoke: {e:#}");
            1
        }
    }
}

async fn run(args: args::SmokeArgs) -> anyhow::Result<u8> {
    let config = Config::load(args.config.as_deref(), &args.sets)
        .map_err(|e| anyhow::anyhow!("cannot load the config: {e}"))?;
    let reference =
        trainyard_worker::models::find_trainer(config.worker.reference_trainer.as_deref())
            .unwrap_or_default();
    let tools = trainyard_worker::tools(&config.worker.trainers, reference);
    let hf_token = std::env::var("HF_TOKEN").unwrap_or_default();
    let mut plans = plan::plan(&args.backends, &tools, args.steps, !hf_token.is_empty());
    for p in &mut plans {
        if let Plan::Run { backend: "trl", .. } = p
            && let Err(reason) = python_imports(&config, TRL_MODULES).await
        {
            *p = Plan::Skip {
                backend: "trl",
                reason,
            };
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    let runs: Vec<_> = plans
        .iter()
        .filter(|p| matches!(p, Plan::Run { .. }))
        .collect();
    let mut fleet = None;
    if !runs.is_empty() {
        eprintln!("starting the fleet");
        fleet = Some(Fleet::start_with(fleet_options(&args, &config)?).await?);
    }
    let mut datasets = BTreeMap::new();
    for p in &plans {
        let row = match (p, fleet.as_mut()) {
            (Plan::Skip { backend, reason }, _) => Row {
                backend,
                preset: plan::smallest_preset(backend, args.steps, !hf_token.is_empty())
                    .map_or_else(|_| "-".into(), |(p, _)| p.name.to_string()),
                steps: args.steps,
                observed: Observed::default(),
                wall: None,
                verdict: Verdict::Skipped {
                    reason: reason.clone(),
                },
            },
            (
                Plan::Run {
                    backend,
                    preset,
                    settings,
                },
                Some(fleet),
            ) => {
                let job = SmokeJob {
                    backend,
                    preset: preset.name,
                    settings: settings.clone(),
                    pool: config.worker.pool.clone(),
                    hf_token: hf_token.clone(),
                };
                eprintln!("{backend}: {} steps on {}", settings.steps, preset.name);
                let dataset = dataset_uri(fleet, &mut datasets, preset.family).await?;
                let started = Instant::now();
                let observed = run_job(fleet, &job, &dataset, args.timeout).await?;
                let wall = started.elapsed();
                let verdict = report::verdict(&observed, settings.steps, settings.save_every);
                eprintln!(
                    "{backend}: {} in {:.1}s",
                    verdict.word(),
                    wall.as_secs_f64()
                );
                Row {
                    backend,
                    preset: preset.name.to_string(),
                    steps: settings.steps,
                    observed,
                    wall: Some(wall),
                    verdict,
                }
            }
            (Plan::Run { .. }, None) => unreachable!("the fleet runs when a backend does"),
        };
        rows.push(row);
    }
    print!("{}", report::table(&rows));
    let code = report::exit_code(&rows);
    if let Some(fleet) = fleet
        && (code != 0 || args.keep)
    {
        let dir = fleet.stop_and_keep();
        println!(
            "\nfleet folder kept: {} (service logs in logs/, each job's trainer log in store/tenants/{}/jobs/<job>/logs/)",
            dir.display(),
            crate::fleet::TENANT
        );
    }
    if rows
        .iter()
        .all(|r| matches!(r.verdict, Verdict::Skipped { .. }))
    {
        println!("\nno selected backend is installed here: nothing ran");
    }
    Ok(code)
}

/// The fleet as the operator's config describes it, on its own NATS,
/// store and port, with the configured model cache.
fn fleet_options(args: &args::SmokeArgs, config: &Config) -> anyhow::Result<FleetOptions> {
    let mut env: Vec<(String, String)> = vec![
        // The smoke job's own token, whatever the config file's are.
        (
            "TY_COORDINATOR__TOKENS".into(),
            format!(
                "{{ {:?} = {:?} }}",
                trainyard_core::auth::token_key(crate::fleet::TOKEN),
                crate::fleet::TENANT
            ),
        ),
        (
            "TY_WORKER__MODEL_CACHE_DIR".into(),
            std::path::absolute(&config.worker.model_cache_dir)?
                .to_string_lossy()
                .into_owned(),
        ),
        // A failure shows at once, with its error, rather than after retries.
        ("TY_RETRY__TRAIN__MAX_ATTEMPTS".into(), "1".into()),
    ];
    if let Some(file) = &args.config {
        env.push((
            "TY_CONFIG".into(),
            std::path::absolute(file)?.to_string_lossy().into_owned(),
        ));
    }
    std::fs::create_dir_all(&config.worker.model_cache_dir)?;
    Ok(FleetOptions {
        env,
        args: args
            .sets
            .iter()
            .flat_map(|s| ["--set".to_string(), s.clone()])
            .collect(),
        log_files: true,
        secured: false,
    })
}

/// Whether the trainers' Python imports `modules`, with the trainers'
/// environment; what failed when it does not.
async fn python_imports(config: &Config, modules: &str) -> Result<(), String> {
    let python = &config.worker.trainers.python;
    let output = tokio::process::Command::new(python)
        .arg("-c")
        .arg(format!("import {modules}"))
        .envs(&config.worker.trainers.env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .map_err(|_| {
            format!(
                "{} -c 'import {modules}' did not finish in 120 s",
                python.display()
            )
        })?
        .map_err(|e| format!("worker.trainers.python {}: {e}", python.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(format!(
        "worker.trainers.python {} cannot import {modules}: {last}",
        python.display()
    ))
}

/// The store URI of the dataset for `family`: the TRL sample, the bundled
/// sample as the fleet stored it, or the sample scaled up to the image
/// backends' resolution (uploaded once).
async fn dataset_uri(
    fleet: &Fleet,
    done: &mut BTreeMap<&'static str, String>,
    family: ModelFamily,
) -> anyhow::Result<String> {
    let (name, file) = match family {
        ModelFamily::Reference => return Ok(fleet.store.uri(&crate::fleet::upload_key("sample"))),
        ModelFamily::Llm => ("trl", Some("train.jsonl")),
        _ => ("sample-smoke", None),
    };
    let key = match file {
        Some(file) => format!("{}/{file}", crate::fleet::upload_key(name)),
        None => crate::fleet::upload_key(name),
    };
    let key = key.as_str();
    if let Some(uri) = done.get(name) {
        return Ok(uri.clone());
    }
    if family == ModelFamily::Llm {
        fleet
            .store
            .put_bytes(key, TRL_SAMPLE.as_bytes().to_vec().into())
            .await?;
    } else {
        let local = fleet.dir().join("sample-smoke");
        let dir = local.clone();
        tokio::task::spawn_blocking(move || scaled_sample(&dir, plan::IMAGE_RESOLUTION)).await??;
        fleet.store.put_dir(&local, key, &[]).await?;
    }
    let uri = fleet.store.uri(key);
    done.insert(name, uri.clone());
    Ok(uri)
}

/// The bundled sample with its images scaled to `side` pixels: real
/// trainers want images at least as large as their resolution.
fn scaled_sample(dir: &Path, side: u32) -> anyhow::Result<()> {
    trainyard_captioner::sample::write_sample_dataset(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "png") {
            image::open(&path)?
                .resize_exact(side, side, image::imageops::FilterType::Nearest)
                .save(&path)?;
        }
    }
    Ok(())
}

/// One smoke job's spec inputs.
struct SmokeJob {
    backend: &'static str,
    preset: &'static str,
    settings: TrainingSettings,
    pool: String,
    hf_token: String,
}

impl SmokeJob {
    fn spec(&self, dataset: &str, outputs: &Path) -> trainyard_proto::v1::JobSpec {
        let mut spec = trainyard_tests::spec(dataset, self.settings.steps);
        spec.name = format!("gpu-smoke {}", self.backend);
        spec.training = Some(self.settings.clone());
        spec.base_model = Some(ModelRef {
            uri: self.preset.into(),
            ..Default::default()
        });
        spec.pool = self.pool.clone();
        spec.destinations = vec![Destination {
            uri: format!("file://{}", outputs.display()),
            ..Default::default()
        }];
        if !self.hf_token.is_empty() {
            spec.secrets = Some(Secrets {
                hf_token: self.hf_token.clone(),
                ..Default::default()
            });
        }
        spec
    }
}

/// Submits the job, follows it to its final state or the timeout (then
/// cancels it) and reads what it delivered.
async fn run_job(
    fleet: &mut Fleet,
    job: &SmokeJob,
    dataset: &str,
    timeout: Duration,
) -> anyhow::Result<Observed> {
    let outputs = fleet.dir().join("outputs").join(job.backend);
    let mut client = fleet.client();
    let submitted = client
        .submit(SubmitRequest {
            spec: Some(job.spec(dataset, &outputs)),
        })
        .await;
    let record = match submitted {
        Ok(reply) => reply.into_inner().job.expect("a submitted job's record"),
        Err(status) => {
            return Ok(Observed {
                state: Some(JobState::Failed),
                error: Some(trainyard_proto::v1::JobError {
                    kind: trainyard_proto::v1::ErrorKind::InvalidSpec as i32,
                    message: format!("submit refused: {}", status.message()),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    };
    eprintln!("{}: job {}", job.backend, record.job_id);
    let mut observed = Observed::default();
    let mut stage = Stage::Prepare;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut events = client
        .watch(WatchRequest {
            job_id: record.job_id.clone(),
        })
        .await?
        .into_inner();
    loop {
        let next = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(next) => next,
            Err(_) => {
                observed.timed_out = Some(format!(
                    "{} s passed in the {} stage at step {}",
                    timeout.as_secs(),
                    stage
                        .as_str_name()
                        .trim_start_matches("STAGE_")
                        .to_lowercase(),
                    observed.steps_done
                ));
                let _ = client
                    .cancel(CancelRequest {
                        job_id: record.job_id.clone(),
                        reason: "gpu-smoke timeout".into(),
                    })
                    .await;
                break;
            }
        };
        let Some(event) = next else { break };
        match event?.kind {
            Some(Kind::Progress(p)) => {
                stage = p.stage();
                if stage == Stage::Train {
                    observed.steps_done = observed.steps_done.max(p.step);
                }
            }
            Some(Kind::Checkpoint(c)) => {
                observed.checkpoint = observed.checkpoint.max(Some(c.step));
            }
            _ => {}
        }
    }
    let record = client
        .get(GetRequest {
            job_id: record.job_id.clone(),
        })
        .await?
        .into_inner()
        .job
        .expect("a job's record");
    if observed.timed_out.is_none() {
        observed.state = Some(record.state());
    }
    observed.error = record.error.clone();
    observed.steps_done = observed
        .steps_done
        .max(record.summary.as_ref().map_or(0, |s| s.steps));
    observed.adapter = delivered_adapter(&record, &outputs);
    observed.exited = fleet.exited();
    Ok(observed)
}

/// The final adapter's file name, when it is in the outputs folder with the
/// size the record says.
fn delivered_adapter(record: &JobRecord, outputs: &Path) -> Option<String> {
    record
        .delivered
        .iter()
        .filter(|d| d.uri.ends_with(".safetensors") && !d.uri.contains("/checkpoints/"))
        .find_map(|d| {
            let path = PathBuf::from(d.uri.strip_prefix("file://").unwrap_or(&d.uri));
            let there = path.starts_with(outputs)
                && std::fs::metadata(&path).is_ok_and(|m| m.len() == d.size && d.size > 0);
            there.then(|| path.file_name()?.to_str().map(str::to_string))?
        })
}
