//! A stand-in Kubernetes API server for the `kubernetes` provider's tests:
//! axum on loopback answering the routes the provider uses, with the API's
//! shapes (`autoscaling/v1` `Scale`, `v1` `PodList` and `Pod`, `v1`
//! `Status` errors with `reason` and `code`):
//!
//! - `GET` and `PUT /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`
//!   (a `PUT` whose `metadata.resourceVersion` is not the current one gets
//!   409 Conflict; each write bumps the version);
//! - `GET /api/v1/namespaces/{ns}/pods?labelSelector=k=v,…`;
//! - `PATCH /api/v1/namespaces/{ns}/pods/{name}` with a merge patch
//!   (`application/merge-patch+json` or
//!   `application/strategic-merge-patch+json`; any other type gets 415) of
//!   the pod's annotations.
//!
//! Every request must carry `Authorization: Bearer <token>` (else 401). As
//! a Deployment's replicas change, pods are made or deleted like its
//! ReplicaSet would (named `<deployment>-<template hash>-<5 random
//! characters>`): pending and not-ready pods go before ready ones, then the
//! lowest `controller.kubernetes.io/pod-deletion-cost`, then the newest.
//! Each request is recorded; a test may script failures of the next
//! requests.
//!
//! A Deployment added with a [`PodTemplate`] runs its pods for real
//! ([`kubelet`]): each pod is a child process (a real `ty-worker`, say)
//! with the pod's name in its environment; a deleted pod is `Terminating`
//! (listed with its `deletionTimestamp`) until its process has ended after
//! SIGTERM, or been SIGKILLed after the pod's grace, and then gone. Every
//! pod the ReplicaSet deleted is kept as a [`RemovedPod`].

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Weak;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

mod kubelet;

pub use kubelet::PodTemplate;

/// The annotation that ranks pods for deletion.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Vec<u8>,
    /// The status it was answered with.
    pub status: u16,
}

impl Request {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a json body")
    }
}

/// A pod of the stand-in, as a test sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct FakePod {
    pub name: String,
    pub deployment: String,
    /// `Pending` or `Running`.
    pub phase: String,
    pub annotations: BTreeMap<String, String>,
    /// Its process, on a Deployment with a [`PodTemplate`].
    pub pid: Option<u32>,
    /// Being deleted (`Terminating`): its process is stopping.
    pub deleting: bool,
    /// Its process exited on its own (`CrashLoopBackOff`).
    pub crashed: bool,
    seq: u64,
    created_ms: i64,
    deleted_ms: Option<i64>,
}

impl FakePod {
    fn deletion_cost(&self) -> i64 {
        self.annotations
            .get(DELETION_COST)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn ready(&self) -> bool {
        self.phase == "Running" && !self.crashed
    }
}

/// How a deleted pod's process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodExit {
    /// It exited within the grace after SIGTERM, with this code.
    Terminated(Option<i32>),
    /// It still ran when the grace was over: SIGKILLed.
    Killed,
    /// It had exited on its own before the pod was deleted.
    Crashed(Option<i32>),
}

/// A pod its ReplicaSet deleted, once it is gone.
#[derive(Clone, Debug, PartialEq)]
pub struct RemovedPod {
    pub name: String,
    pub deployment: String,
    /// Its `pod-deletion-cost` when the ReplicaSet chose it.
    pub deletion_cost: i64,
    /// When its deletion started and when it was gone (ms since the epoch).
    pub deleted_at_ms: i64,
    pub gone_at_ms: i64,
    /// How its process ended (`None`: it had none).
    pub exit: Option<PodExit>,
}

struct Deployment {
    match_labels: BTreeMap<String, String>,
    replicas: i32,
    template: Option<PodTemplate>,
}

#[derive(Default)]
struct Inner {
    token: String,
    namespace: String,
    version: u64,
    pod_seq: u64,
    /// Deployments by name, with their Scale's resource version.
    deployments: BTreeMap<String, (Deployment, u64)>,
    pods: Vec<FakePod>,
    requests: Vec<Request>,
    /// Statuses for the next requests of a method (one each, in order).
    failures: VecDeque<(Method, u16)>,
    /// Another writer changes the Scale just before the next PUT lands.
    races: u32,
    /// The next PUTs are applied, then answered 500 (a lost answer).
    lost_answers: u32,
    /// The phase new pods start in.
    new_pod_phase: String,
    /// Pods deleted and gone, in that order.
    removed: Vec<RemovedPod>,
    /// Per running pod, what stops its process.
    terminators: BTreeMap<String, CancellationToken>,
    /// This state, for the pods' runners.
    me: Weak<Mutex<Inner>>,
    /// Ends every pod's process (the stand-in is dropped).
    stop: CancellationToken,
}

