//! The backend-core conformance suite against the mock engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use backend_core::conformance::Harness;
use backend_core::{ExecutionBackend, OwnershipLabels};
use backend_mock::{MockBackend, MockEngine, ECHO_IMAGE};

struct MockHarness {
    engine: MockEngine,
}

#[async_trait]
impl Harness for MockHarness {
    async fn backend(&self, owner: OwnershipLabels) -> Arc<dyn ExecutionBackend> {
        Arc::new(MockBackend::new(self.engine.clone(), owner))
    }

    fn image(&self) -> String {
        ECHO_IMAGE.to_owned()
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
}

fn harness() -> Option<MockHarness> {
    Some(MockHarness { engine: MockEngine::new() })
}

backend_core::conformance_tests!(harness());

#[tokio::test]
async fn run_all_passes_on_one_shared_engine() {
    let harness = MockHarness { engine: MockEngine::new() };
    backend_core::conformance::run_all(&harness).await;
    assert_eq!(harness.engine.container_count(), 0, "the suite cleans up after itself");
}
