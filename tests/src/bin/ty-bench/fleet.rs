//! The bench's fleet: nats-server and the four service binaries built beside
//! `ty-bench`, each its own process, on a private store and gRPC port in a
//! temp dir. Every mode of the bench starts its fleet here.

use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use trainyard_core::store::ArtifactStore;
use trainyard_core::topology::permissions::Role;
use trainyard_natsd::{NatsServer, find_nats_server};
use trainyard_tests::Bearer;

/// The service binaries, in start order.
pub const SERVICES: [&str; 4] = ["ty-coordinator", "ty-captioner", "ty-worker", "ty-uploader"];

/// The token the fleet's coordinator accepts (set by every fleet, by its
/// hash: there is no default token).
pub const TOKEN: &str = "ty_bench";
/// The tenant of [`TOKEN`].
pub const TENANT: &str = "bench";

/// The store key of the bench tenant's upload `name`.
pub fn upload_key(name: &str) -> String {
    trainyard_tests::upload_key(TENANT, name)
}

/// A service process; killed when dropped.
pub struct Service(pub Child, pub &'static str);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How to start the fleet beyond its own settings.
#[derive(Default)]
pub struct FleetOptions {
    /// Added to every service's environment, after the fleet's own
    /// variables (so they win over them).
    pub env: Vec<(String, String)>,
    /// Appended to every service's command line (`--set section.key=value`).
    pub args: Vec<String>,
    /// Each service's output goes to `<dir>/logs/<service>.log` instead of
    /// this process's stdout and stderr.
    pub log_files: bool,
    /// The bus with identities and TLS, as `yard fleet init` sets it up:
    /// each service connects as its own role.
    pub secured: bool,
}

/// The bus role a service binary connects as.
fn role_of(service: &str) -> Role {
    match service {
        "ty-coordinator" => Role::Coordinator,
        "ty-captioner" => Role::Captioner,
        "ty-uploader" => Role::Uploader,
        _ => Role::Worker {
            pool: "default".into(),
        },
    }
}

/// A fleet of separate processes: nats-server and the four services.
/// Fields drop in order: the services, then NATS, then the folder.
pub struct Fleet {
    pub services: Vec<Service>,
    pub nats: NatsServer,
    pub channel: tonic::transport::Channel,
    pub store: ArtifactStore,
    /// Kept for the fleet's life: nats, the store, work folders and logs live in it.
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The folder `ty-bench` runs from, where the service binaries are built.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .expect("bin dir")
        .to_owned())
}

impl Fleet {
    /// Starts the fleet with `env` added to every service's environment and
    /// waits until it takes jobs.
    pub async fn start(env: &[(&str, String)]) -> anyhow::Result<Fleet> {
        Fleet::start_with(FleetOptions {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..Default::default()
        })
        .await
    }

