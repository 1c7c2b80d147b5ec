//! The mock's conformance harness, shared by the suite's two runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use backend_core::conformance::Harness;
use backend_core::{ExecutionBackend, OwnershipLabels};
use backend_mock::{MockBackend, MockEngine, ECHO_IMAGE, PLAIN_IMAGE};

/// A harness on one mock engine, shared by every case.
pub struct MockHarness {
    pub engine: MockEngine,
}

impl MockHarness {
    /// A harness on `engine`, which reports a 4-CPU host.
    pub fn new(engine: MockEngine) -> Self {
        engine.set_cpus(Some(4));
        Self { engine }
    }
}

#[async_trait]
impl Harness for MockHarness {
    async fn backend(&self, owner: OwnershipLabels) -> Arc<dyn ExecutionBackend> {
        Arc::new(MockBackend::new(self.engine.clone(), owner))
    }

    fn image(&self) -> String {
        ECHO_IMAGE.to_owned()
    }

    fn image_without_user(&self) -> Option<String> {
        Some(PLAIN_IMAGE.to_owned())
    }

    async fn start_fixture(&self, name: &str, labels: BTreeMap<String, String>) -> String {
        self.engine.insert_foreign(name, labels);
        name.to_owned()
    }

    async fn remove_fixture(&self, handle: &str) {
        self.engine.vanish(handle, false);
    }

    async fn kill_from_outside(&self, session: &str) {
        self.engine.kill_from_outside(session);
    }

    async fn remove_from_outside(&self, session: &str) {
        self.engine.vanish(session, true);
    }

    async fn stop_from_outside(&self, session: &str) {
        self.engine.stop_from_outside(session);
    }

    async fn leftovers(&self) -> Vec<String> {
        let count = self.engine.container_count();
        if count == 0 {
            Vec::new()
        } else {
            vec![format!("{count} containers")]
        }
    }
}
