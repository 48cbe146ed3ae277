//! The flags of `ty-bench gpu-smoke`, parsed by hand (the bench has no
//! argument-parser dependency) into [`SmokeArgs`]; every mistake is an
//! [`ArgError`] that says what to write instead.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;
use trainyard_backends::BACKENDS;

pub const USAGE: &str = "\
usage: ty-bench gpu-smoke [--only NAME,NAME] [--steps N] [--timeout SECS]
                          [--config FILE] [--set worker.KEY=VALUE]... [--keep]

Runs each trainer backend for a few steps on the bundled sample through a
local fleet and prints a pass/fail table. Backends whose trainer is not
installed are SKIPPED. Exits 1 when a backend that ran failed (or none ran),
2 on a usage error.

  --only NAME,...   backends to run (default: all): reference, kohya,
                    diffusion-pipe, simpletuner, ai-toolkit, trl
  --steps N         training steps per backend, at least 2 (default 4)
  --timeout SECS    per backend, from submit to the final state, model
                    download included (default 1800)
  --config FILE     the fleet's config file, as for the services
                    (default: $TY_CONFIG); its [worker.trainers] say what is installed
  --set worker.KEY=VALUE
                    override a worker setting (repeatable), e.g.
                    --set worker.trainers.kohya_dir=/opt/sd-scripts
  --keep            keep the fleet's folder (logs, store) even when all pass
";

/// The default number of training steps per backend.
pub const DEFAULT_STEPS: u32 = 4;
/// The default time a backend gets, model download included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Clone, Debug, PartialEq)]
pub struct SmokeArgs {
    /// The selected backends, in the registry's order.
    pub backends: Vec<&'static str>,
    pub steps: u32,
    pub timeout: Duration,
    pub config: Option<PathBuf>,
    /// `worker.KEY=VALUE` overrides, for the fleet and the installed check.
    pub sets: Vec<String>,
    pub keep: bool,
}

/// A usage mistake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgError {
    UnknownFlag(String),
    MissingValue(&'static str),
    BadValue {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    UnknownBackend(String),
    /// A `--set` outside `worker.`: the fleet's own settings are not the
    /// operator's to change.
    NotWorkerKey(String),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::UnknownFlag(flag) => write!(f, "unknown argument {flag:?}"),
            ArgError::MissingValue(flag) => write!(f, "{flag} needs a value"),
            ArgError::BadValue {
                flag,
                value,
                expected,
            } => write!(f, "{flag} {value:?}: expected {expected}"),
            ArgError::UnknownBackend(name) => write!(
                f,
                "--only: unknown backend {name:?}; known: {}",
                BACKENDS.join(", ")
            ),
            ArgError::NotWorkerKey(set) => write!(
                f,
                "--set {set:?}: only worker.KEY=VALUE settings can be given; the smoke \
                 fleet sets its own NATS, store, ports and tokens"
            ),
        }
    }
}

impl std::error::Error for ArgError {}

/// Parses the arguments after `gpu-smoke`; `None` when help was asked for.
pub fn parse(args: &[String]) -> Result<Option<SmokeArgs>, ArgError> {
    let mut parsed = SmokeArgs {
        backends: BACKENDS.to_vec(),
        steps: DEFAULT_STEPS,
        timeout: DEFAULT_TIMEOUT,
        config: std::env::var_os("TY_CONFIG").map(PathBuf::from),
        sets: Vec::new(),
        keep: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        // `--flag=value` and `--flag value` alike.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &'static str| {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or(ArgError::MissingValue(name))
        };
        match flag {
            "-h" | "--help" => return Ok(None),
            "--only" => parsed.backends = backends(&value("--only")?)?,
            "--steps" => {
                let v = value("--steps")?;
                parsed.steps = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 2)
                    .ok_or(ArgError::BadValue {
                        flag: "--steps",
                        value: v,
                        expected: "a whole number of at least 2 (a checkpoint is stored before the last step)",
                    })?;
            }
            "--timeout" => {
                let v = value("--timeout")?;
                let secs: u64 = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(ArgError::BadValue {
                        flag: "--timeout",
                        value: v,
                        expected: "seconds, a whole number above 0",
                    })?;
                parsed.timeout = Duration::from_secs(secs);
            }
            "--config" => parsed.config = Some(PathBuf::from(value("--config")?)),
            "--set" => {
                let v = value("--set")?;
                if !v.starts_with("worker.") || !v.contains('=') {
                    return Err(ArgError::NotWorkerKey(v));
                }
                parsed.sets.push(v);
            }
            "--keep" => parsed.keep = true,
            _ => return Err(ArgError::UnknownFlag(arg.clone())),
        }
    }
    Ok(Some(parsed))
}

/// `kohya,trl` as registry names, in the registry's order.
fn backends(list: &str) -> Result<Vec<&'static str>, ArgError> {
    let mut wanted = Vec::new();
    for name in list.split(',').map(str::trim) {
        if name.is_empty() {
            continue;
        }
        if !BACKENDS.contains(&name) {
            return Err(ArgError::UnknownBackend(name.to_string()));
        }
        wanted.push(name);
    }
    if wanted.is_empty() {
        return Err(ArgError::BadValue {
            flag: "--only",
            value: list.to_string(),
            expected: "backend names separated by commas",
        });
    }
    Ok(BACKENDS
        .iter()
        .copied()
        .filter(|b| wanted.contains(b))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(args: &[&str]) -> Result<Option<SmokeArgs>, ArgError> {
        parse(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_are_read_in_either_form() {
        let args = parse_all(&[
            "--only",
            "trl,kohya",
            "--steps=6",
            "--timeout",
            "60",
            "--set",
            "worker.trainers.kohya_dir=/opt/sd-scripts",
            "--keep",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(args.backends, ["kohya", "trl"]);
        assert_eq!(args.steps, 6);
        assert_eq!(args.timeout, Duration::from_secs(60));
        assert_eq!(args.sets, ["worker.trainers.kohya_dir=/opt/sd-scripts"]);
        assert!(args.keep);
        let defaults = parse_all(&[]).unwrap().unwrap();
        assert_eq!(defaults.backends, BACKENDS);
        assert_eq!(defaults.steps, DEFAULT_STEPS);
        assert_eq!(parse_all(&["--help"]).unwrap(), None);
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(
            parse_all(&["--only", "kohya,sd-scripts"]).unwrap_err(),
            ArgError::UnknownBackend("sd-scripts".into())
        );
        assert!(matches!(
            parse_all(&["--steps", "1"]).unwrap_err(),
            ArgError::BadValue {
                flag: "--steps",
                ..
            }
        ));
        assert!(matches!(
            parse_all(&["--timeout", "0"]).unwrap_err(),
            ArgError::BadValue {
                flag: "--timeout",
                ..
            }
        ));
        assert_eq!(
            parse_all(&["--only"]).unwrap_err(),
            ArgError::MissingValue("--only")
        );
        assert_eq!(
            parse_all(&["--set", "store.uri=/tmp/x"]).unwrap_err(),
            ArgError::NotWorkerKey("store.uri=/tmp/x".into())
        );
        assert_eq!(
            parse_all(&["--gpu"]).unwrap_err(),
            ArgError::UnknownFlag("--gpu".into())
        );
    }
}
