//! The trainer's whole output of one attempt, kept as a log artifact: every
//! line the worker reads from the trainer (stdout and stderr, as the run
//! loop sees them) is appended to a file in the run's folder, stored at the
//! end of the run under `jobs/<job>/logs/train-attempt-<a>-delivery-<d>.log`.
//!
//! The kept text is capped (`[worker] trainer_log_max_bytes`): the file is
//! written in two halves of at most half the cap each, the older half
//! dropped when the newer one fills, so the end of the output is always
//! there; a log that lost its beginning says so in its first line.
//!
//! Writes are buffered appends to a local file, small enough for the run
//! loop; a failed write turns the log off for the run (one warning), never
//! the run itself.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const CURRENT: &str = "trainer.log";
const OLDER: &str = "trainer.log.older";
const KEPT: &str = "trainer.log.kept";

pub struct TrainerLog {
    dir: PathBuf,
    cap: u64,
    file: Option<BufWriter<File>>,
    /// Bytes in the current half.
    current: u64,
    /// Bytes the trainer wrote in all.
    total: u64,
    /// Whether an older half exists.
    rotated: bool,
}

/// The finished log, ready to store.
#[derive(Debug)]
pub struct Finished {
    pub path: PathBuf,
    /// Bytes the trainer wrote.
    pub total: u64,
    /// Whether the beginning was dropped.
    pub truncated: bool,
}

impl TrainerLog {
    /// A log in `dir` keeping at most about `cap` bytes; `None` when `cap`
    /// is 0 (not kept) or the file cannot be created (warned).
    pub fn create(dir: &Path, cap: u64) -> Option<TrainerLog> {
        if cap == 0 {
            return None;
        }
        match File::create(dir.join(CURRENT)) {
            Ok(file) => Some(TrainerLog {
                dir: dir.to_owned(),
                cap,
                file: Some(BufWriter::with_capacity(64 * 1024, file)),
                current: 0,
                total: 0,
                rotated: false,
            }),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot create the trainer log file; the output is not kept");
                None
            }
        }
    }

    /// Appends one line.
    pub fn line(&mut self, line: &str) {
        if self.file.is_none() {
            return;
        }
        let len = line.len() as u64 + 1;
        let half = (self.cap / 2).max(1);
        let mut written = Ok(());
        if self.current > 0 && self.current + len > half {
            written = self.rotate();
        }
        if written.is_ok()
            && let Some(file) = self.file.as_mut()
        {
            written = file
                .write_all(line.as_bytes())
                .and_then(|_| file.write_all(b"\n"));
        }
        match written {
            Ok(()) => {
                self.current += len;
                self.total += len;
            }
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), %error, "cannot write the trainer log file; the rest of the output is not kept");
                self.file = None;
            }
        }
    }

    /// The current half becomes the older one; a new current half starts.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush()?;
        }
        std::fs::rename(self.dir.join(CURRENT), self.dir.join(OLDER))?;
        self.file = Some(BufWriter::with_capacity(
            64 * 1024,
            File::create(self.dir.join(CURRENT))?,
        ));
        self.current = 0;
        self.rotated = true;
        Ok(())
    }

    /// Closes the log and returns the file to store: the current half
    /// alone, or, when the output outgrew the cap, a note and the last
    /// `cap` bytes (from the first whole line). Blocking file work.
    pub fn finish(mut self) -> std::io::Result<Finished> {
        match self.file.take() {
            Some(mut file) => file.flush()?,
            None if self.total == 0 => {
                return Err(std::io::Error::other("the trainer log was not written"));
            }
            None => {}
        }
        let current = self.dir.join(CURRENT);
        if !self.rotated && self.total <= self.cap {
            return Ok(Finished {
                path: current,
                total: self.total,
                truncated: false,
            });
        }
        let mut tail = Vec::new();
        let older = self.dir.join(OLDER);
        let current_len = std::fs::metadata(&current)?.len();
        let from_current = current_len.min(self.cap);
        let from_older = self.cap - from_current;
        if from_older > 0 && self.rotated {
            tail.extend(read_tail(&older, from_older)?);
        }
        tail.extend(read_tail(&current, from_current)?);
        let kept_from = (tail.len() as u64) < self.total;
        // Start at a whole line.
        let start = match (kept_from, tail.iter().position(|b| *b == b'\n')) {
            (true, Some(newline)) if newline + 1 < tail.len() => newline + 1,
            _ => 0,
        };
        let kept = &tail[start..];
        let path = self.dir.join(KEPT);
        let mut out = BufWriter::new(File::create(&path)?);
        writeln!(
            out,
            "[trainyard] the trainer wrote {} bytes; only the last {} are kept (worker.trainer_log_max_bytes = {})",
            self.total,
            kept.len(),
            self.cap
        )?;
        out.write_all(kept)?;
        out.flush()?;
        let _ = std::fs::remove_file(&older);
        Ok(Finished {
            path,
            total: self.total,
            truncated: true,
        })
    }
}

fn read_tail(path: &Path, bytes: u64) -> std::io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
    let mut out = Vec::new();
    file.read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_log_is_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = TrainerLog::create(dir.path(), 1024).unwrap();
        log.line("step 1 loss 0.5");
        log.line("Traceback: boom");
        let done = log.finish().unwrap();
        assert!(!done.truncated);
        assert_eq!(
            std::fs::read_to_string(done.path).unwrap(),
            "step 1 loss 0.5\nTraceback: boom\n"
        );
    }

    #[test]
    fn a_log_over_the_cap_keeps_its_tail_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = TrainerLog::create(dir.path(), 100).unwrap();
        for i in 0..100 {
            log.line(&format!("line {i:03}"));
        }
        let done = log.finish().unwrap();
        assert!(done.truncated);
        assert_eq!(done.total, 900);
        let text = std::fs::read_to_string(done.path).unwrap();
        let mut lines = text.lines();
        let head = lines.next().unwrap();
        assert!(
            head.starts_with("[trainyard] the trainer wrote 900 bytes; only the last"),
            "{head}"
        );
        let rest: Vec<&str> = lines.collect();
        assert_eq!(rest.last(), Some(&"line 099"));
        // Whole lines only, consecutive, at most the cap.
        assert!(rest.len() >= 5 && rest.len() <= 11, "{rest:?}");
        for pair in rest.windows(2) {
            let n = |l: &str| l.trim_start_matches("line ").parse::<u32>().unwrap();
            assert_eq!(n(pair[1]), n(pair[0]) + 1, "{rest:?}");
        }
        assert!(rest.iter().map(|l| l.len() + 1).sum::<usize>() <= 100);
    }

    #[test]
    fn a_zero_cap_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(TrainerLog::create(dir.path(), 0).is_none());
        assert!(TrainerLog::create(&dir.path().join("missing"), 10).is_none());
    }
}
