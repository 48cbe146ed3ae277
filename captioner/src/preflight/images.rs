//! Checks of a prepared image dataset against the job: what the trainer
//! will see, read back from the prepared folder (`manifest.json` for sizes,
//! the `<stem>.txt` files for captions), so nothing the pipeline did in
//! between is assumed.

use std::path::Path;

use super::{Report, check, effective_batch, estimate, list_names};
use crate::manifest::{DatasetManifest, DropReason, MANIFEST_FILE_NAME};
use crate::prepare::PreparedDataset;
use trainyard_proto::v1::{ErrorKind, JobSpec};

/// The fewest images a backend trains on at some settings, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Minimum {
    pub images: u32,
    pub why: String,
}

/// The fewest images `backend` can train on with `repeats` and
/// `batch_size`. Every trainer needs one image; diffusion-pipe and
/// SimpleTuner also need a whole batch of samples (images × repeats) in a
/// bucket, or they drop the bucket and may be left with no data.
pub fn minimum_images(backend: &str, repeats: u32, batch_size: u32) -> Minimum {
    let repeats = repeats.max(1);
    let batch_size = batch_size.max(1);
    let fill_batch = batch_size.div_ceil(repeats);
    match backend {
        "diffusion-pipe" if fill_batch > 1 => Minimum {
            images: fill_batch,
            why: format!(
                "diffusion-pipe drops every aspect-ratio bucket with fewer images × repeats than \
                 the batch size ({batch_size}), so {fill_batch} images at {repeats} repeats are \
                 needed to fill one batch"
            ),
        },
        "simpletuner" if fill_batch > 1 => Minimum {
            images: fill_batch,
            why: format!(
                "SimpleTuner discards a bucket with fewer images × repeats than the batch size \
                 ({batch_size}) and stops with \"no images detected in dataset\", so {fill_batch} \
                 images at {repeats} repeats are needed to fill one batch"
            ),
        },
        _ => Minimum {
            images: 1,
            why: format!("{backend} needs at least one image to train on"),
        },
    }
}

/// The problem for a dataset with `found` usable images, if that is too few.
pub fn too_few_images(spec: &JobSpec, found: u32, detail: Option<&str>) -> Option<String> {
    let t = spec.training.clone().unwrap_or_default();
    let min = minimum_images(&t.backend, t.repeats, t.batch_size);
    (found < min.images).then(|| {
        let detail = detail.map(|d| format!(" ({d})")).unwrap_or_default();
        format!(
            "the dataset has {found} usable image{}{detail}; at least {} {} needed: {}",
            if found == 1 { "" } else { "s" },
            min.images,
            if min.images == 1 { "is" } else { "are" },
            min.why
        )
    })
}

/// Reads `manifest.json` from a prepared folder and checks it.
pub async fn check_dir(spec: &JobSpec, dir: &Path) -> Report {
    match DatasetManifest::read_from_file(&dir.join(MANIFEST_FILE_NAME)).await {
        Ok(manifest) => {
            check(
                spec,
                &PreparedDataset {
                    dir: dir.to_owned(),
                    manifest,
                },
            )
            .await
        }
        Err(e) => {
            let mut report = Report::default();
            report.problem(
                check::DATASET,
                ErrorKind::BadDataset,
                format!("{MANIFEST_FILE_NAME} of the prepared dataset cannot be read: {e}"),
            );
            report
        }
    }
}

