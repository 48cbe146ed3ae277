//! The `[runtime]` section: what every stage service (captioner, worker,
//! uploader) reads about itself.

use serde::{Deserialize, Serialize};

/// The `[runtime]` section.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// This service's worker id: its claims, its registry entry in
    /// `ty_workers` and its logs name it. Empty: `<stage>-<uuid>`,
    /// generated at start. The autoscaler sets it
    /// (`TY_RUNTIME__WORKER_ID`) to the name of the machine it starts, so
    /// the registry entry names its machine.
    pub worker_id: String,
}
