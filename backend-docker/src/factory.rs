//! The registration of this backend: its configuration section and its constructor.

use std::sync::Arc;

use async_trait::async_trait;
use backend_core::{ExecutionBackend, OwnershipLabels, Result, TypedFactory};

use crate::{DockerBackend, DockerConfig};

/// The Docker backend as the daemon registers it: `backend = "docker"`, section `[docker]`
/// ([`DockerConfig`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Factory;

#[async_trait]
impl TypedFactory for Factory {
    type Config = DockerConfig;
    const NAME: &'static str = "docker";
    const AUTO: bool = true;

    async fn connect_with(&self, config: DockerConfig, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>> {
        Ok(Arc::new(DockerBackend::connect(config, owner).await?))
    }
}