/// Every check of a prepared image dataset, and the step estimate.
pub async fn check(spec: &JobSpec, dataset: &PreparedDataset) -> Report {
    let mut report = Report::default();
    let t = spec.training.clone().unwrap_or_default();
    let trigger = spec
        .caption
        .as_ref()
        .map(|c| c.trigger_word.trim().to_owned())
        .unwrap_or_default();
    let images = &dataset.manifest.images;
    let count = images.len() as u32;

    if let Some(message) = too_few_images(spec, count, None) {
        report.problem(check::IMAGES, ErrorKind::BadDataset, message);
    }

    let small: Vec<String> = images
        .iter()
        .filter(|i| i.width.min(i.height) < t.resolution)
        .map(|i| format!("{} ({}×{})", i.file, i.width, i.height))
        .collect();
    if !small.is_empty() {
        report.problem(
            check::RESOLUTION,
            ErrorKind::BadDataset,
            format!(
                "{} smaller than training.resolution {} on the short side, so the trainer \
                 would upscale {}: {}; use larger images or a lower resolution",
                are(small.len(), "image is", "images are"),
                t.resolution,
                if small.len() == 1 { "it" } else { "them" },
                list_names(&small)
            ),
        );
    }

    let files: Vec<(String, std::path::PathBuf)> = images
        .iter()
        .map(|i| (i.file.clone(), dataset.dir.join(&i.caption_file)))
        .collect();
    let Some(captions) = read_captions(files).await else {
        report.unchecked(check::CAPTIONS, "the service is stopping");
        return report;
    };
    let uncaptioned: Vec<&str> = captions
        .iter()
        .filter(|(_, c)| c.as_deref().is_none_or(|c| c.trim().is_empty()))
        .map(|(file, _)| file.as_str())
        .collect();
    if !uncaptioned.is_empty() {
        report.problem(
            check::CAPTIONS,
            ErrorKind::BadDataset,
            format!(
                "{} no caption or an empty one: {}; diffusion-pipe skips such images and other \
                 trainers learn them without a prompt; give each a <stem>.txt or a \
                 caption.template that yields text",
                are(uncaptioned.len(), "image has", "images have"),
                list_names(&uncaptioned)
            ),
        );
    }

    if !trigger.is_empty() {
        let missing: Vec<(&str, &str)> = captions
            .iter()
            .filter_map(|(file, c)| {
                let c = c.as_deref().unwrap_or_default();
                (!c.trim().is_empty() && !c.contains(&trigger)).then_some((file.as_str(), c))
            })
            .collect();
        if !missing.is_empty() {
            let named: Vec<String> = missing
                .iter()
                .map(|(file, caption)| format!("{file} ({caption:?})"))
                .collect();
            let collapsed = trigger.split_whitespace().collect::<Vec<_>>().join(" ");
            let hint = if collapsed != trigger
                && missing
                    .iter()
                    .all(|(_, caption)| caption.contains(&collapsed))
            {
                format!(
                    "; captions are one line with single spaces, so the trigger word appears \
                     as {collapsed:?}: use that as caption.trigger_word"
                )
            } else {
                String::new()
            };
            report.problem(
                check::TRIGGER_WORD,
                ErrorKind::BadDataset,
                format!(
                    "{} the trigger word {trigger:?}: {}{hint}",
                    are(missing.len(), "caption lacks", "captions lack"),
                    list_names(&named)
                ),
            );
        }
    }

    let dropped: Vec<String> = dataset
        .manifest
        .dropped
        .iter()
        .map(|d| format!("{} ({})", d.name, drop_reason(d.reason)))
        .collect();
    if !dropped.is_empty() {
        report.warnings.push(format!(
            "{} left out of the dataset: {}",
            are(dropped.len(), "file was", "files were"),
            list_names(&dropped)
        ));
    }

    if count > 0 {
        let e = estimate(count, "images", t.steps, t.repeats, effective_batch(&t));
        if e.epochs < 1.0 {
            report.warnings.push(format!(
                "training.steps {} is less than one epoch ({} steps): some images are never trained on",
                e.total_steps, e.steps_per_epoch
            ));
        }
        report.estimate = Some(e);
    }
    report
}

/// "1 image is", "3 images are".
fn are(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn drop_reason(reason: DropReason) -> &'static str {
    match reason {
        DropReason::Undecodable => "not a readable image or clip",
        DropReason::TooSmall => "too small",
        DropReason::OverLimit => "clip over the limits",
        DropReason::UnsupportedType => "not an image, clip or caption",
        DropReason::OrphanCaption => "caption without an image or clip",
        DropReason::InvalidCaption => "unreadable caption",
        DropReason::Symlink => "symbolic link",
        DropReason::SpecialFile => "not a regular file",
        DropReason::NestedTooDeep => "nested too deep",
        DropReason::BadArchive => "unreadable zip",
    }
}

/// Each image's caption file as the trainer will read it (`None` when it
/// is missing or unreadable), on the blocking pool; `None` when the runtime
/// is shutting down.
async fn read_captions(
    files: Vec<(String, std::path::PathBuf)>,
) -> Option<Vec<(String, Option<String>)>> {
    crate::error::blocking(move || {
        files
            .into_iter()
            .map(|(file, path)| (file, std::fs::read_to_string(path).ok()))
            .collect()
    })
    .await
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimums_say_why() {
        let m = minimum_images("reference", 1, 8);
        assert_eq!(m.images, 1);
        let m = minimum_images("diffusion-pipe", 2, 8);
        assert_eq!(m.images, 4);
        assert!(
            m.why.contains("drops every aspect-ratio bucket"),
            "{}",
            m.why
        );
        assert_eq!(minimum_images("diffusion-pipe", 8, 8).images, 1);
        assert_eq!(minimum_images("simpletuner", 1, 3).images, 3);
    }
}
