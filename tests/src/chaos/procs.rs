//! The services as child processes: the real `ty-*` binaries built beside
//! the test executable, each with its own TOML config file and its output in
//! a log file of the test's temp dir, so a test can SIGKILL, SIGSTOP or
//! SIGTERM one of them exactly as a machine or an orchestrator would.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use trainyard_core::Config;

/// One of the four service binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Coordinator,
    Captioner,
    Worker,
    Uploader,
}

impl Service {
    pub fn binary(self) -> &'static str {
        match self {
            Service::Coordinator => "ty-coordinator",
            Service::Captioner => "ty-captioner",
            Service::Worker => "ty-worker",
            Service::Uploader => "ty-uploader",
        }
    }
}

/// Where `cargo build --workspace --bins` put the service binaries: the
/// test executable lives in `target/<profile>/deps`, they in `target/<profile>`.
/// `TY_TEST_BIN_DIR` names another folder (binaries copied elsewhere).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let deps = exe.parent().expect("deps dir");
    let dir = if let Some(dir) = std::env::var_os("TY_TEST_BIN_DIR") {
        PathBuf::from(dir)
    } else if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("profile dir").to_owned()
    } else {
        deps.to_owned()
    };
    for service in [
        Service::Coordinator,
        Service::Captioner,
        Service::Worker,
        Service::Uploader,
    ] {
        assert!(
            dir.join(service.binary()).is_file(),
            "{} not found in {}: run `cargo build --workspace --bins` first",
            service.binary(),
            dir.display()
        );
    }
    dir
}

/// A running (or stopped) service process; SIGKILLed when dropped.
pub struct Proc {
    pub service: Service,
    pub name: String,
    pub config: Config,
    /// Extra environment variables (a fault hook's, say).
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Writes `config` to `<dir>/<name>.toml` and starts the service with it
    /// and `env` added to its environment.
    pub fn spawn(
        bin_dir: &Path,
        dir: &Path,
        service: Service,
        name: &str,
        config: Config,
        env: Vec<(String, String)>,
    ) -> Proc {
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config.to_toml()).expect("write service config");
        let log = dir.join(format!("{name}.log"));
        // Append: a restarted service keeps its earlier output in the same file.
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(bin_dir.join(service.binary()))
            .arg("--config")
            .arg(&config_path)
            .env_remove("TY_LOG")
            .env_remove("TY_CONFIG")
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("service starts");
        Proc {
            service,
            name: name.to_owned(),
            config,
            env,
            log,
            child,
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) {
        if self.exit.is_none() {
            let _ = kill(Pid::from_raw(self.pid() as i32), signal);
        }
    }

    /// SIGKILL, as a machine dying would: the process and every trainer it
    /// started (they run in their own process groups and would otherwise
    /// outlive it, which a dead pod's would not).
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().map(|s| self.exit = Some(s));
        if self.service == Service::Worker {
            let work_dir = self.config.worker.work_dir.display().to_string();
            for pid in crate::processes_mentioning(&work_dir) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }

    /// Waits for the process to exit on its own, within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit {
                return status;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.exit.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.kill();
    }
}
