//! How records read on a terminal, and as protobuf JSON.

use indicatif::{HumanBytes, HumanDuration};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use std::fmt::Write as _;
use std::time::Duration;
use trainyard_proto::v1::{JobError, JobRecord, JobState, Stage, ValidateReply};

/// `SUCCEEDED`, `TRAINING`, …
pub fn state_name(state: JobState) -> &'static str {
    let name = state.as_str_name();
    name.strip_prefix("JOB_STATE_").unwrap_or(name)
}

pub fn stage_name(stage: i32) -> &'static str {
    Stage::try_from(stage).unwrap_or_default().name()
}

pub fn error_line(error: &JobError) -> String {
    let kind = trainyard_proto::v1::ErrorKind::try_from(error.kind).unwrap_or_default();
    let kind = kind
        .as_str_name()
        .strip_prefix("ERROR_KIND_")
        .unwrap_or("UNKNOWN");
    let retry = if error.retryable { ", retryable" } else { "" };
    format!(
        "{} failed ({}{retry}): {}",
        stage_name(error.stage),
        kind.to_lowercase(),
        error.message
    )
}

/// A local path for `file://` URIs, the URI otherwise.
pub fn display_uri(uri: &str) -> &str {
    uri.strip_prefix("file://").unwrap_or(uri)
}

fn seconds_between(from_ms: i64, to_ms: i64) -> Option<Duration> {
    (from_ms > 0 && to_ms >= from_ms).then(|| Duration::from_millis((to_ms - from_ms) as u64))
}

