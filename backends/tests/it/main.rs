//! The backends' integration tests as one test binary, so the crate and its
//! dependencies link once instead of once per file: each module is a suite
//! of its own (`cargo nextest run -p trainyard-backends -E
//! 'test(kohya_standin::)'`). `common`, `session` and `support` are the
//! fixtures they share; `support` is also the crate's own unit tests'
//! (`backends/src/lib.rs` includes it by path), so it stays beside this
//! folder.

mod common;
mod session;
#[path = "../support/mod.rs"]
mod support;

mod ai_toolkit_standin;
mod diffusion_pipe_render;
mod diffusion_pipe_standin;
mod kohya_parser;
mod kohya_render;
mod kohya_standin;
mod simpletuner_real;
mod simpletuner_standin;
mod trl_real;
mod trl_standin;
