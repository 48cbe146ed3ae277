//! The `[secrets]` section: the fleet key that seals jobs' secrets.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the fleet's secrets key file is (`yard secrets keygen` makes
/// one). The coordinator seals each job's `Secrets` with its first key;
/// the captioner, worker and uploader open them with any of its keys. A
/// fleet without one refuses jobs that carry secrets; every other job runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// The key file: one key a line (`<key id> <64 hex>`), the first seals,
    /// the later ones (older keys, kept through a rotation) only open.
    /// Readable by the service roles that need secrets only (mode 0600).
    pub key_file: Option<PathBuf>,
}
