//! Azurite — Microsoft's Azure Storage emulator, from npm — on loopback for
//! the `az://` tests: its blob service on a port it picks itself (read back
//! from its start-up line), in memory, killed when dropped. It checks
//! Shared Key and SAS signatures like Azure does, against its well-known
//! development account.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trainyard_core::store::ArtifactStore;

/// Where `scripts/test` installs Azurite (`npm install --prefix`).
const TOOLS_DIR: &str = ".trainyard/tools";
/// How long Azurite may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Azurite's development account and its published key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The REST version the container request speaks.
const VERSION: &str = "2023-11-03";

pub struct Azurite {
    /// The account's blob endpoint, `http://127.0.0.1:<port>/devstoreaccount1`.
    pub endpoint: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Azurite {
    /// Starts Azurite's blob service (from `.trainyard/tools`, else the
    /// `PATH`) and waits until it accepts connections.
    pub fn start() -> Azurite {
        let installed = crate::workspace_root()
            .join(TOOLS_DIR)
            .join("node_modules/.bin/azurite-blob");
        let program = if installed.exists() {
            installed.into_os_string()
        } else {
            "azurite-blob".into()
        };
        let mut child = Command::new(&program)
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                "0",
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
            ])
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "azurite-blob does not start ({e}); install it with `scripts/test` or \
                     `npm install --prefix {TOOLS_DIR} azurite`"
                )
            });
        let log = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel::<u16>();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let marker = "listens on http://127.0.0.1:";
            crate::drain_for_port(stream, marker, log.clone(), port_tx.clone());
        }
        let mut server = Azurite {
            endpoint: String::new(),
            child,
            log,
        };
        let port = match port_rx.recv_timeout(START_TIMEOUT) {
            Ok(port) => port,
            Err(e) => panic!("azurite did not start ({e}):\n{}", server.log_tail()),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            assert!(
                Instant::now() < deadline,
                "azurite on {addr} never accepted a connection:\n{}",
                server.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server.endpoint = format!("http://{addr}/{ACCOUNT}");
        server
    }

    /// Creates a container (`PUT ?restype=container`, Shared Key signed).
    pub async fn create_container(&self, container: &str) {
        let url = format!("{}/{container}?restype=container", self.endpoint);
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        // Shared Key: the verb, eleven empty standard headers (a zero
        // Content-Length is written empty), the x-ms- headers, the resource.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{VERSION}\n\
             /{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container"
        );
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = b64.decode(ACCOUNT_KEY).expect("account key");
        let signature = b64.encode(crate::webhook::hmac_sha256(&key, to_sign.as_bytes()));
        let response = reqwest::Client::new()
            .put(&url)
            .header("x-ms-date", date)
            .header("x-ms-version", VERSION)
            .header("content-length", "0")
            .header("authorization", format!("SharedKey {ACCOUNT}:{signature}"))
            .send()
            .await
            .expect("create container");
        let status = response.status();
        assert!(
            status.is_success(),
            "create container {container}: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }

    /// A job's own keys for an `az://` destination on this emulator.
    pub fn job_secrets(&self) -> trainyard_proto::v1::Secrets {
        use trainyard_core::destination::secret_keys;
        trainyard_proto::v1::Secrets {
            values: [
                (secret_keys::AZURE_ACCOUNT, ACCOUNT),
                (secret_keys::AZURE_ACCOUNT_KEY, ACCOUNT_KEY),
                (secret_keys::AZURE_ENDPOINT, self.endpoint.as_str()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        }
    }

    /// The container as a store, to read what a delivery wrote.
    pub fn store(&self, container: &str) -> ArtifactStore {
        let builder = object_store::azure::MicrosoftAzureBuilder::new()
            .with_account(ACCOUNT)
            .with_access_key(ACCOUNT_KEY)
            .with_container_name(container)
            .with_endpoint(self.endpoint.clone())
            .with_allow_http(true);
        ArtifactStore::open_azure(builder, "").expect("open azurite container")
    }

    /// The last lines Azurite printed, for failure messages.
    pub fn log_tail(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
