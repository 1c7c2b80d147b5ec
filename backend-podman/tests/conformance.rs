//! The backend-core conformance suite against a real Podman service.

mod common;

backend_core::conformance_tests!(common::harness().await);
