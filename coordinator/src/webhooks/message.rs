//! What a webhook says: which messages a state event of a job calls for
//! (`job.state`, `job.completed`, by the spec's `events` filter), their
//! ids (stable per job, type and state) and JSON bodies, made from the job
//! record alone ([`held_state`] decides how far an event is believed).

use trainyard_core::config::error_kind_name;
use trainyard_proto::v1::{JobRecord, JobState};

/// `events` value: the final state (SUCCEEDED, FAILED, CANCELLED).
pub const COMPLETED: &str = "completed";
/// `events` value: every state change.
pub const STATE: &str = "state";
/// Every `events` value a spec may name.
pub const EVENTS: [&str; 2] = [COMPLETED, STATE];

/// When (Unix ms) the job record says the job reached `claimed` (0 for a
/// final record that kept no time), or `None`
/// when the record never held that state: the final states only when the
/// record is in it, the earlier ones also once passed (the states run in
/// one order, and the record keeps when each stage began). A state event
/// is believed only this far.
pub fn held_state(record: &JobRecord, claimed: JobState) -> Option<i64> {
    let times = record.times.unwrap_or_default();
    let current = record.state();
    let reached = |at: i64| (at > 0).then_some(at);
    match claimed {
        JobState::Unspecified => None,
        _ if claimed.is_final() => (current == claimed)
            .then(|| reached(times.finished_at_ms).unwrap_or(record.updated_at_ms)),
        JobState::Queued => reached(times.queued_at_ms).or(reached(record.created_at_ms)),
        JobState::Preparing => reached(times.preparing_at_ms),
        JobState::AwaitingReview => reached(times.awaiting_review_at_ms),
        JobState::Training => reached(times.training_at_ms),
        JobState::Delivering => reached(times.delivering_at_ms),
        _ => None,
    }
}

/// A state's name in webhook bodies: `succeeded`, `training`, ….
pub fn state_name(state: JobState) -> String {
    state
        .as_str_name()
        .trim_start_matches("JOB_STATE_")
        .to_ascii_lowercase()
}

/// One webhook message: its type (`job.completed` or `job.state`), id and
/// body.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub kind: &'static str,
    pub id: String,
    pub body: Vec<u8>,
}

/// The webhook messages a state event of `record` calls for, given the
/// spec's `events` filter (empty = `completed`).
pub fn messages_for(record: &JobRecord, state: JobState, at_ms: i64) -> Vec<Outgoing> {
    let Some(hook) = record.spec.as_ref().and_then(|s| s.webhook.as_ref()) else {
        return Vec::new();
    };
    let wants = |name: &str| {
        hook.events.iter().any(|e| e == name) || (name == COMPLETED && hook.events.is_empty())
    };
    let mut out = Vec::new();
    if wants(STATE) {
        out.push(("job.state", STATE));
    }
    if wants(COMPLETED) && state.is_final() {
        out.push(("job.completed", COMPLETED));
    }
    out.into_iter()
        .map(|(kind, event)| Outgoing {
            kind,
            id: format!("{}.{event}.{}", record.job_id, state_name(state)),
            body: body(record, kind, state, at_ms),
        })
        .collect()
}

/// An output's `download_url` and `download_url_expires_at` (RFC 3339),
/// when it has one.
fn with_download_url(shown: &mut serde_json::Value, url: &str, expires_at_ms: i64) {
    if !url.is_empty() {
        shown["download_url"] = url.into();
        shown["download_url_expires_at"] = trainyard_core::rfc3339(expires_at_ms).into();
    }
}

