//! The command line, as clap derive structs. No behaviour lives here.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use trainyard_core::service::ServiceArgs;
use trainyard_proto::v1::JobState;

#[derive(Parser, Debug)]
#[command(
    name = "yard",
    version,
    about = "Trainyard: submit, watch and fetch LoRA training jobs, or run the whole fleet locally",
    after_help = "Start here: `yard demo` trains a small LoRA on a bundled dataset, end to end, on this machine."
)]
pub struct Cli {
    /// The coordinator's gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "TY_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Bearer token sent with every call (default: the one `yard dev`
    /// keeps in `.trainyard/dev-token`).
    #[arg(long, global = true, env = "TY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate that an `https://` server's certificate is
    /// checked against (default: the system's roots).
    #[arg(long, global = true, env = "TY_CA_FILE", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole fleet on this machine: NATS, coordinator, captioner, worker, uploader.
    Dev(DevArgs),
    /// Start a local fleet, train the bundled sample end to end, print where the LoRA landed.
    Demo(DemoArgs),
    /// Submit a job: a local folder or zip (uploaded first), a zip URL, or image URLs.
    Submit(Box<SubmitArgs>),
    /// Check a job without submitting it: the spec, the dataset (fetched and
    /// unpacked by a captioner), the base model and the destinations; prints
    /// every problem and the step estimate. Takes the flags of `submit`
    /// (--watch and --idempotency-key do nothing here).
    Validate(Box<SubmitArgs>),
    /// Follow a job until it ends, with progress bars.
    Watch(WatchArgs),
    /// List jobs, newest first.
    List(ListArgs),
    /// Show one job.
    Get(GetArgs),
    /// Cancel a job (also how a job's captions are rejected in review).
    Cancel(CancelArgs),
    /// Print a prepared job's captions, or edit them as files: `--export
    /// DIR` writes one `<name>.txt` per file, `--apply DIR` sends the ones
    /// you changed (only while the job is AWAITING_REVIEW).
    Captions(CaptionsArgs),
    /// Approve the captions of a job AWAITING_REVIEW: it trains.
    Approve(ApproveArgs),
    /// Download a job's outputs into a folder, verifying each sha256.
    Fetch(FetchArgs),
    /// Print a job's training metrics (loss, learning rate, ...) by step.
    Metrics(MetricsArgs),
    /// Your tenant's webhook signing secret: show it, or rotate it.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Set up a fleet whose bus has identities.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Client tokens, for the fleet's operator.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The fleet key that seals jobs' secrets, for the fleet's operator.
    #[command(subcommand)]
    Secrets(SecretsCommand),
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Write an nkey per service role (worker: per pool), a CA and the NATS
    /// server's certificate, a ready nats.conf (TLS, JetStream, one user per
    /// role with least-privilege permissions) and each role's [nats] keys
    /// (<role>.toml) into DIR. Never overwrites.
    Init(FleetInitArgs),
    /// The autoscaler's view of the fleet: each pool's machines (activity,
    /// price), backlog, wanted and live counts, its last decisions, and the
    /// fleet's dollars an hour; read from the bus with an operator's
    /// identity (`--config` a role file of `yard fleet init`, e.g.
    /// autoscaler.toml).
    Status(FleetStatusArgs),
    /// Clear the autoscaler's stop flag (set when the provider reported the
    /// account's spend limit): pools start machines again. Raise the limit
    /// first. `--config` is the autoscaler's role file.
    Resume(FleetResumeArgs),
}

#[derive(Args, Debug)]
pub struct FleetResumeArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
}

#[derive(Args, Debug)]
pub struct FleetStatusArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The identity the config's [nats] keys belong to: `autoscaler` or
    /// `coordinator`.
    #[arg(long, default_value = "autoscaler")]
    pub role: String,
    /// Decisions shown per pool, newest last.
    #[arg(long, default_value_t = 5)]
    pub decisions: usize,
    /// The pools' records as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FleetInitArgs {
    /// Folder to write into (created if missing).
    pub dir: PathBuf,
    /// A worker pool (repeatable); each gets its own identity.
    #[arg(long = "pool", value_name = "NAME", default_values_t = ["default".to_string()])]
    pub pools: Vec<String>,
    /// A host name or address the server's certificate is valid for, besides
    /// localhost and 127.0.0.1 (repeatable).
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
    /// The URL services connect to, written into each <role>.toml.
    #[arg(long, default_value = "tls://127.0.0.1:4222")]
    pub url: String,
    /// Where services and the server see DIR (e.g. a container mount such as
    /// /etc/trainyard/nats); DIR itself when unset.
    #[arg(long, value_name = "PATH")]
    pub mounted_at: Option<PathBuf>,
    /// JetStream's store directory, as the server sees it.
    #[arg(long, default_value = "/data")]
    pub store_dir: String,
}

