//! The Docker test harness: backends on the engine at `DOCKER_HOST`, fixtures started with
//! testcontainers, and outside interference through bollard.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use backend_core::conformance::{skip_or_fail, Harness};
use backend_core::{ExecutionBackend, OwnershipLabels};
use backend_docker::{DockerBackend, DockerConfig};
use bollard::query_parameters::{KillContainerOptions, RemoveContainerOptions, StopContainerOptions};
use testcontainers::core::ContainerAsync;
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};

pub const IMAGE: &str = "agentd-echo:latest";
/// An image without a `USER` (`cargo xtask images` builds it).
pub const NOUSER_IMAGE: &str = "agentd-nouser:latest";

pub struct DockerHarness {
    probe: DockerBackend,
    fixtures: Mutex<HashMap<String, ContainerAsync<GenericImage>>>,
}

/// A harness on the local Docker Engine, or why there is none.
pub async fn connect() -> Result<DockerHarness, String> {
    let owner = OwnershipLabels::new("agentd-probe", "probe").expect("labels");
    let probe = DockerBackend::connect(DockerConfig::default(), owner).await.map_err(|e| e.to_string())?;
    match probe.image_exists(IMAGE).await {
        Ok(true) => Ok(DockerHarness { probe, fixtures: Mutex::new(HashMap::new()) }),
        Ok(false) => Err(format!("image {IMAGE} is missing; build it with `cargo xtask images`")),
        Err(e) => Err(e.to_string()),
    }
}

/// A harness on the local Docker Engine, or `None` (after printing why) when there is
/// none and engines are not required.
#[allow(dead_code)]
pub async fn harness() -> Option<DockerHarness> {
    connect().await.map_or_else(|why| skip_or_fail("Docker", why), Some)
}

#[async_trait]
impl Harness for DockerHarness {
    async fn backend(&self, owner: OwnershipLabels) -> Arc<dyn ExecutionBackend> {
        Arc::new(DockerBackend::connect(DockerConfig::default(), owner).await.expect("connect to Docker"))
    }

    fn image(&self) -> String {
        IMAGE.to_owned()
    }

    fn image_without_user(&self) -> Option<String> {
        Some(NOUSER_IMAGE.to_owned())
    }

    async fn start_fixture(&self, name: &str, labels: BTreeMap<String, String>) -> String {
        let container = GenericImage::new("agentd-echo", "latest")
            .with_container_name(name)
            .with_labels(labels)
            .with_label("agentd.test", "fixture")
            .start()
            .await
            .unwrap_or_else(|e| panic!("start fixture {name} with testcontainers: {e}"));
        self.fixtures.lock().expect("lock").insert(name.to_owned(), container);
        name.to_owned()
    }

    async fn remove_fixture(&self, handle: &str) {
        let container = self.fixtures.lock().expect("lock").remove(handle);
        if let Some(container) = container {
            if let Err(e) = container.rm().await {
                eprintln!("could not remove fixture {handle}: {e}");
            }
        }
    }

    async fn kill_from_outside(&self, session: &str) {
        let options = KillContainerOptions { signal: "SIGKILL".into() };
        self.probe.client().kill_container(session, Some(options)).await.expect("docker kill");
    }

    async fn remove_from_outside(&self, session: &str) {
        let options = RemoveContainerOptions { force: true, ..RemoveContainerOptions::default() };
        self.probe.client().remove_container(session, Some(options)).await.expect("docker rm -f");
    }

    async fn stop_from_outside(&self, session: &str) {
        let options = StopContainerOptions { t: None, signal: None };
        self.probe.client().stop_container(session, Some(options)).await.expect("docker stop");
    }

    async fn internet_address(&self, session: &str) -> Option<IpAddr> {
        let inspect = self.probe.client().inspect_container(session, None).await.ok()?;
        let networks = inspect.network_settings?.networks?;
        networks.get("bridge")?.ip_address.as_deref()?.parse().ok()
    }
}
