//! Shared fixtures for the manager's tests and benchmarks: a manager on the mock engine,
//! with a manual clock.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use agent_manager::{AgentKind, AgentManager, AgentStatus, AgentView, ManagerConfig, ManualClock, NewAgent, Store};
use backend_core::{ExecutionBackend, OwnershipLabels};
use backend_mock::{MockBackend, MockEngine, PLAIN_IMAGE};

/// A manager on a mock engine, as a daemon would hold it: over `dyn ExecutionBackend`.
pub struct Fixture {
    pub engine: MockEngine,
    pub clock: ManualClock,
    pub store: Store,
    pub owner: OwnershipLabels,
    pub manager: Arc<AgentManager<dyn ExecutionBackend>>,
}

/// Test defaults: agents of kind `image` on an image without a health check.
pub fn test_config() -> ManagerConfig {
    let mut config = ManagerConfig::default();
    config.defaults.kind = AgentKind::Image;
    config.defaults.image = PLAIN_IMAGE.into();
    config.defaults.stop_grace_secs = 1;
    config
}

impl Fixture {
    pub async fn new() -> Self {
        Self::with_config(test_config()).await
    }

    pub async fn with_config(config: ManagerConfig) -> Self {
        let store = Store::in_memory().await.expect("in-memory store");
        Self::on(MockEngine::new(), store, config, ManualClock::new()).await
    }

    /// A manager on an existing engine and store (a daemon restart).
    pub async fn on(engine: MockEngine, store: Store, config: ManagerConfig, clock: ManualClock) -> Self {
        let instance = store.instance_id().await.expect("instance id");
        let owner = OwnershipLabels::new("agentd", instance).expect("labels");
        let backend: Arc<dyn ExecutionBackend> = Arc::new(MockBackend::new(engine.clone(), owner.clone()));
        let manager = AgentManager::new(backend, store.clone(), config).with_clock(Arc::new(clock.clone()));
        Self { engine, clock, store, owner, manager: Arc::new(manager) }
    }

    pub async fn spawn(&self, name: &str) -> AgentView {
        self.spawn_with(NewAgent { name: name.into(), ..NewAgent::default() }).await
    }

    pub async fn spawn_with(&self, new: NewAgent) -> AgentView {
        let name = new.name.clone();
        self.manager.spawn(new).await.unwrap_or_else(|e| panic!("spawn {name}: {e}"))
    }

    pub async fn get(&self, name: &str) -> AgentView {
        self.manager.get(name).await.unwrap_or_else(|e| panic!("get {name}: {e}"))
    }

    pub async fn status(&self, name: &str) -> AgentStatus {
        self.get(name).await.agent.status
    }

    pub async fn reconcile(&self) -> agent_manager::ReconcileReport {
        self.manager.reconcile().await.expect("reconcile pass")
    }

    /// Spawns `n` agents named `a0`, `a1`, ... and runs one pass so all are settled.
    pub async fn spawn_many(&self, n: usize) {
        for i in 0..n {
            self.spawn(&format!("a{i}")).await;
        }
        self.reconcile().await;
    }
}

/// Waits (bounded) until `check` holds, polling every 20 ms.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after 10 s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
