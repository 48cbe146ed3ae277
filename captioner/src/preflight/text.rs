//! Checks of a prepared language-model dataset: every row of
//! `train.jsonl` in a format the job's method takes, all rows in one format
//! (`trainyard_backends::trl::check_jsonl`), and the step estimate in
//! examples.

use super::{Report, check, effective_batch, estimate};
use crate::prepare::PreparedDataset;
use crate::text::TRAIN_JSONL;
use trainyard_backends::trl::{Method, check_jsonl};
use trainyard_proto::v1::{ErrorKind, JobSpec};

/// Every check of a prepared text dataset, and the step estimate.
pub async fn check(spec: &JobSpec, dataset: &PreparedDataset) -> Report {
    let mut report = Report::default();
    let t = spec.training.clone().unwrap_or_default();
    let Some(method) = Method::parse(&t.method) else {
        report.problem(
            "training.method",
            ErrorKind::InvalidSpec,
            format!("unknown method {:?}; use sft, dpo or orpo", t.method),
        );
        return report;
    };
    let path = dataset.dir.join(TRAIN_JSONL);
    let shown = path.display().to_string();
    let checked = crate::error::blocking(move || check_jsonl(&path, method)).await;
    match checked {
        Err(_) => report.unchecked(check::JSONL, "the service is stopping"),
        Ok(Err(problems)) => {
            for problem in problems {
                // Name the file as the user knows it, not by its local path.
                let problem = problem.replace(&shown, TRAIN_JSONL);
                report.problem(
                    check::JSONL,
                    ErrorKind::BadDataset,
                    format!("{TRAIN_JSONL} for {}: {problem}", method.name()),
                );
            }
        }
        Ok(Ok(stats)) => {
            let e = estimate(
                stats.rows.min(u32::MAX as usize) as u32,
                "examples",
                t.steps,
                1,
                effective_batch(&t),
            );
            if e.epochs < 1.0 {
                report.warnings.push(format!(
                    "training.steps {} is less than one epoch ({} steps): some examples are never trained on",
                    e.total_steps, e.steps_per_epoch
                ));
            }
            report.estimate = Some(e);
        }
    }
    report
}
