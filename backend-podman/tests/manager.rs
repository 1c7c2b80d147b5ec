//! The manager scenarios against a real Podman service with the echo agent.

mod common;

fn main() -> std::process::ExitCode {
    backend_core::conformance::main("Podman", common::connect, agent_manager::scenarios::cases())
}
