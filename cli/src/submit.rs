//! `yard submit`: turn the command line into a `JobSpec`, uploading a local
//! folder or zip through the API first, and submit it.
//!
//! Local data never travels in a job message: it is streamed to the
//! coordinator (`Upload`), which stores it in the caller's tenant's uploads
//! (`tenants/<tenant>/uploads/<id>/…`) and answers with the store URI the
//! spec carries. The client needs no store credentials and no `store.uri`.

use crate::args::SubmitArgs;
use crate::client::Client;
use anyhow::{Context, bail};
use std::collections::HashMap;
use std::path::PathBuf;
use trainyard_proto::v1::dataset_source::Source;
use trainyard_proto::v1::{
    CaptionSettings, DatasetSource, Destination, ExtraValue, ImageUrls, JobRecord, JobSpec,
    ModelRef, Secrets, SubmitRequest, TrainingSettings, Webhook, extra_value,
};

/// With `chain`, every destination but the last says `on_error = next`:
/// the first that succeeds is the delivery.
fn chained(mut destinations: Vec<Destination>, chain: bool) -> Vec<Destination> {
    let last = destinations.len().saturating_sub(1);
    if chain {
        for destination in &mut destinations[..last] {
            destination.on_error = "next".into();
        }
    }
    destinations
}

/// Where a dataset comes from, as given on the command line.
#[derive(Debug, PartialEq, Eq)]
pub enum DatasetArg {
    LocalDir(PathBuf),
    LocalZip(PathBuf),
    ZipUrl(String),
    ImageUrls(Vec<String>),
    StoreUri(String),
}

fn is_http(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://")
}

fn is_image_url(url: &str) -> bool {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .to_ascii_lowercase();
    path.rsplit_once('.').is_some_and(|(_, ext)| {
        trainyard_captioner::IMAGE_EXTENSIONS.contains(&ext)
            || trainyard_captioner::VIDEO_EXTENSIONS.contains(&ext)
    })
}

/// Classifies the positional sources of `yard submit`.
pub fn classify(sources: &[String]) -> anyhow::Result<DatasetArg> {
    let [first, rest @ ..] = sources else {
        bail!("give a dataset: a folder, a .zip, a zip URL or image URLs");
    };
    if is_http(first) {
        if rest.is_empty() && !is_image_url(first) {
            return Ok(DatasetArg::ZipUrl(first.clone()));
        }
        if let Some(bad) = sources.iter().find(|s| !is_http(s) || !is_image_url(s)) {
            bail!(
                "{bad:?} is not an image or clip URL; several sources must all be http(s) image or \
                 clip URLs ({}, {})",
                trainyard_captioner::IMAGE_EXTENSIONS.join(", "),
                trainyard_captioner::VIDEO_EXTENSIONS.join(", ")
            );
        }
        return Ok(DatasetArg::ImageUrls(sources.to_vec()));
    }
    if !rest.is_empty() {
        bail!("give one local folder or zip; several sources must all be http(s) image URLs");
    }
    if first.starts_with("file://") || first.starts_with("s3://") {
        return Ok(DatasetArg::StoreUri(first.clone()));
    }
    let path = PathBuf::from(first);
    let meta = std::fs::metadata(&path)
        .with_context(|| format!("dataset {} cannot be read", path.display()))?;
    if meta.is_dir() {
        return Ok(DatasetArg::LocalDir(path));
    }
    let is_zip = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"));
    if meta.is_file() && is_zip {
        return Ok(DatasetArg::LocalZip(path));
    }
    bail!(
        "dataset {} is neither a folder nor a .zip file",
        path.display()
    )
}

