//! tdrussell/diffusion-pipe: `train.py` under the single-node `deepspeed`
//! launcher, LoRA for Flux, SDXL, Wan, Qwen-Image and Z-Image (the trainers
//! reference, section 3).
//!
//! - **Inputs.** A main config TOML and a dataset TOML, both written to the
//!   run folder and serialised from the structs below. The dataset folder
//!   holds images and, for Wan, video clips side by side, as diffusion-pipe
//!   reads them; a dataset with clips gets `frame_buckets` ([`video`]). `output_dir` is the
//!   job's own output folder: diffusion-pipe puts each run in a new
//!   `<UTC %Y%m%d_%H-%M-%S>/` folder there and, when resuming, picks
//!   `sorted(glob(output_dir/*))[-1]`, so that folder holds nothing but run
//!   folders. `max_steps` = `steps` makes the total known (it is never
//!   printed); `epochs` is set high enough that `max_steps` always ends the
//!   run (every micro-batch is at least one example and every epoch at least
//!   one micro-batch, so `steps × gradient_accumulation_steps` epochs can
//!   never run out first).
//! - **Saves and checkpoints are different things.** `save_every_n_steps`
//!   (required: diffusion-pipe asserts one `save_every_n_*` key) exports the
//!   LoRA to `step{N}/`; it is `save_every`, or `steps` when `save_every` is
//!   0, so the final export is always there. Resuming needs the DeepSpeed
//!   training state, `global_step{N}/` plus a `latest` file naming it, which
//!   diffusion-pipe can write only every N minutes or every N epochs. We ask
//!   for one every [`DEFAULT_CHECKPOINT_MINUTES`] minutes (extras may choose
//!   another period, or epochs instead); `save_every = 0` asks for none
//!   except the one written at the end and the one a stop request triggers.
//! - **Command.** `deepspeed --num_gpus=1 --master_port=<port>
//!   <checkout>/train.py --deepspeed --config <run>/config.toml
//!   --master_port=<port> [--resume_from_checkpoint <run folder>]`, in
//!   the checkout folder: the model code opens `configs/…` and puts
//!   `submodules/…` on `sys.path` relative to the working directory. With
//!   `--num_gpus` the DeepSpeed runner ignores and removes
//!   `CUDA_VISIBLE_DEVICES` and uses the first GPU, so a run whose slot has
//!   GPUs of its own gets `--include=localhost:<gpus>` instead.
//! - **Rendezvous port.** `train.py` has its own `--master_port` (default
//!   29500) and sets `MASTER_PORT` from it before
//!   `deepspeed.init_distributed`, overwriting what the runner exported, so
//!   the port that torch.distributed binds is the one given to `train.py`.
//!   Every run passes its slot's port (`29500 + slot`) there, and to the
//!   runner too so the environment it exports agrees; two runs on one
//!   worker never both bind 29500.
//! - **Stop.** The file `<run folder>/save_quit` makes the trainer write a
//!   checkpoint at the end of the current step and exit 0, without the
//!   final adapter (`Saver.process_step`).

mod config;
mod output;
pub mod video;

pub use config::DEFAULT_CHECKPOINT_MINUTES;

use crate::{
    BackendError, FoundCheckpoint, Launch, OutputParser, SettingProblem, StopRequest, TrainInputs,
    TrainerBackend,
};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::process::ExitStatus;
use trainyard_core::process::CommandSpec;
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{JobError, TrainingSettings, extra_value::Kind};

const NAME: &str = "diffusion-pipe";
const CONFIG_FILE: &str = "config.toml";
const DATASET_FILE: &str = "dataset.toml";
/// The graceful-stop file diffusion-pipe looks for in its run folder.
const SAVE_QUIT_FILE: &str = "save_quit";

const FAMILIES: &[ModelFamily] = &[
    ModelFamily::Flux,
    ModelFamily::Sdxl,
    ModelFamily::Wan,
    ModelFamily::QwenImage,
    ModelFamily::ZImage,
];

pub struct DiffusionPipe {
    deepspeed: PathBuf,
    /// The diffusion-pipe checkout (holds `train.py`).
    dir: PathBuf,
}

impl DiffusionPipe {
    pub fn new(deepspeed: PathBuf, dir: PathBuf) -> Self {
        Self { deepspeed, dir }
    }
}

/// Whether diffusion-pipe trains `family` on video clips: Wan here (its
/// HunyuanVideo and LTX-Video types are not families of ours yet).
pub fn trains_video(family: ModelFamily) -> bool {
    family == ModelFamily::Wan
}