impl Inner {
    /// A pod's process exited on its own.
    fn crashed(&mut self, pod: &str) {
        if let Some(p) = self.pods.iter_mut().find(|p| p.name == pod) {
            p.crashed = true;
        }
    }

    /// A deleted pod is gone.
    fn gone(&mut self, pod: &str, exit: Option<PodExit>) {
        let Some(i) = self.pods.iter().position(|p| p.name == pod) else {
            return;
        };
        let p = self.pods.remove(i);
        self.terminators.remove(pod);
        self.version += 1;
        self.removed.push(RemovedPod {
            deletion_cost: p.deletion_cost(),
            deleted_at_ms: p.deleted_ms.unwrap_or_default(),
            gone_at_ms: now_ms(),
            name: p.name,
            deployment: p.deployment,
            exit,
        });
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// An RFC 3339 UTC time, as the API writes them (whole seconds).
fn rfc3339(ms: i64) -> String {
    // `YYYY-MM-DDTHH:MM:SS` of the core's `….mmmZ`.
    let full = trainyard_core::rfc3339(ms);
    format!("{}Z", &full[..19])
}

/// Five characters of the alphabet Kubernetes names pods with.
fn random_suffix(seq: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(seq);
    let mut bits = hasher.finish();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(bits % ALPHABET.len() as u64) as usize];
            bits /= ALPHABET.len() as u64;
            c as char
        })
        .collect()
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stand-in API server; stops when dropped.
pub struct FakeKube {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: CancellationToken,
}