/// Uploads a local dataset through the API and returns its source; other
/// sources become their `DatasetSource` directly.
pub async fn dataset_source(arg: DatasetArg, client: &mut Client) -> anyhow::Result<DatasetSource> {
    let source = match arg {
        DatasetArg::ZipUrl(url) => Source::ZipUrl(url),
        DatasetArg::ImageUrls(urls) => Source::ImageUrls(ImageUrls { urls }),
        DatasetArg::StoreUri(uri) => Source::ArtifactUri(uri),
        DatasetArg::LocalDir(dir) => {
            Source::ArtifactUri(crate::transfer::upload_dir(client, &dir).await?)
        }
        DatasetArg::LocalZip(zip) => {
            Source::ArtifactUri(crate::transfer::upload_zip(client, &zip).await?)
        }
    };
    Ok(DatasetSource {
        source: Some(source),
    })
}

/// Removes what [`dataset_source`] uploaded for `source`; a failure is only
/// reported.
pub async fn remove_upload(source: &DatasetSource, client: &mut Client) {
    if let Some(Source::ArtifactUri(uri)) = &source.source {
        crate::transfer::remove_upload(client, uri).await;
    }
}

/// `--hf-public` and `--license` on every `hf://` destination; an error
/// when there is none for them to apply to.
fn hub_options(
    mut destinations: Vec<Destination>,
    public: bool,
    license: Option<&str>,
) -> anyhow::Result<Vec<Destination>> {
    if !public && license.is_none() {
        return Ok(destinations);
    }
    let mut hub = destinations
        .iter_mut()
        .filter(|d| trainyard_core::destination::hf::is_hf(&d.uri))
        .peekable();
    if hub.peek().is_none() {
        bail!("--hf-public and --license apply to hf:// destinations; give one with --dest");
    }
    for destination in hub {
        destination.public = public;
        destination.license = license.unwrap_or_default().to_string();
    }
    Ok(destinations)
}

/// A destination as the fleet expects it: URIs as given, local folders absolute.
fn destination(raw: &str) -> anyhow::Result<Destination> {
    let uri = if raw.contains("://") {
        raw.to_string()
    } else {
        std::path::absolute(raw)
            .with_context(|| format!("destination {raw:?}"))?
            .to_string_lossy()
            .into_owned()
    };
    Ok(Destination {
        uri,
        ..Default::default()
    })
}

/// `--extra key=value`: an integer, a number, a boolean, else text.
fn typed_extra(raw: &str) -> ExtraValue {
    let kind = if let Ok(n) = raw.parse::<i64>() {
        extra_value::Kind::Int(n)
    } else if let Ok(x) = raw.parse::<f64>() {
        extra_value::Kind::Float(x)
    } else if let Ok(b) = raw.parse::<bool>() {
        extra_value::Kind::Flag(b)
    } else {
        extra_value::Kind::Text(raw.to_string())
    };
    ExtraValue { kind: Some(kind) }
}

/// The spec of `yard submit`, without its dataset.
pub fn spec_from_args(args: &SubmitArgs) -> anyhow::Result<JobSpec> {
    Ok(JobSpec {
        name: args.name.clone().unwrap_or_default(),
        labels: args.labels.iter().cloned().collect::<HashMap<_, _>>(),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        dataset: None,
        caption: Some(CaptionSettings {
            trigger_word: args.trigger.clone().unwrap_or_default(),
            backend: args.caption_backend.clone().unwrap_or_default(),
            model: args.caption_model.clone().unwrap_or_default(),
            prompt: args.caption_prompt.clone().unwrap_or_default(),
            command: args.caption_command.clone().unwrap_or_default(),
            fallback: args.caption_fallback.clone().unwrap_or_default(),
            on_error: args.caption_on_error.clone().unwrap_or_default(),
            review: args.review,
            ..Default::default()
        }),
        base_model: args.model.clone().map(|uri| ModelRef {
            uri,
            family: args.family.clone().unwrap_or_default(),
        }),
        training: Some(TrainingSettings {
            backend: args.backend.clone(),
            steps: args.steps,
            learning_rate: args.lr,
            rank: args.rank,
            alpha: args.alpha.unwrap_or(0.0),
            resolution: args.resolution,
            batch_size: args.batch_size,
            repeats: args.repeats.unwrap_or(0),
            save_every: args.save_every,
            seed: args.seed.unwrap_or(0),
            extras: args
                .extras
                .iter()
                .map(|(k, v)| (k.clone(), typed_extra(v)))
                .collect(),
            method: args.method.clone().unwrap_or_default(),
        }),
        destinations: chained(
            hub_options(
                args.destinations
                    .iter()
                    .map(|d| destination(d))
                    .collect::<anyhow::Result<_>>()?,
                args.hf_public,
                args.license.as_deref(),
            )?,
            args.dest_chain,
        ),
        secrets: args.hf_token.clone().map(|hf_token| Secrets {
            hf_token,
            ..Default::default()
        }),
        sealed_secrets: None,
        pool: args.pool.clone().unwrap_or_default(),
        retry: None,
        timeout_secs: args.timeout_secs,
        ttl_secs: args.ttl_secs,
        webhook: args.webhook.clone().map(|url| Webhook {
            url,
            events: args.webhook_events.clone(),
        }),
    })
}

