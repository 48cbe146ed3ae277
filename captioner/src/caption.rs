//! Captioning: the backend trait, the template backend, and the policy
//! that decides each image's final caption.
//!
//! Backends differ wildly (a string template, an OpenAI-compatible vision
//! endpoint, an external command), so the trait is one async call per image
//! and everything shared — keeping sidecars, the concurrency limit, bounded
//! per-image retries of retryable errors, the trigger word — lives here,
//! outside the backends.
//!
//! Trigger-word rule ([`apply_trigger`]): with a non-empty trigger word, a
//! caption containing `[trigger]` has it replaced (ai-toolkit style); a
//! caption already starting with the trigger word is kept; anything else
//! gets `"{trigger}, "` in front. The one exception is a backend that places
//! the trigger word itself ([`CaptionBackend::inserts_trigger`], e.g. a
//! template `"a photo of {trigger}"`): its output only gets `[trigger]`
//! replaced, so it does not become `"tyzx, a photo of tyzx"`.

pub mod cache;
pub mod chain;
pub mod command;
mod frames;
pub mod gemini;
pub mod http;
pub mod openai;
pub mod prompts;
pub mod select;
pub mod tidy;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use tracing::Instrument;

use crate::manifest::CaptionSource;

/// What a dataset file is, for the backends that treat them apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Media {
    #[default]
    Image,
    /// A clip (`.mp4`, `.webm`, `.mov`, or a `.gif` taken as video), as
    /// `ffprobe` described it.
    Video(VideoInfo),
}

/// A clip's stream facts, from `ffprobe`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VideoInfo {
    pub duration_ms: u64,
    /// Frames per second × 1000 (rounded), e.g. 16_000 or 29_970.
    pub fps_milli: u32,
    /// Frames in the clip (counted or duration × rate).
    pub frames: u64,
    /// The video stream's codec name, e.g. `h264`, `vp9`.
    pub codec: String,
}

impl From<&VideoInfo> for crate::manifest::VideoFacts {
    fn from(info: &VideoInfo) -> Self {
        Self {
            duration_ms: info.duration_ms,
            fps_milli: info.fps_milli,
            frames: info.frames,
            codec: info.codec.clone(),
        }
    }
}

/// One image or clip to caption, as written in the prepared folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image file in the prepared folder (backends read it from here).
    pub path: PathBuf,
    /// File name in the prepared folder, e.g. `cat_2.png`.
    pub file_name: String,
    /// File name without extension, e.g. `cat_2`.
    pub stem: String,
    /// Name in the user's input, relative to the dataset root, e.g.
    /// `sub/cat.png` (before any renaming for uniqueness).
    pub source_name: String,
    /// 1-based position in the prepared dataset (sorted by file name).
    pub index: usize,
    pub width: u32,
    pub height: u32,
    /// The job's trigger word, possibly empty.
    pub trigger_word: String,
    /// An image, or a clip with its stream facts.
    pub media: Media,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CaptionError {
    /// The backend cannot be reached or is overloaded (connect error, 5xx,
    /// 429, process failed to start).
    #[error("caption backend unavailable: {message}")]
    Unavailable {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("caption backend timed out")]
    Timeout,
    /// The backend refused this image (4xx, content policy).
    #[error("caption backend rejected the image: {message}")]
    Rejected { message: String },
    /// The backend answered with something that is not a caption.
    #[error("caption backend returned an unusable answer: {message}")]
    InvalidOutput { message: String },
}

impl CaptionError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CaptionError::Unavailable { .. } | CaptionError::Timeout
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CaptionError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A captioning backend.
#[async_trait]
pub trait CaptionBackend: Send + Sync {
    /// Short stable name recorded in the manifest, e.g. `"template"`.
    fn name(&self) -> &str;

    /// True when the backend's captions already place the trigger word
    /// where it belongs, so it must not be prepended again.
    fn inserts_trigger(&self) -> bool {
        false
    }

