//! The `command` backend: one of the fleet's caption programs
//! (`[captioner.caption.commands.<name>]`), for models with no
//! OpenAI-compatible server — Florence-2 under transformers, above all. A
//! job names a configured program (`caption.command`), never a path.
//!
//! # Contract
//!
//! One run per file, started through [`trainyard_core::process`] (its own
//! process group, the allow-listed environment only — no store keys, NATS
//! credentials or Hub token), in the file's folder:
//!
//! ```text
//! <argv...> --media image|video --file /abs/path/cat.png --prompt "<DETAILED_CAPTION>"
//! env: TY_CAPTION_FILE=/abs/path/cat.png TY_CAPTION_MEDIA=image TY_CAPTION_PROMPT=…
//!      TY_CAPTION_SYSTEM_PROMPT=… TY_CAPTION_MODEL=<the command's model>
//! ```
//!
//! - stdout: the caption (several lines are joined into one; the answer is
//!   tidied like a model's: "The image shows …" comes off);
//! - exit 0: captioned; exit 3: this file cannot be captioned (refused, not
//!   retried); any other status: failed, retried with backoff, and the last
//!   lines of stderr are the error's message;
//! - a run past the timeout has its whole process group killed and counts
//!   as a timeout (retried).
//!
//! The program must not write next to the file: the prepared folder is
//! the dataset.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;
use trainyard_core::process::{ChildGroup, CommandSpec, OutputStream};

use super::http::unavailable;
use super::prompts::Prompts;
use super::{CaptionBackend, CaptionError, ImageInfo, Media};

/// The exit status that means "this file cannot be captioned".
pub const EXIT_REFUSED: i32 = 3;

/// Lines of stderr kept for an error message.
const STDERR_LINES: usize = 8;

pub struct CommandCaptioner {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    model: String,
    prompts: Prompts,
    /// Runs at once.
    slots: Arc<Semaphore>,
}

impl CommandCaptioner {
    /// `argv` is the configured program and its first arguments (not
    /// empty; checked at config load).
    pub fn new(
        name: &str,
        argv: &[String],
        model: &str,
        prompts: Prompts,
        concurrency: usize,
    ) -> Self {
        Self {
            name: format!("command:{name}"),
            program: PathBuf::from(argv.first().cloned().unwrap_or_default()),
            args: argv.iter().skip(1).cloned().collect(),
            model: model.to_owned(),
            prompts,
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    fn spec(&self, file: &Path, media: &str, prompt: &str) -> CommandSpec {
        let mut args: Vec<OsString> = self.args.iter().map(OsString::from).collect();
        args.extend(["--media".into(), media.into(), "--file".into()]);
        args.push(file.as_os_str().to_owned());
        args.extend(["--prompt".into(), prompt.into()]);
        CommandSpec {
            program: self.program.clone(),
            args,
            cwd: file.parent().map(Path::to_owned).unwrap_or_default(),
            env: vec![
                ("TY_CAPTION_FILE".into(), file.display().to_string()),
                ("TY_CAPTION_MEDIA".into(), media.into()),
                ("TY_CAPTION_PROMPT".into(), prompt.into()),
                (
                    "TY_CAPTION_SYSTEM_PROMPT".into(),
                    self.prompts.system.clone(),
                ),
                ("TY_CAPTION_MODEL".into(), self.model.clone()),
            ],
        }
    }
}

#[async_trait]
impl CaptionBackend for CommandCaptioner {
    fn name(&self) -> &str {
        &self.name
    }

    async fn caption(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| unavailable("caption command closed"))?;
        let file = std::path::absolute(&image.path).map_err(|e| CaptionError::Rejected {
            message: format!("{}: {e}", image.path.display()),
        })?;
        let media = match image.media {
            Media::Image => "image",
            Media::Video(_) => "video",
        };
        let prompt = self.prompts.for_media(&image.media);
        let out = run(&self.spec(&file, media, prompt), None).await?;
        match out.code {
            Some(0) => Ok(out.stdout.join(" ")),
            Some(EXIT_REFUSED) => Err(CaptionError::Rejected {
                message: format!(
                    "{} refused {}: {}",
                    self.name,
                    image.file_name,
                    out.stderr_tail()
                ),
            }),
            code => Err(unavailable(format!(
                "{} exited with {}: {}",
                self.name,
                code.map_or("a signal".to_owned(), |c| format!("status {c}")),
                out.stderr_tail()
            ))),
        }
    }
}

/// What a finished child said.
pub(crate) struct ChildOutput {
    /// Exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl ChildOutput {
    pub fn stderr_tail(&self) -> String {
        let skip = self.stderr.len().saturating_sub(STDERR_LINES);
        let tail = self.stderr[skip..].join(" | ");
        if tail.is_empty() {
            "no output on stderr".into()
        } else {
            tail
        }
    }
}

/// Runs `spec` to its end. With a `timeout`, a run past it has its group
/// killed and is [`CaptionError::Timeout`]; without one the caller's own
/// timeout drops this future, which kills the group too.
pub(crate) async fn run(
    spec: &CommandSpec,
    timeout: Option<Duration>,
) -> Result<ChildOutput, CaptionError> {
    let (mut group, mut lines) = ChildGroup::spawn(spec)
        .map_err(|e| unavailable(format!("cannot start {}: {e}", spec.program.display())))?;
    let work = async {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(line) = lines.recv().await {
            match line.stream {
                OutputStream::Stdout => stdout.push(line.line),
                OutputStream::Stderr => stderr.push(line.line),
            }
        }
        let status = group.wait().await;
        (stdout, stderr, status)
    };
    let (stdout, stderr, status) = match timeout {
        Some(limit) => tokio::time::timeout(limit, work)
            .await
            .map_err(|_| CaptionError::Timeout)?,
        None => work.await,
    };
    let status =
        status.map_err(|e| unavailable(format!("waiting for {}: {e}", spec.program.display())))?;
    Ok(ChildOutput {
        code: status.code(),
        stdout,
        stderr,
    })
}
