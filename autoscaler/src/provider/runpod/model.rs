//! The pure half of the RunPod provider: which GPU types a launch may try
//! and at what bid, what a GraphQL error message means, and how a pod
//! reads as a [`Machine`]. No I/O here; `mod.rs` does the calls.

use crate::provider::{Launch, Machine, MachineState};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Env marker on every pod: the fleet that started it.
pub const ENV_FLEET: &str = "TY_AUTOSCALER_FLEET";
/// Env marker on every pod: the pool it serves.
pub const ENV_POOL: &str = "TY_AUTOSCALER_POOL";
/// Env marker on every pod: the GPU type id it was created with (the pod
/// itself reports only the display name).
pub const ENV_GPU_TYPE: &str = "TY_AUTOSCALER_GPU_TYPE";

/// One entry of `gpuTypes { … lowestPrice(input:{gpuCount}) { … } }`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuType {
    pub id: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub lowest_price: Option<LowestPrice>,
}

/// The cheapest offer of a GPU type for the asked GPU count.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LowestPrice {
    /// Dollars per GPU-hour, the least an interruptible bid may be.
    #[serde(default)]
    pub minimum_bid_price: Option<f64>,
    /// Dollars per GPU-hour on demand.
    #[serde(default)]
    pub uninterruptable_price: Option<f64>,
    /// `High`, `Medium`, `Low`, `None` (or absent).
    #[serde(default)]
    pub stock_status: Option<String>,
}

/// A GPU type worth a create call, in the launch's order.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub gpu_type: String,
    /// `Some(bid per GPU)` for an interruptible pod.
    pub bid_per_gpu: Option<f64>,
}

/// The launch's GPU types that are listed, in stock and within its price
/// cap, in its order; the others with why they were skipped.
pub fn candidates(launch: &Launch, types: &[GpuType]) -> (Vec<Candidate>, Vec<String>) {
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    let cap = launch.max_price_per_gpu;
    for wanted in &launch.gpu_types {
        let Some(listed) = types.iter().find(|t| &t.id == wanted) else {
            skipped.push(format!("{wanted}: not offered"));
            continue;
        };
        let price = listed.lowest_price.clone().unwrap_or_default();
        if price
            .stock_status
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("none"))
        {
            skipped.push(format!("{wanted}: out of stock"));
            continue;
        }
        if launch.interruptible {
            let Some(minimum) = price.minimum_bid_price.filter(|p| *p > 0.0) else {
                skipped.push(format!("{wanted}: no interruptible offer"));
                continue;
            };
            if cap > 0.0 && minimum > cap {
                skipped.push(format!("{wanted}: minimum bid {minimum} above {cap}"));
                continue;
            }
            let mut bid = launch.bid_per_gpu.max(minimum);
            if cap > 0.0 {
                bid = bid.min(cap);
            }
            chosen.push(Candidate {
                gpu_type: wanted.clone(),
                bid_per_gpu: Some(bid),
            });
        } else {
            let Some(on_demand) = price.uninterruptable_price.filter(|p| *p > 0.0) else {
                skipped.push(format!("{wanted}: no on-demand offer"));
                continue;
            };
            if cap > 0.0 && on_demand > cap {
                skipped.push(format!("{wanted}: {on_demand} per GPU-hour above {cap}"));
                continue;
            }
            chosen.push(Candidate {
                gpu_type: wanted.clone(),
                bid_per_gpu: None,
            });
        }
    }
    (chosen, skipped)
}

/// The data centres to try, in order: the configured ones not avoided
/// (all configured ones if every one is avoided: a recent preemption is a
/// reason to prefer elsewhere, not to stop scaling); `[None]` (RunPod
/// chooses) when none is configured.
pub fn data_centres(configured: &[String], avoid: &[String]) -> Vec<Option<String>> {
    if configured.is_empty() {
        return vec![None];
    }
    let preferred: Vec<Option<String>> = configured
        .iter()
        .filter(|dc| !avoid.contains(dc))
        .map(|dc| Some(dc.clone()))
        .collect();
    if preferred.is_empty() {
        configured.iter().map(|dc| Some(dc.clone())).collect()
    } else {
        preferred
    }
}

/// What a GraphQL `errors[].message` means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorMeaning {
    /// No machine of this type (or at this bid) now: try the next one.
    NoCapacity,
    /// The account's spend limit or balance: stop.
    SpendLimit,
    /// Bad or missing credentials.
    Auth,
    /// The pod does not exist (any more).
    NotFound,
    /// A server-side failure worth retrying.
    Transient,
    /// Anything else: a problem with the request.
    Other,
}

