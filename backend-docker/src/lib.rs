//! The Docker Engine backend of agentd, on bollard.
//!
//! [`DockerBackend`] implements [`backend_core::ExecutionBackend`] against Docker Engine
//! 20.10 (API 1.41) and later: each agent runs as the main process of its own container,
//! hardened by default (all capabilities dropped, no-new-privileges, limits from the spec),
//! labelled with the ownership labels, watched through the engine's event stream and a
//! three-call state snapshot.
//!
//! Architecture invariant: this crate is the only one that knows bollard's types; they are
//! mapped to backend-core's in `convert.rs` and `error.rs`.

mod backend;
mod config;
mod convert;
mod error;
mod events;
mod factory;

pub use backend::DockerBackend;
pub use config::DockerConfig;
pub use factory::Factory;
