//! What every backend shares: the tqdm progress-bar regex, the number token,
//! and the failure signatures of the Python training stack (the trainers
//! reference, section 0), and [`video`]: the clips of a dataset and the
//! frame counts the video backends train them at.

pub mod video;

use regex::Regex;
use std::process::ExitStatus;
use std::sync::{LazyLock, OnceLock};
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{ErrorKind, JobError};

/// A number as Python prints it: `1e-05`, `0.109`, `nan`, `inf`.
pub const NUM: &str = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)";

/// A tqdm bar: `desc: 13%|█▎ | 250/2000 [06:12<43:01,  1.48s/it, lr: 1.0e-04 loss: 4.1e-01]`.
pub static TQDM: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?P<desc>[^\r\n]*?):\s+(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s+\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+),\s*(?P<rate>[\d.?]+)(?P<unit>s/it|it/s)(?:,\s*(?P<postfix>[^\]]*))?\]",
    )
    .expect("tqdm regex")
});

/// One parsed tqdm bar line.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar<'a> {
    pub desc: &'a str,
    pub n: u32,
    pub total: u32,
    /// Iterations per second, whichever unit the bar used; `None` at `?it/s`.
    pub it_per_sec: Option<f32>,
    pub postfix: &'a str,
}

pub fn tqdm(line: &str) -> Option<Bar<'_>> {
    let c = TQDM.captures(line)?;
    let rate = c.name("rate")?.as_str().parse::<f32>().ok();
    let it_per_sec = match (rate, c.name("unit")?.as_str()) {
        (Some(r), "s/it") if r > 0.0 => Some(1.0 / r),
        (Some(r), "it/s") => Some(r),
        _ => None,
    };
    Some(Bar {
        desc: c.name("desc")?.as_str().trim(),
        n: c.name("n")?.as_str().parse().ok()?,
        total: c.name("total")?.as_str().parse().ok()?,
        it_per_sec,
        postfix: c.name("postfix").map(|m| m.as_str()).unwrap_or(""),
    })
}

/// Parses a Python number token, `nan` and `inf` included.
pub fn num(s: &str) -> Option<f64> {
    match s.trim().trim_matches('\'') {
        "nan" | "NaN" => Some(f64::NAN),
        "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        other => other.parse().ok(),
    }
}

/// `key=value` (or `key: value`) from a postfix such as `avr_loss=0.109, lr=1e-5`.
pub fn postfix_value(postfix: &str, key: &str) -> Option<f64> {
    static PAIR: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(&format!(r"(?P<k>[\w/]+)\s*[=:]\s*(?P<v>{NUM})")).expect("pair regex")
    });
    PAIR.captures_iter(postfix)
        .find(|c| &c["k"] == key)
        .and_then(|c| num(&c["v"]))
}

/// The families SimpleTuner and ai-toolkit train, both from one diffusers
/// folder (the same list for both, so they stay in step).
pub const DIFFUSERS_FAMILIES: &[ModelFamily] = &[
    ModelFamily::Flux,
    ModelFamily::Sdxl,
    ModelFamily::Wan,
    ModelFamily::QwenImage,
];

/// The model parts a diffusers-folder trainer needs, whatever the family.
pub const DIFFUSERS_PARTS: &[&str] = &[part::DIFFUSERS];

pub fn error(kind: ErrorKind, message: impl Into<String>, retryable: bool) -> JobError {
    trainyard_core::runtime::job_error(kind, message, retryable)
}

/// One known failure: a regex over an output line, the class it means,
/// and a few words for the message (which also carries the line).
pub struct Signature {
    pub pattern: &'static str,
    pub kind: ErrorKind,
    pub retryable: bool,
    pub what: &'static str,
}

/// A table of [`Signature`]s, checked in order, with its regexes compiled
/// on first use. Each backend keeps its own table in a `static`.
pub struct Signatures {
    table: &'static [Signature],
    compiled: OnceLock<Vec<Regex>>,
}

impl Signatures {
    pub const fn new(table: &'static [Signature]) -> Self {
        Self {
            table,
            compiled: OnceLock::new(),
        }
    }

    fn compiled(&self) -> &[Regex] {
        self.compiled.get_or_init(|| {
            self.table
                .iter()
                .map(|s| Regex::new(s.pattern).expect("signature regex"))
                .collect()
        })
    }

