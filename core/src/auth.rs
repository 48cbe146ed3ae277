//! Client bearer tokens as the fleet keeps them: never the token itself,
//! only its SHA-256 (`sha256:<hex>` keys of `[coordinator.tokens]`), so a
//! leaked config file or `--print-config` gives no one a working token.
//! New tokens are 32 random bytes; `yard token new` prints one with its
//! config line, and `yard dev` keeps its own in a 0600 file.

use sha2::{Digest, Sha256};
use std::path::Path;

/// The prefix of a token's key in `[coordinator.tokens]`.
pub const TOKEN_KEY_PREFIX: &str = "sha256:";
/// The prefix of every token this fleet makes (for secret scanners).
pub const TOKEN_PREFIX: &str = "ty_";

/// The `[coordinator.tokens]` key of `token`: `sha256:<64 hex>`.
pub fn token_key(token: &str) -> String {
    format!(
        "{TOKEN_KEY_PREFIX}{}",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

/// The digest a `sha256:<hex>` key names (either case of hex), or `None`
/// when `key` is not one (a plain token, a short digest).
pub fn parse_token_key(key: &str) -> Option<[u8; 32]> {
    let digest = key.strip_prefix(TOKEN_KEY_PREFIX)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(digest, &mut out).ok()?;
    Some(out)
}

/// The SHA-256 of a presented token, to compare with [`parse_token_key`]'s.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random token: `ty_` and 32 random bytes in hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// The token kept in `path`, made (random, the file 0600) when missing:
/// how a local fleet and its clients share one token without a default.
pub fn token_file(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let token = new_token();
    write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Writes `bytes` to a new file at `path` readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_tokens_digest() {
        let key = token_key("ty_abc");
        assert!(key.starts_with("sha256:") && key.len() == 7 + 64);
        assert_eq!(parse_token_key(&key), Some(token_digest("ty_abc")));
        assert_eq!(
            parse_token_key(&key.to_uppercase().replace("SHA256:", "sha256:")),
            Some(token_digest("ty_abc"))
        );
        assert_eq!(parse_token_key("ty_abc"), None);
        assert_eq!(parse_token_key("sha256:abcd"), None);
        assert_ne!(new_token(), new_token());
        assert!(new_token().starts_with(TOKEN_PREFIX));
    }

    #[test]
    fn the_token_file_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dev-token");
        let first = token_file(&path).unwrap();
        assert_eq!(token_file(&path).unwrap(), first);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
