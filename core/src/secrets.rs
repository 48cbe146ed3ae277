//! Jobs' secrets (`JobSpec.secrets`: a Hub token, cloud keys) never travel
//! or rest in clear: the coordinator seals them at submit with
//! XChaCha20-Poly1305 under the fleet's key ([`Keyring`], `[secrets]
//! key_file`) into `JobSpec.sealed_secrets`, and the roles that use them
//! (captioner, worker, uploader) open them in memory when a task arrives
//! ([`open_spec`]). The associated data is the tenant and the job, so a
//! sealed blob copied into another job opens for no one. Each sealed blob
//! names its key, so a rotated key file (new key first, old ones after)
//! still opens what the old key sealed.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use prost::Message;
use sha2::{Digest, Sha256};
use std::path::Path;
use trainyard_proto::v1::{JobSpec, SealedSecrets, Secrets};

/// Why secrets could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("the job's secrets are sealed and this service has no secrets key (secrets.key_file)")]
    NoKey,
    #[error("the job's secrets are sealed with key {0:?}, which the key file does not hold")]
    UnknownKey(String),
    #[error("the job's secrets do not open: tampered with, or sealed for another job")]
    Tampered,
    #[error("the secrets key file {path}: {problem}")]
    KeyFile { path: String, problem: String },
}

/// The fleet's secrets keys: the first seals, every one opens.
pub struct Keyring {
    keys: Vec<(String, Key)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

/// What the associated data of a seal starts with (a version, for a
/// later change of scheme).
const AAD_PREFIX: &str = "trainyard.secrets.v1";

fn aad(tenant: &str, job: &str) -> Vec<u8> {
    format!("{AAD_PREFIX}\n{tenant}\n{job}").into_bytes()
}

/// A key's id: derived from the key, so a file needs no bookkeeping.
fn key_id(key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"trainyard.secrets.key-id\n")
        .chain_update(key)
        .finalize();
    format!("k{}", &hex::encode(digest)[..12])
}

fn random<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// One line of a key file for a fresh random key: `<key id> <64 hex>`.
pub fn new_key_line() -> String {
    let key: [u8; 32] = random();
    format!("{} {}", key_id(&key), hex::encode(key))
}

