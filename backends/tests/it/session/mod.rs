//! Fixtures shared by the SimpleTuner and ai-toolkit stand-in tests: a run session driving a stand-in, a webhook listener, checkpoint restore.
//!

use crate::support::{
    captioned_dataset, diffusers_folder, diffusers_model, run_inputs, small_run, standins,
    write_safetensors,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use trainyard_backends::{
    Launch, LineEvent, ModelFiles, OutputParser, Tools, TrainInputs, TrainerBackend,
};
use trainyard_core::config::TrainerPaths;
use trainyard_core::process::{ChildGroup, OutputLine};
use trainyard_models::{ModelFamily, glob_match, part, preset};

/// Generous bound on any one wait (a whole stand-in run takes seconds).
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The stand-ins in place of the real installs.
pub fn tools() -> Tools {
    let standins = standins();
    Tools {
        trainers: TrainerPaths {
            python: "python3".into(),
            accelerate: standins.join("bin/accelerate"),
            simpletuner_dir: standins.join("simpletuner"),
            ai_toolkit_dir: standins.join("ai-toolkit"),
            ..Tools::default().trainers
        },
        ..Tools::default()
    }
}

/// A temp folder with a captioned dataset and a diffusers-layout model.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub dataset: PathBuf,
    pub model: PathBuf,
}

impl Fixture {
    pub fn new(images: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let dataset = dir.path().join("dataset");
        let model = dir.path().join("model");
        captioned_dataset(
            &dataset,
            (0..images).map(|i| (format!("img{i}"), format!("ohwx, photo {i}"))),
        );
        flux_folder(&model);
        Fixture {
            dir,
            dataset,
            model,
        }
    }

    /// Inputs for a run in its own folder `<tmp>/<run>`, output in `<run>/out`.
    pub fn inputs(&self, backend: &str, run: &str, steps: u32, save_every: u32) -> TrainInputs {
        let run_dir = self.dir.path().join(run);
        TrainInputs {
            output_name: "lora1".into(),
            ..run_inputs(
                &format!("job-{run}"),
                &self.dataset,
                &run_dir,
                run_dir.join("out"),
                diffusers_model("flux1-dev", ModelFamily::Flux, &self.model),
                small_run(backend, steps, save_every),
            )
        }
    }
}

/// A Flux pipeline in diffusers layout with what the stand-ins load from
/// it: each component's config and plain-named weights, listed in
/// `model_index.json`.
fn flux_folder(dir: &Path) {
    diffusers_folder(dir);
    std::fs::write(
        dir.join("model_index.json"),
        r#"{"_class_name": "FluxPipeline",
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}"#,
    )
    .unwrap();
    for (component, weights) in [
        ("transformer", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("text_encoder_2", "model.safetensors"),
    ] {
        let dir = dir.join(component);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        write_safetensors(&dir.join(weights));
    }
}

