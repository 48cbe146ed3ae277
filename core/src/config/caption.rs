//! The `[captioner.caption]` section: the fleet's caption backends — which
//! one a job gets by default, the fleet's own OpenAI-compatible server and
//! Gemini base URL, the caption programs a job may name, and the caps a
//! job's `caption` settings are held to.
//!
//! A job chooses a backend (`caption.backend`) and may bring its own
//! OpenAI-compatible endpoint (`caption.endpoint`, reached only through the
//! address guard and never given the fleet's key) but never a program: the
//! `command` backend runs only one of [`CaptionConfig::commands`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The backends a job may name in `caption.backend`.
pub const CAPTION_BACKENDS: &[&str] = &["template", "openai", "gemini", "command"];

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionConfig {
    /// The backend of a job that names none (one of [`CAPTION_BACKENDS`]).
    pub backend: String,
    /// Files captioned at once for one job, whatever the job asks.
    pub max_concurrency: u32,
    /// Files captioned at once when the job does not say.
    pub concurrency: u32,
    /// Seconds one caption may take when the job does not say.
    pub timeout_secs: u32,
    /// The longest `caption.timeout_secs` a job may ask for.
    pub max_timeout_secs: u32,
    /// Tries per file and backend for a retryable error (429, 5xx, a
    /// timeout, a lost connection), the first included.
    pub max_attempts: u32,
    /// First wait between two tries (doubled each time) unless the server
    /// sent `Retry-After`; never more than a minute.
    pub retry_delay_ms: u64,
    /// Frames sampled from a video for a backend that reads only images.
    pub video_frames: u32,
    /// The most frames a job may ask for.
    pub max_video_frames: u32,
    /// Characters a caption has at least (after tidying) when the job does
    /// not say.
    pub min_chars: u32,
    /// Characters a caption is cut to when the job does not say.
    pub max_chars: u32,
    /// Let a job's own `caption.endpoint` be a private, loopback or
    /// link-local address (development and tests only).
    pub allow_private_endpoints: bool,
    pub openai: OpenAiConfig,
    pub gemini: GeminiConfig,
    /// The programs the `command` backend may run, by the name a job gives
    /// in `caption.command`.
    pub commands: BTreeMap<String, CaptionCommand>,
}

impl Default for CaptionConfig {
    fn default() -> Self {
        Self {
            backend: "template".into(),
            max_concurrency: 16,
            concurrency: 4,
            timeout_secs: 120,
            max_timeout_secs: 900,
            max_attempts: 3,
            retry_delay_ms: 1000,
            video_frames: 4,
            max_video_frames: 16,
            min_chars: 3,
            max_chars: 1000,
            allow_private_endpoints: false,
            openai: OpenAiConfig::default(),
            gemini: GeminiConfig::default(),
            commands: BTreeMap::new(),
        }
    }
}

/// `[captioner.caption.openai]`: the fleet's own OpenAI-compatible server.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Base URL ending in `/v1`, e.g. `http://127.0.0.1:8000/v1` (vLLM) or
    /// `https://api.openai.com/v1`. Trusted (may be private). Empty: jobs
    /// must bring their own `caption.endpoint`.
    pub endpoint: String,
    /// The model of a job that names none, e.g.
    /// `fancyfeast/llama-joycaption-beta-one-hf-llava`.
    pub model: String,
    /// A file holding the API key sent to `endpoint` (and only there) when
    /// the job's secrets hold none. Unset: no key.
    pub api_key_file: Option<PathBuf>,
    pub max_tokens: u32,
    pub temperature: f64,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            model: String::new(),
            api_key_file: None,
            max_tokens: 300,
            temperature: 0.6,
        }
    }
}

/// `[captioner.caption.gemini]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeminiConfig {
    /// Without `/v1beta`; tests point it at a stand-in.
    pub base_url: String,
    pub model: String,
    /// A file holding a key used when the job's secrets hold none.
    pub api_key_file: Option<PathBuf>,
    pub max_tokens: u32,
    pub temperature: f64,
    /// Largest `generateContent` request (base64 data included) sent with
    /// the file inline; a larger file goes through the Files API upload.
    /// The API allows about 100 MB (20 MB in older docs).
    pub inline_max_bytes: u64,
    /// How long an uploaded file may stay `PROCESSING` before the caption
    /// counts as timed out.
    pub upload_ready_secs: u32,
}

impl Default for GeminiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://generativelanguage.googleapis.com".into(),
            model: "gemini-2.5-flash".into(),
            api_key_file: None,
            max_tokens: 300,
            temperature: 0.4,
            inline_max_bytes: 100_000_000,
            upload_ready_secs: 300,
        }
    }
}

/// `[captioner.caption.commands.<name>]`: a caption program. See
/// `captioner::caption::command` for its contract.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionCommand {
    /// Program and its first arguments; the file's arguments follow.
    pub argv: Vec<String>,
    /// Seconds one caption may take (0: the section's `timeout_secs`).
    pub timeout_secs: u32,
    /// Files it captions at once (0: the job's concurrency).
    pub concurrency: u32,
    /// The model it runs, recorded with its captions (e.g.
    /// `microsoft/Florence-2-large`); empty: the command's name.
    pub model: String,
}

impl CaptionConfig {
    /// The section's own consistency, checked at load.
    pub fn validate(&self) -> Result<(), String> {
        if !CAPTION_BACKENDS.contains(&self.backend.as_str()) {
            return Err(format!(
                "captioner.caption.backend {:?} is not one of {CAPTION_BACKENDS:?}",
                self.backend
            ));
        }
        if self.max_concurrency == 0 || self.concurrency == 0 || self.max_attempts == 0 {
            return Err(
                "captioner.caption.max_concurrency, concurrency and max_attempts must be at least 1"
                    .into(),
            );
        }
        if self.timeout_secs == 0 || self.max_timeout_secs < self.timeout_secs {
            return Err(
                "captioner.caption.timeout_secs must be at least 1 and at most max_timeout_secs"
                    .into(),
            );
        }
        if self.min_chars > self.max_chars {
            return Err("captioner.caption.min_chars is above max_chars".into());
        }
        for (name, command) in &self.commands {
            if command.argv.is_empty() {
                return Err(format!("captioner.caption.commands.{name}.argv is empty"));
            }
        }
        Ok(())
    }
}
