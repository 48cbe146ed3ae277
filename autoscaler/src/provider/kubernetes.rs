//! The `kubernetes` provider: each pool is a Deployment, and its machines
//! are the Deployment's pods. Kubernetes counts replicas, it does not name
//! machines, so the provider maps the trait onto the `scale` subresource:
//!
//! - `list`: the pods matching each pool's Deployment selector (read from
//!   the Scale's `status.selector`, the Deployment's `spec.selector`
//!   rendered as a label selector), one [`Machine`] each, named after the
//!   pod. A pod that is deleting, `Failed` or `Succeeded`, or whose
//!   container is in a crash loop, is [`MachineState::Exited`].
//! - `launch`: one more replica. The Scale is read, then written back with
//!   `spec.replicas + 1` by a `PUT` carrying the `resourceVersion` read
//!   (optimistic concurrency): a write that raced another (a second
//!   autoscaler, `kubectl scale`) gets 409 Conflict and is redone from a
//!   fresh read, never applied twice. A `PUT` whose reply was lost is sent
//!   again with the same `resourceVersion`; if the first one landed, the
//!   retry gets 409, and a fresh read already showing the count it aimed at
//!   ends the launch there. The pod's name is chosen by the Deployment's
//!   ReplicaSet later, so the machine returned is `Pending` and named after
//!   the launch; [`Provider::replica_based`] says so to the service, which
//!   counts a pool's machines instead of matching names (the worker's id is
//!   its pod's name). A launch name already served is answered from memory
//!   without raising the count again.
//! - `release(machine)`: the pod's `controller.kubernetes.io/pod-deletion-cost`
//!   annotation is set to the lowest value (a merge patch), then the
//!   replicas are lowered by one, so the ReplicaSet deletes that pod first
//!   among pods of equal readiness (the controller still prefers to delete
//!   unscheduled, pending and not-ready pods before any ready one). A pod
//!   already gone, deleting or finished is released without lowering the
//!   count: its ReplicaSet has replaced it or it was released before.
//!
//! Every call authenticates with a bearer token read from `token_file` (the
//! in-cluster service account's by default, read again on each call since
//! kubelet rotates it), never logged. 429 and 5xx answers and transport
//! errors are retried a few times with a growing delay, then reported as
//! [`ProviderError::Unavailable`]; 401 and 403 are
//! [`ProviderError::Refused`], and so is a Deployment that does not exist.
//! The RBAC this needs: `get`, `update` on `deployments/scale` and `get`,
//! `list`, `patch` on `pods` (see `deploy/k8s/base/autoscaler.yaml`).

use super::{Launch, Machine, MachineState, Provider, ProviderError};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use trainyard_core::config::KubernetesConfig;

/// The in-cluster service account's files.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The annotation the ReplicaSet controller ranks pods by when scaling down.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Launch names remembered for idempotency.
const LEDGER_LEN: usize = 1024;
/// Conflicting writes redone before giving up (as unavailable).
const CONFLICT_ATTEMPTS: u32 = 8;
/// Attempts of one request on 429, 5xx or a transport error.
const HTTP_ATTEMPTS: u32 = 5;
/// The first retry's delay; each next one doubles, up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(3);
/// Longest wait for one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Pools as Deployments of one namespace of a Kubernetes cluster.
pub struct KubernetesProvider {
    http: reqwest::Client,
    api: url::Url,
    namespace: String,
    token_file: PathBuf,
    deployments: BTreeMap<String, String>,
    /// Launches served, newest last: a repeated launch name is answered
    /// with the machine given the first time.
    ledger: Mutex<VecDeque<Machine>>,
}

impl std::fmt::Debug for KubernetesProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesProvider")
            .field("api", &self.api.as_str())
            .field("namespace", &self.namespace)
            .field("deployments", &self.deployments)
            .finish_non_exhaustive()
    }
}

/// The `autoscaling/v1` Scale of a Deployment.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Scale {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: ScaleSpec,
    #[serde(default)]
    status: ScaleStatus,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    resource_version: String,
    #[serde(default, skip_serializing)]
    creation_timestamp: Option<String>,
    #[serde(default, skip_serializing)]
    deletion_timestamp: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ScaleSpec {
    #[serde(default)]
    replicas: i32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ScaleStatus {
    #[serde(default)]
    replicas: i32,
    #[serde(default)]
    selector: String,
}

#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    node_name: String,
    #[serde(default)]
    node_selector: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    phase: String,
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Default, Deserialize)]
struct ContainerStatus {
    #[serde(default)]
    state: ContainerState,
}

