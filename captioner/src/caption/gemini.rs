//! The `gemini` backend: `POST {base}/v1beta/models/{model}:generateContent`
//! with the key in `x-goog-api-key`, reading images and whole videos.
//!
//! A file travels inline (`inline_data`, base64) while the request stays
//! under `[captioner.caption.gemini] inline_max_bytes` (the API allows
//! about 100 MB; older docs said 20 MB). A larger one goes through the
//! Files API's resumable upload (`POST /upload/v1beta/files` to start,
//! the bytes to the returned `X-Goog-Upload-URL` with `upload, finalize`),
//! is polled (`GET /v1beta/files/<id>`) until `ACTIVE` as the docs require
//! for video, and is then named by a `file_data` part. The uploaded file
//! is deleted (`DELETE /v1beta/files/<id>`) as soon as its caption is
//! answered or the attempt fails: the API would otherwise keep a tenant's
//! clip for two days under the key's project. A failed delete is logged
//! and does not fail the caption. The caption is the text of the first
//! candidate's parts. The base URL is fleet config.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::http::{self, media_type, read_answer, send_error};
use super::prompts::Prompts;
use super::{CaptionBackend, CaptionError, ImageInfo};

pub struct GeminiCaptioner {
    name: String,
    client: reqwest::Client,
    base: String,
    model: String,
    api_key: String,
    prompts: Prompts,
    max_tokens: u32,
    temperature: f64,
    inline_max_bytes: u64,
    ready_within: Duration,
    /// First wait between two looks at an uploaded file's state.
    poll: Duration,
}

/// What a `GeminiCaptioner` needs.
pub struct GeminiSettings {
    pub base_url: String,
    pub model: String,
    pub api_key: String,
    pub prompts: Prompts,
    pub max_tokens: u32,
    pub temperature: f64,
    pub inline_max_bytes: u64,
    pub ready_within: Duration,
}

#[derive(Deserialize)]
struct Generated {
    #[serde(default)]
    candidates: Vec<Candidate>,
}

#[derive(Deserialize)]
struct Candidate {
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<TextPart>,
}

