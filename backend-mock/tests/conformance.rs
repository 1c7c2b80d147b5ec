//! The backend-core conformance suite against the mock engine: every case on one shared
//! engine, which must be empty afterwards (the suite cleans up after itself).

mod common;

use std::process::ExitCode;

use backend_mock::MockEngine;
use common::MockHarness;

fn main() -> ExitCode {
    backend_core::conformance::main(
        "mock",
        || async { Ok(MockHarness::new(MockEngine::new())) },
        backend_core::conformance::cases(),
    )
}
