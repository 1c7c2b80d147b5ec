//! An in-memory [`ExecutionBackend`](backend_core::ExecutionBackend) for tests.
//!
//! [`MockEngine`] plays the container engine: it holds containers, images, an event bus
//! and a call log, and simulates the echo agent's behaviour from its environment
//! variables (`ECHO_EXIT_AFTER_MS`, `ECHO_EXIT_CODE`, `ECHO_ALLOC_MB`,
//! `ECHO_IGNORE_SIGTERM`, `ECHO_UNHEALTHY_AFTER_MS`) on tokio's clock, so it works under
//! paused time. [`MockBackend`] is one daemon's view of the engine, filtered by its
//! ownership labels; clones share the engine.
//!
//! Tests script faults on the engine: [`MockEngine::exit`], [`MockEngine::oom_kill`],
//! [`MockEngine::kill_from_outside`], [`MockEngine::set_health`], [`MockEngine::vanish`],
//! [`MockEngine::fail_next`], [`MockEngine::set_latency`], and read back
//! [`MockEngine::calls`].

mod backend;
mod engine;

pub use backend::MockBackend;
pub use engine::{MockCall, MockEngine, ECHO_IMAGE, PLAIN_IMAGE};