/// Writes a new key file (0600) holding one fresh key; an existing file
/// is an error. With `rotate`, an existing file gets a fresh key put
/// first, its keys kept after it for opening.
pub fn write_key_file(path: &Path, rotate: bool) -> std::io::Result<String> {
    let line = new_key_line();
    let old = if rotate {
        std::fs::read_to_string(path)?
    } else {
        String::new()
    };
    let text = format!(
        "# trainyard secrets keys: the first seals, every one opens\n{line}\n{}",
        old.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    if rotate {
        let next = path.with_extension("new");
        let _ = std::fs::remove_file(&next);
        crate::auth::write_private(&next, text.as_bytes())?;
        std::fs::rename(&next, path)?;
    } else {
        crate::auth::write_private(path, text.as_bytes())?;
    }
    Ok(line.split(' ').next().unwrap_or_default().to_string())
}

/// The key file at `path`, made with one key when missing: the insecure
/// development fallback of `yard dev`, `yard demo` and test fleets.
pub fn dev_key_file(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_key_file(path, false).map(|_| ())
}

impl Keyring {
    /// The keys of `[secrets] key_file`, or `None` when it is unset.
    pub fn from_config(
        config: &crate::config::SecretsConfig,
    ) -> Result<Option<Keyring>, SecretsError> {
        config.key_file.as_deref().map(Keyring::load).transpose()
    }

    pub fn load(path: &Path) -> Result<Keyring, SecretsError> {
        let bad = |problem: String| SecretsError::KeyFile {
            path: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Keyring::parse(&text).map_err(bad)
    }

    /// Parses a key file's text; the message never holds a key.
    pub fn parse(text: &str) -> Result<Keyring, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, hex_key) = line
                .split_once(' ')
                .ok_or_else(|| format!("line {} is not `<key id> <64 hex>`", n + 1))?;
            let mut key = [0u8; 32];
            hex::decode_to_slice(hex_key.trim(), &mut key)
                .map_err(|_| format!("line {}: the key is not 64 hex digits", n + 1))?;
            if key_id(&key) != id {
                return Err(format!("line {}: the key id does not match its key", n + 1));
            }
            keys.push((id.to_string(), Key::from(key)));
        }
        if keys.is_empty() {
            return Err("it holds no key".into());
        }
        Ok(Keyring { keys })
    }

    /// A 32-byte key for `purpose` (signing download links, …), derived
    /// from the sealing key so every coordinator of the fleet agrees on it
    /// and it rotates with it; it reveals nothing of the sealing key.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"trainyard derived key\0");
        hasher.update(self.keys[0].1.as_slice());
        hasher.update(purpose.as_bytes());
        hasher.finalize().into()
    }

    /// The id of the key that seals.
    pub fn current_key_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `secrets` for `tenant`'s `job` (empty for a preflight).
    pub fn seal(&self, secrets: &Secrets, tenant: &str, job: &str) -> SealedSecrets {
        let (id, key) = &self.keys[0];
        let nonce: [u8; 24] = random();
        let plain = secrets.encode_to_vec();
        let ciphertext = XChaCha20Poly1305::new(key)
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad(tenant, job),
                },
            )
            // Encryption fails only for messages of many gigabytes.
            .unwrap_or_default();
        SealedSecrets {
            key_id: id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Opens what [`Keyring::seal`] sealed for the same tenant and job.
    pub fn open(
        &self,
        sealed: &SealedSecrets,
        tenant: &str,
        job: &str,
    ) -> Result<Secrets, SecretsError> {
        let (_, key) = self
            .keys
            .iter()
            .find(|(id, _)| *id == sealed.key_id)
            .ok_or_else(|| SecretsError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.nonce.len() != 24 {
            return Err(SecretsError::Tampered);
        }
        let plain = XChaCha20Poly1305::new(key)
            .decrypt(
                XNonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad(tenant, job),
                },
            )
            .map_err(|_| SecretsError::Tampered)?;
        Secrets::decode(plain.as_slice()).map_err(|_| SecretsError::Tampered)
    }
}

/// Replaces a spec's clear `secrets` with their seal (nothing to do
/// without secrets). `None` keyring: a spec with secrets is an error.
pub fn seal_spec(
    keyring: Option<&Keyring>,
    spec: &mut JobSpec,
    tenant: &str,
    job: &str,
) -> Result<(), SecretsError> {
    let Some(secrets) = spec.secrets.take() else {
        return Ok(());
    };
    if secrets == Secrets::default() {
        return Ok(());
    }
    let keyring = keyring.ok_or(SecretsError::NoKey)?;
    spec.sealed_secrets = Some(keyring.seal(&secrets, tenant, job));
    Ok(())
}

/// Opens a spec's sealed secrets into `secrets`, in memory, for the stage
/// that uses them. A spec without sealed secrets is left as it is.
pub fn open_spec(
    keyring: Option<&Keyring>,
    spec: &mut JobSpec,
    tenant: &str,
    job: &str,
) -> Result<(), SecretsError> {
    let Some(sealed) = spec.sealed_secrets.take() else {
        return Ok(());
    };
    let keyring = keyring.ok_or(SecretsError::NoKey)?;
    spec.secrets = Some(keyring.open(&sealed, tenant, job)?);
    Ok(())
}

