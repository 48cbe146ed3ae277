//! Submission checks. Every problem names the field it is about, and every
//! problem of a spec is reported at once, so a client gets
//! `INVALID_ARGUMENT: training.steps: must be at least 1; pool: …` and not a
//! failed job an hour later. Valid specs are normalised: unset optional
//! values get their documented defaults, and the stored spec is explicit.

mod caption;
mod store;
mod webhook;

pub use caption::CaptionRules;
pub use store::check_store_refs;
pub use webhook::SubmitRules;

use trainyard_backends::BACKENDS;
use trainyard_core::destination::{DestinationError, Destinations, hf};
use trainyard_models::ModelSource;
use trainyard_proto::TenantId;
use trainyard_proto::v1::{
    ErrorKind, JobSpec, RetryPolicy, Stage, TrainingSettings, dataset_source::Source,
};

/// The base model a backend uses when the spec names none.
pub fn default_model(backend: &str) -> Option<&'static str> {
    (backend == "reference").then_some("reference-denoiser-v1")
}

/// The longest `timeout_secs` a job may ask for (30 days).
pub const MAX_TIMEOUT_SECS: u64 = 30 * 24 * 3600;
/// The longest `ttl_secs` a job may ask for (365 days).
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// A field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    /// The field's path in the spec, e.g. `training.extras.optimizer`.
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Every problem of a spec, in field order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Invalid(pub Vec<FieldError>);

fn is_http(url: &str) -> bool {
    url.starts_with("https://") || url.starts_with("http://")
}

fn is_store_uri(uri: &str) -> bool {
    uri.starts_with("file:///") || uri.starts_with("s3://") || uri.starts_with('/')
}

/// A destination: a store URI, or a GCS or Azure bucket.
fn is_bucket_destination(uri: &str) -> bool {
    ["gs://", "az://", "azure://"]
        .iter()
        .any(|scheme| uri.starts_with(scheme))
}

/// Collects problems; checks go on after one fails, so a client sees every
/// problem of its spec at once.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: &str, problem: impl Into<String>) {
        self.0.push(FieldError::new(field, problem));
    }

    fn check(&mut self, ok: bool, field: &str, problem: &str) {
        if !ok {
            self.add(field, problem);
        }
    }
}

/// Checks a spec and fills defaults; every problem found is returned.
pub fn normalise(mut spec: JobSpec) -> Result<JobSpec, Invalid> {
    let mut p = Problems::default();
    p.check(
        spec.name.len() <= 200,
        "name",
        "is longer than 200 characters",
    );
    p.check(
        spec.labels.len() <= 64,
        "labels",
        "holds more than 64 labels",
    );
    p.check(
        spec.idempotency_key.len() <= 256,
        "idempotency_key",
        "is longer than 256 characters",
    );
    p.check(
        spec.timeout_secs <= MAX_TIMEOUT_SECS,
        "timeout_secs",
        "is longer than 30 days",
    );
    p.check(
        spec.ttl_secs <= MAX_TTL_SECS,
        "ttl_secs",
        "is longer than 365 days",
    );
    p.check(
        spec.sealed_secrets.is_none(),
        "sealed_secrets",
        "is set by the fleet, not by a client; send secrets in `secrets`",
    );
    check_dataset(&spec, &mut p);
    if let Some(training) = spec.training.as_mut() {
        normalise_training(training, &mut p);
    } else {
        p.add("training", "is required");
    }
    normalise_model(&mut spec, &mut p);
    normalise_caption(&mut spec, &mut p);
    for (i, destination) in spec.destinations.iter().enumerate() {
        p.check(
            destination.license.is_empty() || hf::valid_license(&destination.license),
            &format!("destinations[{i}].license"),
            "must be a Hub license id: lowercase letters, digits, '.', '-' and '+' (e.g. apache-2.0, other)",
        );
        if !is_store_uri(&destination.uri)
            && !is_bucket_destination(&destination.uri)
            && !hf::is_hf(&destination.uri)
        {
            p.add(
                &format!("destinations[{i}].uri"),
                format!(
                    "{} is not a file:///, s3://, gs://, az://, hf:// or absolute path",
                    trainyard_core::redact::display_url(&destination.uri)
                ),
            );
        }
    }
    if spec.pool.is_empty() {
        spec.pool = "default".into();
    }
    p.check(
        spec.pool
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "pool",
        "may hold only ascii letters, digits, '-' and '_'",
    );
    if let Some(retry) = &spec.retry {
        check_retry(retry, &mut p);
    }
    if let Some(hook) = spec.webhook.as_mut() {
        webhook::normalise(hook, &mut p);
    }
    if p.0.is_empty() {
        Ok(spec)
    } else {
        Err(Invalid(p.0))
    }
}

