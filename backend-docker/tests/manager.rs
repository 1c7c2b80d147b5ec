//! The manager scenarios against a real Docker Engine with the echo agent.

mod common;

fn main() -> std::process::ExitCode {
    backend_core::conformance::main("Docker", common::connect, agent_manager::scenarios::cases())
}
