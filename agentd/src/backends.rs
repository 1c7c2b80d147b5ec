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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use backend_core::{BackendConfig, ConfigProblem, Section};

    use super::*;
    use crate::config::{load_with, Sources};

    /// A backend that exists only in this test: its own section type and constructor.
    #[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct TestingConfig {
        greeting: String,
    }

    impl BackendConfig for TestingConfig {
        fn check(&self) -> Vec<ConfigProblem> {
            if self.greeting.len() > 8 {
                return vec![ConfigProblem::value("greeting", format!("{:?}", self.greeting), "at most 8 bytes")];
            }
            Vec::new()
        }
    }

    struct Testing {
        connected_with: Mutex<Option<TestingConfig>>,
    }

    #[async_trait]
    impl BackendFactory for Testing {
        fn name(&self) -> &'static str {
            "testing"
        }

        fn parse(&self, section: &Section) -> Result<Section, ConfigProblem> {
            backend_core::parse_to_section::<TestingConfig>(section)
        }

        fn check(&self, section: &Section) -> Vec<ConfigProblem> {
            backend_core::check_section::<TestingConfig>(section)
        }

        async fn connect(
            &self,
            section: Section,
            owner: OwnershipLabels,
        ) -> backend_core::Result<Arc<dyn ExecutionBackend>> {
            let config: TestingConfig = backend_core::connect_config("testing", &section)?;
            *self.connected_with.lock().expect("lock") = Some(config);
            Ok(Arc::new(backend_mock::MockBackend::new(backend_mock::MockEngine::new(), owner)))
        }
    }

    fn sources(dir: &std::path::Path, text: &str) -> Sources {
        let path = dir.join("agentd.toml");
        std::fs::write(&path, text).expect("write");
        Sources { system: dir.join("none.toml"), user: None, explicit: Some(path) }
    }

    #[tokio::test]
    async fn a_backend_registered_with_one_line_is_configured_and_selected_by_name() {
        let dir = std::env::temp_dir().join(format!("agentd-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let testing = Testing { connected_with: Mutex::new(None) };
        let registry: &[&dyn BackendFactory] = &[&testing, &backend_mock::Factory];

        let config = load_with(&sources(&dir, "backend = \"testing\"\n[testing]\ngreeting = \"hello\"\n"), registry)
            .expect("a registered backend's section is configuration");
        let owner = OwnershipLabels::new("agentd", "k-b").expect("labels");
        let backend = connect_with(registry, &config, owner.clone()).await.expect("connect");
        assert_eq!(backend.ownership(), &owner);
        assert_eq!(
            testing.connected_with.lock().expect("lock").take(),
            Some(TestingConfig { greeting: "hello".into() }),
            "the factory got its own section"
        );

        let bad = load_with(&sources(&dir, "[testing]\ngreeting = \"far too long\"\n"), registry).expect_err("check");
        assert!(bad.to_string().contains("testing.greeting = \"far too long\""), "{bad}");
        let unknown = load_with(&sources(&dir, "backend = \"docker\"\n"), registry).expect_err("not registered");
        assert!(unknown.to_string().contains("use one of: auto, testing, mock"), "{unknown}");
        let section = load_with(&sources(&dir, "[docker]\nsocket = \"unix:///x\"\n"), registry).expect_err("section");
        assert!(section.to_string().contains("unknown key \"docker\""), "{section}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
