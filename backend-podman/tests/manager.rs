//! The manager scenarios against a real Podman service with the echo agent.

mod common;

agent_manager::manager_scenarios!(common::harness().await);
