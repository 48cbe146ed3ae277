//! What a smoke run of one backend came to, and the table of them all. The
//! verdict is a pure function of what was observed, so its rules are
//! tested without a fleet.

use std::fmt::Write;
use std::time::Duration;
use trainyard_proto::v1::{ErrorKind, JobError, JobState};

/// The result of one backend.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass,
    Fail { kind: String, message: String },
    Skipped { reason: String },
}

impl Verdict {
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail { .. } => "FAIL",
            Verdict::Skipped { .. } => "SKIPPED",
        }
    }
}

/// What the run of a job showed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The final state, or `None` when the job had none within the timeout.
    pub state: Option<JobState>,
    /// The highest training step reported.
    pub steps_done: u32,
    /// The step of the newest checkpoint stored during the run.
    pub checkpoint: Option<u32>,
    /// The final adapter's file name, when it was delivered to the destination.
    pub adapter: Option<String>,
    pub error: Option<JobError>,
    /// How the timeout was reached (the last stage and step), when it was.
    pub timed_out: Option<String>,
    /// Services of the fleet that exited while the job ran.
    pub exited: Vec<String>,
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub backend: &'static str,
    pub preset: String,
    pub steps: u32,
    pub observed: Observed,
    pub wall: Option<Duration>,
    pub verdict: Verdict,
}

/// An error kind as a word: `ERROR_KIND_TRAINER` → `trainer`.
pub fn kind_name(kind: ErrorKind) -> String {
    kind.as_str_name()
        .trim_start_matches("ERROR_KIND_")
        .to_lowercase()
}

/// PASS when the job succeeded after every step, a checkpoint was stored
/// on the way and the final adapter was delivered; otherwise why not.
pub fn verdict(o: &Observed, steps: u32, save_every: u32) -> Verdict {
    let fail = |kind: &str, message: String| Verdict::Fail {
        kind: kind.into(),
        message,
    };
    let exited = if o.exited.is_empty() {
        String::new()
    } else {
        format!(" ({})", o.exited.join(", "))
    };
    if let Some(how) = &o.timed_out {
        return fail("timeout", format!("no final state in time: {how}{exited}"));
    }
    match o.state {
        Some(JobState::Succeeded) => {}
        state => {
            return match &o.error {
                Some(e) => fail(&kind_name(e.kind()), format!("{}{exited}", e.message)),
                None => fail(
                    "state",
                    format!(
                        "the job ended {}{exited}",
                        state.map_or("without a state", |s| s.as_str_name())
                    ),
                ),
            };
        }
    }
    if o.steps_done < steps {
        return fail(
            "check",
            format!("succeeded after {} of {steps} steps", o.steps_done),
        );
    }
    if o.checkpoint.is_none() {
        return fail(
            "check",
            format!(
                "no checkpoint was stored during the run (one was due every {save_every} steps)"
            ),
        );
    }
    if o.adapter.is_none() {
        return fail(
            "check",
            "succeeded but no final adapter reached the destination".into(),
        );
    }
    Verdict::Pass
}