/// What the fleet allows `tenant`'s destinations (see
/// [`Destinations`]): a local folder inside `[uploader]
/// allowed_local_roots` once symlinks are resolved (the same answer whether
/// or not it exists), an `s3://` destination with credentials of its own
/// and outside the artifact store. The uploader checks again when it
/// writes.
pub fn check_destinations(
    rules: &Destinations,
    tenant: &TenantId,
    spec: &JobSpec,
) -> Result<(), Invalid> {
    let mut p = Problems::default();
    for (i, destination) in spec.destinations.iter().enumerate() {
        if let Err(e) = rules.check(tenant.as_str(), &destination.uri, spec.secrets.as_ref()) {
            let problem = match e {
                DestinationError::OutsideRoots { .. } => {
                    "is not inside an allowed destination root ([uploader] allowed_local_roots)"
                        .to_owned()
                }
                e => e.to_string(),
            };
            p.add(&format!("destinations[{i}].uri"), problem);
        }
    }
    if let Err((i, problem)) =
        trainyard_core::destination::chain::check_on_error(&spec.destinations)
    {
        p.add(&format!("destinations[{i}].on_error"), problem);
    }
    if p.0.is_empty() {
        Ok(())
    } else {
        Err(Invalid(p.0))
    }
}

/// A job's retry override: zero fields keep the services' defaults; the
/// rest must make sense. Attempts are capped by the services
/// (`nats.max_deliver`), so they are only bounded loosely here.
fn check_retry(retry: &RetryPolicy, p: &mut Problems) {
    for (i, stage) in retry.stages.iter().enumerate() {
        p.check(
            matches!(
                Stage::try_from(*stage),
                Ok(Stage::Prepare | Stage::Train | Stage::Deliver)
            ),
            &format!("retry.stages[{i}]"),
            "must be prepare, train or deliver",
        );
    }
    const DAY_MS: u64 = 24 * 3600 * 1000;
    p.check(
        retry.initial_delay_ms <= DAY_MS,
        "retry.initial_delay_ms",
        "must be at most a day",
    );
    p.check(
        retry.max_delay_ms <= DAY_MS,
        "retry.max_delay_ms",
        "must be at most a day",
    );
    p.check(
        retry.max_delay_ms == 0
            || retry.initial_delay_ms == 0
            || retry.max_delay_ms >= retry.initial_delay_ms,
        "retry.max_delay_ms",
        "must not be below retry.initial_delay_ms",
    );
    p.check(
        retry.multiplier == 0.0 || (retry.multiplier >= 1.0 && retry.multiplier <= 100.0),
        "retry.multiplier",
        "must be between 1 and 100 (0 keeps the default)",
    );
    p.check(
        retry.max_attempts <= 100,
        "retry.max_attempts",
        "must be at most 100",
    );
    if let Some(jitter) = retry.jitter {
        p.check(
            (0.0..1.0).contains(&jitter),
            "retry.jitter",
            "must be at least 0 and below 1",
        );
    }
    for (i, kind) in retry.non_retryable.iter().enumerate() {
        p.check(
            matches!(ErrorKind::try_from(*kind), Ok(k) if k != ErrorKind::Unspecified),
            &format!("retry.non_retryable[{i}]"),
            "is not an error kind",
        );
    }
}

fn check_dataset(spec: &JobSpec, p: &mut Problems) {
    match spec.dataset.as_ref().and_then(|d| d.source.as_ref()) {
        None => p.add(
            "dataset",
            "is empty: give a zip_url, image_urls or artifact_uri",
        ),
        Some(Source::ZipUrl(url)) => {
            p.check(is_http(url), "dataset.zip_url", "must be an http(s) URL");
        }
        Some(Source::ImageUrls(list)) => {
            if list.urls.is_empty() {
                p.add("dataset.image_urls", "is empty");
            } else if list.urls.len() > 10_000 {
                p.add("dataset.image_urls", "holds more than 10000 URLs");
            } else if !list.urls.iter().all(|u| is_http(u)) {
                p.add("dataset.image_urls", "must all be http(s) URLs");
            }
        }
        Some(Source::ArtifactUri(uri)) => p.check(
            is_store_uri(uri),
            "dataset.artifact_uri",
            "must be a file:///, s3:// or absolute path URI",
        ),
    }
}