    /// The first signature of `range` of the table (in table order) that
    /// matches a line, as an error naming the last such line.
    fn find_in(&self, lines: &[&String], range: std::ops::Range<usize>) -> Option<JobError> {
        let compiled = &self.compiled()[range.clone()];
        compiled
            .iter()
            .zip(&self.table[range])
            .find_map(|(regex, sig)| {
                let line = lines.iter().rev().find(|l| regex.is_match(l))?;
                Some(error(
                    sig.kind,
                    format!("{}: {}", sig.what, line.trim()),
                    sig.retryable,
                ))
            })
    }

    /// The first signature of the table that matches a line of `tail`.
    pub fn find(&self, tail: &[String]) -> Option<JobError> {
        let lines: Vec<&String> = tail.iter().collect();
        self.find_in(&lines, 0..self.table.len())
    }
}

/// A backend's own table first, then the shared one ([`classify_common`]).
pub fn classify_with(table: &Signatures, status: ExitStatus, tail: &[String]) -> Option<JobError> {
    table.find(tail).or_else(|| classify_common(status, tail))
}

static COMMON: Signatures = Signatures::new(&[
    Signature {
        pattern: r"OutOfMemoryError|CUDA out of memory|OOM during training step \d+ times in a row",
        kind: ErrorKind::Oom,
        retryable: true,
        what: "out of GPU memory",
    },
    Signature {
        pattern: r"CUDA error: (?:an illegal memory access|device-side assert)|NCCL error|CUBLAS_STATUS|no CUDA GPUs are available|CUDA driver|GPU circuit breaker triggered",
        kind: ErrorKind::Trainer,
        retryable: true,
        what: "GPU device error",
    },
    Signature {
        pattern: r"No space left on device",
        kind: ErrorKind::Trainer,
        retryable: true,
        what: "disk full",
    },
    Signature {
        pattern: r"SafetensorError: Error while deserializing header|HeaderTooLarge|incomplete metadata, file not fully covered",
        kind: ErrorKind::Model,
        retryable: true,
        what: "corrupt or truncated weights",
    },
    Signature {
        pattern: r"GatedRepoError|401 Client Error|403 Client Error|RepositoryNotFoundError",
        kind: ErrorKind::Auth,
        retryable: false,
        what: "model access denied",
    },
    Signature {
        pattern: r"^\s*(?:[\w.]+\.)?(?:ModuleNotFoundError|ImportError): ",
        kind: ErrorKind::Trainer,
        retryable: false,
        what: "trainer environment broken",
    },
    Signature {
        pattern: r"No data found\. Please verify arguments|no images detected in dataset|is being completely dropped|No valid checkpoint found|Failed to load data backends",
        kind: ErrorKind::BadDataset,
        retryable: false,
        what: "no usable training data",
    },
    Signature {
        pattern: r"Non-finite training loss detected|NaN detected in latents",
        kind: ErrorKind::Trainer,
        retryable: false,
        what: "training diverged",
    },
    Signature {
        pattern: r"^\s*(?:[\w.]+\.)?(?:FileNotFoundError: |OSError: .*No such file or directory)|^not directory: ",
        kind: ErrorKind::InvalidSpec,
        retryable: false,
        what: "missing file",
    },
]);

/// How many signatures (from the top of the table) outrank a kill by
/// signal 9: a kill explains the rest (a dying process prints anything).
const STRONG: usize = 4;

/// Failure signatures shared by every trainer, checked in order of the table
/// (an OOM wins over the `FileNotFoundError` a dying process may also print);
/// the message carries the matching line. A kill by signal 9 with no strong
/// signature is the host OOM killer or the system. Interpreter-teardown noise
/// (`Exception ignored in …`, `sys.meta_path is None`) is never a cause.
pub fn classify_common(status: ExitStatus, tail: &[String]) -> Option<JobError> {
    use std::os::unix::process::ExitStatusExt;
    let relevant: Vec<&String> = tail
        .iter()
        .filter(|l| !l.contains("sys.meta_path is None") && !l.starts_with("Exception ignored in"))
        .collect();
    if let Some(found) = COMMON.find_in(&relevant, 0..STRONG) {
        return Some(found);
    }
    let killed = tail
        .iter()
        .rev()
        .find(|l| l.contains("died with <Signals.SIGKILL: 9>"));
    if status.signal() == Some(9) || status.code() == Some(137) || killed.is_some() {
        return Some(error(
            ErrorKind::Oom,
            match killed {
                Some(line) => format!(
                    "trainer was killed (signal 9: out of host memory or killed by the system): {}",
                    line.trim()
                ),
                None => "trainer was killed (signal 9: out of host memory or killed by the system)"
                    .into(),
            },
            true,
        ));
    }
    COMMON.find_in(&relevant, STRONG..COMMON.table.len())
}