#[derive(Debug, Default, Deserialize)]
struct ContainerState {
    waiting: Option<Waiting>,
    running: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct Waiting {
    #[serde(default)]
    reason: String,
}

/// A Kubernetes `Status` error body.
#[derive(Debug, Default, Deserialize)]
struct Status {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    message: String,
}

/// How one request ended, once retries are spent.
enum Failure {
    /// 409; `retried` when an earlier copy of the request (answered 5xx,
    /// or not at all) may have landed.
    Conflict {
        retried: bool,
    },
    NotFound(String),
    Provider(ProviderError),
}

impl From<ProviderError> for Failure {
    fn from(e: ProviderError) -> Self {
        Failure::Provider(e)
    }
}

/// The state a pod's phase and containers say.
fn pod_state(pod: &Pod) -> MachineState {
    if pod.metadata.deletion_timestamp.is_some() {
        return MachineState::Exited;
    }
    match pod.status.phase.as_str() {
        "Failed" | "Succeeded" => MachineState::Exited,
        "Running" => {
            let statuses = &pod.status.container_statuses;
            let crashing = statuses.iter().any(|c| {
                c.state
                    .waiting
                    .as_ref()
                    .is_some_and(|w| w.reason == "CrashLoopBackOff")
            });
            if crashing {
                MachineState::Exited
            } else if !statuses.is_empty() && statuses.iter().all(|c| c.state.running.is_some()) {
                MachineState::Running
            } else {
                MachineState::Pending
            }
        }
        _ => MachineState::Pending,
    }
}

/// Milliseconds since the epoch of an RFC 3339 UTC time as the API writes
/// it (`2026-12-06T20:15:00Z`); 0 when it is not one.
fn epoch_ms(rfc3339: &str) -> i64 {
    trainyard_core::parse_rfc3339(rfc3339).unwrap_or(0)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The delay before retry `n` (from 1), or a server's `Retry-After` when
/// longer (both at most [`MAX_DELAY`]).
fn retry_delay(n: u32, retry_after: Option<Duration>) -> Duration {
    let exp = FIRST_DELAY.saturating_mul(1 << n.saturating_sub(1).min(16));
    exp.max(retry_after.unwrap_or_default()).min(MAX_DELAY)
}

impl KubernetesProvider {
    /// A provider for `config`: its API server (in-cluster from
    /// `KUBERNETES_SERVICE_HOST`/`_PORT` when `api_url` is empty), the CA
    /// the server's certificate must chain to (the service account's
    /// `ca.crt` in-cluster), and the token file.
    pub async fn new(config: &KubernetesConfig) -> Result<Self, ProviderError> {
        let sa = PathBuf::from(SERVICE_ACCOUNT_DIR);
        let in_cluster = config.api_url.is_empty();
        let api = if in_cluster {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                ProviderError::Refused(
                    "no [autoscaler.kubernetes] api_url and KUBERNETES_SERVICE_HOST is unset"
                        .into(),
                )
            })?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            format!("https://{host}:{port}")
        } else {
            config.api_url.clone()
        };
        let api = url::Url::parse(&api)
            .map_err(|e| ProviderError::Refused(format!("kubernetes api url: {e}")))?;
        let ca_file = match &config.ca_file {
            Some(f) => Some(f.clone()),
            None if in_cluster => Some(sa.join("ca.crt")),
            None => None,
        };
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca_file) = ca_file {
            let pem = tokio::fs::read(&ca_file).await.map_err(|e| {
                ProviderError::Refused(format!("reading the CA {}: {e}", ca_file.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ProviderError::Refused(format!("the CA {}: {e}", ca_file.display()))
            })?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ProviderError::Refused(format!("http client: {e}")))?;
        Ok(Self {
            http,
            api,
            namespace: config.namespace.clone(),
            token_file: config
                .token_file
                .clone()
                .unwrap_or_else(|| sa.join("token")),
            deployments: config.deployments.clone(),
            ledger: Mutex::new(VecDeque::new()),
        })
    }

    fn deployment(&self, pool: &str) -> Result<&str, ProviderError> {
        self.deployments
            .get(pool)
            .map(String::as_str)
            .ok_or_else(|| {
                ProviderError::Refused(format!(
                    "pool {pool} has no deployment in [autoscaler.kubernetes] deployments"
                ))
            })
    }

    fn url(&self, segments: &[&str]) -> url::Url {
        let mut url = self.api.clone();
        url.path_segments_mut()
            .expect("an http(s) url has path segments")
            .pop_if_empty()
            .extend(segments);
        url
    }

    fn scale_url(&self, deployment: &str) -> url::Url {
        self.url(&[
            "apis",
            "apps",
            "v1",
            "namespaces",
            &self.namespace,
            "deployments",
            deployment,
            "scale",
        ])
    }

    fn pod_url(&self, pod: &str) -> url::Url {
        self.url(&["api", "v1", "namespaces", &self.namespace, "pods", pod])
    }

    async fn token(&self) -> Result<String, ProviderError> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| {
                ProviderError::Refused(format!(
                    "reading the token file {}: {e}",
                    self.token_file.display()
                ))
            })?;
        Ok(token.trim().to_string())
    }

    /// One request, retried on 429, 5xx and transport errors; the body of
    /// a 2xx answer. A 409 and a 404 are the caller's to handle.
    async fn call(
        &self,
        method: Method,
        url: url::Url,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Vec<u8>, Failure> {
        let token = self.token().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(&token)
                .header(reqwest::header::ACCEPT, "application/json");
            if let Some((content_type, bytes)) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, *content_type)
                    .body(bytes.clone());
            }
            let (why, retry_after) = match request.send().await {
                Err(e) => (format!("{e}"), None),
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let bytes = response.bytes().await.map(|b| b.to_vec());
                    if status.is_success() {
                        match bytes {
                            Ok(b) => return Ok(b),
                            Err(e) => (format!("reading the answer: {e}"), None),
                        }
                    } else {
                        let st: Status = bytes
                            .ok()
                            .and_then(|b| serde_json::from_slice(&b).ok())
                            .unwrap_or_default();
                        let why = format!("{method} {}: {status} {}", url.path(), st.message);
                        match status {
                            StatusCode::CONFLICT => {
                                return Err(Failure::Conflict {
                                    retried: attempt > 1,
                                });
                            }
                            StatusCode::NOT_FOUND => return Err(Failure::NotFound(why)),
                            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                                return Err(ProviderError::Refused(why).into());
                            }
                            s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                                (why, retry_after)
                            }
                            _ => {
                                return Err(ProviderError::Refused(format!(
                                    "{why} ({})",
                                    st.reason
                                ))
                                .into());
                            }
                        }
                    }
                }
            };
            if attempt >= HTTP_ATTEMPTS {
                return Err(ProviderError::Unavailable(why).into());
            }
            let delay = retry_delay(attempt, retry_after);
            tracing::debug!(%method, path = url.path(), attempt, delay_ms = delay.as_millis() as u64, error = %why, "kubernetes request retried");
            tokio::time::sleep(delay).await;
        }
    }

    async fn get_scale(&self, deployment: &str) -> Result<Scale, ProviderError> {
        match self
            .call(Method::GET, self.scale_url(deployment), None)
            .await
        {
            Ok(body) => serde_json::from_slice(&body).map_err(|e| {
                ProviderError::Unavailable(format!("a Scale that does not parse: {e}"))
            }),
            Err(Failure::NotFound(_)) => Err(ProviderError::Refused(format!(
                "deployment {deployment} not found in namespace {}",
                self.namespace
            ))),
            Err(Failure::Conflict { .. }) => {
                Err(ProviderError::Unavailable("409 conflict on a read".into()))
            }
            Err(Failure::Provider(e)) => Err(e),
        }
    }

    /// Moves `deployment`'s replicas by `delta` (never below zero): read,
    /// then write with the version read; a conflict is redone from a fresh
    /// read. Returns the replicas asked for.
    async fn scale_by(&self, deployment: &str, delta: i32) -> Result<i32, ProviderError> {
        // Set when a write may have landed without its answer arriving.
        let mut aimed: Option<i32> = None;
        for _ in 0..CONFLICT_ATTEMPTS {
            let scale = self.get_scale(deployment).await?;
            if let Some(target) = aimed
                && scale.spec.replicas == target
            {
                return Ok(target);
            }
            let target = (scale.spec.replicas + delta).max(0);
            if target == scale.spec.replicas {
                return Ok(target);
            }
            let body = Scale {
                api_version: "autoscaling/v1".into(),
                kind: "Scale".into(),
                metadata: ObjectMeta {
                    name: deployment.into(),
                    namespace: self.namespace.clone(),
                    resource_version: scale.metadata.resource_version.clone(),
                    ..Default::default()
                },
                spec: ScaleSpec { replicas: target },
                status: ScaleStatus::default(),
            };
            let body = serde_json::to_vec(&body).expect("a Scale serialises");
            // A retried PUT (lost answer, 5xx) carries the same version: if
            // an earlier copy landed, it gets 409 and the read above ends it.
            aimed = None;
            match self
                .call(
                    Method::PUT,
                    self.scale_url(deployment),
                    Some(("application/json", body)),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(deployment, replicas = target, "deployment scaled");
                    return Ok(target);
                }
                Err(Failure::Conflict { retried }) => {
                    if retried {
                        aimed = Some(target);
                    }
                    tracing::debug!(deployment, retried, "scale conflict; read again");
                }
                Err(Failure::NotFound(_)) => {
                    return Err(ProviderError::Refused(format!(
                        "deployment {deployment} not found in namespace {}",
                        self.namespace
                    )));
                }
                Err(Failure::Provider(e)) => return Err(e),
            }
        }
        Err(ProviderError::Unavailable(format!(
            "deployment {deployment}: {CONFLICT_ATTEMPTS} conflicting writes in a row"
        )))
    }

    async fn pods(&self, pool: &str, deployment: &str) -> Result<Vec<Machine>, ProviderError> {
        let scale = self.get_scale(deployment).await?;
        if scale.status.selector.is_empty() {
            return Err(ProviderError::Refused(format!(
                "deployment {deployment} has no selector in its Scale"
            )));
        }
        let mut url = self.url(&["api", "v1", "namespaces", &self.namespace, "pods"]);
        url.query_pairs_mut()
            .append_pair("labelSelector", &scale.status.selector);
        let body = match self.call(Method::GET, url, None).await {
            Ok(body) => body,
            Err(Failure::Provider(e)) => return Err(e),
            Err(Failure::NotFound(why)) => return Err(ProviderError::Refused(why)),
            Err(Failure::Conflict { .. }) => {
                return Err(ProviderError::Unavailable("409 conflict on a read".into()));
            }
        };
        let list: PodList = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Unavailable(format!("a PodList that does not parse: {e}"))
        })?;
        Ok(list
            .items
            .iter()
            .map(|pod| Machine {
                id: pod.metadata.name.clone(),
                name: pod.metadata.name.clone(),
                pool: pool.to_string(),
                gpu_type: pod
                    .spec
                    .node_selector
                    .get("nvidia.com/gpu.product")
                    .cloned()
                    .unwrap_or_default(),
                dollars_per_hour: 0.0,
                interruptible: false,
                state: pod_state(pod),
                created_at_ms: pod
                    .metadata
                    .creation_timestamp
                    .as_deref()
                    .map(epoch_ms)
                    .unwrap_or(0),
                host: pod.spec.node_name.clone(),
            })
            .collect())
    }

    /// Marks `pod` to go first on the next scale-down. `Ok(false)` when
    /// the pod is gone, deleting or finished (nothing left to scale down).
    async fn mark_for_deletion(&self, pod: &str) -> Result<bool, ProviderError> {
        let patch = json!({"metadata": {"annotations": {DELETION_COST: i32::MIN.to_string()}}});
        let body = serde_json::to_vec(&patch).expect("a patch serialises");
        match self
            .call(
                Method::PATCH,
                self.pod_url(pod),
                Some(("application/merge-patch+json", body)),
            )
            .await
        {
            Ok(body) => {
                let pod: Pod = serde_json::from_slice(&body).map_err(|e| {
                    ProviderError::Unavailable(format!("a Pod that does not parse: {e}"))
                })?;
                // A crash-looping pod still holds a replica: it is lowered.
                let finished = matches!(pod.status.phase.as_str(), "Failed" | "Succeeded");
                Ok(pod.metadata.deletion_timestamp.is_none() && !finished)
            }
            Err(Failure::NotFound(_)) => Ok(false),
            Err(Failure::Conflict { .. }) => Err(ProviderError::Unavailable(
                "409 conflict on a merge patch".into(),
            )),
            Err(Failure::Provider(e)) => Err(e),
        }
    }
}

