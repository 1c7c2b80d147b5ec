//! The conformance suite against a mock engine with a pod's lifecycle
//! ([`MockEngine::pod_like`]): sessions run when created, a stop deletes them with their
//! exit info, a missing image surfaces at the start. It shows that the suite reads the
//! lifecycle capabilities, so that a Kubernetes backend can pass it honestly.

mod common;

use std::process::ExitCode;

use backend_mock::MockEngine;
use common::MockHarness;

fn main() -> ExitCode {
    backend_core::conformance::main(
        "mock (pod-like)",
        || async { Ok(MockHarness::new(MockEngine::pod_like())) },
        backend_core::conformance::cases(),
    )
}