    /// True when captioning costs nothing but local CPU (no service, model
    /// or money), so `Validate` may run it to show the real captions.
    fn is_local(&self) -> bool {
        false
    }

    /// Files this backend captions at once, when it decides (a job's
    /// `caption.concurrency` under the fleet's cap); `None`: the caller's.
    fn concurrency(&self) -> Option<usize> {
        None
    }

    async fn caption(&self, image: &ImageInfo) -> Result<String, CaptionError>;

    /// The caption of `image` and who wrote it, with the policy's retries
    /// of retryable errors. Backends made of others (the cache, a
    /// fallback: [`chain::Chain`]) override it.
    async fn caption_sourced(
        &self,
        image: &ImageInfo,
        policy: &CaptionPolicy,
    ) -> Result<Captioned, CaptionError> {
        let text = caption_with_retries(self, image, policy).await?;
        Ok(Captioned {
            text,
            source: self.name().to_owned(),
            places_trigger: self.inserts_trigger(),
        })
    }
}

/// A caption and the backend that wrote it (as the manifest records it,
/// e.g. `openai:<model>`, `cache:openai:<model>`, `template`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captioned {
    pub text: String,
    pub source: String,
    /// The text already places the trigger word ([`CaptionBackend::inserts_trigger`]).
    pub places_trigger: bool,
}

/// Captions from a template with `{trigger}`, `{stem}` (the user's file
/// stem, before any uniqueness suffix, with `_` and `-` as spaces) and
/// `{index}` (1-based). Unknown `{…}` stay as is.
#[derive(Debug, Clone)]
pub struct TemplateCaptioner {
    template: String,
}

impl TemplateCaptioner {
    pub const DEFAULT_TEMPLATE: &'static str = "a photo of {trigger}";

    pub fn new(template: impl Into<String>) -> Self {
        Self {
            template: template.into(),
        }
    }

    /// Expands the template in one pass, so text inserted for one
    /// placeholder is never expanded again.
    pub fn render(&self, image: &ImageInfo) -> String {
        let mut out = String::with_capacity(self.template.len() + 32);
        let mut rest = self.template.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open..];
            let (value, used) = if after.starts_with("{trigger}") {
                (image.trigger_word.clone(), "{trigger}".len())
            } else if after.starts_with("{stem}") {
                (stem_words(source_stem(image)), "{stem}".len())
            } else if after.starts_with("{index}") {
                (image.index.to_string(), "{index}".len())
            } else {
                ("{".to_owned(), 1)
            };
            out.push_str(&value);
            rest = &after[used..];
        }
        out.push_str(rest);
        normalize_caption(&out)
    }
}

impl Default for TemplateCaptioner {
    fn default() -> Self {
        Self::new(Self::DEFAULT_TEMPLATE)
    }
}

#[async_trait]
impl CaptionBackend for TemplateCaptioner {
    fn name(&self) -> &str {
        "template"
    }

    fn inserts_trigger(&self) -> bool {
        self.template.contains("{trigger}")
    }

    fn is_local(&self) -> bool {
        true
    }

    async fn caption(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        Ok(self.render(image))
    }
}

fn source_stem(image: &ImageInfo) -> &str {
    let name = image.source_name.rsplit('/').next().unwrap_or_default();
    match name.rfind('.') {
        Some(dot) if dot > 0 => &name[..dot],
        _ if name.is_empty() => &image.stem,
        _ => name,
    }
}

