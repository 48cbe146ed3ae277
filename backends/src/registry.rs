//! The backends this build knows: one table, [`REGISTRY`], is the only
//! place a trainer is registered. A row names the backend as a job spec
//! does, says which installed tools it needs, and makes it from the
//! worker's [`Tools`]; lookups by name, the "is it installed here" check and
//! the list of names all read the table.

use std::path::{Path, PathBuf};
use trainyard_core::config::TrainerPaths;

use crate::{TrainerBackend, ai_toolkit, diffusion_pipe, kohya, reference, simpletuner, trl};

/// Where the trainers are installed on this worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Tools {
    /// `ty-reference-trainer`.
    pub reference: PathBuf,
    /// `[worker.trainers]`.
    pub trainers: TrainerPaths,
}

impl Default for Tools {
    /// Nothing installed: every path empty (not `TrainerPaths`' defaults),
    /// for the checks that need no trainer and for tests to fill in.
    fn default() -> Self {
        Tools {
            reference: PathBuf::new(),
            trainers: TrainerPaths {
                python: PathBuf::new(),
                accelerate: PathBuf::new(),
                deepspeed: PathBuf::new(),
                kohya_dir: PathBuf::new(),
                diffusion_pipe_dir: PathBuf::new(),
                simpletuner_dir: PathBuf::new(),
                ai_toolkit_dir: PathBuf::new(),
                env: Default::default(),
            },
        }
    }
}

/// One installed tool a backend may need: a `[worker.trainers]` key, or the
/// reference trainer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    ReferenceTrainer,
    Python,
    Accelerate,
    Deepspeed,
    KohyaDir,
    DiffusionPipeDir,
    SimpletunerDir,
    AiToolkitDir,
}

impl Tool {
    /// The config key that sets it (under `worker.trainers.`).
    pub fn key(self) -> &'static str {
        match self {
            Tool::ReferenceTrainer => "reference_trainer",
            Tool::Python => "python",
            Tool::Accelerate => "accelerate",
            Tool::Deepspeed => "deepspeed",
            Tool::KohyaDir => "kohya_dir",
            Tool::DiffusionPipeDir => "diffusion_pipe_dir",
            Tool::SimpletunerDir => "simpletuner_dir",
            Tool::AiToolkitDir => "ai_toolkit_dir",
        }
    }

    /// Where `tools` says it is; empty when not installed.
    pub fn path(self, tools: &Tools) -> &Path {
        let t = &tools.trainers;
        match self {
            Tool::ReferenceTrainer => &tools.reference,
            Tool::Python => &t.python,
            Tool::Accelerate => &t.accelerate,
            Tool::Deepspeed => &t.deepspeed,
            Tool::KohyaDir => &t.kohya_dir,
            Tool::DiffusionPipeDir => &t.diffusion_pipe_dir,
            Tool::SimpletunerDir => &t.simpletuner_dir,
            Tool::AiToolkitDir => &t.ai_toolkit_dir,
        }
    }
}

/// A row of [`REGISTRY`].
pub struct BackendEntry {
    /// The name a job spec's `training.backend` uses.
    pub name: &'static str,
    /// The tools that must be installed for this worker to offer it.
    pub needs: &'static [Tool],
    /// The backend, set up with the worker's tools.
    pub make: fn(&Tools) -> Box<dyn TrainerBackend>,
}

/// Every backend this build knows. Add a trainer here, and only here.
pub const REGISTRY: &[BackendEntry] = &[
    BackendEntry {
        name: "reference",
        needs: &[Tool::ReferenceTrainer],
        make: |t| Box::new(reference::Reference::new(t.reference.clone())),
    },
    BackendEntry {
        name: "kohya",
        needs: &[Tool::Accelerate, Tool::KohyaDir],
        make: |t| {
            Box::new(kohya::Kohya::new(
                t.trainers.accelerate.clone(),
                t.trainers.kohya_dir.clone(),
            ))
        },
    },
    BackendEntry {
        name: "diffusion-pipe",
        needs: &[Tool::Deepspeed, Tool::DiffusionPipeDir],
        make: |t| {
            Box::new(diffusion_pipe::DiffusionPipe::new(
                t.trainers.deepspeed.clone(),
                t.trainers.diffusion_pipe_dir.clone(),
            ))
        },
    },
    BackendEntry {
        name: "simpletuner",
        needs: &[Tool::Accelerate, Tool::SimpletunerDir],
        make: |t| Box::new(simpletuner::SimpleTuner::new(t)),
    },
    BackendEntry {
        name: "ai-toolkit",
        needs: &[Tool::Python, Tool::AiToolkitDir],
        make: |t| Box::new(ai_toolkit::AiToolkit::new(t)),
    },
    BackendEntry {
        name: "trl",
        needs: &[Tool::Python],
        make: |t| Box::new(trl::Trl::new(t.trainers.python.clone())),
    },
];

/// The names of [`REGISTRY`]'s backends, in its order.
pub const BACKENDS: &[&str] = &NAMES;

const NAMES: [&str; REGISTRY.len()] = {
    let mut names = [""; REGISTRY.len()];
    let mut i = 0;
    while i < REGISTRY.len() {
        names[i] = REGISTRY[i].name;
        i += 1;
    }
    names
};

/// The row for the name in a job spec.
pub fn entry(name: &str) -> Option<&'static BackendEntry> {
    REGISTRY.iter().find(|e| e.name == name)
}

/// Looks a backend up by the name in the job spec.
pub fn by_name(name: &str, tools: &Tools) -> Option<Box<dyn TrainerBackend>> {
    entry(name).map(|e| (e.make)(tools))
}

/// Why this worker cannot run backend `name`: the `[worker.trainers]`
/// paths it needs are not set. `None` when it can.
pub fn not_installed(name: &str, tools: &Tools) -> Option<String> {
    let Some(entry) = entry(name) else {
        return Some(format!("unknown backend {name:?}"));
    };
    let missing: Vec<&str> = entry
        .needs
        .iter()
        .filter(|tool| tool.path(tools).as_os_str().is_empty())
        .map(|tool| tool.key())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{name} is not installed on this worker: set worker.trainers.{}",
            missing.join(", worker.trainers.")
        )
    })
}

/// Backends this worker can run with its tools.
pub fn installed(tools: &Tools) -> Vec<&'static str> {
    BACKENDS
        .iter()
        .copied()
        .filter(|name| not_installed(name, tools).is_none())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_makes_the_backend_it_names() {
        let tools = Tools::default();
        assert_eq!(BACKENDS.len(), REGISTRY.len());
        for (entry, name) in REGISTRY.iter().zip(BACKENDS) {
            assert_eq!(entry.name, *name);
            assert_eq!(by_name(name, &tools).unwrap().name(), *name);
        }
        assert!(by_name("nope", &tools).is_none());
    }

    #[test]
    fn a_backend_is_installed_when_every_tool_it_needs_is_set() {
        assert!(installed(&Tools::default()).is_empty());
        let mut tools = Tools::default();
        tools.trainers.python = "python3".into();
        assert_eq!(installed(&tools), ["trl"]);
        assert_eq!(
            not_installed("ai-toolkit", &tools).as_deref(),
            Some("ai-toolkit is not installed on this worker: set worker.trainers.ai_toolkit_dir")
        );
        assert_eq!(
            not_installed("kohya", &tools).as_deref(),
            Some(
                "kohya is not installed on this worker: set worker.trainers.accelerate, \
                 worker.trainers.kohya_dir"
            )
        );
        assert_eq!(
            not_installed("nope", &tools).as_deref(),
            Some("unknown backend \"nope\"")
        );
    }
}