impl Drop for FakeKube {
    /// The server stops, and no pod's process outlives it.
    fn drop(&mut self) {
        self.stop.cancel();
        let inner = lock(&self.inner);
        inner.stop.cancel();
        for pid in inner.pods.iter().filter_map(|p| p.pid) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl FakeKube {
    /// Starts on `127.0.0.1:0`, accepting `token` in namespace `namespace`.
    pub async fn start(token: &str, namespace: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in kube api");
        let addr = listener.local_addr().expect("its address");
        let inner = Arc::new_cyclic(|me| {
            Mutex::new(Inner {
                token: token.into(),
                namespace: namespace.into(),
                version: 1000,
                new_pod_phase: "Running".into(),
                me: me.clone(),
                ..Default::default()
            })
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let stop = crate::serve_until_stopped(listener, app);
        Self { addr, inner, stop }
    }

    /// `http://127.0.0.1:<port>`, for `[autoscaler.kubernetes] api_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a Deployment selecting `app=<name>` with `replicas` pods.
    pub fn add_deployment(&self, name: &str, replicas: i32) {
        self.add(name, replicas, None);
    }

    /// Adds a Deployment whose pods run `template` for real, one process
    /// each (call inside a Tokio runtime).
    pub fn add_deployment_running(&self, name: &str, replicas: i32, template: PodTemplate) {
        self.add(name, replicas, Some(template));
    }

    fn add(&self, name: &str, replicas: i32, template: Option<PodTemplate>) {
        let mut inner = lock(&self.inner);
        inner.version += 1;
        let version = inner.version;
        let match_labels = BTreeMap::from([("app".to_string(), name.to_string())]);
        inner.deployments.insert(
            name.into(),
            (
                Deployment {
                    match_labels,
                    replicas,
                    template,
                },
                version,
            ),
        );
        reconcile(&mut inner, name);
    }

    /// The phase pods made from now on start in.
    pub fn set_new_pod_phase(&self, phase: &str) {
        lock(&self.inner).new_pod_phase = phase.into();
    }

    pub fn replicas(&self, deployment: &str) -> i32 {
        lock(&self.inner).deployments[deployment].0.replicas
    }

    /// The Deployment's pods, oldest first.
    pub fn pods(&self, deployment: &str) -> Vec<FakePod> {
        lock(&self.inner)
            .pods
            .iter()
            .filter(|p| p.deployment == deployment)
            .cloned()
            .collect()
    }

    /// The pods the ReplicaSets deleted that are gone, in that order.
    pub fn removed(&self) -> Vec<RemovedPod> {
        lock(&self.inner).removed.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        lock(&self.inner).requests.clone()
    }

    /// Answers the next request of `method` with `status` (a `Status` body).
    pub fn fail_next(&self, method: Method, status: u16) {
        lock(&self.inner).failures.push_back((method, status));
    }

    /// The next PUT of a Scale is applied but answered 500, as when the
    /// answer is lost on the way back.
    pub fn lose_next_put_answer(&self) {
        lock(&self.inner).lost_answers += 1;
    }

    /// Another writer scales the next PUT's Deployment just before it lands
    /// (its resource version moves on, so the PUT gets 409).
    pub fn race_next_put(&self) {
        lock(&self.inner).races += 1;
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).expect("a status code"),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Makes or deletes pods until the Deployment has its replicas (pods
/// being deleted no longer count).
fn reconcile(inner: &mut Inner, deployment: &str) {
    let want = inner.deployments[deployment].0.replicas.max(0) as usize;
    loop {
        let have: Vec<&FakePod> = inner
            .pods
            .iter()
            .filter(|p| p.deployment == deployment && !p.deleting)
            .collect();
        if have.len() < want {
            make_pod(inner, deployment);
        } else if have.len() > want {
            let victim = have
                .iter()
                .min_by_key(|p| (p.ready(), p.deletion_cost(), std::cmp::Reverse(p.seq)))
                .map(|p| p.name.clone())
                .expect("a pod");
            delete_pod(inner, &victim);
        } else {
            return;
        }
    }
}

fn make_pod(inner: &mut Inner, deployment: &str) {
    inner.pod_seq += 1;
    inner.version += 1;
    let seq = inner.pod_seq;
    let mut pod = FakePod {
        name: format!("{deployment}-7d9c5b8f4-{}", random_suffix(seq)),
        deployment: deployment.into(),
        phase: inner.new_pod_phase.clone(),
        annotations: BTreeMap::new(),
        pid: None,
        deleting: false,
        crashed: false,
        seq,
        created_ms: now_ms(),
        deleted_ms: None,
    };
    if let Some(template) = inner.deployments[deployment].0.template.clone() {
        let terminate = CancellationToken::new();
        pod.phase = "Running".into();
        match kubelet::start(
            inner.me.clone(),
            &template,
            &pod.name,
            terminate.clone(),
            inner.stop.clone(),
        ) {
            Ok(pid) => {
                pod.pid = Some(pid);
                inner.terminators.insert(pod.name.clone(), terminate);
            }
            Err(error) => {
                tracing::warn!(pod = %pod.name, %error, "the pod's container did not start");
                pod.crashed = true;
            }
        }
    }
    inner.pods.push(pod);
}

/// Starts deleting a pod: one with a process stops it first, one without
/// is gone at once.
fn delete_pod(inner: &mut Inner, name: &str) {
    inner.version += 1;
    let pod = inner
        .pods
        .iter_mut()
        .find(|p| p.name == name)
        .expect("the pod");
    pod.deleting = true;
    pod.deleted_ms = Some(now_ms());
    match inner.terminators.get(name) {
        Some(terminate) => terminate.cancel(),
        None => inner.gone(name, None),
    }
}

fn scale_json(inner: &Inner, name: &str) -> Value {
    let (d, version) = &inner.deployments[name];
    let running = inner
        .pods
        .iter()
        .filter(|p| p.deployment == name && !p.deleting)
        .count();
    json!({
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {
            "name": name, "namespace": inner.namespace,
            "resourceVersion": version.to_string(),
            "creationTimestamp": "2026-12-06T19:00:00Z",
        },
        "spec": {"replicas": d.replicas},
        "status": {"replicas": running, "selector": selector(&d.match_labels)},
    })
}

fn pod_json(inner: &Inner, pod: &FakePod) -> Value {
    let (deployment, _) = &inner.deployments[&pod.deployment];
    let running = pod.phase == "Running";
    let started = rfc3339(pod.created_ms);
    let state = if pod.crashed {
        json!({"waiting": {"reason": "CrashLoopBackOff",
                           "message": "back-off restarting failed container"}})
    } else if running {
        json!({"running": {"startedAt": started}})
    } else {
        json!({"waiting": {"reason": "ContainerCreating"}})
    };
    let mut metadata = json!({
        "name": pod.name, "namespace": inner.namespace,
        "uid": format!("00000000-0000-0000-0000-{:012}", pod.seq),
        "resourceVersion": inner.version.to_string(),
        "creationTimestamp": started,
        "labels": deployment.match_labels, "annotations": pod.annotations,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                              "name": format!("{}-7d9c5b8f4", pod.deployment),
                              "uid": "rs", "controller": true}],
    });
    if let Some(deleted) = pod.deleted_ms {
        let grace = deployment
            .template
            .as_ref()
            .map_or(30, |t| t.termination_grace.as_secs());
        metadata["deletionTimestamp"] = json!(rfc3339(deleted + grace as i64 * 1000));
        metadata["deletionGracePeriodSeconds"] = json!(grace);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": if running { "gpu-node-1" } else { "" },
            "containers": [{"name": "worker", "image": "trainyard:latest"}],
        },
        "status": {
            "phase": pod.phase,
            "containerStatuses": [{"name": "worker", "ready": pod.ready() && !pod.deleting,
                                   "restartCount": u32::from(pod.crashed),
                                   "image": "trainyard:latest", "state": state}],
        },
    })
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut guard = lock(&inner);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let response = answer(&mut guard, &method, &uri, &headers, &content_type, &body);
    guard.requests.push(Request {
        method,
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        content_type,
        body: body.to_vec(),
        status: response.status().as_u16(),
    });
    response
}

fn answer(
    inner: &mut Inner,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    content_type: &str,
    body: &[u8],
) -> Response {
    let bearer = format!("Bearer {}", inner.token);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(bearer.as_str()) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    if let Some(i) = inner.failures.iter().position(|(m, _)| m == method) {
        let (_, code) = inner.failures.remove(i).expect("a scripted failure");
        let reason = match code {
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            _ => "Unknown",
        };
        return status(code, reason, "scripted failure");
    }
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    match (method.clone(), segments.as_slice()) {
        (
            m,
            [
                "apis",
                "apps",
                "v1",
                "namespaces",
                ns,
                "deployments",
                name,
                "scale",
            ],
        ) if *ns == inner.namespace => {
            let name = name.to_string();
            if !inner.deployments.contains_key(&name) {
                return status(
                    404,
                    "NotFound",
                    &format!("deployments.apps \"{name}\" not found"),
                );
            }
            match m {
                Method::GET => ok(scale_json(inner, &name)),
                Method::PUT => put_scale(inner, &name, content_type, body),
                _ => status(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method",
                ),
            }
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "pods"]) if *ns == inner.namespace => {
            let wanted: BTreeMap<String, String> = url_query(uri, "labelSelector")
                .split(',')
                .filter(|s| !s.is_empty())
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_start_matches('=').to_string()))
                .collect();
            let items: Vec<Value> = inner
                .pods
                .iter()
                .filter(|p| {
                    let labels = &inner.deployments[&p.deployment].0.match_labels;
                    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .map(|p| pod_json(inner, p))
                .collect();
            ok(json!({"apiVersion": "v1", "kind": "PodList",
                      "metadata": {"resourceVersion": inner.version.to_string()}, "items": items}))
        }
        (Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name])
            if *ns == inner.namespace =>
        {
            patch_pod(inner, name, content_type, body)
        }
        _ => status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

fn url_query(uri: &Uri, key: &str) -> String {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn put_scale(inner: &mut Inner, name: &str, content_type: &str, body: &[u8]) -> Response {
    if content_type != "application/json" {
        return status(415, "UnsupportedMediaType", "the body of a PUT is JSON");
    }
    let Ok(scale) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    if scale["kind"] != "Scale" || scale["metadata"]["name"] != name {
        return status(400, "BadRequest", "not this deployment's Scale");
    }
    let Some(replicas) = scale["spec"]["replicas"].as_i64() else {
        return status(422, "Invalid", "spec.replicas: Required value");
    };
    if inner.races > 0 {
        inner.races -= 1;
        inner.version += 1;
        let version = inner.version;
        inner.deployments.get_mut(name).expect("checked").1 = version;
    }
    let current = inner.deployments[name].1.to_string();
    match scale["metadata"]["resourceVersion"].as_str() {
        Some(v) if v != current => {
            return status(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on deployments.apps \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                ),
            );
        }
        _ => {}
    }
    inner.version += 1;
    let version = inner.version;
    let entry = inner.deployments.get_mut(name).expect("checked");
    entry.0.replicas = replicas as i32;
    entry.1 = version;
    reconcile(inner, name);
    if inner.lost_answers > 0 {
        inner.lost_answers -= 1;
        return status(500, "InternalError", "the answer was lost");
    }
    ok(scale_json(inner, name))
}

fn patch_pod(inner: &mut Inner, name: &str, content_type: &str, body: &[u8]) -> Response {
    if content_type != "application/merge-patch+json"
        && content_type != "application/strategic-merge-patch+json"
    {
        return status(
            415,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type})"
            ),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    let Some(i) = inner.pods.iter().position(|p| p.name == name) else {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    if let Some(annotations) = patch["metadata"]["annotations"].as_object() {
        for (k, v) in annotations {
            match v {
                Value::Null => {
                    inner.pods[i].annotations.remove(k);
                }
                Value::String(s) => {
                    if k == DELETION_COST && s.parse::<i32>().is_err() {
                        return status(422, "Invalid", "pod-deletion-cost must be an int32");
                    }
                    inner.pods[i].annotations.insert(k.clone(), s.clone());
                }
                _ => return status(400, "BadRequest", "annotations are strings"),
            }
        }
    }
    inner.version += 1;
    let pod = inner.pods[i].clone();
    ok(pod_json(inner, &pod))
}
