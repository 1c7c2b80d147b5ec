//! The registration of the mock: `backend = "mock"`, for trying the API without an
//! engine (nothing really runs).

use std::sync::Arc;

use async_trait::async_trait;
use backend_core::{BackendConfig, ExecutionBackend, OwnershipLabels, Result, TypedFactory};

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
impl TypedFactory for Factory {
    type Config = MockConfig;
    const NAME: &'static str = "mock";

    async fn connect_with(&self, _config: MockConfig, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>> {
        tracing::warn!("Using the in-memory mock backend: nothing really runs.");
        Ok(Arc::new(MockBackend::new(MockEngine::new(), owner)))
    }
}
