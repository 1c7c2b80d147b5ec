//! The backend-core conformance suite against a real Docker Engine.

mod common;

fn main() -> std::process::ExitCode {
    backend_core::conformance::main("Docker", common::connect, backend_core::conformance::cases())
}
