//! The registration of this backend: its configuration section and its constructor.

use std::sync::Arc;

use async_trait::async_trait;
use backend_core::{BackendFactory, ConfigProblem, ExecutionBackend, OwnershipLabels, Result, Section};

use crate::{DockerBackend, DockerConfig};

/// The Docker backend as the daemon registers it: `backend = "docker"`, section `[docker]`
/// ([`DockerConfig`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Factory;

#[async_trait]
impl BackendFactory for Factory {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn auto(&self) -> bool {
        true
    }

    fn parse(&self, section: &Section) -> std::result::Result<Section, ConfigProblem> {
        backend_core::parse_to_section::<DockerConfig>(section)
    }

    fn check(&self, section: &Section) -> Vec<ConfigProblem> {
        backend_core::check_section::<DockerConfig>(section)
    }

    async fn connect(&self, section: Section, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>> {
        let config: DockerConfig = backend_core::connect_config("docker", &section)?;
        Ok(Arc::new(DockerBackend::connect(config, owner).await?))
    }
}