/// Seconds as `12.3s`.
pub fn secs(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// One line for `yard list`.
pub fn list_line(record: &JobRecord, now_ms: i64) -> String {
    let mut progress = String::new();
    if !record.quota_hold.is_empty() && !record.state().is_final() {
        progress.push_str("held");
    } else if record.state() == JobState::AwaitingReview {
        progress.push_str("review");
    } else if let Some(p) = &record.progress
        && !record.state().is_final()
    {
        if p.total_steps > 0 {
            let _ = write!(progress, "{}/{}", p.step, p.total_steps);
        } else if !p.message.is_empty() {
            progress.push_str(&p.message);
        }
    }
    let age = seconds_between(record.created_at_ms, now_ms)
        .map(|d| format!("{} ago", HumanDuration(d)))
        .unwrap_or_default();
    let name = record.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
    format!(
        "{:<36}  {:<10}  {:<12}  {:<16}  {name}",
        record.job_id,
        state_name(record.state()),
        progress,
        age
    )
}

/// What a job awaiting caption review waits for, and the commands.
pub fn review_hint(record: &JobRecord) -> String {
    let job = &record.job_id;
    format!(
        "awaiting review of captions v{}: yard captions {job}, then yard approve {job} (or yard cancel {job})",
        record.captions_version.max(1)
    )
}

/// The human-readable record for `yard get` and the end of `yard watch`.
pub fn record_text(record: &JobRecord) -> String {
    let mut out = String::new();
    let state = record.state();
    let _ = writeln!(out, "job      {}", record.job_id);
    if let Some(spec) = record.spec.as_ref().filter(|s| !s.name.is_empty()) {
        let _ = writeln!(out, "name     {}", spec.name);
    }
    let mut state_line = state_name(state).to_string();
    if !state.is_final() && record.attempt > 0 {
        let _ = write!(
            state_line,
            " ({} attempt {})",
            stage_name(record.stage),
            record.attempt
        );
    }
    let _ = writeln!(out, "state    {state_line}");
    if !record.quota_hold.is_empty() && !state.is_final() {
        let _ = writeln!(out, "held     {}", record.quota_hold);
    }
    if state == JobState::AwaitingReview {
        let _ = writeln!(out, "review   {}", review_hint(record));
    }
    if let Some(error) = &record.error {
        let _ = writeln!(out, "error    {}", error_line(error));
    }
    if !record.cancel_reason.is_empty() {
        let _ = writeln!(out, "reason   {}", record.cancel_reason);
    }
    for adjustment in &record.adjustments {
        let _ = writeln!(out, "adjusted {adjustment}");
    }
    if let Some(t) = &record.times {
        let mut parts = Vec::new();
        let prepared = if t.awaiting_review_at_ms > 0 {
            t.awaiting_review_at_ms
        } else {
            t.training_at_ms
        };
        let stages = [
            ("queued", t.queued_at_ms, t.preparing_at_ms),
            ("prepare", t.preparing_at_ms, prepared),
            ("review", t.awaiting_review_at_ms, t.training_at_ms),
            ("train", t.training_at_ms, t.delivering_at_ms),
            ("deliver", t.delivering_at_ms, t.finished_at_ms),
        ];
        for (name, from, to) in stages {
            if let Some(d) = seconds_between(from, to) {
                parts.push(format!("{name} {}", secs(d)));
            }
        }
        if let Some(d) = seconds_between(record.created_at_ms, t.finished_at_ms) {
            parts.push(format!("total {}", secs(d)));
        }
        if !parts.is_empty() {
            let _ = writeln!(out, "times    {}", parts.join(", "));
        }
    }
    if record.video_count > 0 {
        let _ = writeln!(
            out,
            "dataset  {} files ({} images, {} clips)",
            record.image_count,
            record.image_count.saturating_sub(record.video_count),
            record.video_count
        );
    } else if record.image_count > 0 {
        let _ = writeln!(out, "dataset  {} images", record.image_count);
    }
    if let Some(s) = &record.summary {
        let _ = writeln!(
            out,
            "trained  {} steps with {}, loss {:.4} → {:.4} in {}",
            s.steps,
            s.backend,
            s.loss_first,
            s.loss_last,
            secs(Duration::from_secs_f64(s.seconds.max(0.0)))
        );
    }
    if let Some(c) = record
        .latest_checkpoint
        .as_ref()
        .filter(|c| !c.uri.is_empty())
    {
        let _ = writeln!(out, "checkpoint step {}  {}", c.step, display_uri(&c.uri));
    }
    if !record.artifacts.is_empty() {
        let _ = writeln!(out, "outputs");
        for a in &record.artifacts {
            let _ = writeln!(
                out,
                "  {:<28} {:>10}  {}",
                a.name,
                HumanBytes(a.size).to_string(),
                a.uri
            );
            download_line(&mut out, &a.download_url, a.download_url_expires_at_ms);
        }
    }
    if !record.delivered.is_empty() {
        let _ = writeln!(out, "delivered");
        for d in &record.delivered {
            let _ = writeln!(
                out,
                "  {:>10}  {}",
                HumanBytes(d.size).to_string(),
                display_uri(&d.uri)
            );
            download_line(&mut out, &d.download_url, d.download_url_expires_at_ms);
        }
    }
    if !record.manifest_uri.is_empty() {
        let _ = writeln!(out, "manifest {}", display_uri(&record.manifest_uri));
    }
    out
}

/// An output's signed download URL, when the coordinator gave one, and
/// when it stops working.
fn download_line(out: &mut String, url: &str, expires_at_ms: i64) {
    if !url.is_empty() {
        let _ = writeln!(
            out,
            "    download (until {}) {url}",
            trainyard_core::rfc3339(expires_at_ms)
        );
    }
}

/// What `yard validate` prints: every problem, the warnings, the estimate,
/// and the verdict last.
pub fn validate_text(reply: &ValidateReply) -> String {
    let mut out = String::new();
    for problem in &reply.problems {
        let mut lines = problem.message.lines();
        let _ = writeln!(
            out,
            "problem  {}: {}",
            problem.check,
            lines.next().unwrap_or_default()
        );
        for line in lines {
            let _ = writeln!(out, "         {line}");
        }
    }
    for warning in &reply.warnings {
        let _ = writeln!(out, "warning  {warning}");
    }
    if let Some(estimate) = &reply.estimate {
        let _ = writeln!(
            out,
            "estimate {}",
            trainyard_captioner::preflight::describe(estimate)
        );
    }
    let verdict = match reply.problems.len() {
        0 if reply.ok => "ok: a job with these settings passes its checks".to_owned(),
        1 => "not ok: 1 problem".to_owned(),
        n => format!("not ok: {n} problems"),
    };
    let _ = writeln!(out, "{verdict}");
    out
}

/// The record as canonical protobuf JSON, from the contract's descriptors.
pub fn record_json(record: &JobRecord, pretty: bool) -> anyhow::Result<String> {
    proto_json("trainyard.v1.JobRecord", record, pretty)
}

/// A message of the contract (by its full `name`) as canonical protobuf JSON.
pub fn proto_json(name: &str, value: &impl Message, pretty: bool) -> anyhow::Result<String> {
    let pool = DescriptorPool::decode(trainyard_proto::v1::FILE_DESCRIPTOR_SET)?;
    let descriptor = pool
        .get_message_by_name(name)
        .ok_or_else(|| anyhow::anyhow!("the contract has no {name}"))?;
    let message = DynamicMessage::decode(descriptor, value.encode_to_vec().as_slice())?;
    Ok(if pretty {
        serde_json::to_string_pretty(&message)?
    } else {
        serde_json::to_string(&message)?
    })
}

/// Metric series as a table: one line per point, grouped by name.
pub fn metrics_table(series: &[trainyard_proto::v1::MetricSeries]) -> String {
    let width = series
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max("METRIC".len());
    let mut out = format!("{:<width$}  {:>8}  VALUE\n", "METRIC", "STEP");
    for s in series {
        for p in &s.points {
            out.push_str(&format!("{:<width$}  {:>8}  {}\n", s.name, p.step, p.value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::{Artifact, ErrorKind};

    #[test]
    fn records_read_well_and_serialise_as_proto_json() {
        let record = JobRecord {
            job_id: "j-1".into(),
            state: JobState::Failed as i32,
            error: Some(JobError {
                kind: ErrorKind::BadDataset as i32,
                message: "no usable image".into(),
                retryable: false,
                stage: Stage::Prepare as i32,
            }),
            artifacts: vec![Artifact {
                name: "lora.safetensors".into(),
                uri: "file:///s/jobs/j-1/output/lora.safetensors".into(),
                size: 2048,
                sha256: "ab".into(),
                download_url: "http://yard:50051/v1/download/t.m".into(),
                download_url_expires_at_ms: 1_796_617_210_824,
            }],
            ..Default::default()
        };
        let text = record_text(&record);
        assert!(
            text.contains(
                "download (until 2026-12-07T04:20:10.824Z) http://yard:50051/v1/download/t.m"
            ),
            "{text}"
        );
        assert!(text.contains("state    FAILED"));
        assert!(text.contains("prepare failed (bad_dataset): no usable image"));
        assert!(text.contains("lora.safetensors"));
        let json: serde_json::Value =
            serde_json::from_str(&record_json(&record, false).unwrap()).unwrap();
        assert_eq!(json["jobId"], "j-1");
        assert_eq!(json["state"], "JOB_STATE_FAILED");
        assert_eq!(json["artifacts"][0]["size"], "2048");
    }

    #[test]
    fn a_held_job_says_what_it_waits_for() {
        let hold = "waiting for a task slot (train in pool flux): the tenant has 2 tasks there";
        let mut record = JobRecord {
            job_id: "j-1".into(),
            state: JobState::Training as i32,
            quota_hold: hold.into(),
            ..Default::default()
        };
        assert!(record_text(&record).contains(&format!("held     {hold}")));
        assert!(list_line(&record, 0).contains("held"));
        record.state = JobState::Cancelled as i32;
        assert!(!record_text(&record).contains("held"));
    }

    #[test]
    fn a_job_in_review_says_how_to_review_it() {
        let record = JobRecord {
            job_id: "j-1".into(),
            state: JobState::AwaitingReview as i32,
            stage: Stage::Prepare as i32,
            attempt: 1,
            captions_version: 2,
            ..Default::default()
        };
        let text = record_text(&record);
        assert!(text.contains("AWAITING_REVIEW"), "{text}");
        assert!(
            text.contains("yard captions j-1, then yard approve j-1"),
            "{text}"
        );
        assert!(text.contains("captions v2"), "{text}");
        assert!(list_line(&record, 0).contains("review"));
    }

    #[test]
    fn validate_replies_read_well() {
        use trainyard_proto::v1::{Problem, StepEstimate};
        let reply = ValidateReply {
            ok: false,
            problems: vec![
                Problem {
                    check: "dataset.resolution".into(),
                    message: "1 image is smaller than training.resolution 128".into(),
                },
                Problem {
                    check: "base_model".into(),
                    message: "file:///m.safetensors does not exist in the artifact store".into(),
                },
            ],
            warnings: vec!["1 file was left out of the dataset: notes.md".into()],
            estimate: Some(StepEstimate {
                images: 12,
                repeats: 10,
                batch_size: 1,
                steps_per_epoch: 120,
                epochs: 200.0 / 120.0,
                total_steps: 200,
                unit: "images".into(),
            }),
        };
        assert_eq!(
            validate_text(&reply),
            "problem  dataset.resolution: 1 image is smaller than training.resolution 128\n\
             problem  base_model: file:///m.safetensors does not exist in the artifact store\n\
             warning  1 file was left out of the dataset: notes.md\n\
             estimate 12 images × 10 repeats ÷ batch 1 = 120 steps per epoch; 200 steps ≈ 1.7 epochs\n\
             not ok: 2 problems\n"
        );
    }
}