fn normalise_training(training: &mut TrainingSettings, p: &mut Problems) {
    if training.backend.is_empty() {
        training.backend = "reference".into();
    }
    if !BACKENDS.contains(&training.backend.as_str()) {
        p.add(
            "training.backend",
            format!(
                "unknown backend {:?}; known: {}",
                training.backend,
                BACKENDS.join(", ")
            ),
        );
    }
    p.check(training.steps >= 1, "training.steps", "must be at least 1");
    p.check(
        training.steps <= 1_000_000,
        "training.steps",
        "must be at most 1000000",
    );
    p.check(training.rank >= 1, "training.rank", "must be at least 1");
    p.check(
        training.rank <= 1024,
        "training.rank",
        "must be at most 1024",
    );
    p.check(
        training.learning_rate.is_finite() && training.learning_rate > 0.0,
        "training.learning_rate",
        "must be a positive number",
    );
    if !(training.alpha.is_finite() && training.alpha >= 0.0) {
        p.add(
            "training.alpha",
            "must be a non-negative number (0 means alpha = rank)",
        );
    } else if training.alpha == 0.0 {
        training.alpha = f64::from(training.rank);
    }
    if training.resolution == 0 {
        training.resolution = if training.backend == "reference" {
            32
        } else {
            1024
        };
    }
    p.check(
        training.resolution.is_multiple_of(8) && (8..=4096).contains(&training.resolution),
        "training.resolution",
        "must be a multiple of 8 from 8 to 4096",
    );
    if training.batch_size == 0 {
        training.batch_size = 1;
    }
    p.check(
        training.batch_size <= 1024,
        "training.batch_size",
        "must be at most 1024",
    );
    if training.repeats == 0 {
        training.repeats = 1;
    }
    if training.save_every > training.steps {
        training.save_every = 0;
    }
}

/// Fills the default model, resolves the family, and runs the backend's
/// own settings checks (which need the family).
fn normalise_model(spec: &mut JobSpec, p: &mut Problems) {
    let backend = spec
        .training
        .as_ref()
        .map(|t| t.backend.clone())
        .unwrap_or_default();
    let model = spec.base_model.get_or_insert_default();
    if model.uri.is_empty() {
        match default_model(&backend) {
            Some(uri) => model.uri = uri.into(),
            None => {
                p.add("base_model.uri", format!("is required for {backend}"));
                return;
            }
        }
    }
    let source = match ModelSource::parse(&model.uri) {
        Ok(source) => source,
        Err(e) => {
            p.0.push(FieldError::new(e.field.path(), e.problem));
            return;
        }
    };
    let family = match source.family(&model.family) {
        Ok(family) => family,
        Err(e) => {
            p.0.push(FieldError::new(e.field.path(), e.problem));
            return;
        }
    };
    model.family = family.name().into();
    if let Some(training) = &spec.training
        && BACKENDS.contains(&training.backend.as_str())
    {
        for problem in trainyard_backends::check_settings(training, family) {
            p.0.push(FieldError::new(problem.field, problem.problem));
        }
    }
}