/// The default rendezvous port of DeepSpeed (`TORCH_DISTRIBUTED_DEFAULT_PORT`)
/// and of `train.py --master_port`; slot N uses `MASTER_PORT_BASE + N`.
pub const MASTER_PORT_BASE: u16 = 29500;

/// The runner's flags for a slot. Without GPUs of its own the run takes
/// the first GPU (`--num_gpus=1`); with them, `--include localhost:<gpus>`
/// names them, since the runner given `--num_gpus` drops
/// `CUDA_VISIBLE_DEVICES` (and refuses `--include` next to `--num_gpus`).
/// The runner's `--master_port` only sets the `MASTER_PORT` it exports
/// (`launcher/launch.py`); `train.py` replaces that with its own flag.
fn launcher_args(slot: &crate::Slot) -> Vec<OsString> {
    let devices = match slot.visible_devices() {
        Some(devices) => format!("--include=localhost:{devices}"),
        None => "--num_gpus=1".into(),
    };
    vec![devices.into(), master_port(slot)]
}

/// `--master_port=<port>` for the slot's own rendezvous port. `train.py`
/// binds the port given to it (default 29500) whatever the runner says.
fn master_port(slot: &crate::Slot) -> OsString {
    format!("--master_port={}", slot.port(MASTER_PORT_BASE)).into()
}

/// The LoRA file in each save folder: Flux goes through diffusers'
/// `save_lora_weights`, SDXL writes kohya format, the rest PEFT/ComfyUI.
fn weights_file(family: ModelFamily) -> &'static str {
    match family {
        ModelFamily::Flux => "pytorch_lora_weights.safetensors",
        ModelFamily::Sdxl => "lora.safetensors",
        _ => "adapter_model.safetensors",
    }
}

/// The run folder a restored checkpoint lives in: the first component all
/// its files share.
fn restored_run_dir(files: &[PathBuf]) -> Option<OsString> {
    let first = |p: &PathBuf| match p.components().next() {
        Some(Component::Normal(name)) => Some(name.to_os_string()),
        _ => None,
    };
    let name = first(files.first()?)?;
    files
        .iter()
        .all(|f| first(f).as_ref() == Some(&name) && f.components().count() > 1)
        .then_some(name)
}

/// What `get_most_recent_run_dir` picks: the last of `sorted(glob(output_dir/*))`
/// (hidden names excluded, as glob does), if it is a folder.
fn newest_run_dir(output_dir: &Path) -> Option<PathBuf> {
    let mut names: Vec<OsString> = std::fs::read_dir(output_dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| !n.as_encoded_bytes().starts_with(b"."))
        .collect();
    names.sort();
    let newest = output_dir.join(names.pop()?);
    newest.is_dir().then_some(newest)
}