#[async_trait::async_trait]
impl Provider for KubernetesProvider {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn replica_based(&self) -> bool {
        true
    }

    async fn list(&self) -> Result<Vec<Machine>, ProviderError> {
        let mut machines = Vec::new();
        for (pool, deployment) in &self.deployments {
            machines.extend(self.pods(pool, deployment).await?);
        }
        Ok(machines)
    }

    async fn launch(&self, launch: &Launch) -> Result<Machine, ProviderError> {
        let deployment = self.deployment(&launch.pool)?;
        if let Some(machine) = self
            .ledger
            .lock()
            .expect("ledger lock")
            .iter()
            .find(|m| m.name == launch.name)
        {
            return Ok(machine.clone());
        }
        let replicas = self.scale_by(deployment, 1).await?;
        tracing::info!(launch = %launch.name, pool = %launch.pool, deployment, replicas, "replica added");
        let machine = Machine {
            id: String::new(),
            name: launch.name.clone(),
            pool: launch.pool.clone(),
            gpu_type: launch.gpu_types.first().cloned().unwrap_or_default(),
            dollars_per_hour: 0.0,
            interruptible: false,
            state: MachineState::Pending,
            created_at_ms: now_ms(),
            host: String::new(),
        };
        let mut ledger = self.ledger.lock().expect("ledger lock");
        if ledger.len() >= LEDGER_LEN {
            ledger.pop_front();
        }
        ledger.push_back(machine.clone());
        Ok(machine)
    }