/// The `sdxl-base-1.0` preset's model as the worker fetches it: the
/// single-file checkpoint, and the diffusers folder with only the fp16
/// weights. Each file is checked against the preset's include patterns.
pub fn sdxl_preset_model(root: &Path) -> ModelFiles {
    let sdxl = preset("sdxl-base-1.0").expect("the SDXL preset");
    let diffusers = sdxl.part(part::DIFFUSERS).expect("a diffusers part");
    let folder = root.join("sdxl-diffusers");
    let files: &[(&str, &str)] = &[
        (
            "model_index.json",
            r#"{"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
                "force_zeros_for_empty_prompt": true, "add_watermarker": null,
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"]}"#,
        ),
        ("scheduler/scheduler_config.json", "{}"),
        ("text_encoder/config.json", "{}"),
        ("text_encoder/model.fp16.safetensors", ""),
        ("text_encoder_2/config.json", "{}"),
        ("text_encoder_2/model.fp16.safetensors", ""),
        ("tokenizer/merges.txt", "#version: 0.2"),
        ("tokenizer/special_tokens_map.json", "{}"),
        ("tokenizer/tokenizer_config.json", "{}"),
        ("tokenizer/vocab.json", "{}"),
        ("tokenizer_2/merges.txt", "#version: 0.2"),
        ("tokenizer_2/special_tokens_map.json", "{}"),
        ("tokenizer_2/tokenizer_config.json", "{}"),
        ("tokenizer_2/vocab.json", "{}"),
        ("unet/config.json", "{}"),
        ("unet/diffusion_pytorch_model.fp16.safetensors", ""),
        ("vae/config.json", "{}"),
        ("vae/diffusion_pytorch_model.fp16.safetensors", ""),
    ];
    for (rel, body) in files {
        assert!(
            diffusers.include.iter().any(|p| glob_match(p, rel)),
            "the preset does not fetch {rel}"
        );
        let path = folder.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match rel.ends_with(".safetensors") {
            true => write_safetensors(&path),
            false => std::fs::write(&path, body).unwrap(),
        }
    }
    for pattern in diffusers.include.iter().filter(|p| !p.contains('*')) {
        assert!(folder.join(pattern).is_file(), "{pattern} not laid out");
    }
    let checkpoint = sdxl.part(part::CHECKPOINT).expect("a checkpoint part");
    let file = root.join(checkpoint.file.expect("one file"));
    sdxl_checkpoint(&file);
    ModelFiles {
        reference: sdxl.name.into(),
        family: ModelFamily::Sdxl,
        parts: [
            (part::DIFFUSERS.to_string(), folder),
            (part::CHECKPOINT.to_string(), file),
        ]
        .into(),
    }
}

/// A single-file SDXL checkpoint: a safetensors file with a key only SDXL
/// base checkpoints hold (the second text encoder's).
fn sdxl_checkpoint(path: &Path) {
    let key = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias";
    let mut header =
        format!(r#"{{"{key}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#).into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&1.0f32.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// An empty Hugging Face cache (`HF_HOME`), so what a stand-in finds there
/// does not depend on the machine; with `repos`, each has a cached
/// snapshot holding `model_index.json`.
pub fn hf_home(root: &Path, repos: &[&str]) -> PathBuf {
    let home = root.join("hf-home");
    std::fs::create_dir_all(home.join("hub")).unwrap();
    for repo in repos {
        let snapshot = home
            .join("hub")
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots/0123456789abcdef0123456789abcdef01234567");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join("model_index.json"), "{}").unwrap();
    }
    home
}

pub use crate::support::restore;

/// A loopback HTTP listener that hands every POSTed JSON body to the
/// returned channel before answering `200 OK`.
pub async fn webhook_listener() -> (String, mpsc::UnboundedReceiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/st", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    // Runs until the test's runtime shuts down.
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(body) = read_post(socket).await {
                    let _ = tx.send(body);
                }
            });
        }
    });
    (url, rx)
}

async fn read_post(mut socket: TcpStream) -> Option<Value> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[header_end..]).ok();
    socket
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    body
}

/// Writes a rendered run's files.
pub fn write_files(launch: &Launch) {
    for (path, body) in &launch.files {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
}

/// A running trainer, driven as the worker drives it.
pub struct Session {
    pub child: ChildGroup,
    lines: mpsc::Receiver<OutputLine>,
    hooks: Option<mpsc::UnboundedReceiver<Value>>,
    lines_done: bool,
    parser: Box<dyn OutputParser>,
    pub events: Vec<LineEvent>,
    pub tail: Vec<String>,
    pub bodies: Vec<Value>,
    deadline: Duration,
}

/// What a finished session saw.
pub struct Finished {
    pub status: ExitStatus,
    pub events: Vec<LineEvent>,
    pub tail: Vec<String>,
    pub bodies: Vec<Value>,
}

impl Finished {
    /// The last 40 lines, as the worker hands them to `classify`.
    pub fn last_lines(&self) -> &[String] {
        &self.tail[self.tail.len().saturating_sub(40)..]
    }
}

pub fn first_progress(events: &[LineEvent]) -> Option<u32> {
    events.iter().find_map(|e| match e {
        LineEvent::Progress { step, .. } => Some(*step),
        _ => None,
    })
}

pub fn max_progress(events: &[LineEvent]) -> Option<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            LineEvent::Progress { step, .. } => Some(*step),
            _ => None,
        })
        .max()
}

