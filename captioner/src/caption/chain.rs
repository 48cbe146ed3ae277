//! A job's captioning as one backend: the cache, the chosen backend with
//! its retries and timeout, the answer tidied, then the fallback backend,
//! then `on_error`.
//!
//! ```text
//! for each step (backend, then fallback):
//!     template?          ─▶ its caption
//!     cache hit?         ─▶ tidy ─▶ caption   (source "cache:<backend>:<model>")
//!     call, retried on 429 (after Retry-After) / 5xx / timeout, with backoff
//!       ok and tidy ok   ─▶ cache it ─▶ caption (source "<backend>:<model>")
//!       otherwise        ─▶ next step
//! on_error = template    ─▶ the template's caption (source "template")
//! otherwise              ─▶ the last error fails the job, naming the file
//! ```
//!
//! The cache keeps the model's raw answer under the step's
//! [`CaptionRecipe`] and the file's sha256, and tidying runs after it, so
//! changing `min_chars`/`max_chars` needs no new call. A cache hit records
//! its source as `cache:<the backend that wrote it>`: the manifest says
//! both who wrote a caption and that this job did not pay for it.

use std::time::Duration;

use async_trait::async_trait;
use trainyard_proto::TenantId;

use super::cache::{CaptionCache, CaptionRecipe};
use super::tidy::Tidy;
use super::{
    CaptionBackend, CaptionError, CaptionPolicy, Captioned, ImageInfo, TemplateCaptioner,
    caption_with_retries,
};

/// A backend that costs a call: its recipe (the cache key's fields) and
/// how long one call may take.
pub struct Remote {
    pub backend: Box<dyn CaptionBackend>,
    pub recipe: CaptionRecipe,
    pub timeout: Duration,
}

pub enum Step {
    Remote(Remote),
    Template(TemplateCaptioner),
}

pub struct Chain {
    pub steps: Vec<Step>,
    /// `on_error = "template"`.
    pub on_error: Option<TemplateCaptioner>,
    pub tidy: Tidy,
    /// The cache, and whose entries to read and write.
    pub cache: Option<(CaptionCache, TenantId)>,
    /// Tries and backoff per step (`max_attempts`, `retry_delay`).
    pub retries: CaptionPolicy,
    pub concurrency: usize,
}

impl Chain {
    fn first_name(&self) -> &str {
        match self.steps.first() {
            Some(Step::Remote(remote)) => remote.backend.name(),
            _ => "template",
        }
    }

    async fn remote(
        &self,
        remote: &Remote,
        image: &ImageInfo,
        sha256: &mut Option<String>,
    ) -> Result<Captioned, CaptionError> {
        let key = match &self.cache {
            Some(_) if sha256.is_none() => match crate::manifest::sha256_file(&image.path).await {
                Ok((hash, _)) => {
                    *sha256 = Some(hash);
                    sha256.as_deref().map(|h| remote.recipe.key(h))
                }
                Err(error) => {
                    tracing::warn!(%error, file = %image.file_name, "cannot hash for the caption cache");
                    None
                }
            },
            Some(_) => sha256.as_deref().map(|h| remote.recipe.key(h)),
            None => None,
        };
        if let (Some((cache, tenant)), Some(key)) = (&self.cache, &key)
            && let Some(answer) = cache.get(tenant, key).await
            && let Ok(text) = self.tidy.apply(&answer)
        {
            return Ok(Captioned {
                text,
                source: format!("cache:{}", remote.backend.name()),
                places_trigger: false,
            });
        }
        let timed = Timed(remote);
        let answer = caption_with_retries(&timed, image, &self.retries).await?;
        let text = self.tidy.apply(&answer)?;
        if let (Some((cache, tenant)), Some(key)) = (&self.cache, &key) {
            cache.put(tenant, key, &answer).await;
        }
        Ok(Captioned {
            text,
            source: remote.backend.name().to_owned(),
            places_trigger: false,
        })
    }
}

fn template(t: &TemplateCaptioner, image: &ImageInfo) -> Captioned {
    Captioned {
        text: t.render(image),
        source: "template".into(),
        places_trigger: t.inserts_trigger(),
    }
}

#[async_trait]
impl CaptionBackend for Chain {
    fn name(&self) -> &str {
        self.first_name()
    }

    fn is_local(&self) -> bool {
        self.steps.iter().all(|s| matches!(s, Step::Template(_)))
    }

    fn concurrency(&self) -> Option<usize> {
        Some(self.concurrency.max(1))
    }

    async fn caption(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        self.caption_sourced(image, &self.retries)
            .await
            .map(|c| c.text)
    }

    async fn caption_sourced(
        &self,
        image: &ImageInfo,
        _policy: &CaptionPolicy,
    ) -> Result<Captioned, CaptionError> {
        let mut sha256 = None;
        let mut last = None;
        for step in &self.steps {
            match step {
                Step::Template(t) => return Ok(template(t, image)),
                Step::Remote(remote) => match self.remote(remote, image, &mut sha256).await {
                    Ok(captioned) => return Ok(captioned),
                    Err(error) => {
                        tracing::warn!(
                            backend = remote.backend.name(),
                            file = %image.file_name,
                            %error,
                            "caption backend failed for a file"
                        );
                        last = Some(error);
                    }
                },
            }
        }
        if let Some(t) = &self.on_error {
            return Ok(template(t, image));
        }
        Err(last.unwrap_or(CaptionError::InvalidOutput {
            message: "no caption backend configured".into(),
        }))
    }
}

/// A remote backend whose every call is held to its timeout (the call's
/// future is dropped at the deadline: a request is abandoned, a caption
/// program's process group killed).
struct Timed<'a>(&'a Remote);

#[async_trait]
impl CaptionBackend for Timed<'_> {
    fn name(&self) -> &str {
        self.0.backend.name()
    }

    async fn caption(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        tokio::time::timeout(self.0.timeout, self.0.backend.caption(image))
            .await
            .map_err(|_| CaptionError::Timeout)?
    }
}
