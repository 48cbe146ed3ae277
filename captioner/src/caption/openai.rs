//! The `openai` backend: any OpenAI-compatible chat-completions server —
//! vLLM serving JoyCaption or Qwen2-VL, Ollama, OpenAI itself.
//!
//! One `POST {endpoint}/chat/completions` per file: the system prompt, then
//! a user message of the instruction and the image as a `data:` URL
//! (base64). A file is never sent as a link: vLLM and others fetch
//! `image_url` links themselves, with no address checks of their own
//! (CVE-2025-6242), so a link would let a tenant make the caption server
//! fetch inside our network. A video is sampled into frames
//! ([`super::frames`]) sent as several image parts of the one message.
//! The caption is `choices[0].message.content`.

use std::path::PathBuf;

use async_trait::async_trait;
use reqwest::Url;
use serde::Deserialize;
use serde_json::json;

use super::http::{self, data_url, media_type, read_answer, send_error};
use super::prompts::Prompts;
use super::{CaptionBackend, CaptionError, ImageInfo, Media};

/// Where the server is and who may be given what.
pub struct OpenAiCaptioner {
    name: String,
    client: reqwest::Client,
    /// `{endpoint}/chat/completions`.
    url: Url,
    /// A tenant's endpoint is checked by the guard before each request.
    guard: Option<trainyard_core::netguard::Guard>,
    model: String,
    api_key: Option<String>,
    prompts: Prompts,
    max_tokens: u32,
    temperature: f64,
    video_frames: u32,
    ffmpeg: PathBuf,
}

/// How to reach one server.
pub struct OpenAiServer {
    pub client: reqwest::Client,
    /// The base URL, e.g. `http://127.0.0.1:8000/v1`.
    pub endpoint: String,
    /// Set for a tenant's own endpoint.
    pub guard: Option<trainyard_core::netguard::Guard>,
    pub api_key: Option<String>,
}

/// What to ask.
pub struct OpenAiAsk {
    pub model: String,
    pub prompts: Prompts,
    pub max_tokens: u32,
    pub temperature: f64,
    pub video_frames: u32,
    pub ffmpeg: PathBuf,
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

impl OpenAiCaptioner {
    pub fn new(server: OpenAiServer, ask: OpenAiAsk) -> Result<Self, CaptionError> {
        let base = server.endpoint.trim_end_matches('/');
        let url = Url::parse(&format!("{base}/chat/completions")).map_err(|e| {
            CaptionError::Rejected {
                message: format!("caption.endpoint is not a valid url: {e}"),
            }
        })?;
        if let Some(guard) = &server.guard {
            http::check_tenant_url(guard, &url)?;
        }
        Ok(Self {
            name: format!("openai:{}", ask.model),
            client: server.client,
            url,
            guard: server.guard,
            model: ask.model,
            api_key: server.api_key,
            prompts: ask.prompts,
            max_tokens: ask.max_tokens,
            temperature: ask.temperature,
            video_frames: ask.video_frames,
            ffmpeg: ask.ffmpeg,
        })
    }

    /// The image parts of `image`: the file itself, or its sampled frames.
    async fn image_parts(&self, image: &ImageInfo) -> Result<Vec<serde_json::Value>, CaptionError> {
        let urls = match &image.media {
            Media::Image => {
                let kind = media_type(&image.path).ok_or_else(|| CaptionError::Rejected {
                    message: format!("{}: not an image type a model reads", image.file_name),
                })?;
                vec![data_url(kind, &http::read_file(&image.path).await?)]
            }
            Media::Video(info) => {
                super::frames::sample(&self.ffmpeg, &image.path, info, self.video_frames)
                    .await?
                    .iter()
                    .map(|frame| data_url("image/jpeg", frame))
                    .collect()
            }
        };
        Ok(urls
            .into_iter()
            .map(|url| json!({"type": "image_url", "image_url": {"url": url}}))
            .collect())
    }
}

#[async_trait]
impl CaptionBackend for OpenAiCaptioner {
    fn name(&self) -> &str {
        &self.name
    }

    async fn caption(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        self.ask(image)
            .await
            .map_err(|e| http::redact(e, self.api_key.as_deref()))
    }
}

impl OpenAiCaptioner {
    async fn ask(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        if let Some(guard) = &self.guard {
            http::check_tenant_url(guard, &self.url)?;
        }
        let mut content =
            vec![json!({"type": "text", "text": self.prompts.for_media(&image.media)})];
        content.extend(self.image_parts(image).await?);
        let mut messages = Vec::new();
        if !self.prompts.system.is_empty() {
            messages.push(json!({"role": "system", "content": self.prompts.system}));
        }
        messages.push(json!({"role": "user", "content": content}));
        let body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        });
        let mut request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&body).unwrap_or_default());
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let server = "caption server";
        let response = request.send().await.map_err(|e| send_error(server, e))?;
        let answer: Completion = http::parse(server, &read_answer(server, response).await?)?;
        answer
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.message.content)
            .ok_or_else(|| CaptionError::InvalidOutput {
                message: "the answer holds no message content".into(),
            })
    }
}