/// Reads a GraphQL error message. RunPod gives no machine-readable codes
/// for these, so the words decide (lowercased).
pub fn meaning(message: &str) -> ErrorMeaning {
    let m = message.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| m.contains(w));
    if any(&[
        "spend limit",
        "spending limit",
        "balance",
        "insufficient funds",
        "add funds",
    ]) {
        ErrorMeaning::SpendLimit
    } else if any(&[
        "no longer any instances",
        "no instances available",
        "not enough free",
        "out of stock",
        "no available",
        "minimum bid",
        "bid price",
        "capacity",
    ]) {
        ErrorMeaning::NoCapacity
    } else if any(&[
        "unauthorized",
        "unauthenticated",
        "api key",
        "forbidden",
        "permission",
    ]) {
        ErrorMeaning::Auth
    } else if any(&["not found", "does not exist", "no pod"]) {
        ErrorMeaning::NotFound
    } else if any(&[
        "internal server error",
        "something went wrong",
        "timeout",
        "timed out",
        "try again later",
        "rate limit",
    ]) {
        ErrorMeaning::Transient
    } else {
        ErrorMeaning::Other
    }
}

/// One pod of `myself { pods { … } }` (and of the create mutations).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub desired_status: Option<String>,
    #[serde(default)]
    pub cost_per_hr: Option<f64>,
    #[serde(default)]
    pub pod_type: Option<String>,
    /// `KEY=VALUE` strings.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub machine_id: Option<String>,
    #[serde(default)]
    pub machine: Option<PodMachine>,
    #[serde(default)]
    pub runtime: Option<serde_json::Value>,
}

/// The machine a pod runs on.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodMachine {
    #[serde(default)]
    pub pod_host_id: Option<String>,
    #[serde(default)]
    pub data_center_id: Option<String>,
    #[serde(default)]
    pub gpu_display_name: Option<String>,
}

impl Pod {
    /// The value of one `KEY=VALUE` of its env.
    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env.as_ref()?.iter().find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// Whether the fleet `fleet` started it: its name carries the fleet's
    /// tag (`<fleet>-…`) and its env the fleet's marker (so `trainyard-dev-…`
    /// of a fleet named `trainyard-dev` is not `trainyard`'s).
    pub fn is_of_fleet(&self, fleet: &str) -> bool {
        self.name
            .strip_prefix(fleet)
            .is_some_and(|rest| rest.starts_with('-'))
            && self.env_value(ENV_FLEET) == Some(fleet)
    }

    /// Its state as the fleet sees it.
    pub fn state(&self) -> MachineState {
        match self.desired_status.as_deref().unwrap_or("") {
            "EXITED" | "TERMINATED" | "DEAD" => MachineState::Exited,
            "RUNNING" if self.runtime.as_ref().is_some_and(|r| !r.is_null()) => {
                MachineState::Running
            }
            _ => MachineState::Pending,
        }
    }

    /// The pod as a [`Machine`]; `created_at_ms` is when this process first
    /// saw it (RunPod's pod has no creation time we rely on).
    pub fn to_machine(&self, created_at_ms: i64) -> Machine {
        let machine = self.machine.clone().unwrap_or_default();
        Machine {
            id: self.id.clone(),
            name: self.name.clone(),
            pool: self.env_value(ENV_POOL).unwrap_or_default().to_string(),
            gpu_type: self
                .env_value(ENV_GPU_TYPE)
                .map(str::to_string)
                .or(machine.gpu_display_name)
                .unwrap_or_default(),
            dollars_per_hour: self.cost_per_hr.unwrap_or(0.0),
            interruptible: self
                .pod_type
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case("INTERRUPTABLE")),
            state: self.state(),
            created_at_ms,
            host: machine
                .data_center_id
                .or(self.machine_id.clone())
                .or(machine.pod_host_id)
                .unwrap_or_default(),
        }
    }
}

