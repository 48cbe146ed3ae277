//! Submission checks. Every problem names the field it is about, so a client
//! gets `INVALID_ARGUMENT: training.steps must be at least 1` and not a
//! failed job an hour later. Valid specs are normalised: unset optional
//! values get their documented defaults, and the stored spec is explicit.

use trainyard_backends::BACKENDS;
use trainyard_core::models::ModelSource;
use trainyard_proto::v1::{JobSpec, dataset_source::Source};

/// The base model a backend uses when the spec names none.
pub fn default_model(backend: &str) -> Option<&'static str> {
    (backend == "reference").then_some("reference-denoiser-v1")
}

fn training_ref(spec: &JobSpec) -> &trainyard_proto::v1::TrainingSettings {
    spec.training.as_ref().expect("checked above")
}

/// A field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: &'static str,
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> FieldError {
    FieldError {
        field,
        problem: problem.into(),
    }
}

fn is_http(url: &str) -> bool {
    url.starts_with("https://") || url.starts_with("http://")
}

fn is_store_uri(uri: &str) -> bool {
    uri.starts_with("file:///") || uri.starts_with("s3://") || uri.starts_with('/')
}

/// Checks a spec and fills defaults; the first problem found is returned.
pub fn normalise(mut spec: JobSpec) -> Result<JobSpec, FieldError> {
    if spec.name.len() > 200 {
        return Err(bad("name", "is longer than 200 characters"));
    }
    if spec.labels.len() > 64 {
        return Err(bad("labels", "holds more than 64 labels"));
    }
    if spec.idempotency_key.len() > 256 {
        return Err(bad("idempotency_key", "is longer than 256 characters"));
    }
    match spec.dataset.as_ref().and_then(|d| d.source.as_ref()) {
        None => {
            return Err(bad(
                "dataset",
                "is empty: give a zip_url, image_urls or artifact_uri",
            ));
        }
        Some(Source::ZipUrl(url)) if !is_http(url) => {
            return Err(bad("dataset.zip_url", "must be an http(s) URL"));
        }
        Some(Source::ImageUrls(list)) if list.urls.is_empty() => {
            return Err(bad("dataset.image_urls", "is empty"));
        }
        Some(Source::ImageUrls(list)) if list.urls.len() > 10_000 => {
            return Err(bad("dataset.image_urls", "holds more than 10000 URLs"));
        }
        Some(Source::ImageUrls(list)) if !list.urls.iter().all(|u| is_http(u)) => {
            return Err(bad("dataset.image_urls", "must all be http(s) URLs"));
        }
        Some(Source::ArtifactUri(uri)) if !is_store_uri(uri) => {
            return Err(bad(
                "dataset.artifact_uri",
                "must be a file:///, s3:// or absolute path URI",
            ));
        }
        Some(_) => {}
    }
    let training = spec
        .training
        .as_mut()
        .ok_or_else(|| bad("training", "is required"))?;
    if training.backend.is_empty() {
        training.backend = "reference".into();
    }
    if !BACKENDS.contains(&training.backend.as_str()) {
        return Err(bad(
            "training.backend",
            format!(
                "unknown backend {:?}; known: {}",
                training.backend,
                BACKENDS.join(", ")
            ),
        ));
    }
    if training.steps == 0 {
        return Err(bad("training.steps", "must be at least 1"));
    }
    if training.steps > 1_000_000 {
        return Err(bad("training.steps", "must be at most 1000000"));
    }
    if training.rank == 0 {
        return Err(bad("training.rank", "must be at least 1"));
    }
    if training.rank > 1024 {
        return Err(bad("training.rank", "must be at most 1024"));
    }
    if !(training.learning_rate.is_finite() && training.learning_rate > 0.0) {
        return Err(bad("training.learning_rate", "must be a positive number"));
    }
    if !(training.alpha.is_finite() && training.alpha >= 0.0) {
        return Err(bad(
            "training.alpha",
            "must be a non-negative number (0 means alpha = rank)",
        ));
    }
    if training.alpha == 0.0 {
        training.alpha = f64::from(training.rank);
    }
    if training.resolution == 0 {
        training.resolution = if training.backend == "reference" {
            32
        } else {
            1024
        };
    }
    if training.resolution % 8 != 0 || !(8..=4096).contains(&training.resolution) {
        return Err(bad(
            "training.resolution",
            "must be a multiple of 8 from 8 to 4096",
        ));
    }
    if training.batch_size == 0 {
        training.batch_size = 1;
    }
    if training.batch_size > 1024 {
        return Err(bad("training.batch_size", "must be at most 1024"));
    }
    if training.repeats == 0 {
        training.repeats = 1;
    }
    if training.save_every > training.steps {
        training.save_every = 0;
    }
    let backend = training.backend.clone();
    let model = spec.base_model.get_or_insert_default();
    if model.uri.is_empty() {
        model.uri = default_model(&backend)
            .ok_or_else(|| bad("base_model.uri", format!("is required for {backend}")))?
            .into();
    }
    let source = ModelSource::parse(&model.uri).map_err(|e| bad("base_model.uri", e))?;
    let family = source
        .family(&model.family)
        .map_err(|e| bad("base_model.family", e))?;
    model.family = family.name().into();
    if let Some(problem) = trainyard_backends::check_settings(training_ref(&spec), family)
        .into_iter()
        .next()
    {
        return Err(bad("training", problem));
    }
    let caption = spec.caption.get_or_insert_default();
    if caption.backend.is_empty() {
        caption.backend = "template".into();
    }
    if caption.backend != "template" {
        return Err(bad(
            "caption.backend",
            format!(
                "unknown caption backend {:?}; known: template",
                caption.backend
            ),
        ));
    }
    if caption.trigger_word.len() > 100 || caption.trigger_word.contains(['\n', '\r']) {
        return Err(bad(
            "caption.trigger_word",
            "must be one line of at most 100 characters",
        ));
    }
    for destination in &spec.destinations {
        if !is_store_uri(&destination.uri) {
            return Err(bad(
                "destinations",
                format!(
                    "{:?} is not a file:///, s3:// or absolute path",
                    destination.uri
                ),
            ));
        }
    }
    if spec.pool.is_empty() {
        spec.pool = "default".into();
    }
    if !spec
        .pool
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad(
            "pool",
            "may hold only ascii letters, digits, '-' and '_'",
        ));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::{DatasetSource, TrainingSettings};

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

    fn field_of(spec: JobSpec) -> &'static str {
        normalise(spec).unwrap_err().field
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
    }
}
