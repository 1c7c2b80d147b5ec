//! The Podman backend of agentd, on podman-api (libpod API).
//!
//! [`PodmanBackend`] implements [`backend_core::ExecutionBackend`] against the Podman
//! service (`podman system service`), Podman 4.3 and later: each agent runs as the main
//! process of its own container, hardened like the Docker backend's (all capabilities
//! dropped, no-new-privileges, limits from the spec), labelled with the ownership labels,
//! watched through libpod's event stream and a one-call state snapshot.
//!
//! Where Podman differs from Docker the difference is handled here, never papered over:
//! - health checks run by the backend where Podman cannot schedule them (no systemd),
//!   see [`HealthScheduling`] and `health.rs`;
//! - OOM kills told from the kernel log where Podman does not report them
//!   (containers/podman#13102), see `oom.rs`;
//! - stop's grace period and the no-new-privileges flag sent the way libpod reads them,
//!   see `raw.rs`;
//! - a session's stdin held open by a keeper process of its own, because libpod closes it
//!   when an attach ends, see `stdin.rs`.
//!
//! The crate's README lists every workaround with the upstream issue it works around.
//!
//! Architecture invariant: this crate is the only one that knows podman-api's types; they
//! are mapped to backend-core's in `convert.rs` and `error.rs`.

mod attach;
mod backend;
mod config;
mod convert;
mod error;
mod events;
mod factory;
mod health;
mod oom;
mod raw;
mod stdin;
mod volumes;

pub use backend::PodmanBackend;
pub use config::{PodmanConfig, DEFAULT_STDIN_DIR, ROOTFUL_SOCKET, START_SERVICE};
pub use factory::Factory;
pub use health::HealthScheduling;
