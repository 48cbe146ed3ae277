//! RunPod's GraphQL API on loopback for tests: `POST /graphql` with
//! `Authorization: Bearer <key>`, answering the operations the `runpod`
//! provider sends with RunPod's documented shapes:
//!
//! - `gpuTypes { id displayName memoryInGb lowestPrice(input:{gpuCount}) {
//!   minimumBidPrice uninterruptablePrice stockStatus } }`;
//! - `myself { pods { id name desiredStatus costPerHr podType env machineId
//!   machine { podHostId dataCenterId gpuDisplayName } runtime { … } } }`
//!   (`env` as `KEY=VALUE` strings, `runtime` null until the container runs);
//! - `podFindAndDeployOnDemand(input)` and `podRentInterruptable(input)` (with
//!   `bidPerGpu`), returning the pod;
//! - `podTerminate(input:{podId})`, a scalar; the pod leaves the listing.
//!
//! Errors are RunPod's: `{"errors":[{"message":…}]}` with HTTP 200 for a
//! refused operation ("There are no longer any instances available with the
//! requested specifications. Please refresh and try again.", the spend
//! limit, a bid under the minimum, a pod not found), 401 for a bad key.
//!
//! The operation is found by the field it names (enough for the provider's
//! fixed queries); its input comes from `variables.input`. State: GPU types
//! with prices, real capacity and the advertised `stockStatus` (which, as on
//! RunPod, is no promise), pods, an hourly spend limit ($80 by default, as
//! RunPod's accounts), and faults: the next calls answering a status (with
//! `Retry-After`), a create carried out whose reply comes too late or is
//! lost (the connection drops mid-answer), a pod preempted. Every request
//! is recorded.
//!
//! With a [`PodRunner`] ([`FakeRunpod::run_pods`]) pods run for real: see
//! [`pods`] — secrets resolved from [`FakeRunpod::set_secret`]'s table, the
//! image's entrypoint and command started with the pod's env, SIGTERM then
//! SIGKILL on terminate and on a spot preemption.

mod pods;

pub use pods::{PodExit, PodRunner, SPOT_NOTICE, TERMINATE_GRACE, resolve_secrets};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The message RunPod answers a create with when no machine fits.
pub const NO_INSTANCES: &str = "There are no longer any instances available with the requested specifications. Please refresh and try again.";

/// One GPU type on offer.
#[derive(Clone, Debug)]
pub struct FakeGpuType {
    pub id: String,
    pub display_name: String,
    pub memory_gb: u32,
    /// Dollars per GPU-hour on demand.
    pub price: f64,
    /// The least bid per GPU-hour for an interruptible pod.
    pub min_bid: f64,
    /// GPUs that can really be rented now.
    pub capacity: u32,
    /// What `stockStatus` says (`High`, `Low`, `None`).
    pub stock_status: String,
}

impl FakeGpuType {
    /// A type with `capacity` GPUs that says `High` (or `None` at zero).
    pub fn new(id: &str, price: f64, min_bid: f64, capacity: u32) -> Self {
        Self {
            id: id.into(),
            display_name: id.trim_start_matches("NVIDIA ").into(),
            memory_gb: 24,
            price,
            min_bid,
            capacity,
            stock_status: if capacity == 0 { "None" } else { "High" }.into(),
        }
    }

    /// The same, claiming `status` whatever the capacity.
    pub fn advertising(mut self, status: &str) -> Self {
        self.stock_status = status.into();
        self
    }
}

/// One pod of the account.
#[derive(Clone, Debug, PartialEq)]
pub struct FakePod {
    pub id: String,
    pub name: String,
    pub desired_status: String,
    pub cost_per_hr: f64,
    /// `INTERRUPTABLE` or `RESERVED`.
    pub pod_type: String,
    pub gpu_type: String,
    pub gpu_count: u32,
    pub image: String,
    pub env: BTreeMap<String, String>,
    pub data_center: String,
    pub machine_id: String,
    /// The container runs (`runtime` is not null).
    pub running: bool,
    /// The create's `input`, as sent.
    pub input: Value,
}

