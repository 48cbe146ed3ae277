//! One worker process per model cache folder: the cache's index and its
//! per-blob download locks live in the process ([`super::cache`]), so two
//! workers writing one folder would race on the same partial downloads.
//! A worker claims the folder it is configured with by an OS file lock on
//! `<dir>/.owner`; when another live worker holds it — several workers on
//! one box, as the `local` autoscaler starts them — it takes the first
//! free sibling `<dir>-2`, `<dir>-3`, …, so each box keeps a few warm
//! caches that later workers reuse rather than one per worker ever started.
//! The kernel drops the lock when the process ends, however it ends: a
//! crashed worker's folder is free for the next one at once.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// How many sibling folders a worker tries before giving up.
pub const MAX_CACHE_FOLDERS: usize = 64;

/// A model cache folder this process holds until it drops.
#[derive(Debug)]
pub struct CacheClaim {
    pub dir: PathBuf,
    _owner: Flock<File>,
}

/// The `k`th candidate for `dir` (1: `dir` itself).
fn candidate(dir: &Path, k: usize) -> PathBuf {
    if k == 1 {
        return dir.to_path_buf();
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "models".into());
    dir.with_file_name(format!("{name}-{k}"))
}

/// Claims `dir`, or the first free sibling of it; an error names the
/// folders tried when all are held.
pub fn claim(dir: &Path) -> std::io::Result<CacheClaim> {
    for k in 1..=MAX_CACHE_FOLDERS {
        let dir = candidate(dir, k);
        std::fs::create_dir_all(&dir)?;
        let owner = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".owner"))?;
        match Flock::lock(owner, FlockArg::LockExclusiveNonblock) {
            Ok(mut owner) => {
                // Who holds it, for an operator looking at the folder.
                owner.set_len(0)?;
                writeln!(owner, "{}", std::process::id())?;
                return Ok(CacheClaim { dir, _owner: owner });
            }
            Err((_, Errno::EWOULDBLOCK)) => continue,
            Err((_, errno)) => return Err(errno.into()),
        }
    }
    Err(std::io::Error::other(format!(
        "the model cache folder {} and its {} siblings ({}-2 …) are all held by running workers",
        dir.display(),
        MAX_CACHE_FOLDERS - 1,
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_folder_sends_the_next_worker_to_a_sibling_until_it_is_free() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("models");
        let first = claim(&dir).expect("first");
        assert_eq!(first.dir, dir);
        let second = claim(&dir).expect("second");
        assert_eq!(second.dir, root.path().join("models-2"));
        let third = claim(&dir).expect("third");
        assert_eq!(third.dir, root.path().join("models-3"));
        drop(first);
        let again = claim(&dir).expect("again");
        assert_eq!(again.dir, dir, "a released folder is taken again first");
        let pid: u32 = std::fs::read_to_string(dir.join(".owner"))
            .expect("owner")
            .trim()
            .parse()
            .expect("pid");
        assert_eq!(pid, std::process::id());
    }
}
