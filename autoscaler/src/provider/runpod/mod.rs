//! RunPod pods through RunPod's GraphQL API (`[autoscaler.runpod]`).
//!
//! # Which API, and why
//! Every call goes to GraphQL (`graphql_url`), with the key as
//! `Authorization: Bearer` (never `?api_key=`, which would put it in every
//! logged URL):
//!
//! | call | operation |
//! |---|---|
//! | [`Provider::list`] | `myself { pods { … env machine { dataCenterId } runtime … } }` |
//! | prices and stock | `gpuTypes { id lowestPrice(input:{gpuCount}) { minimumBidPrice uninterruptablePrice stockStatus } }` |
//! | launch, interruptible | `podRentInterruptable(input:{bidPerGpu, …})` |
//! | launch, on demand | `podFindAndDeployOnDemand(input:{…})` |
//! | [`Provider::release`] | `podTerminate(input:{podId})` — never `podStop`: a stopped pod keeps billing its disk and may resume with zero GPUs |
//!
//! REST v1 is retired (15 Nov 2026) and the v2 `CreatePodRequest` has no
//! spot field, so interruptible pods exist only through GraphQL. On-demand
//! pods use GraphQL too, with the same input type but for the bid: one
//! request shape, one error shape (`errors[].message`) and one stand-in to
//! test against, instead of two APIs with two error models. The price of
//! that choice: GraphQL takes one `dataCenterId` per create, so the
//! configured data centres (less those avoided) are tried one by one. Should
//! GraphQL on-demand creation go away, v2 `POST /v2/pods` (`rest_url`) takes
//! the same fields nested (`gpu:{id,count}`, `mounts`, `dataCenterIds[]`).
//!
//! # Launch
//! 1. List: a pod already named `launch.name` is returned (a launch
//!    repeated after a lost reply or by a second replica starts nothing).
//! 2. `gpuTypes` for the launch's GPU count; the launch's types are tried
//!    in its order, skipping those not offered, with `stockStatus: None`,
//!    or dearer than `max_price_per_gpu` (interruptible: the minimum bid,
//!    bid = max(`bid_per_gpu`, minimum), at most the cap).
//! 3. Each is created with the launch's name, the image, the environment
//!    (`[autoscaler.runpod] env`, then the pool's, then the launch's, then
//!    the fleet markers `TY_AUTOSCALER_FLEET|POOL|GPU_TYPE` that `list`
//!    reads), the network volume at `volume_mount_path`, the container disk,
//!    the cloud type and a data centre.
//! 4. Before a create is sent again after a transient failure (a timeout,
//!    a dropped connection, 5xx, 429), the pods are listed once more: a
//!    create whose reply was lost has made its pod, which is returned.
//!
//! # Failures
//! | RunPod says | result |
//! |---|---|
//! | "no longer any instances available…", a bid under the minimum | next type / data centre; none left → [`ProviderError::OutOfStock`] |
//! | spend limit, balance | [`ProviderError::SpendLimit`] at once, no further create |
//! | 429, 5xx, timeouts, connection errors | retried with exponential backoff, at least `Retry-After` (bounded), then [`ProviderError::Unavailable`] |
//! | 401, 403 | [`ProviderError::Refused`] |
//! | any other error on every type | [`ProviderError::Refused`] (the request is wrong) |
//! | terminate of a pod not found | released (`Ok`) |
//!
//! Pods are the fleet's when their name starts with `<fleet_name>-` and
//! their env carries `TY_AUTOSCALER_FLEET=<fleet_name>`. A pod's state:
//! `RUNNING` with a runtime → running; `RUNNING`/`CREATED` without one →
//! pending; `EXITED`/`TERMINATED` (a preempted spot pod) → exited. RunPod
//! gives spot pods 5 s from SIGTERM to SIGKILL; the fleet learns of a
//! preemption from the listing.

mod api;
mod model;

pub use model::{ENV_FLEET, ENV_GPU_TYPE, ENV_POOL};

use crate::provider::{Launch, Machine, Provider, ProviderError};
use api::{ApiKey, CallError, Graphql};
use model::{Candidate, ErrorMeaning, GpuType, Pod, candidates, data_centres, pod_env};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use trainyard_core::config::{AutoscalerConfig, RunpodConfig};
use trainyard_core::retry::Policy;