#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Write a new key file (0600) for `[secrets] key_file`; with
    /// --rotate, put a fresh key first in an existing one (its keys stay,
    /// to open what they sealed).
    Keygen(KeygenArgs),
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The key file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Add a fresh sealing key to an existing file instead.
    #[arg(long)]
    pub rotate: bool,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a fresh random token and the `[coordinator.tokens]` line that
    /// lets it in (the token's SHA-256; the token itself is never stored).
    New(TokenNewArgs),
}

#[derive(Args, Debug)]
pub struct TokenNewArgs {
    /// The tenant the token authenticates as.
    #[arg(long)]
    pub tenant: String,
}

#[derive(Subcommand, Debug)]
pub enum WebhooksCommand {
    /// Print your tenant's signing secret (whsec_…; made on first use).
    /// Receivers verify `webhook-signature` with it (Standard Webhooks).
    Secret(WebhookSecretArgs),
    /// Replace your tenant's signing secret and print the new one. The old
    /// one keeps signing, next to the new, for the fleet's overlap.
    Rotate(WebhookSecretArgs),
}

#[derive(Args, Debug)]
pub struct WebhookSecretArgs {
    /// The secret, its creation time and the overlap's end as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Where the local fleet keeps its state.
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// Folder for the NATS store, artifact store, work dirs and model cache.
    #[arg(long, default_value = ".trainyard")]
    pub data_dir: PathBuf,
    /// Use this NATS server instead of the configured one (or a local one yard starts).
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    #[command(flatten)]
    pub service: ServiceArgs,
}

#[derive(Args, Debug)]
pub struct DevArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Run the autoscaler with its local provider instead of one captioner,
    /// worker and uploader: it starts them as processes as the backlog
    /// needs ([autoscaler.pools], or one of each at most by default).
    #[arg(long)]
    pub autoscale: bool,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Training steps.
    #[arg(long, default_value_t = 200)]
    pub steps: u32,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// A local folder or .zip, an http(s) zip URL, one or more http(s) image
    /// URLs, or an artifact-store URI (file:///…, s3://…).
    #[arg(required = true, value_name = "FOLDER|ZIP|URL")]
    pub sources: Vec<String>,
    /// Display name.
    #[arg(long)]
    pub name: Option<String>,
    /// Trigger word put in front of every caption.
    #[arg(long)]
    pub trigger: Option<String>,
    #[arg(long, default_value_t = 200)]
    pub steps: u32,
    /// Learning rate.
    #[arg(long, default_value_t = 0.002)]
    pub lr: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    pub rank: u32,
    /// LoRA alpha (default: the rank).
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long, default_value_t = 32)]
    pub resolution: u32,
    #[arg(long, default_value_t = 2)]
    pub batch_size: u32,
    /// Times each image is seen per epoch.
    #[arg(long)]
    pub repeats: Option<u32>,
    /// Save a checkpoint every N steps (0: only the final adapter).
    #[arg(long, default_value_t = 50)]
    pub save_every: u32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Trainer backend.
    #[arg(long, default_value = "reference")]
    pub backend: String,
    /// Base model: a preset name, hf://org/repo@revision/path, or an
    /// artifact-store URI (default: the backend's, where it has one).
    #[arg(long)]
    pub model: Option<String>,
    /// Model family of a non-preset model: flux, sdxl, wan, qwen_image, z_image, llm.
    #[arg(long)]
    pub family: Option<String>,
    /// For language-model backends: sft, dpo or orpo.
    #[arg(long)]
    pub method: Option<String>,
    /// A backend option, key=value; the value is typed as an integer, a
    /// number, true/false, or text (repeatable).
    #[arg(long = "extra", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub extras: Vec<(String, String)>,
    /// Hugging Face token for gated models (sent as the job's secret, never stored in logs).
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,
    /// GPU pool that trains the job.
    #[arg(long)]
    pub pool: Option<String>,
    /// Where outputs are delivered besides the artifact store: a folder or a
    /// URI — file://, s3://, gs://, az://, hf://org/repo[@branch][/path]
    /// (a '/' in the branch written %2F) (repeatable).
    #[arg(long = "dest", value_name = "DIR_OR_URI")]
    pub destinations: Vec<String>,
    /// The --dest destinations are one fallback chain: tried in order, the
    /// first that succeeds is the delivery (each failure noted in the job's
    /// events).
    #[arg(long)]
    pub dest_chain: bool,
    /// hf:// destinations: a repository the delivery creates is public
    /// (default private). An existing repository keeps its visibility.
    #[arg(long)]
    pub hf_public: bool,
    /// hf:// destinations: the model card's license, a Hub license id
    /// (apache-2.0, mit, openrail++, other…; default other).
    #[arg(long, value_name = "ID", value_parser = parse_license)]
    pub license: Option<String>,
    /// Caption backend: template (default), openai, gemini or command.
    #[arg(long)]
    pub caption_backend: Option<String>,
    /// The captioning model (openai: the served model; gemini: e.g.
    /// gemini-2.5-flash); default: the fleet's.
    #[arg(long)]
    pub caption_model: Option<String>,
    /// The instruction sent with each image or clip (default: the model
    /// family's).
    #[arg(long)]
    pub caption_prompt: Option<String>,
    /// The fleet's caption program, for --caption-backend command.
    #[arg(long)]
    pub caption_command: Option<String>,
    /// A backend tried for a file the first could not caption (e.g. template).
    #[arg(long)]
    pub caption_fallback: Option<String>,
    /// What a file no backend could caption does: fail (default) or template.
    #[arg(long)]
    pub caption_on_error: Option<String>,
    /// Stop after captioning until the captions are approved (`yard
    /// captions`, `yard approve`).
    #[arg(long)]
    pub review: bool,
    /// Submitting again with the same key returns the first job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Seconds the whole job may take from submission; past it the job
    /// fails with deadline_exceeded (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub timeout_secs: u64,
    /// Seconds a finished job's record and artifacts are kept (0 = kept).
    #[arg(long, default_value_t = 0)]
    pub ttl_secs: u64,
    /// A label, key=value (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// An http(s) URL the fleet POSTs to (signed, Standard Webhooks) when
    /// the job ends, instead of polling.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// What the webhook is told (repeatable): completed (the final state,
    /// the default) or state (every state change).
    #[arg(long = "webhook-event", value_name = "EVENT", requires = "webhook",
          value_parser = ["completed", "state"])]
    pub webhook_events: Vec<String>,
    /// Keep following the job after submitting it.
    #[arg(long)]
    pub watch: bool,
    /// Config for the artifact store the upload goes to.
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// A Hub license id, checked as the coordinator checks
/// `Destination.license` ([`hf::valid_license`]).
///
/// [`hf::valid_license`]: trainyard_core::destination::hf::valid_license
fn parse_license(raw: &str) -> Result<String, String> {
    if trainyard_core::destination::hf::valid_license(raw) {
        Ok(raw.to_string())
    } else {
        Err(format!(
            "{raw:?} is not a Hub license id: lowercase letters, digits, '.', '-' and '+' \
             (e.g. apache-2.0, mit, other)"
        ))
    }
}

