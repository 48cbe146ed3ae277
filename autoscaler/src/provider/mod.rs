//! Where machines come from. A provider starts a machine for a pool,
//! lists the machines carrying the fleet's name tag, and releases one.
//! Every call may be repeated (a lost reply, a second autoscaler replica
//! after a failover): starting is idempotent by the launch's name, and
//! releasing a machine already gone is no error.

pub mod kubernetes;
pub mod local;
pub mod runpod;

use std::collections::BTreeMap;

/// One machine a provider runs for the fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    /// The provider's id (a pod id, a process id).
    pub id: String,
    /// The name tag given at launch ([`Launch::name`]); it is also the id
    /// of the worker the machine runs, so the registry entry the worker
    /// writes names its machine.
    pub name: String,
    /// The pool it serves (`prepare`, `deliver`, `train.<pool>`).
    pub pool: String,
    /// Its GPU type (empty for a CPU machine).
    pub gpu_type: String,
    /// What it costs, in dollars an hour (0 when unknown or free).
    pub dollars_per_hour: f64,
    pub interruptible: bool,
    pub state: MachineState,
    /// Milliseconds since the Unix epoch when it was asked for.
    pub created_at_ms: i64,
    /// The host or data centre it runs on, when the provider says.
    pub host: String,
}

/// A machine's life as its provider sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineState {
    /// Asked for, not running yet (image pulling, queued for capacity).
    Pending,
    Running,
    /// Stopped or gone without being released by the fleet (a spot
    /// machine preempted, a process that exited): to be released and
    /// replaced.
    Exited,
}

/// What to start.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The machine's name tag and its worker's id, unique per launch:
    /// `<fleet_name>-<pool>-<suffix>`. A provider that already runs a
    /// machine of this name returns it instead of starting another.
    pub name: String,
    pub pool: String,
    /// The environment of the service it runs (its pool, its role's
    /// credentials, the worker id).
    pub env: BTreeMap<String, String>,
    /// GPU types in order of preference (empty: a CPU machine).
    pub gpu_types: Vec<String>,
    pub gpu_count: u32,
    pub interruptible: bool,
    /// Dollars per GPU-hour bid for an interruptible machine (0: the
    /// type's minimum).
    pub bid_per_gpu: f64,
    /// A GPU type dearer than this per GPU-hour is not taken (0: any).
    pub max_price_per_gpu: f64,
    /// Hosts or data centres not to use now (recent preemptions).
    pub avoid_hosts: Vec<String>,
}

/// Why a provider call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// None of the launch's GPU types is available (at its price).
    #[error("out of stock: {0}")]
    OutOfStock(String),
    /// The provider refuses to spend more (the account's spend limit or
    /// balance): no machine is started until an operator acts.
    #[error("spend limit reached: {0}")]
    SpendLimit(String),
    /// Worth trying again later (network, 429, 5xx).
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// The request is wrong and will stay so (bad credentials, bad image).
    #[error("provider refused: {0}")]
    Refused(String),
}

/// Where machines come from.
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// `local`, `runpod`, `kubernetes`.
    fn name(&self) -> &'static str;
    /// Whether machines are replicas of a controller (a Kubernetes
    /// Deployment) rather than named machines. Then a launch asks for one
    /// more replica: the machine it returns is `Pending` under the
    /// launch's name, but the machine that comes up is listed under a name
    /// the controller chose (the pod's, which is also its worker's id), so
    /// the service counts a pool's machines rather than waiting for the
    /// launch's name; and an `Exited` machine is replaced by the controller
    /// itself (release it, and launch none for it). False by default.
    fn replica_based(&self) -> bool {
        false
    }
    /// Every machine carrying the fleet's name tag, of every pool.
    async fn list(&self) -> Result<Vec<Machine>, ProviderError>;
    /// Starts one machine, or returns the one already running under
    /// `launch.name`.
    async fn launch(&self, launch: &Launch) -> Result<Machine, ProviderError>;
    /// Releases a machine for good (terminates it; never parks it). A
    /// machine already gone is released.
    async fn release(&self, machine: &Machine) -> Result<(), ProviderError>;
}