fn stem_words(stem: &str) -> String {
    stem.replace(['_', '-'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line: every whitespace run (newlines included) becomes one space,
/// and the ends are trimmed.
pub fn normalize_caption(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Puts the trigger word in front (see the module docs). An empty trigger
/// word leaves the caption unchanged.
pub fn apply_trigger(caption: &str, trigger: &str) -> String {
    let trigger = trigger.trim();
    if trigger.is_empty() {
        return caption.to_owned();
    }
    if caption.contains("[trigger]") {
        return caption.replace("[trigger]", trigger);
    }
    if starts_with_word(caption, trigger) {
        return caption.to_owned();
    }
    if caption.is_empty() {
        return trigger.to_owned();
    }
    format!("{trigger}, {caption}")
}

/// `caption` starts with `word` followed by the end or a non-alphanumeric
/// character (so `tyzx,` and `tyzx style` match, `tyzxy` does not).
fn starts_with_word(caption: &str, word: &str) -> bool {
    caption
        .strip_prefix(word)
        .is_some_and(|rest| rest.chars().next().is_none_or(|c| !c.is_alphanumeric()))
}

/// How final captions are decided.
#[derive(Debug, Clone)]
pub struct CaptionPolicy {
    pub trigger_word: String,
    /// Caption every image with the backend, ignoring sidecar `.txt` files.
    pub overwrite_sidecar: bool,
    /// Backend calls in flight at once (at least 1).
    pub concurrency: usize,
    /// Tries per image for retryable errors (at least 1).
    pub max_attempts: u32,
    /// First wait between tries, doubled each time, unless the backend
    /// gives a `retry_after`. Capped at one minute.
    pub retry_delay: Duration,
}

impl Default for CaptionPolicy {
    fn default() -> Self {
        Self {
            trigger_word: String::new(),
            overwrite_sidecar: false,
            concurrency: 4,
            max_attempts: 3,
            retry_delay: Duration::from_secs(1),
        }
    }
}

/// An image plus the sidecar caption found for it (already normalised).
#[derive(Debug, Clone)]
pub struct CaptionJob {
    pub image: ImageInfo,
    pub sidecar: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalCaption {
    pub text: String,
    pub source: CaptionSource,
}

/// An image whose caption could not be made, even after its retries
/// (the prepare stage reports it as `PrepareError::Caption`).
#[derive(Debug)]
pub struct CaptionFailed {
    pub file: String,
    pub error: CaptionError,
}

/// Decides the final caption of every job, in order. Backend calls run at
/// most `policy.concurrency` at a time; the first image that still fails
/// after its retries fails the whole batch (with the file named).
pub async fn caption_all(
    jobs: &[CaptionJob],
    backend: &dyn CaptionBackend,
    policy: &CaptionPolicy,
) -> Result<Vec<FinalCaption>, CaptionFailed> {
    let concurrency = backend.concurrency().unwrap_or(policy.concurrency).max(1);
    let span = tracing::info_span!(
        "prepare.caption",
        trainyard.caption.backend = backend.name(),
        trainyard.images = jobs.len(),
        trainyard.outcome = tracing::field::Empty,
    );
    // One `caption.call` span per image, children of `prepare.caption`.
    // Indices, not `&CaptionJob` items: a closure over borrowed items makes
    // the future fail `Send` (rust-lang/rust#102211), and the stage spawns it.
    let parent = span.clone();
    let results: Result<Vec<(usize, FinalCaption)>, CaptionFailed> =
        futures::stream::iter(0..jobs.len())
            .map(|i| {
                let call = tracing::info_span!(
                    parent: &parent,
                    "caption.call",
                    trainyard.caption.backend = backend.name(),
                    trainyard.image.index = jobs[i].image.index,
                    trainyard.image.file = %jobs[i].image.file_name,
                    trainyard.caption.source = tracing::field::Empty,
                    trainyard.attempts = tracing::field::Empty,
                    trainyard.outcome = tracing::field::Empty,
                );
                async move {
                    let caption = final_caption(&jobs[i], backend, policy).await;
                    let span = tracing::Span::current();
                    match &caption {
                        Ok(c) => {
                            span.record("trainyard.outcome", "ok");
                            span.record("trainyard.caption.source", c.source.kind());
                        }
                        Err(_) => {
                            span.record("trainyard.outcome", "error");
                            span.record("trainyard.caption.source", "backend");
                        }
                    }
                    Ok::<_, CaptionFailed>((i, caption?))
                }
                .instrument(call)
            })
            .buffer_unordered(concurrency)
            .try_collect()
            .instrument(span.clone())
            .await;
    span.record(
        "trainyard.outcome",
        if results.is_ok() { "ok" } else { "error" },
    );
    let mut results = results?;
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, c)| c).collect())
}

async fn final_caption(
    job: &CaptionJob,
    backend: &dyn CaptionBackend,
    policy: &CaptionPolicy,
) -> Result<FinalCaption, CaptionFailed> {
    let trigger = &policy.trigger_word;
    if let Some(sidecar) = job.sidecar.as_deref().filter(|_| !policy.overwrite_sidecar) {
        return Ok(FinalCaption {
            text: apply_trigger(sidecar, trigger),
            source: CaptionSource::Sidecar,
        });
    }
    let captioned = backend
        .caption_sourced(&job.image, policy)
        .await
        .map_err(|error| CaptionFailed {
            file: job.image.file_name.clone(),
            error,
        })?;
    let raw = normalize_caption(&captioned.text);
    let text = if captioned.places_trigger && !trigger.trim().is_empty() {
        raw.replace("[trigger]", trigger.trim())
    } else {
        apply_trigger(&raw, trigger)
    };
    Ok(FinalCaption {
        text,
        source: CaptionSource::Backend(captioned.source),
    })
}

/// Calls `backend` for `image`, again on a retryable error up to
/// `policy.max_attempts` tries, waiting the server's `Retry-After` or the
/// doubling `retry_delay` (at most a minute) in between.
pub(crate) async fn caption_with_retries<B: CaptionBackend + ?Sized>(
    backend: &B,
    image: &ImageInfo,
    policy: &CaptionPolicy,
) -> Result<String, CaptionError> {
    const MAX_DELAY: Duration = Duration::from_secs(60);
    let attempts = policy.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        tracing::Span::current().record("trainyard.attempts", attempt);
        match backend.caption(image).await {
            Ok(caption) => return Ok(caption),
            Err(err) if err.is_retryable() && attempt < attempts => {
                let backoff = policy
                    .retry_delay
                    .saturating_mul(1 << (attempt - 1).min(16));
                let delay = err.retry_after().unwrap_or(backoff).min(MAX_DELAY);
                tracing::warn!(
                    backend = backend.name(),
                    file = %image.file_name,
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    error = %err,
                    "caption attempt failed, retrying"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(stem: &str, index: usize) -> ImageInfo {
        ImageInfo {
            path: PathBuf::from(format!("{stem}.png")),
            file_name: format!("{stem}.png"),
            stem: stem.to_owned(),
            source_name: format!("sub/{stem}.png"),
            index,
            width: 64,
            height: 64,
            trigger_word: "tyzx".to_owned(),
            media: Media::Image,
        }
    }

    #[test]
    fn template_expands_placeholders_once() {
        let t = TemplateCaptioner::new("{trigger} #{index}: {stem} {unknown} {");
        assert_eq!(
            t.render(&info("red_car-{trigger}", 3)),
            "tyzx #3: red car {trigger} {unknown} {"
        );
    }

    #[test]
    fn trigger_rules() {
        assert_eq!(
            apply_trigger("a [trigger] on grass", "tyzx"),
            "a tyzx on grass"
        );
        assert_eq!(apply_trigger("tyzx, a coin", "tyzx"), "tyzx, a coin");
        assert_eq!(apply_trigger("tyzxy coin", "tyzx"), "tyzx, tyzxy coin");
        assert_eq!(apply_trigger("a coin", "tyzx"), "tyzx, a coin");
        assert_eq!(apply_trigger("", "tyzx"), "tyzx");
        assert_eq!(apply_trigger("a coin", "  "), "a coin");
    }

    #[test]
    fn captions_are_one_line() {
        assert_eq!(normalize_caption("  a\r\nred \n\n car\t "), "a red car");
    }
}