/// The table, then one line per row that did not pass saying why.
pub fn table(rows: &[Row]) -> String {
    let dash = || "-".to_string();
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let skipped = matches!(r.verdict, Verdict::Skipped { .. });
            [
                r.backend.to_string(),
                r.preset.clone(),
                r.verdict.word().to_string(),
                if skipped {
                    dash()
                } else {
                    format!("{}/{}", r.observed.steps_done, r.steps)
                },
                r.wall
                    .map_or_else(dash, |w| format!("{:.1}s", w.as_secs_f64())),
                r.observed
                    .checkpoint
                    .map_or_else(dash, |s| format!("step {s}")),
                r.observed.adapter.clone().unwrap_or_else(dash),
            ]
        })
        .collect();
    let header = [
        "backend",
        "preset",
        "result",
        "steps",
        "wall",
        "checkpoint",
        "adapter",
    ];
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |fields: &[&str]| {
        let text: Vec<String> = fields
            .iter()
            .zip(&widths)
            .map(|(f, w)| format!("{f:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&header);
    for c in &cells {
        line(&c.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let notes: Vec<String> = rows
        .iter()
        .filter_map(|r| match &r.verdict {
            Verdict::Pass => None,
            Verdict::Fail { kind, message } => {
                Some(format!("{} FAIL [{kind}]: {message}", r.backend))
            }
            Verdict::Skipped { reason } => Some(format!("{} SKIPPED: {reason}", r.backend)),
        })
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        for note in notes {
            let _ = writeln!(out, "{note}");
        }
    }
    out
}

/// The process's exit code: 0 when at least one backend ran and every one
/// that ran passed; 1 when one failed or none ran.
pub fn exit_code(rows: &[Row]) -> u8 {
    let ran = rows
        .iter()
        .filter(|r| !matches!(r.verdict, Verdict::Skipped { .. }));
    let mut any = false;
    for row in ran {
        any = true;
        if row.verdict != Verdict::Pass {
            return 1;
        }
    }
    if any { 0 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed() -> Observed {
        Observed {
            state: Some(JobState::Succeeded),
            steps_done: 4,
            checkpoint: Some(2),
            adapter: Some("lora.safetensors".into()),
            ..Default::default()
        }
    }

    fn kind_of(v: Verdict) -> String {
        match v {
            Verdict::Fail { kind, .. } => kind,
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[test]
    fn a_pass_needs_every_step_a_checkpoint_and_the_adapter() {
        assert_eq!(verdict(&passed(), 4, 2), Verdict::Pass);
        let short = Observed {
            steps_done: 3,
            ..passed()
        };
        assert_eq!(kind_of(verdict(&short, 4, 2)), "check");
        let no_checkpoint = Observed {
            checkpoint: None,
            ..passed()
        };
        assert_eq!(kind_of(verdict(&no_checkpoint, 4, 2)), "check");
        let no_adapter = Observed {
            adapter: None,
            ..passed()
        };
        assert_eq!(kind_of(verdict(&no_adapter, 4, 2)), "check");
    }

    #[test]
    fn a_failed_job_shows_its_error_kind_and_message() {
        let failed = Observed {
            state: Some(JobState::Failed),
            error: Some(JobError {
                kind: ErrorKind::Oom as i32,
                message: "cuda out of memory".into(),
                ..Default::default()
            }),
            exited: vec!["ty-worker exited (signal: 9)".into()],
            ..Default::default()
        };
        assert_eq!(
            verdict(&failed, 4, 2),
            Verdict::Fail {
                kind: "oom".into(),
                message: "cuda out of memory (ty-worker exited (signal: 9))".into(),
            }
        );
        let late = Observed {
            timed_out: Some("train step 1".into()),
            ..Default::default()
        };
        assert_eq!(kind_of(verdict(&late, 4, 2)), "timeout");
    }

    #[test]
    fn skipped_backends_do_not_fail_the_run_but_an_empty_run_does() {
        let row = |verdict: Verdict| Row {
            backend: "kohya",
            preset: "sdxl-base-1.0".into(),
            steps: 4,
            observed: Observed::default(),
            wall: None,
            verdict,
        };
        let skipped = row(Verdict::Skipped {
            reason: "set worker.trainers.kohya_dir".into(),
        });
        assert_eq!(exit_code(&[row(Verdict::Pass), skipped.clone()]), 0);
        assert_eq!(exit_code(std::slice::from_ref(&skipped)), 1);
        let failed = row(Verdict::Fail {
            kind: "trainer".into(),
            message: "exit 1".into(),
        });
        assert_eq!(exit_code(&[row(Verdict::Pass), failed]), 1);
        let text = table(&[row(Verdict::Pass), skipped]);
        assert!(
            text.lines().nth(2).unwrap().starts_with("kohya   "),
            "{text}"
        );
        assert!(
            text.contains("kohya SKIPPED: set worker.trainers.kohya_dir"),
            "{text}"
        );
    }
}
