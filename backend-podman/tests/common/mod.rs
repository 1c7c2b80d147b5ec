//! The Podman test harness: backends on the service at `CONTAINER_HOST` (else the default
//! sockets), and fixtures and outside interference through podman-api directly (not
//! testcontainers, which talks to Docker).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use backend_core::conformance::{skip_or_fail, Harness};
use backend_core::{ExecutionBackend, OwnershipLabels};
use backend_podman::{PodmanBackend, PodmanConfig};
use podman_api::opts::{ContainerCreateOpts, ContainerDeleteOpts, ContainerStopOpts};

/// The echo agent as Podman names it (`cargo xtask images` builds it).
pub const IMAGE: &str = "localhost/agentd-echo:latest";
/// An image without a `USER` (`cargo xtask images` builds it).
pub const NOUSER_IMAGE: &str = "localhost/agentd-nouser:latest";

pub struct PodmanHarness {
    probe: PodmanBackend,
}

/// A harness on the local Podman service, or why there is none.
pub async fn connect() -> Result<PodmanHarness, String> {
    let owner = OwnershipLabels::new("agentd-probe", "probe").expect("labels");
    let probe = PodmanBackend::connect(PodmanConfig::default(), owner).await.map_err(|e| e.to_string())?;
    match probe.image_exists(IMAGE).await {
        Ok(true) => Ok(PodmanHarness { probe }),
        Ok(false) => Err(format!("image {IMAGE} is missing; build it with `cargo xtask images`")),
        Err(e) => Err(e.to_string()),
    }
}

/// A harness on the local Podman service, or `None` (after printing why) when there is
/// none and engines are not required.
pub async fn harness() -> Option<PodmanHarness> {
    connect().await.map_or_else(|why| skip_or_fail("Podman", why), Some)
}

impl PodmanHarness {
    /// A backend with its concrete type, for Podman-specific tests.
    pub async fn podman_backend(&self, owner: OwnershipLabels) -> PodmanBackend {
        PodmanBackend::connect(PodmanConfig::default(), owner).await.expect("connect to Podman")
    }

    /// The podman-api client of the probe backend.
    pub fn client(&self) -> &podman_api::Podman {
        self.probe.client()
    }
}

#[async_trait]
impl Harness for PodmanHarness {
    async fn backend(&self, owner: OwnershipLabels) -> Arc<dyn ExecutionBackend> {
        Arc::new(self.podman_backend(owner).await)
    }

    fn image(&self) -> String {
        IMAGE.to_owned()
    }

    fn image_without_user(&self) -> Option<String> {
        Some(NOUSER_IMAGE.to_owned())
    }

    async fn start_fixture(&self, name: &str, labels: BTreeMap<String, String>) -> String {
        let mut labels = labels;
        labels.insert("agentd.test".into(), "fixture".into());
        let opts = ContainerCreateOpts::builder().name(name).image(IMAGE).labels(labels).build();
        let containers = self.client().containers();
        let created = containers.create(&opts).await.unwrap_or_else(|e| panic!("create fixture {name}: {e}"));
        containers.get(created.id.as_str()).start(None).await.unwrap_or_else(|e| panic!("start fixture {name}: {e}"));
        created.id
    }

    async fn remove_fixture(&self, handle: &str) {
        let opts = ContainerDeleteOpts::builder().force(true).timeout(0).build();
        if let Err(e) = self.client().containers().get(handle).delete(&opts).await {
            if !e.to_string().contains("no such container") {
                eprintln!("could not remove fixture {handle}: {e}");
            }
        }
    }

    async fn kill_from_outside(&self, session: &str) {
        self.client().containers().get(session).send_signal("SIGKILL").await.expect("podman kill");
    }

    async fn remove_from_outside(&self, session: &str) {
        // As `podman rm -f` does: a stop with the container's timeout (SIGTERM first),
        // then the removal.
        let opts = ContainerDeleteOpts::builder().force(true).build();
        self.client().containers().get(session).delete(&opts).await.expect("podman rm -f");
    }

    async fn stop_from_outside(&self, session: &str) {
        let opts = ContainerStopOpts::builder().build();
        self.client().containers().get(session).stop(&opts).await.expect("podman stop");
    }

    async fn internet_address(&self, session: &str) -> Option<IpAddr> {
        let inspect = self.client().containers().get(session).inspect().await.ok()?;
        let networks = inspect.network_settings?.networks?;
        networks.get("podman")?.ip_address.as_deref()?.parse().ok()
    }
}