/// One request the stand-in answered.
#[derive(Clone, Debug)]
pub struct Call {
    /// `gpuTypes`, `myself`, `podFindAndDeployOnDemand`,
    /// `podRentInterruptable`, `podTerminate`, or `unknown`.
    pub op: String,
    pub variables: Value,
    /// The bearer key was right.
    pub authorized: bool,
    pub status: u16,
    /// The GraphQL error answered, if any.
    pub error: Option<String>,
    pub at: Instant,
}

/// A status answered instead of the operation, to the first request of
/// `op` (any operation when `None`).
#[derive(Clone, Debug)]
struct Fault {
    op: Option<String>,
    status: u16,
    retry_after: Option<u64>,
}

struct Inner {
    key: String,
    gpu_types: Vec<FakeGpuType>,
    pods: Vec<FakePod>,
    spend_limit: f64,
    faults: VecDeque<Fault>,
    /// The next create is carried out but answered after this long.
    slow_create: Option<Duration>,
    /// A create error to answer to the next creates, instead of placing.
    create_error: Option<String>,
    new_pods_run: bool,
    /// The next create is carried out but its reply is lost.
    drop_create: bool,
    next_id: u64,
    calls: Vec<Call>,
    /// Pods run as processes when set.
    runner: Option<PodRunner>,
    /// The account's secrets, by name.
    secrets: BTreeMap<String, String>,
    /// The processes of pods, by pod id.
    processes: HashMap<String, pods::PodProcess>,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(m: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running stand-in; stops when dropped.
pub struct FakeRunpod {
    inner: Shared,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for FakeRunpod {
    /// No pod's process outlives the stand-in.
    fn drop(&mut self) {
        self.stop.cancel();
        for process in lock(&self.inner).processes.values() {
            process.kill_now();
        }
    }
}

impl FakeRunpod {
    /// Starts on `127.0.0.1:0`, accepting `key`.
    pub async fn start(key: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake runpod");
        let addr = listener.local_addr().expect("fake runpod address");
        let inner = Arc::new(Mutex::new(Inner {
            key: key.into(),
            gpu_types: Vec::new(),
            pods: Vec::new(),
            spend_limit: 80.0,
            faults: VecDeque::new(),
            slow_create: None,
            create_error: None,
            new_pods_run: true,
            drop_create: false,
            next_id: 1,
            calls: Vec::new(),
            runner: None,
            secrets: BTreeMap::new(),
            processes: HashMap::new(),
        }));
        let app = axum::Router::new()
            .route("/graphql", axum::routing::post(graphql))
            .with_state(inner.clone());
        let stop = crate::serve_until_stopped(listener, app);
        Self { inner, addr, stop }
    }

    /// The `graphql_url` to configure.
    pub fn graphql_url(&self) -> String {
        format!("http://{}/graphql", self.addr)
    }

    pub fn add_gpu_type(&self, gpu: FakeGpuType) {
        lock(&self.inner).gpu_types.push(gpu);
    }

    /// The account's spend limit, dollars an hour over running pods.
    pub fn set_spend_limit(&self, dollars_per_hour: f64) {
        lock(&self.inner).spend_limit = dollars_per_hour;
    }

    /// The next `n` requests answer `status` (with `Retry-After`).
    pub fn fail_next(&self, n: usize, status: u16, retry_after_secs: Option<u64>) {
        self.fail_next_of(None, n, status, retry_after_secs);
    }

    /// The next `n` requests of `op` (all when `None`) answer `status`.
    pub fn fail_next_of(
        &self,
        op: Option<&str>,
        n: usize,
        status: u16,
        retry_after_secs: Option<u64>,
    ) {
        let mut inner = lock(&self.inner);
        for _ in 0..n {
            inner.faults.push_back(Fault {
                op: op.map(str::to_string),
                status,
                retry_after: retry_after_secs,
            });
        }
    }

    /// The next create makes its pod but answers only after `delay`.
    pub fn delay_next_create_reply(&self, delay: Duration) {
        lock(&self.inner).slow_create = Some(delay);
    }

    /// The next create makes its pod but its reply is lost: the
    /// connection drops after the status line.
    pub fn drop_next_create_reply(&self) {
        lock(&self.inner).drop_create = true;
    }

    /// Pods created from now on run as processes.
    pub fn run_pods(&self, runner: PodRunner) {
        lock(&self.inner).runner = Some(runner);
    }

    /// An account secret, referenced as `{{ RUNPOD_SECRET_<name> }}`.
    pub fn set_secret(&self, name: &str, value: &str) {
        lock(&self.inner).secrets.insert(name.into(), value.into());
    }

    /// Whether the pod's container process runs.
    pub fn pod_running(&self, id: &str) -> bool {
        lock(&self.inner)
            .processes
            .get(id)
            .is_some_and(|p| p.running())
    }

    /// How the pod's container process ended, once it has.
    pub fn pod_exit(&self, id: &str) -> Option<PodExit> {
        lock(&self.inner)
            .processes
            .get(id)
            .and_then(|p| p.exit.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Why the pod's container never started (a secret that does not exist).
    pub fn pod_boot_error(&self, id: &str) -> Option<String> {
        lock(&self.inner)
            .processes
            .get(id)
            .and_then(|p| p.boot_error.clone())
    }

    /// What the pod's container wrote.
    pub fn pod_log(&self, id: &str) -> String {
        let dir = lock(&self.inner).processes.get(id).map(|p| p.dir.clone());
        dir.and_then(|d| std::fs::read_to_string(d.join("pod.log")).ok())
            .unwrap_or_default()
    }

    /// Creates answer this GraphQL error (`None`: place as usual).
    pub fn refuse_creates(&self, message: Option<&str>) {
        lock(&self.inner).create_error = message.map(str::to_string);
    }

    /// Whether new pods have a runtime at once (else they stay pending).
    pub fn set_new_pods_run(&self, run: bool) {
        lock(&self.inner).new_pods_run = run;
    }

    /// Adds a pod made elsewhere (another fleet, a person).
    pub fn add_pod(&self, name: &str, env: &[(&str, &str)]) -> String {
        let mut inner = lock(&self.inner);
        let id = inner.new_id();
        inner.pods.push(FakePod {
            id: id.clone(),
            name: name.into(),
            desired_status: "RUNNING".into(),
            cost_per_hr: 0.5,
            pod_type: "RESERVED".into(),
            gpu_type: "NVIDIA RTX A5000".into(),
            gpu_count: 1,
            image: "other".into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            data_center: "US-TX-3".into(),
            machine_id: format!("m-{id}"),
            running: true,
            input: Value::Null,
        });
        id
    }

    /// A spot pod taken back: `EXITED`, no runtime, no cost; its process
    /// gets SIGTERM and SIGKILL [`SPOT_NOTICE`] later.
    pub fn preempt(&self, id: &str) {
        let mut inner = lock(&self.inner);
        if let Some(pod) = inner.pods.iter_mut().find(|p| p.id == id) {
            pod.desired_status = "EXITED".into();
            pod.running = false;
            pod.cost_per_hr = 0.0;
        }
        if let Some(process) = inner.processes.get(id) {
            process.stop(SPOT_NOTICE);
        }
    }

    pub fn pods(&self) -> Vec<FakePod> {
        lock(&self.inner).pods.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        lock(&self.inner).calls.clone()
    }

    /// The calls of one operation.
    pub fn calls_of(&self, op: &str) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.op == op).collect()
    }
}

impl Inner {
    fn new_id(&mut self) -> String {
        let id = format!("pod{:011x}", self.next_id * 7919);
        self.next_id += 1;
        id
    }

    fn spend(&self) -> f64 {
        self.pods
            .iter()
            .filter(|p| p.desired_status == "RUNNING")
            .map(|p| p.cost_per_hr)
            .sum()
    }

    fn create(&mut self, input: &Value, interruptible: bool) -> Result<FakePod, String> {
        if let Some(message) = &self.create_error {
            return Err(message.clone());
        }
        let str_of = |k: &str| {
            input
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let gpu_type = str_of("gpuTypeId");
        let gpu_count = input.get("gpuCount").and_then(Value::as_u64).unwrap_or(1) as u32;
        let Some(offer) = self.gpu_types.iter().find(|t| t.id == gpu_type).cloned() else {
            return Err(format!("gpu type {gpu_type} is not valid"));
        };
        if str_of("name").is_empty() || str_of("imageName").is_empty() {
            return Err("name and imageName are required".into());
        }
        let per_gpu = if interruptible {
            let bid = input
                .get("bidPerGpu")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            if bid < offer.min_bid {
                return Err(format!(
                    "Your bid price is below the minimum bid of {}",
                    offer.min_bid
                ));
            }
            bid
        } else {
            offer.price
        };
        if offer.capacity < gpu_count {
            return Err(NO_INSTANCES.into());
        }
        let cost = per_gpu * gpu_count as f64;
        if self.spend() + cost > self.spend_limit {
            return Err(format!(
                "You have reached your spend limit of ${:.2}/hr. Contact support to raise it.",
                self.spend_limit
            ));
        }
        if let Some(gpu) = self.gpu_types.iter_mut().find(|t| t.id == gpu_type) {
            gpu.capacity -= gpu_count;
        }
        let id = self.new_id();
        let env = input
            .get("env")
            .and_then(Value::as_array)
            .map(|kvs| {
                kvs.iter()
                    .filter_map(|kv| {
                        Some((
                            kv.get("key")?.as_str()?.to_string(),
                            kv.get("value")?.as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let dc = str_of("dataCenterId");
        let pod = FakePod {
            id: id.clone(),
            name: str_of("name"),
            desired_status: "RUNNING".into(),
            cost_per_hr: cost,
            pod_type: if interruptible {
                "INTERRUPTABLE"
            } else {
                "RESERVED"
            }
            .into(),
            gpu_type,
            gpu_count,
            image: str_of("imageName"),
            env,
            data_center: if dc.is_empty() { "EU-RO-1".into() } else { dc },
            machine_id: format!("m-{id}"),
            running: self.new_pods_run,
            input: input.clone(),
        };
        if let Some(runner) = &self.runner {
            let process = pods::boot(runner, &pod.id, &pod.env, &self.secrets);
            self.processes.insert(pod.id.clone(), process);
        }
        self.pods.push(pod.clone());
        Ok(pod)
    }
}

fn pod_json(pod: &FakePod, display: &str, process_runs: Option<bool>) -> Value {
    let running = pod.running && process_runs.unwrap_or(true);
    json!({
        "id": pod.id,
        "name": pod.name,
        "desiredStatus": pod.desired_status,
        "costPerHr": pod.cost_per_hr,
        "podType": pod.pod_type,
        "gpuCount": pod.gpu_count,
        "imageName": pod.image,
        "env": pod.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "machineId": pod.machine_id,
        "machine": {
            "podHostId": format!("{}-{}", pod.id, 64410065),
            "dataCenterId": pod.data_center,
            "gpuDisplayName": display,
        },
        "runtime": if running {
            json!({ "uptimeInSeconds": 11, "gpus": [], "ports": [] })
        } else {
            Value::Null
        },
    })
}

fn op_of(query: &str) -> &'static str {
    // Mutations first: their selections name pod fields, not operations.
    for op in [
        "podRentInterruptable",
        "podFindAndDeployOnDemand",
        "podTerminate",
        "gpuTypes",
        "myself",
    ] {
        if query.contains(op) {
            return op;
        }
    }
    "unknown"
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A 200 whose body fails mid-way: the connection drops, the client
/// never reads the answer.
fn lost_reply() -> Response {
    let body = axum::body::Body::from_stream(futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("connection lost"))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("response")
}

fn graphql_error(message: &str) -> Response {
    json_response(
        StatusCode::OK,
        json!({ "errors": [{ "message": message, "path": [] }], "data": null }),
    )
}

async fn graphql(State(inner): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let (response, delay) = answer(&inner, &headers, &body);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    response
}

/// The answer, and how long to hold it back.
fn answer(inner: &Shared, headers: &HeaderMap, body: &[u8]) -> (Response, Option<Duration>) {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let query = request.get("query").and_then(Value::as_str).unwrap_or("");
    let variables = request.get("variables").cloned().unwrap_or(Value::Null);
    let op = op_of(query);
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let mut state = lock(inner);
    let authorized = bearer == state.key;
    let mut call = Call {
        op: op.into(),
        variables: variables.clone(),
        authorized,
        status: 200,
        error: None,
        at: Instant::now(),
    };
    if !authorized {
        call.status = 401;
        state.calls.push(call);
        // Echoes the key it was given, as careless servers do: the client
        // must not pass it on.
        let body =
            json!({ "errors": [{ "message": format!("Unauthorized: bad api key {bearer}") }] });
        return (json_response(StatusCode::UNAUTHORIZED, body), None);
    }
    let fault = state
        .faults
        .iter()
        .position(|f| f.op.as_deref().is_none_or(|o| o == op));
    if let Some(Fault {
        status,
        retry_after,
        ..
    }) = fault.and_then(|i| state.faults.remove(i))
    {
        call.status = status;
        state.calls.push(call);
        let mut response = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "upstream error",
        )
            .into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", secs.to_string().parse().expect("header"));
        }
        return (response, None);
    }
    let input = variables.get("input").cloned().unwrap_or(Value::Null);
    let outcome: Result<Value, String> = match op {
        "gpuTypes" if variables.pointer("/lowestPrice/gpuCount").is_none() => Err(
            "Variable \"$lowestPrice\" of required type \"LowestPriceInput!\" was not provided."
                .into(),
        ),
        "gpuTypes" => {
            Ok(json!({ "gpuTypes": state.gpu_types.iter().map(|t| json!({
                "id": t.id,
                "displayName": t.display_name,
                "memoryInGb": t.memory_gb,
                "lowestPrice": {
                    "minimumBidPrice": t.min_bid,
                    "uninterruptablePrice": t.price,
                    // Advertised, whatever the count: no promise.
                    "stockStatus": t.stock_status,
                },
            })).collect::<Vec<_>>() }))
        }
        "myself" => {
            let pods: Vec<Value> = state
                .pods
                .iter()
                .map(|p| {
                    let display = state
                        .gpu_types
                        .iter()
                        .find(|t| t.id == p.gpu_type)
                        .map(|t| t.display_name.clone())
                        .unwrap_or_else(|| p.gpu_type.clone());
                    let runs = state.processes.get(&p.id).map(|proc| proc.running());
                    pod_json(p, &display, runs)
                })
                .collect();
            Ok(json!({ "myself": { "id": "user", "pods": pods } }))
        }
        "podFindAndDeployOnDemand" | "podRentInterruptable" => {
            match state.create(&input, op == "podRentInterruptable") {
                Ok(pod) => {
                    let display = pod.gpu_type.trim_start_matches("NVIDIA ").to_string();
                    let runs = state.processes.get(&pod.id).map(|p| p.running());
                    let reply = json!({ op: pod_json(&pod, &display, runs) });
                    if std::mem::take(&mut state.drop_create) {
                        state.calls.push(call);
                        return (lost_reply(), None);
                    }
                    if let Some(delay) = state.slow_create.take() {
                        state.calls.push(call);
                        let response = json_response(StatusCode::OK, json!({ "data": reply }));
                        return (response, Some(delay));
                    }
                    Ok(reply)
                }
                Err(message) => Err(message),
            }
        }
        "podTerminate" => {
            let id = input.get("podId").and_then(Value::as_str).unwrap_or("");
            let before = state.pods.len();
            state.pods.retain(|p| p.id != id);
            if let Some(process) = state.processes.get(id) {
                process.stop(TERMINATE_GRACE);
            }
            if state.pods.len() == before {
                Err(format!("pod {id} not found"))
            } else {
                Ok(json!({ "podTerminate": null }))
            }
        }
        _ => Err("Cannot query field on type Query".into()),
    };
    match outcome {
        Ok(data) => {
            state.calls.push(call);
            (json_response(StatusCode::OK, json!({ "data": data })), None)
        }
        Err(message) => {
            call.error = Some(message.clone());
            state.calls.push(call);
            (graphql_error(&message), None)
        }
    }
}
