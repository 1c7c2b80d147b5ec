//! The backend registry: every backend this daemon can run, one line each.
//!
//! A backend is one crate that exports a [`BackendFactory`] (its name, its configuration
//! section and its constructor). Adding one takes its crate, a dependency line in
//! `agentd/Cargo.toml` and one line in [`BACKENDS`]; the configuration (`backend =
//! "<name>"`, the `[<name>]` section, validation, `config show`) and the daemon follow
//! from the list.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use backend_core::{BackendError, BackendFactory, ExecutionBackend, OwnershipLabels};
use tracing::info;

use crate::config::Config;

/// `backend = "auto"`: the first backend of the registry that says it takes part
/// ([`BackendFactory::auto`]) and whose engine answers.
pub const AUTO: &str = "auto";

/// The registered backends, in the order `auto` tries them.
pub static BACKENDS: &[&dyn BackendFactory] =
    &[&backend_docker::Factory, &backend_podman::Factory, &backend_mock::Factory];

/// The values `backend` may take: `auto`, then every registered name.
pub fn choices(registry: &[&dyn BackendFactory]) -> Vec<&'static str> {
    std::iter::once(AUTO).chain(registry.iter().map(|f| f.name())).collect()
}

/// Connects the configured backend.
pub async fn connect(config: &Config, owner: OwnershipLabels) -> Result<Arc<dyn ExecutionBackend>> {
    connect_with(BACKENDS, config, owner).await
}

/// [`connect`] with the given registry.
pub async fn connect_with(
    registry: &[&dyn BackendFactory],
    config: &Config,
    owner: OwnershipLabels,
) -> Result<Arc<dyn ExecutionBackend>> {
    let choice = config.backend.as_str();
    if choice != AUTO {
        let Some(factory) = registry.iter().find(|f| f.name() == choice) else {
            bail!("backend = {choice:?} is not registered; use one of: {}", choices(registry).join(", "));
        };
        let backend = factory
            .connect(config.backend_section(choice), owner)
            .await
            .with_context(|| format!("backend = {choice:?}"))?;
        info!(backend = backend.name(), "Backend connected.");
        return Ok(backend);
    }
    let mut unavailable = Vec::new();
    for factory in registry.iter().filter(|f| f.auto()) {
        let name = factory.name();
        match factory.connect(config.backend_section(name), owner.clone()).await {
            Ok(backend) => {
                info!(backend = backend.name(), "Backend connected (backend = \"auto\").");
                return Ok(backend);
            }
            Err(e @ BackendError::Unavailable { .. }) => unavailable.push(format!("  {name}: {e}")),
            Err(other) => {
                return Err(other).with_context(|| format!("backend = \"auto\": {name} answered but cannot be used"))
            }
        }
    }
    bail!(
        "backend = \"auto\" found no container engine:\n{}\nStart one, or set backend = \"mock\" to try the API \
         without containers",
        unavailable.join("\n")
    )
}