impl Session {
    /// Renders, writes the files and starts the command in its own group.
    pub fn start(
        backend: &dyn TrainerBackend,
        inputs: &TrainInputs,
        env: &[(&str, &str)],
        hooks: Option<mpsc::UnboundedReceiver<Value>>,
    ) -> Session {
        let launch = backend.render(inputs).expect("render");
        write_files(&launch);
        Session::spawn(launch, backend.parser(inputs), inputs, env, hooks)
    }

    /// Starts an already written launch.
    pub fn spawn(
        launch: Launch,
        parser: Box<dyn OutputParser>,
        inputs: &TrainInputs,
        env: &[(&str, &str)],
        hooks: Option<mpsc::UnboundedReceiver<Value>>,
    ) -> Session {
        std::fs::create_dir_all(&inputs.output_dir).unwrap();
        let mut command = launch.command;
        command.env.extend(
            [("PYTHONUNBUFFERED", "1"), ("PYTHONIOENCODING", "utf-8")]
                .iter()
                .chain(env)
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let (child, lines) = ChildGroup::spawn(&command).expect("spawn");
        Session {
            child,
            lines,
            hooks,
            lines_done: false,
            parser,
            events: Vec::new(),
            tail: Vec::new(),
            bodies: Vec::new(),
            deadline: DEADLINE,
        }
    }

    /// Waits up to `deadline` (instead of [`DEADLINE`]) for each step.
    pub fn deadline(mut self, deadline: Duration) -> Session {
        self.deadline = deadline;
        self
    }

    fn take_body(&mut self, body: Value) {
        self.events.extend(self.parser.webhook(&body));
        self.bodies.push(body);
    }

    /// Feeds the next output line or webhook body to the parser; false once
    /// the output has ended and every body has been read.
    async fn next(&mut self) -> bool {
        if self.lines_done {
            let body = self.hooks.as_mut().and_then(|h| h.try_recv().ok());
            return match body {
                Some(body) => {
                    self.take_body(body);
                    true
                }
                None => false,
            };
        }
        let hooks = self.hooks.as_mut();
        tokio::select! {
            line = self.lines.recv() => match line {
                Some(line) => {
                    self.events.extend(self.parser.line(&line.line));
                    self.tail.push(line.line);
                }
                None => self.lines_done = true,
            },
            Some(body) = async { match hooks { Some(h) => h.recv().await, None => None } } => {
                self.take_body(body);
            }
        }
        true
    }

    /// Reads output until `done` holds; false if the output ended first.
    pub async fn until(&mut self, mut done: impl FnMut(&Session) -> bool) -> bool {
        tokio::time::timeout(self.deadline, async {
            loop {
                if done(self) {
                    return true;
                }
                if !self.next().await {
                    return done(self);
                }
            }
        })
        .await
        .expect("the trainer did not get there in time")
    }

    /// Reads the rest of the output and waits for the exit.
    pub async fn finish(mut self) -> Finished {
        self.until(|_| false).await;
        let status = tokio::time::timeout(self.deadline, self.child.wait())
            .await
            .expect("the trainer did not exit in time")
            .expect("wait");
        // Bodies are queued before the trainer's POST returns.
        while self.next().await {}
        Finished {
            status,
            events: self.events,
            tail: self.tail,
            bodies: self.bodies,
        }
    }

    /// SIGKILL to the whole group, as a lost machine would.
    pub async fn kill(mut self) -> ExitStatus {
        self.child.signal(nix::sys::signal::Signal::SIGKILL);
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the group did not die")
            .expect("wait")
    }
}
