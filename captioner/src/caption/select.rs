//! A job's caption backend, from its `caption` settings and the fleet's
//! `[captioner.caption]` section: which backend, which server and model,
//! which key, and the shared policy around them ([`Chain`]).
//!
//! Keys: a job's own secret (`caption.api_key_secret`, else
//! `openai_api_key` / `gemini_api_key` in `secrets.values`) goes to the
//! backend's server, whichever it is. The fleet's key file goes only to
//! the fleet's own server: a job that names its own `caption.endpoint`
//! never gets it, and that endpoint is reached through the address guard.
//! The job's `model` and `endpoint` apply to the backend they name; a
//! fallback of another kind uses the fleet's defaults for it, with the
//! job's prompts and parameters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use trainyard_core::config::{CAPTION_BACKENDS, CaptionConfig};
use trainyard_core::runtime::StageError;
use trainyard_core::store::ArtifactStore;
use trainyard_proto::TenantId;
use trainyard_proto::v1::{CaptionSettings, ErrorKind, Secrets};

use super::cache::{CaptionCache, CaptionRecipe};
use super::chain::{Chain, Remote, Step};
use super::command::CommandCaptioner;
use super::gemini::{GeminiCaptioner, GeminiSettings};
use super::openai::{OpenAiAsk, OpenAiCaptioner, OpenAiServer};
use super::prompts::{Family, Prompts};
use super::tidy::Tidy;
use super::{CaptionBackend, CaptionPolicy, TemplateCaptioner, http};

/// A job's caption settings that cannot be served, by field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SetupError {
    pub field: String,
    pub problem: String,
}

impl From<SetupError> for StageError {
    fn from(e: SetupError) -> Self {
        StageError::fail(ErrorKind::InvalidSpec, e.to_string())
    }
}

