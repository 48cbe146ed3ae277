//! A fault-injection hook for the fault suite (`tests/it/faults.rs`).
//!
//! When the environment variable [`EXIT_AFTER_ENV`] names a point, the
//! process exits at once with [`EXIT_CODE`] when it reaches that point, as a
//! crash there would: nothing after it is published, acked or cleaned up.
//! Unset (always, outside the suite) the hook does nothing.
//!
//! Points:
//! - `deliver.uploaded`: every file and the manifest are in every
//!   destination, and the result is not yet published nor the task acked.

/// The variable naming the point to exit after.
pub const EXIT_AFTER_ENV: &str = "TY_FAULT_EXIT_AFTER";
/// The exit status of an injected crash (distinct from a panic's 101).
pub const EXIT_CODE: i32 = 86;
/// After a delivery's uploads, before its result and ack.
pub const DELIVER_UPLOADED: &str = "deliver.uploaded";

/// Exits the process if [`EXIT_AFTER_ENV`] names `point`.
pub fn exit_after(point: &str) {
    if std::env::var_os(EXIT_AFTER_ENV).is_some_and(|v| v == point) {
        eprintln!("{EXIT_AFTER_ENV}={point}: injected crash, exiting with {EXIT_CODE}");
        std::process::exit(EXIT_CODE);
    }
}
