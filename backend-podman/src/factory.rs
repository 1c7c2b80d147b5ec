//! The registration of this backend: its configuration section and its constructor.

use std::sync::Arc;

use async_trait::async_trait;
use backend_core::{ExecutionBackend, OwnershipLabels, Result, TypedFactory};

use crate::{PodmanBackend, PodmanConfig};

/// The Podman backend as the daemon registers it: `backend = "podman"`, section `[podman]`
/// ([`PodmanConfig`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Factory;

#[async_trait]
impl TypedFactory for Factory {
    type Config = PodmanConfig;
    const NAME: &'static str = "podman";
    const AUTO: bool = true;

    async fn connect_with(&self, config: PodmanConfig, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>> {
        Ok(Arc::new(PodmanBackend::connect(config, owner).await?))
    }
}
