//! The Trainyard contract: protobuf messages of `trainyard.v1` (jobs, tasks,
//! results, events, the client API) and the typed ids every service uses.
//!
//! The `.proto` files under `proto/trainyard/v1/` are the source of truth;
//! this crate only adds Rust conveniences around the generated code.

mod ids;
pub mod redact;
mod state;

pub use ids::{Attempt, IdError, JobId, TenantId};

/// Generated code for `trainyard.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("trainyard.v1");

    /// Encoded `FileDescriptorSet` of the whole contract, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/trainyard_descriptor.bin"));
}