fn normalise_caption(spec: &mut JobSpec, p: &mut Problems) {
    let caption = spec.caption.get_or_insert_default();
    p.check(
        caption.trigger_word.len() <= 100 && !caption.trigger_word.contains(['\n', '\r']),
        "caption.trigger_word",
        "must be one line of at most 100 characters",
    );
    caption::normalise(spec, p);
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::{DatasetSource, TrainingSettings, Webhook};

    pub fn valid() -> JobSpec {
        JobSpec {
            dataset: Some(DatasetSource {
                source: Some(Source::ArtifactUri("file:///data/set.zip".into())),
            }),
            training: Some(TrainingSettings {
                steps: 10,
                rank: 4,
                learning_rate: 1e-3,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn field_of(spec: JobSpec) -> String {
        normalise(spec).unwrap_err().0.remove(0).field
    }

    #[test]
    fn defaults_are_filled() {
        let spec = normalise(valid()).unwrap();
        let t = spec.training.unwrap();
        assert_eq!(
            (t.backend.as_str(), t.alpha, t.resolution, t.batch_size),
            ("reference", 4.0, 32, 1)
        );
        assert_eq!(spec.base_model.unwrap().uri, "reference-denoiser-v1");
        assert_eq!(spec.pool, "default");
    }

    #[test]
    fn a_webhook_is_checked_and_its_events_filled() {
        let hook = |url: &str, events: &[&str]| {
            let mut s = valid();
            s.webhook = Some(Webhook {
                url: url.into(),
                events: events.iter().map(|e| e.to_string()).collect(),
            });
            s
        };
        let spec = normalise(hook("https://hooks.example/x?t=1", &[])).unwrap();
        assert_eq!(spec.webhook.unwrap().events, ["completed"]);
        let spec = normalise(hook("http://h.example/", &["state", "completed", "state"])).unwrap();
        assert_eq!(spec.webhook.unwrap().events, ["completed", "state"]);
        for (url, events, problem) in [
            ("ftp://h.example/x", &[][..], "http:// or https://"),
            ("not a url", &[], "not a valid url"),
            ("https://user:pw@h.example/", &[], "credentials"),
        ] {
            let err = normalise(hook(url, events)).unwrap_err();
            assert_eq!(err.0[0].field, "webhook.url", "{url}");
            assert!(err.0[0].problem.contains(problem), "{err}");
        }
        let err = normalise(hook("https://h.example/", &["done"])).unwrap_err();
        assert_eq!(err.0[0].field, "webhook.events");
        assert!(err.0[0].problem.contains("\"done\""), "{err}");
    }

    #[test]
    fn each_problem_names_its_field() {
        let mut s = valid();
        s.training.as_mut().unwrap().steps = 0;
        assert_eq!(field_of(s), "training.steps");
        let mut s = valid();
        s.training.as_mut().unwrap().rank = 0;
        assert_eq!(field_of(s), "training.rank");
        let mut s = valid();
        s.training.as_mut().unwrap().backend = "nope".into();
        assert_eq!(field_of(s), "training.backend");
        let mut s = valid();
        s.dataset = None;
        assert_eq!(field_of(s), "dataset");
        let mut s = valid();
        s.dataset = Some(DatasetSource {
            source: Some(Source::ZipUrl("ftp://x".into())),
        });
        assert_eq!(field_of(s), "dataset.zip_url");
        let mut s = valid();
        s.training.as_mut().unwrap().learning_rate = f64::NAN;
        assert_eq!(field_of(s), "training.learning_rate");
        let mut s = valid();
        s.pool = "a.b".into();
        assert_eq!(field_of(s), "pool");
        let mut s = valid();
        s.timeout_secs = MAX_TIMEOUT_SECS + 1;
        assert_eq!(field_of(s), "timeout_secs");
        let mut s = valid();
        s.ttl_secs = MAX_TTL_SECS + 1;
        assert_eq!(field_of(s), "ttl_secs");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut s = valid();
        let t = s.training.as_mut().unwrap();
        t.steps = 0;
        t.rank = 0;
        t.extras.insert(
            "fault_crash_at_stpe".into(),
            trainyard_proto::v1::ExtraValue::default(),
        );
        s.pool = "a.b".into();
        let Invalid(problems) = normalise(s).unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "training.steps",
                "training.rank",
                "training.extras.fault_crash_at_stpe",
                "pool"
            ]
        );
        assert!(
            problems[2].problem.starts_with("unknown key for reference"),
            "{}",
            problems[2]
        );
    }

    #[test]
    fn a_retry_override_is_checked() {
        let mut s = valid();
        s.retry = Some(RetryPolicy {
            stages: vec![Stage::Prepare as i32],
            initial_delay_ms: 200,
            multiplier: 2.0,
            max_delay_ms: 1_000,
            max_attempts: 3,
            jitter: Some(0.1),
            non_retryable: vec![ErrorKind::Auth as i32],
        });
        assert!(normalise(s).is_ok());
        let mut s = valid();
        s.retry = Some(RetryPolicy {
            stages: vec![Stage::Unspecified as i32],
            initial_delay_ms: 2_000,
            multiplier: 0.5,
            max_delay_ms: 1_000,
            max_attempts: 1_000,
            jitter: Some(1.0),
            non_retryable: vec![77],
        });
        let Invalid(problems) = normalise(s).unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "retry.stages[0]",
                "retry.max_delay_ms",
                "retry.multiplier",
                "retry.max_attempts",
                "retry.jitter",
                "retry.non_retryable[0]"
            ]
        );
    }

    #[test]
    fn library_problems_keep_their_field() {
        let mut s = valid();
        s.base_model = Some(trainyard_proto::v1::ModelRef {
            uri: "reference-denoiser-v1".into(),
            family: "flux".into(),
        });
        let Invalid(problems) = normalise(s).unwrap_err();
        assert_eq!(problems[0].field, "base_model.family");
        assert!(
            !problems[0]
                .to_string()
                .contains("family: base_model.family"),
            "{}",
            problems[0]
        );
        // A backend's problem keeps the exact field it is about.
        let mut s = valid();
        s.training.as_mut().unwrap().extras.insert(
            "optimiser".into(),
            trainyard_proto::v1::ExtraValue {
                kind: Some(trainyard_proto::v1::extra_value::Kind::Int(1)),
            },
        );
        let Invalid(problems) = normalise(s).unwrap_err();
        assert_eq!(problems[0].field, "training.extras.optimiser");
        assert!(
            problems[0].problem.starts_with("unknown key for reference"),
            "{}",
            problems[0]
        );
    }
}