fn parse_label(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{raw:?} is not of the form key=value")),
    }
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    pub job: String,
    /// Also print the trainer's and services' log lines.
    #[arg(long)]
    pub logs: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only jobs in this state.
    #[arg(long)]
    pub state: Option<StateArg>,
    /// At most this many jobs.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// One JSON record per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    pub job: String,
    /// The whole record as protobuf JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MetricsArgs {
    pub job: String,
    /// Only this metric ("loss"; repeatable).
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// One JSON object per series.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    pub job: String,
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Args, Debug)]
pub struct CaptionsArgs {
    pub job: String,
    /// Write each caption to DIR/<name>.txt, with the version they were
    /// read at in DIR/yard-captions.json.
    #[arg(long, value_name = "DIR", conflicts_with = "apply")]
    pub export: Option<PathBuf>,
    /// Send the captions changed in DIR since `--export` (refused if the
    /// job's captions changed meanwhile).
    #[arg(long, value_name = "DIR")]
    pub apply: Option<PathBuf>,
    /// The captions as protobuf JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ApproveArgs {
    pub job: String,
    /// Approve only if the captions are still at this version.
    #[arg(long)]
    pub version: Option<u32>,
}

#[derive(Args, Debug)]
pub struct FetchArgs {
    pub job: String,
    /// Folder to download into (created when missing).
    pub dir: PathBuf,
    /// Config for the artifact store the outputs are in.
    #[command(flatten)]
    pub service: ServiceArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum StateArg {
    Queued,
    Preparing,
    AwaitingReview,
    Training,
    Delivering,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateArg> for JobState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Queued => JobState::Queued,
            StateArg::Preparing => JobState::Preparing,
            StateArg::AwaitingReview => JobState::AwaitingReview,
            StateArg::Training => JobState::Training,
            StateArg::Delivering => JobState::Delivering,
            StateArg::Succeeded => JobState::Succeeded,
            StateArg::Failed => JobState::Failed,
            StateArg::Cancelled => JobState::Cancelled,
        }
    }
}