/// [`open_spec`] for a stage's task: a service missing the key (or the
/// key that sealed it) retries, so a replica that holds it may take the
/// task; secrets that do not open fail the job.
pub fn open_task(
    keyring: Option<&Keyring>,
    spec: &mut Option<JobSpec>,
    tenant: &str,
    job: &str,
) -> Result<(), crate::runtime::StageError> {
    use crate::runtime::StageError;
    use trainyard_proto::v1::ErrorKind;
    let Some(spec) = spec.as_mut() else {
        return Ok(());
    };
    open_spec(keyring, spec, tenant, job).map_err(|e| match e {
        SecretsError::Tampered => StageError::fail(ErrorKind::InvalidSpec, e.to_string()),
        _ => StageError::retry(
            ErrorKind::Internal,
            e.to_string(),
            std::time::Duration::from_secs(30),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        Secrets {
            hf_token: "hf_sealed-test".into(),
            values: [("AWS_SECRET_ACCESS_KEY".to_string(), "s3-sealed".to_string())].into(),
        }
    }

    #[test]
    fn sealed_secrets_open_only_for_their_job_with_their_key() {
        let ring = Keyring::parse(&new_key_line()).unwrap();
        let sealed = ring.seal(&secrets(), "acme", "j-1");
        let bytes = sealed.encode_to_vec();
        assert!(!String::from_utf8_lossy(&bytes).contains("sealed-test"));
        assert_eq!(ring.open(&sealed, "acme", "j-1").unwrap(), secrets());
        // Copied into another job or tenant: does not open.
        assert!(matches!(
            ring.open(&sealed, "acme", "j-2"),
            Err(SecretsError::Tampered)
        ));
        assert!(matches!(
            ring.open(&sealed, "globex", "j-1"),
            Err(SecretsError::Tampered)
        ));
        // A flipped bit anywhere: does not open.
        let mut tampered = sealed.clone();
        tampered.ciphertext[3] ^= 1;
        assert!(matches!(
            ring.open(&tampered, "acme", "j-1"),
            Err(SecretsError::Tampered)
        ));
        let mut tampered = sealed.clone();
        tampered.nonce[0] ^= 1;
        assert!(matches!(
            ring.open(&tampered, "acme", "j-1"),
            Err(SecretsError::Tampered)
        ));
        // Another fleet's key: unknown by id.
        let other = Keyring::parse(&new_key_line()).unwrap();
        assert!(matches!(
            other.open(&sealed, "acme", "j-1"),
            Err(SecretsError::UnknownKey(_))
        ));
    }

    #[test]
    fn a_rotated_key_file_still_opens_what_the_old_key_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let first = write_key_file(&path, false).unwrap();
        assert!(write_key_file(&path, false).is_err(), "never overwritten");
        let old = Keyring::load(&path).unwrap();
        let sealed = old.seal(&secrets(), "acme", "j-1");
        let second = write_key_file(&path, true).unwrap();
        let rotated = Keyring::load(&path).unwrap();
        assert_eq!(rotated.current_key_id(), second);
        assert_ne!(first, second);
        assert_eq!(rotated.open(&sealed, "acme", "j-1").unwrap(), secrets());
        assert_eq!(rotated.seal(&secrets(), "a", "j").key_id, second);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A bad file names the line, never a key.
        let err = Keyring::parse("kabc 00").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        assert!(Keyring::parse("# nothing\n").is_err());
    }

    #[test]
    fn specs_are_sealed_and_opened_in_place() {
        let ring = Keyring::parse(&new_key_line()).unwrap();
        let mut spec = JobSpec {
            secrets: Some(secrets()),
            ..Default::default()
        };
        seal_spec(Some(&ring), &mut spec, "acme", "j-1").unwrap();
        assert!(spec.secrets.is_none() && spec.sealed_secrets.is_some());
        let mut without_key = spec.clone();
        assert!(matches!(
            open_spec(None, &mut without_key, "acme", "j-1"),
            Err(SecretsError::NoKey)
        ));
        open_spec(Some(&ring), &mut spec, "acme", "j-1").unwrap();
        assert_eq!(spec.secrets, Some(secrets()));
        assert!(spec.sealed_secrets.is_none());
        let mut plain = JobSpec {
            secrets: Some(secrets()),
            ..Default::default()
        };
        assert!(matches!(
            seal_spec(None, &mut plain, "acme", "j-1"),
            Err(SecretsError::NoKey)
        ));
    }
}
