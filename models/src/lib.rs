//! Base models: what a job's `base_model.uri` may name (presets, `hf://`
//! references, artifact-store files), the model families trainers are
//! configured for, and the client for the Hugging Face Hub's file protocol
//! that resolves and downloads them.
//!
//! A crate of its own so that `trainyard-core` stays free of any particular
//! stage's knowledge: the coordinator validates references, the captioner
//! preflights them, backends pick parts by family, and the worker resolves
//! and caches them; nothing in the stage runtime needs to know what a model is.

pub mod hub;
pub mod presets;

pub use presets::{
    HubPart, HubRef, ModelFamily, ModelField, ModelRefError, ModelSource, PRESETS, Preset,
    glob_match, part, preset,
};
