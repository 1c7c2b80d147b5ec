//! The registration of this backend: its configuration section and its constructor.

use std::sync::Arc;

use async_trait::async_trait;
use backend_core::{BackendFactory, ConfigProblem, ExecutionBackend, OwnershipLabels, Result, Section};

use crate::{PodmanBackend, PodmanConfig};

/// The Podman backend as the daemon registers it: `backend = "podman"`, section `[podman]`
/// ([`PodmanConfig`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Factory;

#[async_trait]
impl BackendFactory for Factory {
    fn name(&self) -> &'static str {
        "podman"
    }

    fn auto(&self) -> bool {
        true
    }

    fn parse(&self, section: &Section) -> std::result::Result<Section, ConfigProblem> {
        backend_core::parse_to_section::<PodmanConfig>(section)
    }

    fn check(&self, section: &Section) -> Vec<ConfigProblem> {
        backend_core::check_section::<PodmanConfig>(section)
    }

    async fn connect(&self, section: Section, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>> {
        let config: PodmanConfig = backend_core::connect_config("podman", &section)?;
        Ok(Arc::new(PodmanBackend::connect(config, owner).await?))
    }
}