    async fn release(&self, machine: &Machine) -> Result<(), ProviderError> {
        let deployment = self.deployment(&machine.pool)?;
        self.ledger
            .lock()
            .expect("ledger lock")
            .retain(|m| m.name != machine.name);
        // A launched replica whose pod is not known yet has no id: the
        // controller picks which pod goes (it prefers unscheduled ones).
        if !machine.id.is_empty() && !self.mark_for_deletion(&machine.id).await? {
            tracing::debug!(pod = %machine.id, "pod already gone, deleting or finished");
            return Ok(());
        }
        let replicas = self.scale_by(deployment, -1).await?;
        tracing::info!(pod = %machine.id, deployment, replicas, "replica released");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_of_api_times() {
        assert_eq!(epoch_ms("1970-01-01T00:00:00Z"), 0);
        assert_eq!(epoch_ms("2026-12-06T20:15:00Z"), 1_796_588_100_000);
        assert_eq!(epoch_ms("2000-03-01T00:00:01Z"), 951_868_801_000);
        assert_eq!(epoch_ms("not a time"), 0);
    }

    fn pod(phase: &str, containers: serde_json::Value, deleting: bool) -> Pod {
        let mut v = json!({"metadata": {"name": "p"}, "status": {"phase": phase, "containerStatuses": containers}});
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!("2026-12-06T20:15:00Z");
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn states_from_phase_and_containers() {
        let running = json!([{"state": {"running": {"startedAt": "2026-12-06T20:15:00Z"}}}]);
        let creating = json!([{"state": {"waiting": {"reason": "ContainerCreating"}}}]);
        let crashing = json!([{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]);
        assert_eq!(
            pod_state(&pod("Pending", json!([]), false)),
            MachineState::Pending
        );
        assert_eq!(
            pod_state(&pod("Running", running.clone(), false)),
            MachineState::Running
        );
        assert_eq!(
            pod_state(&pod("Running", creating, false)),
            MachineState::Pending
        );
        assert_eq!(
            pod_state(&pod("Running", crashing, false)),
            MachineState::Exited
        );
        assert_eq!(
            pod_state(&pod("Running", running, true)),
            MachineState::Exited
        );
        assert_eq!(
            pod_state(&pod("Failed", json!([]), false)),
            MachineState::Exited
        );
        assert_eq!(
            pod_state(&pod("Succeeded", json!([]), false)),
            MachineState::Exited
        );
    }

    #[test]
    fn delays_grow_and_are_capped() {
        assert_eq!(retry_delay(1, None), FIRST_DELAY);
        assert_eq!(retry_delay(2, None), FIRST_DELAY * 2);
        assert_eq!(retry_delay(30, None), MAX_DELAY);
        assert_eq!(
            retry_delay(1, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(retry_delay(1, Some(Duration::from_secs(600))), MAX_DELAY);
    }
}