const POD_FIELDS: &str = "id name desiredStatus costPerHr podType env machineId \
     machine { podHostId dataCenterId gpuDisplayName } runtime { uptimeInSeconds }";

fn list_query() -> String {
    ["query Pods { myself { pods { ", POD_FIELDS, " } } }"].concat()
}

fn gpu_types_query() -> &'static str {
    "query GpuTypes($lowestPrice: LowestPriceInput!) { gpuTypes { id displayName memoryInGb \
     lowestPrice(input: $lowestPrice) { minimumBidPrice uninterruptablePrice stockStatus } } }"
}

fn create_mutation(interruptible: bool) -> (String, &'static str) {
    let (field, input) = if interruptible {
        ("podRentInterruptable", "PodRentInterruptableInput")
    } else {
        ("podFindAndDeployOnDemand", "PodFindAndDeployOnDemandInput")
    };
    let query = [
        "mutation Create($input: ",
        input,
        "!) { ",
        field,
        "(input: $input) { ",
        POD_FIELDS,
        " } }",
    ]
    .concat();
    (query, field)
}

const TERMINATE: &str =
    "mutation Terminate($input: PodTerminateInput!) { podTerminate(input: $input) }";

/// How hard the provider tries one call.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrySettings {
    /// One HTTP request's deadline (a create past it counts as lost).
    pub request_timeout: Duration,
    /// Tries per call (1: no retry).
    pub attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// A `Retry-After` longer than this ends the call as unavailable
    /// instead of holding the planning pass.
    pub max_retry_after: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            attempts: 5,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// The `runpod` provider.
pub struct RunpodProvider {
    fleet: String,
    config: RunpodConfig,
    pool_env: BTreeMap<String, BTreeMap<String, String>>,
    api: Graphql,
    settings: RetrySettings,
    policy: Policy,
    /// When this process first saw each pod (ms since the epoch).
    first_seen: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for RunpodProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunpodProvider")
            .field("fleet", &self.fleet)
            .field("graphql_url", &self.config.graphql_url)
            .field("image", &self.config.image)
            .field("key", self.api.key())
            .finish_non_exhaustive()
    }
}

impl RunpodProvider {
    /// From `[autoscaler]`, reading the key from `runpod.api_key_file`.
    pub fn from_config(config: &AutoscalerConfig) -> Result<Self, ProviderError> {
        Self::with_settings(config, RetrySettings::default())
    }

