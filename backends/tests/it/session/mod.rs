//! Fixtures shared by the SimpleTuner and ai-toolkit stand-in tests: a run session driving a stand-in, a webhook listener, checkpoint restore.
//!

use crate::support::{
    captioned_dataset, diffusers_folder, diffusers_model, run_inputs, small_run, standins,
};
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use trainyard_backends::{Launch, LineEvent, OutputParser, Tools, TrainInputs, TrainerBackend};
use trainyard_core::config::TrainerPaths;
use trainyard_core::process::{ChildGroup, OutputLine};
use trainyard_models::ModelFamily;

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
        diffusers_folder(&model);
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
