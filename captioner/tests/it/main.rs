//! The captioner's integration tests as one test binary, so the crate and
//! its dependencies link once instead of once per file: each module is a
//! suite of its own (`cargo nextest run -p trainyard-captioner -E
//! 'test(unpack::)'`), `common` the helpers they share.

mod common;

mod captioning;
mod fetch;
mod preflight;
mod prepare;
mod sample;
mod text;
mod unpack;
mod video;