/// The pod's environment: the provider's, the pool's, the launch's (later
/// wins), then the fleet's markers (which nothing overrides).
pub fn pod_env(
    fleet: &str,
    provider_env: &BTreeMap<String, String>,
    pool_env: Option<&BTreeMap<String, String>>,
    launch: &Launch,
    gpu_type: &str,
) -> BTreeMap<String, String> {
    let mut env = provider_env.clone();
    if let Some(pool_env) = pool_env {
        env.extend(pool_env.clone());
    }
    env.extend(launch.env.clone());
    env.insert(ENV_FLEET.into(), fleet.into());
    env.insert(ENV_POOL.into(), launch.pool.clone());
    env.insert(ENV_GPU_TYPE.into(), gpu_type.into());
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(types: &[&str], interruptible: bool, bid: f64, cap: f64) -> Launch {
        Launch {
            name: "fleet-train.gpu-1".into(),
            pool: "train.gpu".into(),
            env: BTreeMap::new(),
            gpu_types: types.iter().map(|t| t.to_string()).collect(),
            gpu_count: 1,
            interruptible,
            bid_per_gpu: bid,
            max_price_per_gpu: cap,
            avoid_hosts: Vec::new(),
        }
    }

    fn gpu(id: &str, bid: f64, price: f64, stock: &str) -> GpuType {
        GpuType {
            id: id.into(),
            display_name: None,
            lowest_price: Some(LowestPrice {
                minimum_bid_price: Some(bid),
                uninterruptable_price: Some(price),
                stock_status: Some(stock.into()),
            }),
        }
    }

    #[test]
    fn candidates_keep_order_and_skip_by_stock_price_and_listing() {
        let types = [
            gpu("A", 0.2, 0.5, "High"),
            gpu("B", 0.3, 3.0, "High"),
            gpu("C", 0.1, 0.4, "None"),
            gpu("D", 0.2, 0.9, "Low"),
        ];
        let (chosen, skipped) =
            candidates(&launch(&["D", "B", "C", "X", "A"], false, 0.0, 1.0), &types);
        let ids: Vec<_> = chosen.iter().map(|c| c.gpu_type.as_str()).collect();
        assert_eq!(ids, ["D", "A"]);
        assert!(chosen.iter().all(|c| c.bid_per_gpu.is_none()));
        assert_eq!(skipped.len(), 3);
    }

    #[test]
    fn a_bid_is_at_least_the_minimum_and_at_most_the_cap() {
        let types = [gpu("A", 0.3, 0.5, "High"), gpu("B", 0.9, 1.5, "High")];
        let (chosen, _) = candidates(&launch(&["A", "B"], true, 0.1, 0.0), &types);
        assert_eq!(chosen[0].bid_per_gpu, Some(0.3));
        assert_eq!(chosen[1].bid_per_gpu, Some(0.9));
        let (chosen, _) = candidates(&launch(&["A", "B"], true, 2.0, 0.5), &types);
        assert_eq!(chosen.len(), 1, "B's minimum bid is above the cap");
        assert_eq!(chosen[0].bid_per_gpu, Some(0.5));
    }

    #[test]
    fn avoided_data_centres_are_left_out_unless_all_are() {
        let dcs = |c: &[&str], a: &[&str]| {
            data_centres(
                &c.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                &a.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(dcs(&[], &["X"]), vec![None]);
        assert_eq!(dcs(&["X", "Y"], &["X"]), vec![Some("Y".to_string())]);
        assert_eq!(dcs(&["X"], &["X"]), vec![Some("X".to_string())]);
    }

    #[test]
    fn error_messages_are_read_by_their_words() {
        let cases = [
            (
                "There are no longer any instances available with the requested specifications. Please refresh and try again.",
                ErrorMeaning::NoCapacity,
            ),
            (
                "You have reached your spend limit of $80.00/hr",
                ErrorMeaning::SpendLimit,
            ),
            (
                "Your balance is too low to deploy this pod",
                ErrorMeaning::SpendLimit,
            ),
            ("Unauthorized", ErrorMeaning::Auth),
            ("pod not found", ErrorMeaning::NotFound),
            (
                "Something went wrong. Please try again later",
                ErrorMeaning::Transient,
            ),
            ("Invalid image name", ErrorMeaning::Other),
        ];
        for (message, expected) in cases {
            assert_eq!(meaning(message), expected, "{message}");
        }
    }

    #[test]
    fn pods_map_to_machines_by_status_and_markers() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "id": "p1", "name": "fleet-train.gpu-1", "desiredStatus": "RUNNING",
            "costPerHr": 0.69, "podType": "INTERRUPTABLE",
            "env": ["TY_AUTOSCALER_FLEET=fleet", "TY_AUTOSCALER_POOL=train.gpu",
                    "TY_AUTOSCALER_GPU_TYPE=NVIDIA GeForce RTX 4090", "A=b=c"],
            "machineId": "m1",
            "machine": {"podHostId": "p1-1", "dataCenterId": "EU-RO-1", "gpuDisplayName": "RTX 4090"},
            "runtime": {"uptimeInSeconds": 5}
        }))
        .unwrap();
        assert!(pod.is_of_fleet("fleet"));
        assert!(!pod.is_of_fleet("flee"));
        assert_eq!(pod.env_value("A"), Some("b=c"));
        let m = pod.to_machine(7);
        assert_eq!(m.state, MachineState::Running);
        assert_eq!(m.pool, "train.gpu");
        assert_eq!(m.gpu_type, "NVIDIA GeForce RTX 4090");
        assert_eq!(m.host, "EU-RO-1");
        assert!(m.interruptible);
        assert_eq!(m.dollars_per_hour, 0.69);
        let pending = Pod {
            runtime: None,
            ..pod.clone()
        };
        assert_eq!(pending.state(), MachineState::Pending);
        let exited = Pod {
            desired_status: Some("EXITED".into()),
            ..pod
        };
        assert_eq!(exited.state(), MachineState::Exited);
    }
}
