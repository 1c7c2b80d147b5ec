//! The registration of the mock: `backend = "mock"`, for trying the API without an
//! engine (nothing really runs).

use std::sync::Arc;

use async_trait::async_trait;
use backend_core::{BackendConfig, BackendFactory, ConfigProblem, ExecutionBackend, OwnershipLabels, Result, Section};

use crate::{MockBackend, MockEngine};

/// The mock's `[mock]` section: it has no keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockConfig {}

impl BackendConfig for MockConfig {}

/// The mock as the daemon registers it: `backend = "mock"`, a fresh in-memory engine per
/// daemon. `backend = "auto"` never picks it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Factory;

#[async_trait]
impl BackendFactory for Factory {
    fn name(&self) -> &'static str {
        "mock"
    }

    fn parse(&self, section: &Section) -> std::result::Result<Section, ConfigProblem> {
        backend_core::parse_to_section::<MockConfig>(section)
    }

    fn check(&self, section: &Section) -> Vec<ConfigProblem> {
        backend_core::check_section::<MockConfig>(section)
    }

    async fn connect(&self, section: Section, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>> {
        let MockConfig {} = backend_core::connect_config("mock", &section)?;
        tracing::warn!("Using the in-memory mock backend: nothing really runs.");
        Ok(Arc::new(MockBackend::new(MockEngine::new(), owner)))
    }
}
