//! `yard`'s integration tests as one test binary, so the harness and the
//! fleet link once: each module is a suite of its own. The test that needs
//! the process's global telemetry to be its own is a binary of its own,
//! `tests/submit_trace.rs`.

mod cli;
mod demo;
mod fleet_resume;
mod fleet_status;
mod observability;
mod review;
mod tls;
mod transfer;
mod validate;
mod webhooks;