fn problem(field: &str, problem: impl Into<String>) -> SetupError {
    SetupError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// What every job's caption backend is built from, held by the stage.
#[derive(Clone)]
pub struct CaptionSetup {
    config: CaptionConfig,
    cache: Option<CaptionCache>,
    fleet_client: reqwest::Client,
    openai_key: Option<String>,
    gemini_key: Option<String>,
    /// Samples a clip's frames for backends that read images only
    /// (`[captioner.video] ffmpeg`).
    ffmpeg: PathBuf,
}

/// The template backend of `caption.template` (or the default template).
pub fn template_of(caption: &CaptionSettings) -> TemplateCaptioner {
    if caption.template.is_empty() {
        TemplateCaptioner::default()
    } else {
        TemplateCaptioner::new(caption.template.clone())
    }
}

fn read_key(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    let Some(file) = file else { return Ok(None) };
    let key = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read caption key file {}: {e}", file.display()))?;
    Ok(Some(key.trim().to_owned()).filter(|k| !k.is_empty()))
}

impl CaptionSetup {
    /// `store`: where the caption cache lives (`None`: no cache).
    pub fn new(config: &CaptionConfig, store: Option<ArtifactStore>) -> anyhow::Result<Self> {
        Ok(Self {
            openai_key: read_key(config.openai.api_key_file.as_deref())?,
            gemini_key: read_key(config.gemini.api_key_file.as_deref())?,
            fleet_client: http::fleet_client()?,
            cache: store.map(CaptionCache::new),
            config: config.clone(),
            ffmpeg: PathBuf::from("ffmpeg"),
        })
    }

    /// The `ffmpeg` that samples a clip's frames (`[captioner.video] ffmpeg`;
    /// default: `ffmpeg` on PATH).
    pub fn with_ffmpeg(mut self, ffmpeg: PathBuf) -> Self {
        self.ffmpeg = ffmpeg;
        self
    }

    /// The backend for `tenant`'s job with `caption` settings. `secrets`
    /// are the job's opened secrets; `None` builds a backend that will not
    /// be called (`Validate`), so missing keys are not problems.
    pub fn backend(
        &self,
        tenant: &TenantId,
        caption: &CaptionSettings,
        secrets: Option<&Secrets>,
    ) -> Result<Box<dyn CaptionBackend>, SetupError> {
        let name = if caption.backend.is_empty() {
            self.config.backend.as_str()
        } else {
            caption.backend.as_str()
        };
        if name == "template" {
            return Ok(Box::new(template_of(caption)));
        }
        let c = &self.config;
        let mut steps = vec![self.step(name, true, caption, secrets)?];
        match caption.fallback.as_str() {
            "" => {}
            "template" => steps.push(Step::Template(template_of(caption))),
            other if other == name => {
                return Err(problem("caption.fallback", "is the backend itself"));
            }
            other => steps.push(self.step(other, false, caption, secrets)?),
        }
        let on_error = match caption.on_error.as_str() {
            "" | "fail" => None,
            "template" => Some(template_of(caption)),
            other => {
                return Err(problem(
                    "caption.on_error",
                    format!("{other:?} is not \"fail\" or \"template\""),
                ));
            }
        };
        let pick = |job: u32, fleet: u32| if job == 0 { fleet } else { job };
        Ok(Box::new(Chain {
            steps,
            on_error,
            tidy: Tidy {
                min_chars: pick(caption.min_chars, c.min_chars) as usize,
                max_chars: pick(caption.max_chars, c.max_chars) as usize,
                ..Tidy::default()
            },
            cache: self.cache.clone().map(|cache| (cache, tenant.clone())),
            retries: CaptionPolicy {
                max_attempts: c.max_attempts,
                retry_delay: Duration::from_millis(c.retry_delay_ms),
                ..CaptionPolicy::default()
            },
            concurrency: pick(caption.concurrency, c.concurrency).min(c.max_concurrency) as usize,
        }))
    }

    /// One remote step. `primary`: the job's `model` applies.
    fn step(
        &self,
        name: &str,
        primary: bool,
        caption: &CaptionSettings,
        secrets: Option<&Secrets>,
    ) -> Result<Step, SetupError> {
        let c = &self.config;
        let field = if primary {
            "caption.backend"
        } else {
            "caption.fallback"
        };
        if !CAPTION_BACKENDS.contains(&name) {
            return Err(problem(
                field,
                format!("unknown caption backend {name:?}; known: {CAPTION_BACKENDS:?}"),
            ));
        }
        let pick = |job: u32, fleet: u32| if job == 0 { fleet } else { job };
        let timeout = pick(caption.timeout_secs, c.timeout_secs).min(c.max_timeout_secs);
        let video_frames = pick(caption.video_frames, c.video_frames).min(c.max_video_frames);
        let job_model = if primary { caption.model.as_str() } else { "" };
        let secret = |default: &str| -> Result<Option<String>, SetupError> {
            let Some(secrets) = secrets else {
                return Ok(None);
            };
            let named = !caption.api_key_secret.is_empty();
            let key_name = if named {
                caption.api_key_secret.as_str()
            } else {
                default
            };
            match secrets.values.get(key_name) {
                Some(v) if !v.is_empty() => Ok(Some(v.clone())),
                _ if named => Err(problem(
                    "caption.api_key_secret",
                    format!("the job's secrets.values hold no {key_name:?}"),
                )),
                _ => Ok(None),
            }
        };
        let mut recipe = CaptionRecipe {
            backend: name.to_owned(),
            ..CaptionRecipe::default()
        };
        let (backend, prompts): (Box<dyn CaptionBackend>, Prompts) = match name {
            "openai" => {
                let model = if job_model.is_empty() {
                    c.openai.model.as_str()
                } else {
                    job_model
                };
                if model.is_empty() {
                    return Err(problem(
                        "caption.model",
                        "is required: the fleet has no default openai model",
                    ));
                }
                let fleet = c.openai.endpoint.trim_end_matches('/');
                let own = caption.endpoint.trim_end_matches('/');
                let server = if own.is_empty() || own == fleet {
                    if fleet.is_empty() {
                        return Err(problem(
                            "caption.endpoint",
                            "is required: the fleet has no openai endpoint",
                        ));
                    }
                    let key = secret("openai_api_key")?.or_else(|| self.openai_key.clone());
                    OpenAiServer {
                        client: self.fleet_client.clone(),
                        endpoint: fleet.to_owned(),
                        guard: None,
                        api_key: key,
                    }
                } else {
                    let (client, guard) = http::tenant_client(c.allow_private_endpoints)
                        .map_err(|e| problem("caption.endpoint", e.to_string()))?;
                    OpenAiServer {
                        client,
                        endpoint: own.to_owned(),
                        guard: Some(guard),
                        // Never the fleet's key.
                        api_key: secret("openai_api_key")?,
                    }
                };
                let prompts = Prompts::for_job(
                    Family::of(name, model),
                    &caption.system_prompt,
                    &caption.prompt,
                );
                let max_tokens = pick(caption.max_tokens, c.openai.max_tokens);
                let temperature = caption.temperature.unwrap_or(c.openai.temperature);
                recipe.endpoint = server.endpoint.clone();
                recipe.model = model.to_owned();
                recipe.parameters = [
                    ("max_tokens".to_string(), max_tokens.to_string()),
                    ("temperature".to_string(), temperature.to_string()),
                    ("video_frames".to_string(), video_frames.to_string()),
                    ("video_prompt".to_string(), prompts.video.clone()),
                ]
                .into();
                let ask = OpenAiAsk {
                    model: model.to_owned(),
                    prompts: prompts.clone(),
                    max_tokens,
                    temperature,
                    video_frames,
                    ffmpeg: self.ffmpeg.clone(),
                };
                let backend = OpenAiCaptioner::new(server, ask)
                    .map_err(|e| problem("caption.endpoint", e.to_string()))?;
                (Box::new(backend), prompts)
            }
            "gemini" => {
                let model = if job_model.is_empty() {
                    c.gemini.model.as_str()
                } else {
                    job_model
                };
                let key = secret("gemini_api_key")?.or_else(|| self.gemini_key.clone());
                if key.is_none() && secrets.is_some() {
                    return Err(problem(
                        "secrets.values.gemini_api_key",
                        "the gemini backend needs an API key in the job's secrets",
                    ));
                }
                let prompts = Prompts::for_job(
                    Family::of(name, model),
                    &caption.system_prompt,
                    &caption.prompt,
                );
                let max_tokens = pick(caption.max_tokens, c.gemini.max_tokens);
                let temperature = caption.temperature.unwrap_or(c.gemini.temperature);
                recipe.endpoint = c.gemini.base_url.clone();
                recipe.model = model.to_owned();
                recipe.parameters = [
                    ("max_tokens".to_string(), max_tokens.to_string()),
                    ("temperature".to_string(), temperature.to_string()),
                    ("video_prompt".to_string(), prompts.video.clone()),
                ]
                .into();
                let backend = GeminiCaptioner::new(
                    self.fleet_client.clone(),
                    GeminiSettings {
                        base_url: c.gemini.base_url.clone(),
                        model: model.to_owned(),
                        api_key: key.unwrap_or_default(),
                        prompts: prompts.clone(),
                        max_tokens,
                        temperature,
                        inline_max_bytes: c.gemini.inline_max_bytes,
                        ready_within: Duration::from_secs(u64::from(c.gemini.upload_ready_secs)),
                    },
                );
                (Box::new(backend), prompts)
            }
            "command" => {
                let Some(command) = c.commands.get(&caption.command) else {
                    let known: Vec<&String> = c.commands.keys().collect();
                    return Err(problem(
                        "caption.command",
                        format!(
                            "{:?} is not one of the fleet's caption commands {known:?}",
                            caption.command
                        ),
                    ));
                };
                let model = if command.model.is_empty() {
                    caption.command.as_str()
                } else {
                    command.model.as_str()
                };
                let prompts = Prompts::for_job(
                    Family::of(name, model),
                    &caption.system_prompt,
                    &caption.prompt,
                );
                recipe.endpoint = command.argv.join("\0");
                recipe.model = model.to_owned();
                recipe.parameters = [("video_prompt".to_string(), prompts.video.clone())].into();
                let concurrency = pick(
                    command.concurrency,
                    pick(caption.concurrency, c.concurrency),
                );
                let backend = CommandCaptioner::new(
                    &caption.command,
                    &command.argv,
                    model,
                    prompts.clone(),
                    concurrency as usize,
                );
                let timeout = if command.timeout_secs == 0 {
                    timeout
                } else {
                    command.timeout_secs
                };
                recipe.system_prompt = prompts.system.clone();
                recipe.prompt = prompts.image.clone();
                return Ok(Step::Remote(Remote {
                    backend: Box::new(backend),
                    recipe,
                    timeout: Duration::from_secs(u64::from(timeout)),
                }));
            }
            _ => return Ok(Step::Template(template_of(caption))),
        };
        recipe.system_prompt = prompts.system.clone();
        recipe.prompt = prompts.image.clone();
        Ok(Step::Remote(Remote {
            backend,
            recipe,
            timeout: Duration::from_secs(u64::from(timeout)),
        }))
    }
}
