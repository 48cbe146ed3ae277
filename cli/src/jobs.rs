//! The client commands: submit, validate, watch, list, get, cancel, fetch,
//! metrics.

use crate::args::{CancelArgs, FetchArgs, GetArgs, ListArgs, MetricsArgs, SubmitArgs, WatchArgs};
use crate::client::{Client, load_config};
use crate::view::{self, record_text, state_name};
use crate::watch::{WatchOptions, watch};
use anyhow::bail;
use indicatif::HumanBytes;
use std::process::ExitCode;
use tracing::Instrument;
use trainyard_proto::v1::{
    CancelRequest, GetMetricsRequest, GetRequest, JobRecord, JobState, ListRequest, ValidateRequest,
};

/// Exit code of a job that ended in any state but SUCCEEDED.
pub const JOB_NOT_SUCCEEDED: u8 = 3;
/// Exit code of `yard validate` when the job would fail its checks.
pub const NOT_VALID: u8 = 4;

pub fn exit_code_of(record: &JobRecord) -> ExitCode {
    if record.state() == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(JOB_NOT_SUCCEEDED)
    }
}

/// Checks the dataset and flags before touching the network, so a typo
/// fails fast, then uploads (for a local dataset) and submits.
pub async fn submit(target: &crate::client::Target, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let dataset = crate::submit::classify(&args.sources)?;
    let mut spec = crate::submit::spec_from_args(&args)?;
    // Loaded for `--print-config` and its checks; a client needs nothing
    // of the store's settings.
    if load_config(&args.service, "yard", true)?.is_none() {
        return Ok(ExitCode::SUCCESS);
    }
    let client = &mut crate::client::connect(target).await?;
    spec.dataset = Some(crate::submit::dataset_source(dataset, client).await?);
    // With an OTLP endpoint configured, the job's trace starts here: the
    // client interceptor sends this span's context to the coordinator.
    let span = tracing::info_span!("submit", otel.name = "yard submit", otel.kind = "client");
    let record = crate::submit::submit(client, spec).instrument(span).await?;
    println!("{}", record.job_id);
    if !args.watch {
        return Ok(ExitCode::SUCCESS);
    }
    watch_job(client, &record.job_id, WatchOptions::default()).await
}

/// Like `submit` up to the call, then `Validate` instead: prints every
/// problem, the warnings and the estimate. A local dataset is uploaded for
/// the check and removed afterwards.
pub async fn validate(
    target: &crate::client::Target,
    args: SubmitArgs,
) -> anyhow::Result<ExitCode> {
    let dataset = crate::submit::classify(&args.sources)?;
    let uploaded = matches!(
        dataset,
        crate::submit::DatasetArg::LocalDir(_) | crate::submit::DatasetArg::LocalZip(_)
    );
    let mut spec = crate::submit::spec_from_args(&args)?;
    // Loaded for `--print-config` and its checks; a client needs nothing
    // of the store's settings.
    if load_config(&args.service, "yard", true)?.is_none() {
        return Ok(ExitCode::SUCCESS);
    }
    let client = &mut crate::client::connect(target).await?;
    let source = crate::submit::dataset_source(dataset, client).await?;
    spec.dataset = Some(source.clone());
    let reply = client.validate(ValidateRequest { spec: Some(spec) }).await;
    if uploaded {
        crate::submit::remove_upload(&source, client).await;
    }
    let reply = reply?.into_inner();
    print!("{}", view::validate_text(&reply));
    Ok(if reply.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(NOT_VALID)
    })
}

pub async fn watch_cmd(client: &mut Client, args: WatchArgs) -> anyhow::Result<ExitCode> {
    watch_job(client, &args.job, WatchOptions { logs: args.logs }).await
}

async fn watch_job(
    client: &mut Client,
    job: &str,
    options: WatchOptions,
) -> anyhow::Result<ExitCode> {
    let outcome = watch(client, job, options).await?;
    print!("{}", record_text(&outcome.record));
    Ok(exit_code_of(&outcome.record))
}

pub async fn list(client: &mut Client, args: ListArgs) -> anyhow::Result<ExitCode> {
    let state = args.state.map(JobState::from).unwrap_or_default();
    let mut jobs: Vec<JobRecord> = Vec::new();
    let mut page_token = String::new();
    while jobs.len() < args.limit as usize {
        let page = client
            .list(ListRequest {
                state: state as i32,
                page_size: (args.limit as usize - jobs.len()).min(500) as u32,
                page_token,
            })
            .await?
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    jobs.truncate(args.limit as usize);
    if args.json {
        for job in &jobs {
            println!("{}", view::record_json(job, false)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        eprintln!("no jobs");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<36}  {:<10}  {:<12}  {:<16}  NAME",
        "JOB", "STATE", "PROGRESS", "CREATED"
    );
    let now = trainyard_core::now_ms();
    for job in &jobs {
        println!("{}", view::list_line(job, now));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn get_record(client: &mut Client, job: &str) -> anyhow::Result<JobRecord> {
    client
        .get(GetRequest {
            job_id: job.to_string(),
        })
        .await?
        .into_inner()
        .job
        .ok_or_else(|| anyhow::anyhow!("the coordinator answered without a job"))
}

pub async fn get(client: &mut Client, args: GetArgs) -> anyhow::Result<ExitCode> {
    let record = get_record(client, &args.job).await?;
    if args.json {
        println!("{}", view::record_json(&record, true)?);
    } else {
        print!("{}", record_text(&record));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(client: &mut Client, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let record = client
        .cancel(CancelRequest {
            job_id: args.job.clone(),
            reason: args.reason.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .job
        .ok_or_else(|| anyhow::anyhow!("the coordinator answered without a job"))?;
    match record.state() {
        JobState::Cancelled => println!("{} CANCELLED", record.job_id),
        state => println!(
            "{} was already {}; nothing to cancel",
            record.job_id,
            state_name(state)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn fetch(client: &mut Client, args: FetchArgs) -> anyhow::Result<ExitCode> {
    // Loaded for `--print-config` and its checks; a client needs nothing
    // of the store's settings.
    if load_config(&args.service, "yard", true)?.is_none() {
        return Ok(ExitCode::SUCCESS);
    }
    let record = get_record(client, &args.job).await?;
    if record.artifacts.is_empty() {
        bail!(
            "job {} has no outputs yet (it is {})",
            record.job_id,
            state_name(record.state())
        );
    }
    let fetched = crate::transfer::download(client, &record.job_id, &args.dir).await?;
    for (local, size, sha256) in fetched {
        println!(
            "{}  {:>10}  sha256 {} ok",
            local.display(),
            HumanBytes(size).to_string(),
            &sha256[..sha256.len().min(12)]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a job's metric series: a table of name, step and value, or with
/// `--json` one object per series.
pub async fn metrics(client: &mut Client, args: MetricsArgs) -> anyhow::Result<ExitCode> {
    let reply = client
        .get_metrics(GetMetricsRequest {
            job_id: args.job.clone(),
            names: args.names,
        })
        .await?
        .into_inner();
    if args.json {
        for series in &reply.series {
            let points: Vec<_> = series
                .points
                .iter()
                .map(|p| serde_json::json!({"step": p.step, "value": p.value, "at_ms": p.at_ms}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"name": series.name, "points": points})
            );
        }
    } else if reply.series.is_empty() {
        eprintln!("no metrics for {}", args.job);
    } else {
        print!("{}", view::metrics_table(&reply.series));
    }
    if reply.truncated {
        eprintln!("(more points than one answer carries: the oldest are shown)");
    }
    Ok(ExitCode::SUCCESS)
}
