//! Small helpers on generated enums and messages.

use crate::v1::{JobRecord, JobSpec, JobState, Stage};

impl JobState {
    /// SUCCEEDED, FAILED and CANCELLED never change again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The stage that runs while a job is in this state.
    pub fn running_stage(self) -> Option<Stage> {
        match self {
            JobState::Preparing => Some(Stage::Prepare),
            JobState::Training => Some(Stage::Train),
            JobState::Delivering => Some(Stage::Deliver),
            _ => None,
        }
    }
}

impl Stage {
    /// The lowercase name used in subjects, consumer names and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Unspecified => "unspecified",
            Stage::Prepare => "prepare",
            Stage::Train => "train",
            Stage::Deliver => "deliver",
        }
    }

    pub fn from_name(name: &str) -> Option<Stage> {
        match name {
            "prepare" => Some(Stage::Prepare),
            "train" => Some(Stage::Train),
            "deliver" => Some(Stage::Deliver),
            _ => None,
        }
    }
}

impl JobSpec {
    /// A copy safe to show: the secrets are gone, their names kept.
    pub fn redacted(&self) -> JobSpec {
        let mut spec = self.clone();
        if let Some(secrets) = spec.secrets.as_mut() {
            if !secrets.hf_token.is_empty() {
                secrets.hf_token = "[redacted]".into();
            }
            for value in secrets.values.values_mut() {
                *value = "[redacted]".into();
            }
        }
        // Sealed, but of no use to a reader: not shown.
        spec.sealed_secrets = None;
        if let Some(hook) = spec.webhook.as_mut() {
            hook.url = crate::redact::origin_masked(&hook.url);
        }
        spec
    }
}

impl JobRecord {
    /// A copy safe to return to a client or write to a log.
    pub fn redacted(&self) -> JobRecord {
        let mut record = self.clone();
        record.spec = record.spec.as_ref().map(JobSpec::redacted);
        record
    }
}

#[cfg(test)]
mod tests {
    use crate::v1::{JobRecord, JobSpec, Secrets};

    #[test]
    fn webhook_urls_keep_only_their_host() {
        use crate::v1::Webhook;
        let spec = |url: &str| JobSpec {
            webhook: Some(Webhook {
                url: url.into(),
                events: vec![],
            }),
            ..Default::default()
        };
        let shown = |url: &str| spec(url).redacted().webhook.unwrap().url;
        assert_eq!(
            shown("https://hooks.example.com/services/T0/B0/s3cr3t"),
            "https://hooks.example.com/[redacted]"
        );
        assert_eq!(
            shown("http://10.0.0.1:8080?token=s3cr3t"),
            "http://10.0.0.1:8080/[redacted]"
        );
        assert_eq!(shown("https://h.example/"), "https://h.example/");
        assert_eq!(
            shown("https://u:p@h.example/x"),
            "https://h.example/[redacted]"
        );
    }

    #[test]
    fn redaction_removes_every_secret_value() {
        let spec = JobSpec {
            secrets: Some(Secrets {
                hf_token: "hf_abc".into(),
                values: [("AWS_SECRET_ACCESS_KEY".to_string(), "s3cr3t".to_string())].into(),
            }),
            ..Default::default()
        };
        let record = JobRecord {
            spec: Some(spec),
            ..Default::default()
        };
        let text = format!("{:?}", record.redacted());
        assert!(!text.contains("hf_abc"));
        assert!(!text.contains("s3cr3t"));
        assert!(text.contains("AWS_SECRET_ACCESS_KEY"));
    }
}