#[derive(Deserialize)]
struct TextPart {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Uploaded {
    file: FileInfo,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileInfo {
    name: String,
    uri: String,
    #[serde(default)]
    state: String,
}

const SERVER: &str = "gemini";

impl GeminiCaptioner {
    pub fn new(client: reqwest::Client, settings: GeminiSettings) -> Self {
        Self {
            name: format!("gemini:{}", settings.model),
            client,
            base: settings.base_url.trim_end_matches('/').to_owned(),
            model: settings.model,
            api_key: settings.api_key,
            prompts: settings.prompts,
            max_tokens: settings.max_tokens,
            temperature: settings.temperature,
            inline_max_bytes: settings.inline_max_bytes,
            ready_within: settings.ready_within,
            poll: Duration::from_millis(500),
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CaptionError> {
        request
            .header("x-goog-api-key", &self.api_key)
            .send()
            .await
            .map_err(|e| send_error(SERVER, e))
    }

    /// Uploads `bytes` through the resumable Files API and waits until the
    /// file is `ACTIVE`; returns its name (`files/<id>`) and URI. A file
    /// that never becomes usable is deleted before the error returns.
    async fn upload(
        &self,
        bytes: Vec<u8>,
        kind: &str,
        display: &str,
    ) -> Result<(String, String), CaptionError> {
        let start = self
            .client
            .post(format!("{}/upload/v1beta/files", self.base))
            .header("X-Goog-Upload-Protocol", "resumable")
            .header("X-Goog-Upload-Command", "start")
            .header(
                "X-Goog-Upload-Header-Content-Length",
                bytes.len().to_string(),
            )
            .header("X-Goog-Upload-Header-Content-Type", kind)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json!({"file": {"display_name": display}}).to_string());
        let response = self.send(start).await?;
        let session = response
            .headers()
            .get("x-goog-upload-url")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        read_answer(SERVER, response).await?;
        let session = session.ok_or_else(|| CaptionError::InvalidOutput {
            message: "the upload start answered without X-Goog-Upload-URL".into(),
        })?;
        let finish = self
            .client
            .post(session)
            .header("X-Goog-Upload-Offset", "0")
            .header("X-Goog-Upload-Command", "upload, finalize")
            .body(bytes);
        let answer = read_answer(SERVER, self.send(finish).await?).await?;
        let file = http::parse::<Uploaded>(SERVER, &answer)?.file;
        let name = file.name.clone();
        match self.until_active(file, display).await {
            Ok(uri) => Ok((name, uri)),
            Err(e) => {
                self.delete(&name).await;
                Err(e)
            }
        }
    }

    /// Polls an uploaded file until it is `ACTIVE`; returns its URI.
    async fn until_active(
        &self,
        mut file: FileInfo,
        display: &str,
    ) -> Result<String, CaptionError> {
        let deadline = tokio::time::Instant::now() + self.ready_within;
        let mut wait = self.poll;
        while file.state != "ACTIVE" {
            if file.state == "FAILED" {
                return Err(CaptionError::Rejected {
                    message: format!("gemini could not process the uploaded {display}"),
                });
            }
            if tokio::time::Instant::now() + wait > deadline {
                return Err(CaptionError::Timeout);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
            let look = self
                .client
                .get(format!("{}/v1beta/{}", self.base, file.name));
            let answer = read_answer(SERVER, self.send(look).await?).await?;
            file = http::parse::<FileInfo>(SERVER, &answer)?;
        }
        Ok(file.uri)
    }

    /// Deletes an uploaded file; a failure is logged (without the key) and
    /// left to the API's own two-day expiry.
    async fn delete(&self, name: &str) {
        let request = self.client.delete(format!("{}/v1beta/{name}", self.base));
        let result = match self.send(request).await {
            Ok(response) => read_answer(SERVER, response).await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let e = http::redact(e, Some(&self.api_key));
            tracing::warn!(file = name, error = %e, "could not delete an uploaded file from gemini");
        }
    }
}

#[async_trait]
impl CaptionBackend for GeminiCaptioner {
    fn name(&self) -> &str {
        &self.name
    }

    async fn caption(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        self.ask(image)
            .await
            .map_err(|e| http::redact(e, Some(&self.api_key)))
    }
}

impl GeminiCaptioner {
    async fn ask(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        let kind = match media_type(&image.path) {
            // Gemini's own name for QuickTime.
            Some("video/quicktime") => "video/mov",
            Some(kind) => kind,
            None => {
                return Err(CaptionError::Rejected {
                    message: format!("{}: not a file type gemini reads", image.file_name),
                });
            }
        };
        let bytes = http::read_file(&image.path).await?;
        let prompt = self.prompts.for_media(&image.media);
        // base64 is 4/3 of the bytes; the rest of the request is small.
        let request_size = (bytes.len() as u64).div_ceil(3) * 4 + prompt.len() as u64 + 4096;
        if request_size <= self.inline_max_bytes {
            let part = json!({"inline_data": {"mime_type": kind, "data": http::base64(&bytes)}});
            return self.generate(part, prompt).await;
        }
        let (name, uri) = self.upload(bytes, kind, &image.file_name).await?;
        let part = json!({"file_data": {"mime_type": kind, "file_uri": uri}});
        let answer = self.generate(part, prompt).await;
        self.delete(&name).await;
        answer
    }

    /// One `generateContent` call on `file_part` and the prompt.
    async fn generate(
        &self,
        file_part: serde_json::Value,
        prompt: &str,
    ) -> Result<String, CaptionError> {
        let mut body = json!({
            "contents": [{"role": "user", "parts": [file_part, {"text": prompt}]}],
            "generationConfig": {
                "maxOutputTokens": self.max_tokens,
                "temperature": self.temperature,
            },
        });
        if !self.prompts.system.is_empty() {
            body["systemInstruction"] = json!({"parts": [{"text": self.prompts.system}]});
        }
        let request = self
            .client
            .post(format!(
                "{}/v1beta/models/{}:generateContent",
                self.base, self.model
            ))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        let answer = read_answer(SERVER, self.send(request).await?).await?;
        let generated: Generated = http::parse(SERVER, &answer)?;
        let text: String = generated
            .candidates
            .into_iter()
            .next()
            .and_then(|c| c.content)
            .map(|c| c.parts.into_iter().filter_map(|p| p.text).collect())
            .unwrap_or_default();
        if text.trim().is_empty() {
            // A blocked prompt answers 200 with no candidate text.
            return Err(CaptionError::Rejected {
                message: "gemini answered without a caption (blocked or empty)".into(),
            });
        }
        Ok(text)
    }
}