/// The generic fallback: the exit status and the last line.
pub fn unclassified(tool: &str, status: ExitStatus, tail: &[String]) -> JobError {
    let last = tail
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .cloned()
        .unwrap_or_default();
    error(
        ErrorKind::Trainer,
        format!("{tool} exited with {status}; last line: {last}"),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn tqdm_bars_in_both_rate_units() {
        let bar =
            tqdm("steps: 100%|██████████| 10000/10000 [3:17:44<00:00,  1.19s/it, avr_loss=0.109]")
                .unwrap();
        assert_eq!((bar.desc, bar.n, bar.total), ("steps", 10000, 10000));
        assert!((bar.it_per_sec.unwrap() - 1.0 / 1.19).abs() < 1e-4);
        assert_eq!(postfix_value(bar.postfix, "avr_loss"), Some(0.109));
        let bar = tqdm("job123:  13%|█▎        | 250/2000 [06:12<43:01,  4.50it/s, lr: 1.0e-04 loss: 4.123e-01]").unwrap();
        assert_eq!(bar.it_per_sec, Some(4.5));
        assert_eq!(postfix_value(bar.postfix, "lr"), Some(1e-4));
        assert_eq!(postfix_value(bar.postfix, "loss"), Some(0.4123));
        let bar = tqdm("steps:   0%|          | 0/100 [00:00<?, ?it/s]").unwrap();
        assert_eq!((bar.n, bar.it_per_sec), (0, None));
        let bar =
            tqdm("steps:  10%|#         | 10/100 [00:10<01:30,  1.00it/s, avr_loss=nan]").unwrap();
        assert!(postfix_value(bar.postfix, "avr_loss").unwrap().is_nan());
    }

    #[test]
    fn failure_table() {
        let fail = ExitStatus::from_raw(1 << 8);
        let cases: &[(&str, ErrorKind, bool)] = &[
            (
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                ErrorKind::Oom,
                true,
            ),
            (
                "RuntimeError: CUDA error: an illegal memory access was encountered",
                ErrorKind::Trainer,
                true,
            ),
            (
                "OSError: [Errno 28] No space left on device",
                ErrorKind::Trainer,
                true,
            ),
            (
                "safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge",
                ErrorKind::Model,
                true,
            ),
            (
                "huggingface_hub.errors.GatedRepoError: 401 Client Error.",
                ErrorKind::Auth,
                false,
            ),
            (
                "ModuleNotFoundError: No module named 'bitsandbytes'",
                ErrorKind::Trainer,
                false,
            ),
            (
                "No data found. Please verify arguments (train_data_dir must be the parent of folders with images)",
                ErrorKind::BadDataset,
                false,
            ),
            (
                "FileNotFoundError: [Errno 2] No such file or directory: '/models/ae.safetensors'",
                ErrorKind::InvalidSpec,
                false,
            ),
        ];
        for (line, kind, retryable) in cases {
            let e = classify_common(fail, &["noise".into(), line.to_string()]).unwrap();
            assert_eq!((e.kind(), e.retryable), (*kind, *retryable), "{line}");
            assert!(e.message.contains(line.trim()), "{}", e.message);
        }
        // A kill explains the import warnings a starting process printed;
        // teardown noise after a transient error is never the cause.
        let e = classify_common(
            ExitStatus::from_raw(9),
            &["ModuleNotFoundError: No module named 'triton'".into()],
        )
        .unwrap();
        assert_eq!(
            (e.kind(), e.retryable),
            (ErrorKind::Oom, true),
            "{}",
            e.message
        );
        assert!(
            classify_common(
                fail,
                &[
                    "ImportError: sys.meta_path is None, Python is likely shutting down".into(),
                    "Exception ignored in: <function _TemporaryFileCloser.__del__> FileNotFoundError: '/tmp/x'".into(),
                ],
            )
            .is_none()
        );
        let e = classify_common(ExitStatus::from_raw(9), &[]).unwrap();
        assert_eq!((e.kind(), e.retryable), (ErrorKind::Oom, true));
        assert!(classify_common(fail, &["just text".into()]).is_none());
    }
}
