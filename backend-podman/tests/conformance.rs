//! The backend-core conformance suite against a real Podman service.

mod common;

fn main() -> std::process::ExitCode {
    backend_core::conformance::main("Podman", common::connect, backend_core::conformance::cases())
}
