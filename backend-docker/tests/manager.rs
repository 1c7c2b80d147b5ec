//! The manager scenarios against a real Docker Engine with the echo agent.

mod common;

agent_manager::manager_scenarios!(common::harness().await);
