//! An agentd daemon inside the test process, on the mock backend: what the API, paging,
//! OpenAPI and client-output tests start. Included with `#[path]`, so that a test file
//! takes only this and not the stand-in model.

#![allow(dead_code)] // Each test file uses its own part of it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent_manager::{AgentManager, ShutdownSummary, Store};
use agentd::config::Config;
use agentd::daemon::Daemon;
use backend_core::{ExecutionBackend, OwnershipLabels};
use backend_mock::{MockBackend, MockEngine};
use tokio::sync::oneshot;

/// A running daemon and what a test reaches into.
pub struct InProcess {
    /// `http://<its API address>`.
    pub base: String,
    pub addr: SocketAddr,
    pub engine: MockEngine,
    pub store: Store,
    pub manager: Arc<AgentManager<dyn ExecutionBackend>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<ShutdownSummary>>,
}

/// The configuration the tests start from: the API on an ephemeral loopback port, with
/// `token`, and agents of kind image on the mock's echo image.
pub fn test_config(token: Option<&str>) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.token = token.map(str::to_owned);
    config.agents.kind = agent_manager::AgentKind::Image;
    config.agents.image = backend_mock::ECHO_IMAGE.into();
    config
}

impl InProcess {
    /// Binds a daemon with `config` on `engine` and runs it until [`InProcess::stop`].
    pub async fn start(config: &Config, engine: MockEngine) -> Self {
        // The daemon's warnings (a request that failed with 500 says why there) go to the
        // test's captured output, shown when it fails.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .try_init();
        let store = Store::in_memory().await.expect("store");
        let instance = store.instance_id().await.expect("instance");
        let owner = OwnershipLabels::new("agentd", instance.clone()).expect("labels");
        let backend: Arc<dyn ExecutionBackend> = Arc::new(MockBackend::new(engine.clone(), owner));
        let daemon = Daemon::bind(config, backend, store.clone(), instance).await.expect("bind");
        let addr = daemon.api_addr();
        let manager = daemon.manager();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon.run(async move {
            let _ = stopped.await;
        }));
        Self { base: format!("http://{addr}"), addr, engine, store, manager, stop: Some(stop), task }
    }

    /// Shuts the daemon down, asserting that it ends cleanly within `within`.
    pub async fn stop(mut self, within: Duration) -> ShutdownSummary {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(within, &mut self.task)
            .await
            .expect("daemon stops")
            .expect("join")
            .expect("clean shutdown")
    }
}
