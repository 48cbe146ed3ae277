//! The files of a fleet whose bus has identities (`yard fleet init`): an
//! nkey per service role, a CA and the server's certificate, a `nats.conf`
//! with TLS, JetStream and one user per role (permissions from
//! [`crate::topology::permissions`]), and each role's `[nats]` settings.
//!
//! | file | what |
//! |---|---|
//! | `<role>.nk` (0600) | the role's nkey seed; give it to that role's services only |
//! | `<role>.toml` | the role's `[nats]` keys, to paste into (or load beside) its config |
//! | `ca.pem` | the CA every service checks the server against |
//! | `ca-key.pem` (0600) | the CA's key: keep it offline; only `fleet init` needs it |
//! | `server.pem`, `server-key.pem` (0600) | the server's certificate and key |
//! | `auth.conf` | the `authorization` block: one nkey user per role |
//! | `nats.conf` | a ready server config: listen, TLS, JetStream, `include auth.conf` |
//! | `secrets.key` (0600) | the fleet key that seals jobs' secrets (`[secrets] key_file`); for the coordinator, captioner, workers and uploader, never the client role |
//! | `coordinator.pem`, `coordinator-key.pem` (0600) | the coordinator's gRPC TLS certificate and key, signed by the same CA (clients: `yard --ca ca.pem`) |

use crate::topology::permissions::{self, Role};
use std::path::{Path, PathBuf};

/// What to generate.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// Worker pools; each gets its own identity.
    pub pools: Vec<String>,
    /// Names and addresses the server's certificate is valid for (besides
    /// `localhost` and `127.0.0.1`).
    pub hosts: Vec<String>,
    /// The server's client listen address.
    pub listen: String,
    /// The URL services connect to.
    pub url: String,
    /// JetStream's store directory, as the server sees it.
    pub store_dir: String,
    /// Where the services and the server will find these files (a mount
    /// point); the written directory itself when unset.
    pub mounted_at: Option<PathBuf>,
}

impl Default for FleetSpec {
    fn default() -> Self {
        Self {
            pools: vec!["default".into()],
            hosts: Vec::new(),
            listen: "0.0.0.0:4222".into(),
            url: "tls://127.0.0.1:4222".into(),
            store_dir: "/data".into(),
            mounted_at: None,
        }
    }
}

/// Why the files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FleetInitError {
    #[error("{0} exists already: fleet init never overwrites keys (use a new folder)")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid pool name {0:?}: only ascii letters, digits, '-' and '_'")]
    Pool(String),
    #[error("cannot generate a key: {0}")]
    Key(String),
    #[error("cannot make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

/// What was written.
#[derive(Clone, Debug)]
pub struct FleetFiles {
    /// The folder written.
    pub dir: PathBuf,
    /// Every role, with its seed file and `[nats]` snippet.
    pub roles: Vec<Role>,
}

impl FleetFiles {
    pub fn nats_conf(&self) -> PathBuf {
        self.dir.join("nats.conf")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn seed_file(&self, role: &Role) -> PathBuf {
        self.dir.join(format!("{}.nk", role.name()))
    }

    pub fn snippet(&self, role: &Role) -> PathBuf {
        self.dir.join(format!("{}.toml", role.name()))
    }

    /// The fleet key that seals jobs' secrets.
    pub fn secrets_key(&self) -> PathBuf {
        self.dir.join("secrets.key")
    }

    /// The coordinator's gRPC certificate and key (signed by [`Self::ca`]).
    pub fn grpc_cert(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("coordinator.pem"),
            self.dir.join("coordinator-key.pem"),
        )
    }

    /// Sets `nats` to connect as `role` with these files (for tests and
    /// dev fleets that load no snippet).
    pub fn apply(&self, role: &Role, nats: &mut crate::config::NatsConfig) {
        nats.nkey_seed_file = Some(self.seed_file(role));
        nats.tls_ca_file = Some(self.ca());
        nats.insecure_dev = false;
    }
}

