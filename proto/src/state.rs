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
