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
//! ReplicaSet would: pending pods go before running ones, then the lowest
//! `controller.kubernetes.io/pod-deletion-cost`, then the newest. Each
//! request is recorded; a test may script failures of the next requests.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

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
    seq: u64,
}

impl FakePod {
    fn deletion_cost(&self) -> i64 {
        self.annotations
            .get(DELETION_COST)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

struct Deployment {
    match_labels: BTreeMap<String, String>,
    replicas: i32,
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
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeKube {
    /// Starts on `127.0.0.1:0`, accepting `token` in namespace `namespace`.
    pub async fn start(token: &str, namespace: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in kube api");
        let addr = listener.local_addr().expect("its address");
        let inner = Arc::new(Mutex::new(Inner {
            token: token.into(),
            namespace: namespace.into(),
            version: 1000,
            new_pod_phase: "Running".into(),
            ..Default::default()
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
        });
        Self { addr, inner, stop }
    }

    /// `http://127.0.0.1:<port>`, for `[autoscaler.kubernetes] api_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a Deployment selecting `app=<name>` with `replicas` pods.
    pub fn add_deployment(&self, name: &str, replicas: i32) {
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

/// Makes or deletes pods until the Deployment has its replicas.
fn reconcile(inner: &mut Inner, deployment: &str) {
    let want = inner.deployments[deployment].0.replicas.max(0) as usize;
    loop {
        let have: Vec<&FakePod> = inner
            .pods
            .iter()
            .filter(|p| p.deployment == deployment)
            .collect();
        if have.len() < want {
            inner.pod_seq += 1;
            let pod = FakePod {
                name: format!("{deployment}-7d9c5b8f4-{:05}", inner.pod_seq),
                deployment: deployment.into(),
                phase: inner.new_pod_phase.clone(),
                annotations: BTreeMap::new(),
                seq: inner.pod_seq,
            };
            inner.pods.push(pod);
        } else if have.len() > want {
            let victim = have
                .iter()
                .min_by_key(|p| {
                    (
                        p.phase == "Running",
                        p.deletion_cost(),
                        std::cmp::Reverse(p.seq),
                    )
                })
                .map(|p| p.name.clone())
                .expect("a pod");
            inner.pods.retain(|p| p.name != victim);
        } else {
            return;
        }
    }
}

fn scale_json(inner: &Inner, name: &str) -> Value {
    let (d, version) = &inner.deployments[name];
    let running = inner.pods.iter().filter(|p| p.deployment == name).count();
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
    let labels = &inner.deployments[&pod.deployment].0.match_labels;
    let running = pod.phase == "Running";
    let state = if running {
        json!({"running": {"startedAt": "2026-12-06T19:00:05Z"}})
    } else {
        json!({"waiting": {"reason": "ContainerCreating"}})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": inner.namespace,
            "uid": format!("00000000-0000-0000-0000-{:012}", pod.seq),
            "resourceVersion": inner.version.to_string(),
            "creationTimestamp": format!("2026-12-06T19:{:02}:00Z", pod.seq % 60),
            "labels": labels, "annotations": pod.annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                  "name": format!("{}-7d9c5b8f4", pod.deployment),
                                  "uid": "rs", "controller": true}],
        },
        "spec": {
            "nodeName": if running { "gpu-node-1" } else { "" },
            "containers": [{"name": "worker", "image": "trainyard:latest"}],
        },
        "status": {
            "phase": pod.phase,
            "containerStatuses": [{"name": "worker", "ready": running, "restartCount": 0,
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
