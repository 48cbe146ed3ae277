//! The end-to-end suites as one test binary, so the fleet links once instead
//! of once per suite: each module is a suite of its own (its helpers stay
//! inside it), run as `it` (`cargo nextest run -p trainyard-tests -E
//! 'test(faults::)'`, or `cargo test -p trainyard-tests --test it faults::`).
//!
//! A suite that installs process-global state (the global tracing
//! subscriber and metrics of `telemetry::init`) cannot share a process with
//! the others, which start fleets that install it first: those live in
//! `tests/global/`, one binary each (see `tests/Cargo.toml`).

mod api;
mod attacks_bus;
mod attacks_destinations;
mod attacks_fairshare;
mod attacks_limits;
mod attacks_secrets;
mod attacks_store;
mod attacks_webhooks;
mod auth;
mod autoscaler_failover;
mod autoscaler_k8s;
mod autoscaler_k8s_e2e;
mod autoscaler_local;
mod autoscaler_runpod;
mod autoscaler_runpod_e2e;
mod backends;
mod captions;
mod cloud_delivery;
mod cloud_stores;
mod deploy_one_box;
mod drain;
mod failures;
mod faults;
mod fencing;
mod gpu_smoke;
mod hub_delivery;
mod lifetimes;
mod model_cache;
mod orphans;
mod outage;
mod pipeline;
mod preflight;
mod presign;
mod prometheus;
mod reconcile;
mod registry;
mod retry;
mod review;
mod s3;
mod stage_telemetry;
mod startup;
mod stuck;
mod telemetry;
mod trace;
mod trainer_logs;
mod video;
mod webhooks;