/// The roles of a fleet with these worker pools.
pub fn roles(pools: &[String]) -> Vec<Role> {
    let mut roles = vec![
        Role::Coordinator,
        Role::Captioner,
        Role::Uploader,
        Role::Client,
        Role::Autoscaler,
    ];
    roles.extend(pools.iter().map(|pool| Role::Worker { pool: pool.clone() }));
    roles
}

/// Writes a fleet's keys, certificates and configs into `dir` (created if
/// missing; refused if it already holds a `nats.conf` or a seed).
pub fn init(dir: &Path, spec: &FleetSpec) -> Result<FleetFiles, FleetInitError> {
    for pool in &spec.pools {
        if pool.is_empty()
            || !pool
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(FleetInitError::Pool(pool.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let roles = roles(&spec.pools);
    let files = FleetFiles {
        dir: dir.to_owned(),
        roles: roles.clone(),
    };
    for path in [
        files.nats_conf(),
        files.dir.join("ca-key.pem"),
        files.secrets_key(),
    ]
    .into_iter()
    .chain(roles.iter().map(|r| files.seed_file(r)))
    {
        if path.exists() {
            return Err(FleetInitError::Exists(path));
        }
    }
    let at = spec
        .mounted_at
        .clone()
        .unwrap_or_else(|| std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned()));

    let mut users = Vec::new();
    for role in &roles {
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().map_err(|e| FleetInitError::Key(e.to_string()))?;
        write(&files.seed_file(role), &format!("{seed}\n"), true)?;
        users.push((role.clone(), key.public_key()));
        let snippet = format!(
            "# The [nats] keys of the {name} role (written by yard fleet init).\n\
             [nats]\n\
             url = {url:?}\n\
             nkey_seed_file = {seed:?}\n\
             tls_ca_file = {ca:?}\n",
            name = role.name(),
            url = spec.url,
            seed = at.join(format!("{}.nk", role.name())).display().to_string(),
            ca = at.join("ca.pem").display().to_string(),
        );
        let secrets_key = at.join("secrets.key").display().to_string();
        let snippet = match role {
            Role::Client | Role::Autoscaler => snippet,
            _ => format!("{snippet}\n[secrets]\nkey_file = {secrets_key:?}\n"),
        };
        let snippet = match role {
            Role::Worker { pool } => format!("{snippet}\n[worker]\npool = {pool:?}\n"),
            Role::Coordinator => format!(
                "{snippet}\n[coordinator]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n\
                 # tokens = {{ \"sha256:…\" = \"<tenant>\" }}   # lines printed by `yard token new --tenant <tenant>`\n",
                cert = at.join("coordinator.pem").display().to_string(),
                key = at.join("coordinator-key.pem").display().to_string(),
            ),
            _ => snippet,
        };
        write(&files.snippet(role), &snippet, false)?;
    }

    let certs = certificates(&spec.hosts)?;
    write(&files.ca(), &certs.ca, false)?;
    write(&dir.join("ca-key.pem"), &certs.ca_key, true)?;
    write(&dir.join("server.pem"), &certs.nats.0, false)?;
    write(&dir.join("server-key.pem"), &certs.nats.1, true)?;
    let (grpc_cert, grpc_key) = files.grpc_cert();
    write(&grpc_cert, &certs.grpc.0, false)?;
    write(&grpc_key, &certs.grpc.1, true)?;
    crate::secrets::write_key_file(&files.secrets_key(), false)
        .map_err(write_err(&files.secrets_key()))?;
    write(
        &dir.join("auth.conf"),
        &format!(
            "# One nkey user per Trainyard role (written by yard fleet init; the\n\
             # permissions come from core/src/topology/permissions.rs).\n{}",
            permissions::authorization_block(&users)
        ),
        false,
    )?;
    write(&files.nats_conf(), &nats_conf(spec, &at), false)?;
    Ok(files)
}

/// The server config: TLS required, JetStream, the users.
fn nats_conf(spec: &FleetSpec, at: &Path) -> String {
    let path = |name: &str| at.join(name).display().to_string();
    format!(
        "# NATS server for a Trainyard fleet with identities (written by yard fleet init).\n\
         # Every client must present TLS and one of the role nkeys in auth.conf.\n\
         # Needs nats-server 2.12 or newer.\n\
         listen: {listen:?}\n\
         # Monitoring is off; to turn it on, bind it to a private address:\n\
         # http: \"127.0.0.1:8222\"\n\
         tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  timeout: 5\n}}\n\
         jetstream {{\n  store_dir: {store:?}\n}}\n\
         include ./auth.conf\n",
        listen = spec.listen,
        cert = path("server.pem"),
        key = path("server-key.pem"),
        store = spec.store_dir,
    )
}

/// The PEM texts of a fleet's certificates: the CA, and a certificate
/// with its key for NATS and for the coordinator's gRPC, each signed by it.
struct Certificates {
    ca: String,
    ca_key: String,
    nats: (String, String),
    grpc: (String, String),
}

/// A CA and the two server certificates it signs, valid for `localhost`,
/// `127.0.0.1` and `hosts`.
fn certificates(hosts: &[String]) -> Result<Certificates, FleetInitError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Trainyard fleet CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(hosts.iter().cloned());
    let server = |common_name: &str| -> Result<(String, String), FleetInitError> {
        let mut params = CertificateParams::new(names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    Ok(Certificates {
        nats: server("Trainyard NATS")?,
        grpc: server("Trainyard coordinator")?,
        ca: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
    })
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), FleetInitError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(write_err(path))?;
    file.write_all(text.as_bytes()).map_err(write_err(path))
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> FleetInitError + '_ {
    move |source| FleetInitError::Write {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_private_seeds_and_a_conf_naming_every_role() {
        let dir = tempfile::tempdir().unwrap();
        let spec = FleetSpec {
            pools: vec!["a100".into(), "h100".into()],
            ..Default::default()
        };
        let files = init(dir.path(), &spec).unwrap();
        let worker = Role::Worker {
            pool: "h100".into(),
        };
        let seed = files.seed_file(&worker);
        let mode = std::fs::metadata(&seed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let seed_text = std::fs::read_to_string(&seed).unwrap();
        let public = nkeys::KeyPair::from_seed(seed_text.trim())
            .unwrap()
            .public_key();
        let auth = std::fs::read_to_string(dir.path().join("auth.conf")).unwrap();
        assert!(auth.contains(&public));
        // Coordinator, captioner, uploader, client, autoscaler, two pools.
        assert_eq!(auth.matches("nkey:").count(), 7);
        let autoscaler =
            std::fs::read_to_string(files.snippet(&Role::Autoscaler)).expect("autoscaler.toml");
        assert!(autoscaler.contains("autoscaler.nk") && !autoscaler.contains("secrets.key"));
        let snippet = std::fs::read_to_string(files.snippet(&worker)).unwrap();
        let config: crate::Config = toml::from_str(&snippet).unwrap();
        assert_eq!(config.nats.nkey_seed_file.as_deref(), Some(seed.as_path()));
        assert_eq!(config.worker.pool, "h100");
        // The secrets key and the coordinator's certificate, private keys 0600.
        let keyring = crate::secrets::Keyring::load(&files.secrets_key()).unwrap();
        assert!(!keyring.current_key_id().is_empty());
        let (_, grpc_key) = files.grpc_cert();
        for private in [files.secrets_key(), grpc_key] {
            let mode = std::fs::metadata(&private).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", private.display());
        }
        let coordinator: crate::Config =
            toml::from_str(&std::fs::read_to_string(files.snippet(&Role::Coordinator)).unwrap())
                .unwrap();
        assert_eq!(
            coordinator.coordinator.tls_cert_file.as_deref(),
            Some(files.grpc_cert().0.as_path())
        );
        assert_eq!(
            coordinator.secrets.key_file.as_deref(),
            Some(files.secrets_key().as_path())
        );
        let client: crate::Config =
            toml::from_str(&std::fs::read_to_string(files.snippet(&Role::Client)).unwrap())
                .unwrap();
        assert!(
            client.secrets.key_file.is_none(),
            "the client role never gets the key"
        );
        // Never overwritten.
        assert!(matches!(
            init(dir.path(), &spec),
            Err(FleetInitError::Exists(_))
        ));
    }
}
