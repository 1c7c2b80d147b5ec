//! agentd: a daemon that runs AI coding agents in containers and always knows the truth
//! about them.
//!
//! This crate is the daemon and its CLI: configuration (figment), the HTTP API (axum),
//! metrics, and the wiring of the store, the backend and the manager.
//!
//! Architecture invariant: only this crate knows figment and HTTP.

pub mod api;
pub mod backends;
pub mod chat;
pub mod client;
pub mod config;
pub mod daemon;
pub mod egress;
pub mod firewall;
pub mod gateway;
pub mod listen;
pub mod logs;
pub mod metrics;
pub mod output;
pub mod storefs;
pub mod times;
