//! When the worker stops: ask the trainer to save the way its backend
//! allows ([`StopRequest`]), wait up to the stop grace for it to exit (or,
//! for save-and-continue, for a newer complete checkpoint), stop the group
//! and store the newest checkpoint, so the attempt that takes the task over
//! continues from it.

use super::supervise::{Run, RunState};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;
use trainyard_backends::StopRequest;
use trainyard_core::process::{ChildGroup, OutputLine};

impl Run<'_> {
    /// Asks the trainer to save as its backend allows, waits up to the
    /// grace, stops the group, and uploads the newest complete checkpoint.
    pub(super) async fn stop(
        &self,
        child: &mut ChildGroup,
        lines: &mut Receiver<OutputLine>,
        lines_open: bool,
        state: &mut RunState,
    ) {
        let job = &self.ctx.meta.job;
        let grace = self.stage.stop_grace.max(Duration::from_millis(100));
        let request = self.backend.stop_request(self.inputs);
        tracing::info!(%job, ?request, "stopping: asking the trainer to save");
        let deadline = Instant::now() + grace;
        self.request_save(child, &request);
        if request != StopRequest::Unsupported {
            let wait = Saving {
                request: &request,
                deadline,
                scan: self.stage.checkpoint_scan.min(grace),
                before: state.uploads.stored_step,
            };
            self.wait_for_save(child, lines, lines_open, state, wait)
                .await;
        }
        let _ = child
            .stop(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(500)),
            )
            .await;
        self.drain(lines, state).await;
        self.keep_latest(&mut state.uploads).await;
        tracing::info!(%job, step = ?state.uploads.stored_step, "trainer stopped; task handed back");
    }

    /// Writes the stop file or signals the group.
    fn request_save(&self, child: &ChildGroup, request: &StopRequest) {
        let job = &self.ctx.meta.job;
        let write = |path: &Path, body: &[u8]| {
            if let Err(e) = write_whole(path, body) {
                tracing::warn!(%job, path = %path.display(), error = %e, "cannot write the stop file");
            }
        };
        match request {
            StopRequest::SaveAndExit { path, body } => write(path, body),
            StopRequest::SaveAndContinue { path, body } => write(path, body),
            StopRequest::Signal(signal) => match nix::sys::signal::Signal::try_from(*signal) {
                Ok(signal) => child.signal(signal),
                Err(_) => tracing::warn!(%job, signal, "backend asked for an unknown signal"),
            },
            StopRequest::Unsupported => {}
        }
    }

    /// Waits for the trainer to exit (or, for save-and-continue, for a
    /// newer complete checkpoint), reading its output meanwhile.
    async fn wait_for_save(
        &self,
        child: &mut ChildGroup,
        lines: &mut Receiver<OutputLine>,
        mut lines_open: bool,
        state: &mut RunState,
        wait: Saving<'_>,
    ) {
        let mut scan = tokio::time::interval(wait.scan);
        let continues = matches!(wait.request, StopRequest::SaveAndContinue { .. });
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wait.deadline) => break,
                line = lines.recv(), if lines_open => match line {
                    Some(line) => { let _ = self.on_line(line, state).await; }
                    None => lines_open = false,
                },
                _ = scan.tick(), if continues => {
                    let newer = self
                        .backend
                        .latest_checkpoint(self.inputs)
                        .is_some_and(|c| wait.before.is_none_or(|b| c.step > b));
                    if newer {
                        break;
                    }
                }
                _ = child.wait() => break,
            }
        }
    }
}

/// What waiting for a requested save needs to know.
struct Saving<'a> {
    request: &'a StopRequest,
    deadline: Instant,
    /// How often to look for a newer checkpoint (save-and-continue).
    scan: Duration,
    /// The newest checkpoint stored before the request.
    before: Option<u32>,
}

/// Writes `body` to `path` in one step (a temporary file beside it, then a
/// rename), so a trainer polling the file never reads it empty or half
/// written: SimpleTuner reads its signal file when the modification time
/// changes and acts on what it read then.
fn write_whole(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::write_whole;

    #[test]
    fn the_stop_file_is_replaced_whole_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signal.json");
        std::fs::write(&path, br#"{"manual_checkpoint": 1}"#).unwrap();
        write_whole(&path, br#"{"manual_checkpoint": 2}"#).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            br#"{"manual_checkpoint": 2}"#
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["signal.json"]);
    }
}