/// Submits `spec`, returning the stored record (or the first job of the
/// same idempotency key).
pub async fn submit(client: &mut Client, spec: JobSpec) -> anyhow::Result<JobRecord> {
    let response = client
        .submit(SubmitRequest { spec: Some(spec) })
        .await?
        .into_inner();
    let record = response
        .job
        .ok_or_else(|| anyhow::anyhow!("the coordinator answered without a job"))?;
    if response.duplicate {
        eprintln!("the idempotency key matched an earlier job; not submitted again");
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sources_are_classified() {
        assert_eq!(
            classify(&strings(&["https://x.test/set.zip"])).unwrap(),
            DatasetArg::ZipUrl("https://x.test/set.zip".into())
        );
        assert_eq!(
            classify(&strings(&[
                "https://x.test/a.PNG?sig=1",
                "http://x.test/b.jpg"
            ]))
            .unwrap(),
            DatasetArg::ImageUrls(strings(&[
                "https://x.test/a.PNG?sig=1",
                "http://x.test/b.jpg"
            ]))
        );
        assert!(classify(&strings(&["https://x.test/a.png", "https://x.test/b.zip"])).is_err());
        assert_eq!(
            classify(&strings(&["s3://bucket/uploads/x"])).unwrap(),
            DatasetArg::StoreUri("s3://bucket/uploads/x".into())
        );
        let dir = tempfile::tempdir().unwrap();
        let zip = dir.path().join("set.ZIP");
        std::fs::write(&zip, b"PK").unwrap();
        let txt = dir.path().join("notes.txt");
        std::fs::write(&txt, b"x").unwrap();
        let d = dir.path().to_string_lossy().into_owned();
        assert_eq!(
            classify(std::slice::from_ref(&d)).unwrap(),
            DatasetArg::LocalDir(dir.path().into())
        );
        assert_eq!(
            classify(&[zip.to_string_lossy().into_owned()]).unwrap(),
            DatasetArg::LocalZip(zip.clone())
        );
        assert!(classify(&[txt.to_string_lossy().into_owned()]).is_err());
        assert!(classify(&[format!("{d}/missing")]).is_err());
        assert!(classify(&[d.clone(), d]).is_err());
    }

    #[test]
    fn webhook_flags_make_the_spec_webhook() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["yard", "submit", "s3://b/uploads/x"];
            argv.extend_from_slice(extra);
            match crate::args::Cli::try_parse_from(argv)?.command {
                crate::args::Command::Submit(args) => Ok(spec_from_args(&args).unwrap()),
                _ => unreachable!(),
            }
        };
        assert_eq!(parse(&[]).unwrap().webhook, None);
        let spec = parse(&["--webhook", "https://h.test/x", "--webhook-event", "state"]).unwrap();
        assert_eq!(
            spec.webhook,
            Some(Webhook {
                url: "https://h.test/x".into(),
                events: strings(&["state"]),
            })
        );
        let no_url: Result<_, clap::Error> = parse(&["--webhook-event", "state"]);
        assert!(no_url.is_err());
        assert!(parse(&["--webhook", "https://h.test/x", "--webhook-event", "done"]).is_err());
    }

    #[test]
    fn caption_and_chain_flags_make_the_spec() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["yard", "submit", "s3://b/uploads/x"];
            argv.extend_from_slice(extra);
            match crate::args::Cli::try_parse_from(argv).unwrap().command {
                crate::args::Command::Submit(args) => spec_from_args(&args).unwrap(),
                _ => unreachable!(),
            }
        };
        let plain = parse(&["--dest", "hf://me/lora", "--dest", "s3://b/out"]);
        let caption = plain.caption.unwrap();
        assert_eq!((caption.backend.as_str(), caption.review), ("", false));
        assert!(plain.destinations.iter().all(|d| d.on_error.is_empty()));
        let spec = parse(&[
            "--caption-backend",
            "openai",
            "--caption-model",
            "joycaption",
            "--caption-fallback",
            "template",
            "--review",
            "--dest",
            "hf://me/lora",
            "--dest",
            "s3://b/out",
            "--dest",
            "file:///srv/out",
            "--dest-chain",
        ]);
        let caption = spec.caption.unwrap();
        assert_eq!(
            (
                caption.backend.as_str(),
                caption.model.as_str(),
                caption.fallback.as_str(),
                caption.review
            ),
            ("openai", "joycaption", "template", true)
        );
        let on_error: Vec<&str> = spec
            .destinations
            .iter()
            .map(|d| d.on_error.as_str())
            .collect();
        assert_eq!(on_error, ["next", "next", ""]);
    }

    #[test]
    fn hub_flags_make_the_hf_destinations_public_and_licensed() {
        use clap::Parser;
        let parse = |extra: &[&str]| -> Result<anyhow::Result<JobSpec>, clap::Error> {
            let mut argv = vec!["yard", "submit", "s3://b/uploads/x"];
            argv.extend_from_slice(extra);
            match crate::args::Cli::try_parse_from(argv)?.command {
                crate::args::Command::Submit(args) => Ok(spec_from_args(&args)),
                _ => unreachable!(),
            }
        };
        let options = |spec: &JobSpec| -> Vec<(bool, String)> {
            spec.destinations
                .iter()
                .map(|d| (d.public, d.license.clone()))
                .collect()
        };
        let plain = parse(&["--dest", "hf://me/lora"]).unwrap().unwrap();
        assert_eq!(options(&plain), [(false, String::new())]);
        let spec = parse(&[
            "--dest",
            "hf://me/lora@exp%2Frun-1",
            "--dest",
            "s3://b/out",
            "--dest",
            "hf://team/lora",
            "--hf-public",
            "--license",
            "openrail++",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            options(&spec),
            [
                (true, "openrail++".to_string()),
                (false, String::new()),
                (true, "openrail++".to_string()),
            ]
        );
        assert_eq!(spec.destinations[0].uri, "hf://me/lora@exp%2Frun-1");
        let licensed = parse(&["--dest", "hf://me/lora", "--license", "apache-2.0"])
            .unwrap()
            .unwrap();
        assert_eq!(options(&licensed), [(false, "apache-2.0".to_string())]);
        // Refused as the coordinator would refuse them.
        for bad in ["MIT", "mit license", "", "mit\nx: y"] {
            let error = parse(&["--dest", "hf://me/lora", "--license", bad]).unwrap_err();
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}"
            );
        }
        // Nothing for them to apply to.
        assert!(
            parse(&["--dest", "s3://b/out", "--hf-public"])
                .unwrap()
                .is_err()
        );
        assert!(parse(&["--license", "mit"]).unwrap().is_err());
    }
}
