//! The autoscaler: sizes each stage's fleet (`prepare`, `deliver`, and
//! each training pool `train.<pool>`) from its backlog.
//!
//! - [`plan`]: the planner, pure — an observation of one pool (backlog in
//!   estimated seconds of work, its machines and what they do) and its
//!   policy in, a decision out (machines to start, idle ones to release,
//!   busy ones to drain, and why). `ty-sim` runs the same code.
//! - [`provider`]: where machines come from, behind one trait
//!   ([`provider::Provider`]): `local` child processes, `runpod` pods,
//!   `kubernetes` Deployment replicas.

pub mod plan;
pub mod provider;
pub mod sim;