    /// Starts the fleet as `options` say and waits until it takes jobs;
    /// the bundled sample dataset is in its store under the bench tenant's
    /// `uploads/sample`.
    pub async fn start_with(options: FleetOptions) -> anyhow::Result<Fleet> {
        let bin_dir = bin_dir()?;
        for name in SERVICES {
            anyhow::ensure!(
                bin_dir.join(name).is_file(),
                "{name} not found beside ty-bench in {}: build every binary first \
                 (`cargo build --release --bins`)",
                bin_dir.display()
            );
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("root")
            .to_owned();
        let dir = tempfile::Builder::new().prefix("ty-bench-").tempdir()?;
        let nats_dir = dir.path().join("nats");
        let secured = if options.secured {
            let spec = trainyard_core::fleet::FleetSpec {
                store_dir: nats_dir.join("jetstream").display().to_string(),
                ..Default::default()
            };
            Some(trainyard_core::fleet::init(
                &dir.path().join("fleet"),
                &spec,
            )?)
        } else {
            None
        };
        let binary = find_nats_server(&root)?;
        let nats = match &secured {
            Some(files) => NatsServer::start_with_config(&binary, &nats_dir, &files.nats_conf())?,
            None => NatsServer::start(&binary, &nats_dir)?,
        };
        let url = match secured {
            Some(_) => format!("tls://127.0.0.1:{}", nats.port()),
            None => nats.url(),
        };
        let port = free_port();
        let store_dir = dir.path().join("store");
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let key_file = dir.path().join("secrets.key");
        trainyard_core::secrets::dev_key_file(&key_file)?;
        let mut services = Vec::new();
        for name in SERVICES {
            let mut command = Command::new(bin_dir.join(name));
            command
                .args(&options.args)
                .env("TY_NATS__URL", &url)
                .env("TY_NATS__INSECURE_DEV", (secured.is_none()).to_string())
                .env("TY_STORE__URI", &store_dir)
                .env("TY_COORDINATOR__GRPC_ADDR", format!("127.0.0.1:{port}"))
                .env("TY_CAPTIONER__WORK_DIR", dir.path().join("work/c"))
                .env("TY_WORKER__WORK_DIR", dir.path().join("work/w"))
                .env("TY_WORKER__MODEL_CACHE_DIR", dir.path().join("cache"))
                .env("TY_UPLOADER__WORK_DIR", dir.path().join("work/u"))
                // Jobs deliver into the fleet's own `outputs` folder.
                .env(
                    "TY_UPLOADER__ALLOWED_LOCAL_ROOTS",
                    format!("[{:?}]", dir.path().join("outputs")),
                )
                .env("TY_LOG", "warn")
                .env("TY_SECRETS__KEY_FILE", &key_file)
                .env(
                    "TY_COORDINATOR__TOKENS",
                    format!(
                        "{{ {:?} = \"bench\" }}",
                        trainyard_core::auth::token_key(TOKEN)
                    ),
                )
                .envs(options.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null());
            if let Some(files) = &secured {
                let role = role_of(name);
                command
                    .env("TY_NATS__NKEY_SEED_FILE", files.seed_file(&role))
                    .env("TY_NATS__TLS_CA_FILE", files.ca());
            }
            if options.log_files {
                let out = std::fs::File::create(logs.join(format!("{name}.log")))?;
                command.stderr(out.try_clone()?).stdout(out);
            }
            services.push(Service(command.spawn()?, name));
        }
        let mut admin = trainyard_core::config::NatsConfig {
            url: url.clone(),
            insecure_dev: secured.is_none(),
            ..Default::default()
        };
        if let Some(files) = &secured {
            files.apply(&Role::Coordinator, &mut admin);
        }
        let channel = ready(&admin, port, &mut services).await?;
        let store = ArtifactStore::open(store_dir.to_str().expect("utf-8 path"))?;
        let sample = dir.path().join("sample");
        trainyard_captioner::sample::write_sample_dataset(&sample)?;
        store.put_dir(&sample, &upload_key("sample"), &[]).await?;
        Ok(Fleet {
            services,
            nats,
            channel,
            store,
            dir,
        })
    }

    /// The fleet's own folder (store, work folders, `logs/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the fleet and keeps its folder; returns where it is.
    pub fn stop_and_keep(self) -> PathBuf {
        let Fleet {
            services,
            nats,
            dir,
            ..
        } = self;
        drop(services);
        drop(nats);
        dir.keep()
    }

    /// The services that have exited, with how.
    pub fn exited(&mut self) -> Vec<String> {
        self.services
            .iter_mut()
            .filter_map(|s| match s.0.try_wait() {
                Ok(Some(status)) => Some(format!("{} exited ({status})", s.1)),
                _ => None,
            })
            .collect()
    }

    pub fn client(
        &self,
    ) -> trainyard_proto::v1::job_service_client::JobServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
    > {
        trainyard_proto::v1::job_service_client::JobServiceClient::with_interceptor(
            self.channel.clone(),
            Bearer(TOKEN.into()),
        )
    }
}

/// Waits until gRPC answers and every stage consumer exists; fails at once
/// when a service exits first (a bad config, a port taken).
async fn ready(
    nats: &trainyard_core::config::NatsConfig,
    port: u16,
    services: &mut [Service],
) -> anyhow::Result<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let check_alive = |services: &mut [Service]| -> anyhow::Result<()> {
        for s in services.iter_mut() {
            if let Some(status) = s.0.try_wait()? {
                anyhow::bail!("{} exited while the fleet started ({status})", s.1);
            }
        }
        Ok(())
    };
    let channel = loop {
        match tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("coordinator never answered: {e}")
            }
            Err(_) => {
                check_alive(services)?;
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    };
    let client = trainyard_core::nats::options(nats, &Role::Coordinator)?
        .connect(nats.url.as_str())
        .await?;
    let js = async_nats::jetstream::new(client);
    loop {
        if let Ok(stream) = js.get_stream(trainyard_core::topology::TASKS_STREAM).await {
            let names: Vec<String> = stream
                .consumer_names()
                .filter_map(|n| async { n.ok() })
                .collect()
                .await;
            if names.len() >= 3 {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "stage consumers never appeared");
        check_alive(services)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(channel)
}
