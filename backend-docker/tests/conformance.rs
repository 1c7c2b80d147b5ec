//! The backend-core conformance suite against a real Docker Engine.

mod common;

backend_core::conformance_tests!(common::harness().await);