/// The JSON body: ids, name, labels, state, error or outputs (with their
/// download URLs). Never the spec itself, so never a secret.
fn body(record: &JobRecord, kind: &str, state: JobState, at_ms: i64) -> Vec<u8> {
    let spec = record.spec.clone().unwrap_or_default().redacted();
    let mut data = serde_json::json!({
        "job_id": record.job_id,
        "tenant": record.tenant,
        "name": spec.name,
        "labels": spec.labels,
        "state": state_name(state),
    });
    if state == JobState::Failed
        && let Some(error) = &record.error
    {
        data["error"] = serde_json::json!({
            "kind": error_kind_name(error.kind()),
            "message": error.message,
            "stage": error.stage().name(),
        });
    }
    if state == JobState::AwaitingReview {
        data["captions_version"] = record.captions_version.into();
    }
    if state == JobState::Cancelled && !record.cancel_reason.is_empty() {
        data["cancel_reason"] = record.cancel_reason.clone().into();
    }
    if state == JobState::Succeeded {
        data["artifacts"] = record
            .artifacts
            .iter()
            .map(|a| {
                let mut shown = serde_json::json!({"name": a.name, "uri": a.uri, "size": a.size, "sha256": a.sha256});
                with_download_url(&mut shown, &a.download_url, a.download_url_expires_at_ms);
                shown
            })
            .collect();
        data["delivered"] = record
            .delivered
            .iter()
            .map(|d| {
                let mut shown = serde_json::json!({"destination": d.destination, "uri": d.uri, "size": d.size, "sha256": d.sha256});
                with_download_url(&mut shown, &d.download_url, d.download_url_expires_at_ms);
                shown
            })
            .collect();
    }
    serde_json::to_vec(&serde_json::json!({
        "type": kind,
        "timestamp": trainyard_core::rfc3339(at_ms),
        "data": data,
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::{Artifact, JobError, JobSpec, Secrets, Webhook};

    #[test]
    fn only_states_the_record_held_are_believed() {
        use trainyard_proto::v1::StageTimes;
        let mut rec = record(&[STATE], JobState::Training);
        rec.created_at_ms = 10;
        rec.updated_at_ms = 35;
        rec.times = Some(StageTimes {
            queued_at_ms: 10,
            preparing_at_ms: 20,
            training_at_ms: 30,
            ..Default::default()
        });
        for (claimed, held) in [
            (JobState::Queued, Some(10)),
            (JobState::Preparing, Some(20)),
            (JobState::Training, Some(30)),
            (JobState::AwaitingReview, None),
            (JobState::Delivering, None),
            (JobState::Succeeded, None),
            (JobState::Failed, None),
            (JobState::Cancelled, None),
            (JobState::Unspecified, None),
        ] {
            assert_eq!(held_state(&rec, claimed), held, "{claimed:?}");
        }
        // A job that waited for caption review, now or before it trained.
        rec.times.as_mut().unwrap().awaiting_review_at_ms = 25;
        assert_eq!(held_state(&rec, JobState::AwaitingReview), Some(25));
        rec.state = JobState::Failed as i32;
        rec.times.as_mut().unwrap().finished_at_ms = 40;
        assert_eq!(held_state(&rec, JobState::Failed), Some(40));
        assert_eq!(held_state(&rec, JobState::Succeeded), None);
        assert_eq!(held_state(&rec, JobState::Delivering), None);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        use trainyard_core::rfc3339;
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_614_265_330_123), "2021-02-25T15:02:10.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    fn record(events: &[&str], state: JobState) -> JobRecord {
        JobRecord {
            job_id: "job1".into(),
            tenant: "acme".into(),
            state: state as i32,
            spec: Some(JobSpec {
                name: "portrait".into(),
                secrets: Some(Secrets {
                    hf_token: "hf_verysecret".into(),
                    ..Default::default()
                }),
                webhook: Some(Webhook {
                    url: "https://hooks.example/x?token=t".into(),
                    events: events.iter().map(|e| e.to_string()).collect(),
                }),
                ..Default::default()
            }),
            artifacts: vec![Artifact {
                name: "lora.safetensors".into(),
                uri: "s3://b/jobs/job1/lora.safetensors".into(),
                size: 42,
                sha256: "ab".repeat(32),
                ..Default::default()
            }],
            error: Some(JobError {
                message: "dataset has no images".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_filter_picks_the_messages() {
        let completed = record(&[], JobState::Training);
        assert!(messages_for(&completed, JobState::Training, 0).is_empty());
        let done = messages_for(&completed, JobState::Succeeded, 0);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].kind, "job.completed");
        assert_eq!(done[0].id, "job1.completed.succeeded");

        let both = record(&[STATE, COMPLETED], JobState::Failed);
        let kinds: Vec<_> = messages_for(&both, JobState::Failed, 0)
            .into_iter()
            .map(|m| m.kind)
            .collect();
        assert_eq!(kinds, ["job.state", "job.completed"]);
        assert_eq!(
            messages_for(&both, JobState::Preparing, 0)[0].id,
            "job1.state.preparing"
        );
        let mut none = record(&[], JobState::Succeeded);
        none.spec.as_mut().unwrap().webhook = None;
        assert!(messages_for(&none, JobState::Succeeded, 0).is_empty());
    }

    #[test]
    fn bodies_carry_outputs_or_errors_and_no_secret() {
        let rec = record(&[], JobState::Succeeded);
        let body = &messages_for(&rec, JobState::Succeeded, 1_000)[0].body;
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(!text.contains("hf_verysecret"), "{text}");
        assert!(!text.contains("token=t"), "{text}");
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["type"], "job.completed");
        assert_eq!(json["data"]["state"], "succeeded");
        assert_eq!(json["data"]["artifacts"][0]["size"], 42);
        assert!(json["data"].get("error").is_none());

        let body = &messages_for(&rec, JobState::Failed, 1_000)[0].body;
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["data"]["error"]["message"], "dataset has no images");
        assert!(json["data"].get("artifacts").is_none());
    }
}