    /// As [`RunpodProvider::from_config`], with its own retry settings.
    pub fn with_settings(
        config: &AutoscalerConfig,
        settings: RetrySettings,
    ) -> Result<Self, ProviderError> {
        let runpod = &config.runpod;
        let path = runpod
            .api_key_file
            .as_ref()
            .ok_or_else(|| ProviderError::Refused("runpod.api_key_file is not set".into()))?;
        let key = std::fs::read_to_string(path)
            .map_err(|e| {
                ProviderError::Refused(format!("runpod api key file {}: {e}", path.display()))
            })?
            .trim()
            .to_string();
        if key.is_empty() {
            return Err(ProviderError::Refused(format!(
                "runpod api key file {} is empty",
                path.display()
            )));
        }
        if runpod.image.is_empty() {
            return Err(ProviderError::Refused("runpod.image is not set".into()));
        }
        let api = Graphql::new(
            runpod.graphql_url.clone(),
            ApiKey::new(key),
            settings.request_timeout,
        )
        .map_err(ProviderError::Refused)?;
        let policy = Policy {
            initial_delay: settings.initial_delay,
            multiplier: 2.0,
            max_delay: settings.max_delay.max(settings.initial_delay),
            max_attempts: settings.attempts.max(1),
            jitter: 0.2,
            non_retryable: Vec::new(),
            max_hint: settings.max_retry_after,
        };
        Ok(Self {
            fleet: config.fleet_name.clone(),
            config: runpod.clone(),
            pool_env: config
                .pools
                .iter()
                .map(|(pool, policy)| (pool.clone(), policy.env.clone()))
                .collect(),
            api,
            settings,
            policy,
            first_seen: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `op` (given its try number, from 1) until it succeeds, fails
    /// for good, or runs out of tries; waits between tries.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, CallError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let mut attempt = 1;
        loop {
            let error = match op(attempt).await {
                Err(e) if e.is_transient() && attempt < self.policy.max_attempts => e,
                done => return done,
            };
            let hint = match &error {
                CallError::Transient {
                    retry_after: Some(after),
                    ..
                } => *after,
                _ => Duration::ZERO,
            };
            if hint > self.settings.max_retry_after {
                return Err(error);
            }
            let delay = self.policy.delay(attempt, hint);
            tracing::debug!(
                call = what,
                attempt,
                delay_ms = delay.as_millis() as u64,
                error = error.message(),
                "runpod call failed, retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn pods_once(&self) -> Result<Vec<Pod>, CallError> {
        let data = self.api.call(&list_query(), serde_json::json!({})).await?;
        let pods = data
            .pointer("/myself/pods")
            .cloned()
            .unwrap_or(serde_json::Value::Array(Vec::new()));
        serde_json::from_value(pods).map_err(|e| CallError::Malformed(e.to_string()))
    }

    fn machine(&self, pod: &Pod) -> Machine {
        let now = now_ms();
        let created = *self
            .first_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(pod.id.clone())
            .or_insert(now);
        pod.to_machine(created)
    }

    /// The fleet's pod named `name`, listed once.
    async fn find_once(&self, name: &str) -> Result<Option<Machine>, CallError> {
        Ok(self
            .pods_once()
            .await?
            .iter()
            .find(|p| p.name == name && p.is_of_fleet(&self.fleet))
            .map(|p| self.machine(p)))
    }

    async fn gpu_types(&self, gpu_count: u32) -> Result<Vec<GpuType>, CallError> {
        let mut lowest = serde_json::json!({ "gpuCount": gpu_count.max(1) });
        if self.config.cloud_type.eq_ignore_ascii_case("SECURE") {
            lowest["secureCloud"] = true.into();
        }
        let variables = serde_json::json!({ "lowestPrice": lowest });
        let data = self
            .retrying("gpuTypes", |_| {
                self.api.call(gpu_types_query(), variables.clone())
            })
            .await?;
        serde_json::from_value(data.get("gpuTypes").cloned().unwrap_or_default())
            .map_err(|e| CallError::Malformed(e.to_string()))
    }

    fn create_input(
        &self,
        launch: &Launch,
        candidate: &Candidate,
        data_centre: Option<&str>,
    ) -> serde_json::Value {
        let env: Vec<serde_json::Value> = pod_env(
            &self.fleet,
            &self.config.env,
            self.pool_env.get(&launch.pool),
            launch,
            &candidate.gpu_type,
        )
        .into_iter()
        .map(|(key, value)| serde_json::json!({ "key": key, "value": value }))
        .collect();
        let mut input = serde_json::json!({
            "name": launch.name,
            "imageName": self.config.image,
            "gpuTypeId": candidate.gpu_type,
            "gpuCount": launch.gpu_count.max(1),
            "cloudType": self.config.cloud_type,
            "containerDiskInGb": self.config.container_disk_gb,
            "volumeInGb": 0,
            "env": env,
        });
        if !self.config.network_volume_id.is_empty() {
            input["networkVolumeId"] = self.config.network_volume_id.clone().into();
            input["volumeMountPath"] = self.config.volume_mount_path.clone().into();
        }
        if let Some(dc) = data_centre {
            input["dataCenterId"] = dc.into();
        }
        if let Some(bid) = candidate.bid_per_gpu {
            input["bidPerGpu"] = bid.into();
        }
        input
    }

    /// One create, retried on transient failures; before each retry the
    /// pods are listed, and a pod the lost try made is returned.
    async fn create(
        &self,
        launch: &Launch,
        candidate: &Candidate,
        data_centre: Option<&str>,
    ) -> Result<Machine, CallError> {
        let (mutation, field) = create_mutation(candidate.bid_per_gpu.is_some());
        let variables = serde_json::json!({
            "input": self.create_input(launch, candidate, data_centre)
        });
        self.retrying(field, |attempt| {
            let (mutation, variables) = (&mutation, variables.clone());
            async move {
                if attempt > 1
                    && let Some(made) = self.find_once(&launch.name).await?
                {
                    tracing::info!(
                        name = %launch.name,
                        pod = %made.id,
                        "runpod create answered with an error but made its pod"
                    );
                    return Ok(made);
                }
                let data = self.api.call(mutation, variables).await?;
                let pod: Pod = serde_json::from_value(data.get(field).cloned().unwrap_or_default())
                    .map_err(|e| CallError::Malformed(format!("{field}: {e}")))?;
                let mut machine = self.machine(&pod);
                // The reply's selection may be partial; the launch knows.
                if machine.name.is_empty() {
                    machine.name = launch.name.clone();
                }
                if machine.pool.is_empty() {
                    machine.pool = launch.pool.clone();
                }
                machine.gpu_type = candidate.gpu_type.clone();
                machine.interruptible |= candidate.bid_per_gpu.is_some();
                Ok(machine)
            }
        })
        .await
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A failed call as the trait's error.
fn provider_error(error: CallError) -> ProviderError {
    match error {
        CallError::Transient { message, .. } => ProviderError::Unavailable(message),
        CallError::Malformed(message) => ProviderError::Unavailable(message),
        CallError::Auth(message) => ProviderError::Refused(message),
        CallError::Graphql { meaning, message } => match meaning {
            ErrorMeaning::NoCapacity => ProviderError::OutOfStock(message),
            ErrorMeaning::SpendLimit => ProviderError::SpendLimit(message),
            ErrorMeaning::Transient => ProviderError::Unavailable(message),
            ErrorMeaning::Auth | ErrorMeaning::NotFound | ErrorMeaning::Other => {
                ProviderError::Refused(message)
            }
        },
    }
}

#[async_trait::async_trait]
impl Provider for RunpodProvider {
    fn name(&self) -> &'static str {
        "runpod"
    }

    async fn list(&self) -> Result<Vec<Machine>, ProviderError> {
        let pods = self
            .retrying("myself.pods", |_| self.pods_once())
            .await
            .map_err(provider_error)?;
        {
            let mut seen = self.first_seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.retain(|id, _| pods.iter().any(|p| &p.id == id));
        }
        Ok(pods
            .iter()
            .filter(|p| p.is_of_fleet(&self.fleet))
            .map(|p| self.machine(p))
            .collect())
    }

    async fn launch(&self, launch: &Launch) -> Result<Machine, ProviderError> {
        if launch.gpu_types.is_empty() {
            return Err(ProviderError::Refused(format!(
                "pool {}: the runpod provider starts GPU pods only (no gpu_types)",
                launch.pool
            )));
        }
        let existing = self
            .retrying("myself.pods", |_| self.find_once(&launch.name))
            .await
            .map_err(provider_error)?;
        if let Some(machine) = existing {
            return Ok(machine);
        }
        let types = self
            .gpu_types(launch.gpu_count)
            .await
            .map_err(provider_error)?;
        let (chosen, mut failures) = candidates(launch, &types);
        let places = data_centres(&self.config.data_center_ids, &launch.avoid_hosts);
        let (mut capacity, mut other) = (false, false);
        for candidate in &chosen {
            for place in &places {
                match self.create(launch, candidate, place.as_deref()).await {
                    Ok(machine) => {
                        tracing::info!(
                            name = %machine.name,
                            pod = %machine.id,
                            gpu_type = %candidate.gpu_type,
                            bid_per_gpu = candidate.bid_per_gpu,
                            "runpod pod created"
                        );
                        return Ok(machine);
                    }
                    Err(CallError::Graphql { meaning, message }) => match meaning {
                        ErrorMeaning::SpendLimit => return Err(ProviderError::SpendLimit(message)),
                        ErrorMeaning::NoCapacity => {
                            capacity = true;
                            failures.push(format!("{}: {message}", candidate.gpu_type));
                        }
                        _ => {
                            other = true;
                            failures.push(format!("{}: {message}", candidate.gpu_type));
                        }
                    },
                    Err(error) => return Err(provider_error(error)),
                }
            }
        }
        let why = if failures.is_empty() {
            "no gpu type".to_string()
        } else {
            failures.join("; ")
        };
        if other && !capacity {
            Err(ProviderError::Refused(why))
        } else {
            Err(ProviderError::OutOfStock(why))
        }
    }

    async fn release(&self, machine: &Machine) -> Result<(), ProviderError> {
        let variables = serde_json::json!({ "input": { "podId": machine.id } });
        match self
            .retrying("podTerminate", |_| {
                self.api.call(TERMINATE, variables.clone())
            })
            .await
        {
            Ok(_)
            | Err(CallError::Graphql {
                meaning: ErrorMeaning::NotFound,
                ..
            }) => {
                self.first_seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&machine.id);
                Ok(())
            }
            Err(error) => Err(provider_error(error)),
        }
    }
}