/// Regular files under `dir`, relative to `base`, sorted.
fn files_under(dir: &Path, base: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file()
                && let Ok(rel) = entry.path().strip_prefix(base)
            {
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    out
}

impl TrainerBackend for DiffusionPipe {
    fn name(&self) -> &'static str {
        NAME
    }

    fn families(&self) -> &'static [ModelFamily] {
        FAMILIES
    }

    fn parts(&self, family: ModelFamily) -> &'static [&'static str] {
        match family {
            ModelFamily::Flux | ModelFamily::QwenImage => &[part::DIFFUSERS],
            ModelFamily::Sdxl => &[part::CHECKPOINT],
            ModelFamily::Wan => &[part::CKPT_DIR],
            // The one Z-Image preset is Turbo, which needs its de-distill
            // adapter merged (`merge_adapters`); parts are per family, so a
            // non-distilled Z-Image preset would need this list to differ.
            ModelFamily::ZImage => &[
                part::TRANSFORMER,
                part::AE,
                part::TEXT_ENCODER,
                part::TRAINING_ADAPTER,
            ],
            ModelFamily::Reference | ModelFamily::Llm => &[],
        }
    }

    fn check(&self, settings: &TrainingSettings, family: ModelFamily) -> Vec<SettingProblem> {
        config::check(settings, family)
    }

    fn trains_video(&self, family: ModelFamily) -> bool {
        trains_video(family)
    }

    fn clip_need(
        &self,
        settings: &TrainingSettings,
        family: ModelFamily,
        clip_frames: &[u64],
    ) -> Option<crate::ClipNeed> {
        if !trains_video(family) {
            return None;
        }
        let extra = match settings.extras.get("frame_buckets").map(|v| &v.kind) {
            Some(Some(Kind::Text(text))) => Some(text.as_str()),
            _ => None,
        };
        video::clip_need(extra, clip_frames)
    }

    fn render(&self, inputs: &TrainInputs) -> Result<Launch, BackendError> {
        let config_path = inputs.run_dir.join(CONFIG_FILE);
        let dataset_path = inputs.run_dir.join(DATASET_FILE);
        let (config, dataset) = config::render(inputs, &dataset_path)?;
        let mut args: Vec<OsString> = launcher_args(&inputs.slot);
        args.extend([
            self.dir.join("train.py").into(),
            "--deepspeed".into(),
            "--config".into(),
            config_path.clone().into(),
            master_port(&inputs.slot),
        ]);
        if let Some(resume) = &inputs.resume {
            args.push("--resume_from_checkpoint".into());
            // Naming the folder keeps the choice exact; without a name the
            // trainer takes the newest folder in output_dir.
            args.extend(restored_run_dir(&resume.files));
        }
        Ok(Launch {
            files: vec![(config_path, config), (dataset_path, dataset)],
            links: Vec::new(),
            command: CommandSpec {
                program: self.deepspeed.clone(),
                args,
                cwd: self.dir.clone(),
                env: [
                    ("NCCL_P2P_DISABLE".into(), "1".into()),
                    ("NCCL_IB_DISABLE".into(), "1".into()),
                    (
                        "PYTORCH_CUDA_ALLOC_CONF".into(),
                        "expandable_segments:True".into(),
                    ),
                ]
                .into_iter()
                .chain(inputs.slot.env())
                .collect(),
            },
        })
    }

    fn parser(&self, inputs: &TrainInputs) -> Box<dyn OutputParser> {
        Box::new(output::Parser::new(
            inputs.settings.steps,
            inputs.resume.is_some(),
        ))
    }

    /// The checkpoint `latest` names in the newest run folder. DeepSpeed
    /// writes `latest` after every file of the tag, so a tag it names is
    /// complete. The files are that `global_step{N}/`, `latest` and the
    /// copied TOMLs, relative to `output_dir`: restored under a fresh
    /// `output_dir`, they are the only run folder there.
    fn latest_checkpoint(&self, inputs: &TrainInputs) -> Option<FoundCheckpoint> {
        let run = newest_run_dir(&inputs.output_dir)?;
        let tag = std::fs::read_to_string(run.join("latest")).ok()?;
        let tag = tag.trim();
        let step = tag.strip_prefix("global_step")?.parse::<u32>().ok()?;
        let tag_dir = run.join(tag);
        if !tag_dir.is_dir() {
            return None;
        }
        let mut files = files_under(&tag_dir, &inputs.output_dir);
        if files.is_empty() {
            return None;
        }
        for name in ["latest", CONFIG_FILE, DATASET_FILE] {
            if run.join(name).is_file() {
                files.push(
                    run.join(name)
                        .strip_prefix(&inputs.output_dir)
                        .ok()?
                        .to_path_buf(),
                );
            }
        }
        Some(FoundCheckpoint { step, files })
    }

    /// `save_quit` in the run folder the trainer is using (the newest one,
    /// looked up now: a fresh run creates it only after caching). Before it
    /// exists there is nothing to save.
    fn stop_request(&self, inputs: &TrainInputs) -> StopRequest {
        match newest_run_dir(&inputs.output_dir) {
            Some(run) => StopRequest::SaveAndExit {
                path: run.join(SAVE_QUIT_FILE),
                body: Vec::new(),
            },
            None => StopRequest::Unsupported,
        }
    }

    /// The weights of the last save: `step{N}/` with N at least `max_steps`
    /// (a run resumed from the checkpoint written just before the final
    /// save trains one step more), else the highest `epoch{N}/` if the
    /// epochs ran out first.
    fn final_adapter(&self, inputs: &TrainInputs) -> Option<PathBuf> {
        let run = newest_run_dir(&inputs.output_dir)?;
        let file = weights_file(inputs.model.family);
        let saves: Vec<(&str, u32, PathBuf)> = std::fs::read_dir(&run)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (kind, n) = match name.strip_prefix("step") {
                    Some(n) => ("step", n),
                    None => ("epoch", name.strip_prefix("epoch")?),
                };
                Some((kind, n.parse().ok()?, e.path().join(file)))
            })
            .filter(|(_, _, path)| path.is_file())
            .collect();
        let last = |kind: &str, min: u32| {
            saves
                .iter()
                .filter(|(k, n, _)| *k == kind && *n >= min)
                .max_by_key(|(_, n, _)| *n)
                .map(|(_, _, path)| path.clone())
        };
        last("step", inputs.settings.steps).or_else(|| last("epoch", 0))
    }

    fn classify(&self, status: ExitStatus, tail: &[String]) -> JobError {
        output::classify(status, tail)
    }
}
