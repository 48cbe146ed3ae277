//! The fault suite's harness. Unlike [`crate::Fleet`], which runs the
//! services as tasks of the test process, [`Chaos`] runs them as child
//! processes of the real binaries (so they can be SIGKILLed, SIGSTOPped and
//! SIGTERMed), against a nats-server of its own (one node, or a three-node
//! cluster whose routes pass through cuttable TCP proxies), and
//! [`checks::global`] verifies the invariants every fault test must keep.
//! When a test fails, the tails of every service log are printed.

pub mod checks;
pub mod cluster;
pub mod procs;
pub mod proxy;

pub use cluster::Cluster;
pub use procs::{Proc, Service, bin_dir};

use crate::{Bearer, Client, TOKEN, token_key, workspace_root};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use trainyard_core::Config;
use trainyard_core::store::ArtifactStore;
use trainyard_core::topology::TASKS_STREAM;
use trainyard_natsd::{NatsServer, find_nats_server};
use trainyard_proto::v1::job_service_client::JobServiceClient;

/// How long services get to start and be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A fleet of service processes on loopback.
pub struct Chaos {
    pub dir: tempfile::TempDir,
    pub nats: Option<NatsServer>,
    pub cluster: Option<Cluster>,
    /// The client URL(s) services connect to, comma-separated.
    pub nats_url: String,
    /// The settings every service starts from.
    pub config: Config,
    pub store: ArtifactStore,
    pub procs: Vec<Proc>,
    /// Environment variables every service started from now on gets.
    pub env: Vec<(String, String)>,
    bin_dir: PathBuf,
    grpc_port: u16,
    names: usize,
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Chaos {
    /// One nats-server, a coordinator, a captioner, an uploader and
    /// `workers` workers, ready to take jobs.
    pub async fn start(workers: usize, tweak: impl FnOnce(&mut Config)) -> Chaos {
        Chaos::start_env(workers, tweak, &[]).await
    }

    /// [`Chaos::start`] with environment variables every service gets (an
    /// OTLP endpoint, say); each process is then also named to telemetry
    /// by its own name (`OTEL_SERVICE_NAME=worker-4`).
    pub async fn start_env(
        workers: usize,
        tweak: impl FnOnce(&mut Config),
        env: &[(&str, &str)],
    ) -> Chaos {
        let mut chaos = Chaos::empty(tweak).await;
        chaos.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        chaos.spawn_fleet(workers).await;
        chaos
    }

    /// Starts a coordinator, a captioner, an uploader and `workers` workers
    /// and waits until they take jobs.
    pub async fn spawn_fleet(&mut self, workers: usize) {
        self.spawn(Service::Coordinator);
        self.spawn(Service::Captioner);
        self.spawn(Service::Uploader);
        for _ in 0..workers {
            self.spawn(Service::Worker);
        }
        self.wait_ready().await;
    }

    /// A nats-server and the fleet's settings, no service running yet.
    pub async fn empty(tweak: impl FnOnce(&mut Config)) -> Chaos {
        let dir = tempfile::tempdir().expect("tempdir");
        let store_dir = dir.path().join("nats");
        let nats = tokio::task::spawn_blocking(move || {
            let binary = find_nats_server(&workspace_root()).expect("nats-server >= 2.12");
            NatsServer::start(&binary, &store_dir).expect("nats-server starts")
        })
        .await
        .expect("nats start task");
        let url = nats.url();
        Chaos::with_nats(dir, Some(nats), url, tweak)
    }

    /// [`Chaos::start`] on a three-node cluster with R3 streams and KV;
    /// services get every node's URL unless `tweak` says otherwise.
    pub async fn start_cluster(workers: usize, tweak: impl FnOnce(&mut Config)) -> Chaos {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = find_nats_server(&workspace_root()).expect("nats-server >= 2.12");
        let cluster = Cluster::start(&binary, dir.path()).await;
        let url = cluster.urls();
        let mut chaos = Chaos::with_nats(dir, None, url, |config| {
            config.nats.replicas = 3;
            tweak(config);
        });
        chaos.cluster = Some(cluster);
        // Services that race to create R3 streams on a fresh cluster time
        // out and exit; create the topology once, first.
        let js = chaos.js().await;
        let nats = chaos.config.nats.clone();
        crate::wait_for("R3 streams and buckets", READY_TIMEOUT, || {
            let (js, nats) = (js.clone(), nats.clone());
            async move {
                trainyard_core::topology::ensure(&js, &nats)
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
        chaos.spawn_fleet(workers).await;
        chaos
    }

    /// The fleet's settings around an already running NATS at `url`.
    pub fn with_nats(
        dir: tempfile::TempDir,
        nats: Option<NatsServer>,
        url: String,
        tweak: impl FnOnce(&mut Config),
    ) -> Chaos {
        let grpc_port = free_port();
        let mut config = Config::default();
        config.nats.url = url.clone();
        config.nats.insecure_dev = true;
        config.nats.ack_wait_secs = 4;
        config.store.uri = dir.path().join("store").display().to_string();
        config.coordinator.grpc_addr = format!("127.0.0.1:{grpc_port}");
        config.coordinator.tokens = [(token_key(TOKEN), "acme".to_string())].into();
        let key_file = dir.path().join("secrets.key");
        trainyard_core::secrets::dev_key_file(&key_file).expect("secrets key");
        config.secrets.key_file = Some(key_file);
        config.coordinator.reconcile_interval_secs = 2;
        config.coordinator.stale_after_secs = 5;
        config.captioner.allow_private_urls = true;
        config.worker.model_cache_dir = dir.path().join("cache");
        config.worker.progress_interval_ms = 0;
        config.worker.checkpoint_scan_ms = 100;
        config.worker.stop_grace_secs = 5;
        config.uploader.allowed_local_roots = vec![dir.path().to_owned()];
        tweak(&mut config);
        let store = ArtifactStore::open_config(&config.store).expect("store");
        Chaos {
            dir,
            nats,
            cluster: None,
            nats_url: url,
            config,
            store,
            procs: Vec::new(),
            env: Vec::new(),
            bin_dir: bin_dir(),
            grpc_port,
            names: 0,
        }
    }

    /// Starts one more process of `service` and returns its name
    /// (`worker-3`); each gets its own work dir and model cache.
    pub fn spawn(&mut self, service: Service) -> String {
        self.spawn_with(service, |_| {})
    }

    /// [`Chaos::spawn`] with settings of its own (another NATS URL, say).
    pub fn spawn_with(&mut self, service: Service, tweak: impl FnOnce(&mut Config)) -> String {
        self.spawn_full(service, tweak, &[])
    }

    /// [`Chaos::spawn`] with environment variables of its own (a fault
    /// hook such as the uploader's `TY_FAULT_EXIT_AFTER`).
    pub fn spawn_env(&mut self, service: Service, env: &[(&str, &str)]) -> String {
        self.spawn_full(service, |_| {}, env)
    }

    fn spawn_full(
        &mut self,
        service: Service,
        tweak: impl FnOnce(&mut Config),
        env: &[(&str, &str)],
    ) -> String {
        self.names += 1;
        let name = format!(
            "{}-{}",
            service.binary().trim_start_matches("ty-"),
            self.names
        );
        let mut config = self.config.clone();
        let work = self.dir.path().join("work").join(&name);
        config.captioner.work_dir = work.clone();
        config.worker.work_dir = work.clone();
        config.uploader.work_dir = work;
        // One worker process owns a model cache folder (its index is not
        // shared): two workers downloading into one race on the blob.
        config.worker.model_cache_dir = self.dir.path().join("cache").join(&name);
        tweak(&mut config);
        let mut all = self.env.clone();
        if !all.is_empty() {
            all.push(("OTEL_SERVICE_NAME".into(), name.clone()));
        }
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let env = all;
        let proc = Proc::spawn(&self.bin_dir, self.dir.path(), service, &name, config, env);
        self.procs.push(proc);
        name
    }

    /// Starts a process again with the same name, config and work dir.
    pub fn restart(&mut self, name: &str) {
        let index = self.index(name);
        let old = &self.procs[index];
        let proc = Proc::spawn(
            &self.bin_dir,
            self.dir.path(),
            old.service,
            &old.name,
            old.config.clone(),
            old.env.clone(),
        );
        self.procs[index] = proc;
    }

    fn index(&self, name: &str) -> usize {
        self.procs
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    pub fn proc(&mut self, name: &str) -> &mut Proc {
        let index = self.index(name);
        &mut self.procs[index]
    }

    /// Names of the running processes of `service`.
    pub fn running(&mut self, service: Service) -> Vec<String> {
        self.procs
            .iter_mut()
            .filter(|p| p.service == service)
            .filter_map(|p| p.is_running().then(|| p.name.clone()))
            .collect()
    }

    /// Waits until gRPC answers and every stage consumer exists.
    pub async fn wait_ready(&self) {
        let js = self.js().await;
        crate::wait_for("services ready", READY_TIMEOUT, || {
            let js = js.clone();
            let url = format!("http://127.0.0.1:{}", self.grpc_port);
            async move {
                Channel::from_shared(url).ok()?.connect().await.ok()?;
                let stream = js.get_stream(TASKS_STREAM).await.ok()?;
                use futures::StreamExt;
                let names: Vec<String> = stream
                    .consumer_names()
                    .filter_map(|n| async { n.ok() })
                    .collect()
                    .await;
                (names.len() >= 3).then_some(())
            }
        })
        .await;
    }

    /// A gRPC client of the coordinator, retried until it connects.
    pub async fn client(&self) -> Client {
        let url = format!("http://127.0.0.1:{}", self.grpc_port);
        let channel = crate::wait_for("coordinator answers", READY_TIMEOUT, || {
            let url = url.clone();
            async move { Channel::from_shared(url).ok()?.connect().await.ok() }
        })
        .await;
        JobServiceClient::with_interceptor(channel, Bearer(TOKEN.into()))
    }

    pub async fn nats_client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(trainyard_core::nats::server_addrs(&self.nats_url).expect("nats urls"))
            .await
            .expect("nats connect")
    }

    pub async fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.nats_client().await)
    }

    /// Puts the bundled sample dataset in tenant `acme`'s uploads and
    /// returns its URI.
    pub async fn sample_uri(&self) -> String {
        let local = self.dir.path().join("sample");
        trainyard_captioner::sample::write_sample_dataset(&local).expect("sample");
        let key = crate::upload_key("acme", "sample");
        self.store
            .put_dir(&local, &key, &[])
            .await
            .expect("upload sample");
        self.store.uri(&key)
    }

    /// The folder deliveries of a test go to.
    pub fn outputs_dir(&self) -> PathBuf {
        self.dir.path().join("outputs")
    }

    /// The worker whose trainer runs `job`.
    pub fn worker_running(&mut self, job: &str) -> Option<String> {
        let pids = crate::processes_mentioning(job);
        self.running(Service::Worker).into_iter().find(|name| {
            let work = self.proc(name).config.worker.work_dir.display().to_string();
            pids.iter().any(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&work))
                    .unwrap_or(false)
            })
        })
    }

    /// Waits until `what` shows in the log of `name`.
    pub async fn wait_log(&self, name: &str, what: &str, timeout: Duration) {
        let log = self.procs[self.index(name)].log.clone();
        crate::wait_for(&format!("{what:?} in {name}'s log"), timeout, || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .ok()?
                    .contains(what)
                    .then_some(())
            }
        })
        .await;
    }

    /// Stops the single nats-server (SIGTERM, so it syncs its store) and
    /// starts it again on the same port and store dir.
    pub async fn restart_nats(&mut self) {
        let nats = self.nats.take().expect("a single nats-server");
        let (port, store) = (nats.port(), nats.store_dir().to_owned());
        let nats = tokio::task::spawn_blocking(move || {
            nats.stop();
            let binary = find_nats_server(&workspace_root()).expect("nats-server >= 2.12");
            NatsServer::start_on_port(&binary, &store, port).expect("nats-server restarts")
        })
        .await
        .expect("nats restart task");
        self.nats = Some(nats);
    }

    /// Stops every service with SIGTERM and waits for them (a clean stop).
    pub async fn stop(mut self) {
        for proc in &self.procs {
            proc.signal(nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for proc in &mut self.procs {
            let left = deadline.saturating_duration_since(Instant::now());
            proc.wait_exit(left.max(Duration::from_millis(1))).await;
        }
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for proc in &self.procs {
                eprintln!(
                    "----- {} ({}) -----\n{}",
                    proc.name,
                    proc.log.display(),
                    proc.log_tail(60)
                );
            }
            if let Some(nats) = &self.nats {
                eprintln!("----- nats-server -----\n{}", nats.log_tail());
            }
            for node in self.cluster.iter().flat_map(|c| &c.nodes) {
                eprintln!("----- nats {} -----\n{}", node.name, node.log_tail(30));
            }
        }
    }
}
