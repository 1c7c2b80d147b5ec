//! An in-memory [`ExecutionBackend`](backend_core::ExecutionBackend) for tests.
//!
//! [`MockEngine`] plays the container engine: it holds containers, images, an event bus
//! and a call log, and simulates the echo agent (`docker/echo-agent`) on tokio's clock,
//! so it works under paused time:
//! - its environment variables: `ECHO_EXIT_AFTER_MS`, `ECHO_EXIT_CODE`, `ECHO_ALLOC_MB`,
//!   `ECHO_IGNORE_SIGTERM`, `ECHO_UNHEALTHY_AFTER_MS`;
//! - its stdio mode (`ECHO_STDIO=1`, or a command with `--input-format stream-json`, as
//!   agentd runs `claude`): Claude Code's stream-json on stdin and stdout, with the
//!   `!emit`, `!stderr`, `!tool`, `!stall` and `!exit` commands, answered with the echo
//!   agent's lines byte for byte;
//! - its image's entrypoint, `/agent`: a spec's `entrypoint` is taken for the echo agent,
//!   its further elements and the `command` as its arguments, and `--version` first
//!   prints `echo-agent <version>` and exits 0.
//!
//! The engine reports no host CPU count unless given one ([`MockEngine::set_cpus`]); then
//! a create with more CPUs is refused as Docker refuses it, and
//! [`MockEngine::reject_creates`] refuses every create with an engine answer of the test's.
//!
//! Every container keeps one output log (capped at [`MAX_LOG_ENTRIES`] entries and
//! [`MAX_LOG_BYTES`] bytes, oldest dropped first), stamped by the engine with
//! non-decreasing nanosecond times and read through backend-core's `OutputDecoder`: it
//! serves `session_logs` (capped as the contract says), `session_output` and
//! `attach_session` alike. Stdin stays open for the whole run; a detach does nothing to
//! the container. It has every capability but network isolation, with Docker's
//! lifecycle, or with a pod's ([`MockEngine::pod_like`]: sessions run when created, a stop
//! deletes them, a missing image surfaces at the start), which shows the conformance
//! suite passing on a Kubernetes-like lifecycle.
//!
//! [`MockBackend`] is one daemon's view of the engine, filtered by its ownership labels;
//! clones share the engine.
//!
//! Tests script faults on the engine: [`MockEngine::exit`], [`MockEngine::oom_kill`],
//! [`MockEngine::kill_from_outside`], [`MockEngine::stop_from_outside`],
//! [`MockEngine::set_health`], [`MockEngine::vanish`],
//! [`MockEngine::pause`] and [`MockEngine::unpause`], [`MockEngine::drop_attachments`],
//! [`MockEngine::fail_next`],
//! [`MockEngine::set_latency`], add images with or without a `USER`
//! ([`MockEngine::add_image`]), and read back [`MockEngine::calls`] (the last
//! [`MAX_CALLS`]) and the spec each container was created from
//! ([`MockEngine::created_spec`]).

mod agent;
mod backend;
mod engine;
mod factory;
mod output;

pub use backend::MockBackend;
pub use engine::{MockCall, MockEngine, ECHO_IMAGE, ECHO_IMAGE_USER, MAX_CALLS, PLAIN_IMAGE};
pub use factory::{Factory, MockConfig};
pub use output::{MAX_LOG_BYTES, MAX_LOG_ENTRIES};
