//! Docker behaviour beyond the shared suite: an engine that goes away.

mod common;

use std::time::Duration;

use backend_core::{ExecutionBackend, OwnershipLabels, SessionSpec};
use backend_docker::{DockerBackend, DockerConfig};

fn owner() -> OwnershipLabels {
    let run = &uuid_like()[..10];
    OwnershipLabels::new(format!("dk{run}"), format!("inst-{run}")).expect("labels")
}

/// Removes every container whose name starts with the prefix when the test ends, also
/// when it fails (the engine's CLI, since `Drop` cannot await).
struct Leftovers(String);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let filter = format!("name={}-", self.0);
        let Ok(out) = std::process::Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output() else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker").args(["rm", "-f"]).args(&ids).output();
        }
    }
}

fn uuid_like() -> String {
    format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos())
        .chars()
        .rev()
        .collect()
}

/// A unix-socket proxy in front of the engine that the test can cut, as a dying or
/// restarting daemon would.
struct EngineProxy {
    path: std::path::PathBuf,
    tasks: tokio::task::JoinSet<()>,
}

impl EngineProxy {
    async fn start(path: std::path::PathBuf) -> Self {
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).expect("bind the proxy socket");
        let mut tasks = tokio::task::JoinSet::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
        tasks.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = conn_tx.send(client);
            }
        });
        let mut proxy = Self { path, tasks };
        let mut inner = tokio::task::JoinSet::new();
        proxy.tasks.spawn(async move {
            while let Some(mut client) = conn_rx.recv().await {
                inner.spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect("/var/run/docker.sock").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
            // Dropping `inner` aborts every open connection.
        });
        proxy
    }

    /// Cuts every connection and stops answering.
    fn cut(&mut self) {
        self.tasks.abort_all();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_goes_away_reads_unavailable_never_as_gone_sessions() {
    let Some(_h) = common::harness().await else { return };
    let owner = owner();
    let _leftovers = Leftovers(owner.prefix().to_owned());
    let path = std::env::temp_dir().join(format!("{}.sock", owner.prefix()));
    let mut proxy = EngineProxy::start(path.clone()).await;
    let config = DockerConfig { socket: Some(format!("unix://{}", path.display())), ..DockerConfig::default() };
    let backend: std::sync::Arc<dyn ExecutionBackend> =
        std::sync::Arc::new(DockerBackend::connect(config, owner.clone()).await.expect("connect through the proxy"));
    let spec = SessionSpec::new(format!("{}-steady", owner.prefix()), "steady", common::IMAGE);
    backend.create_session(&spec).await.expect("create");
    backend.start_session(&spec.session).await.expect("start");

    // A manager records the agent running, then the engine goes away.
    let store = agent_manager::Store::in_memory().await.expect("store");
    let mut config = agent_manager::ManagerConfig::default();
    config.defaults.kind = agent_manager::AgentKind::Image;
    config.defaults.image = common::IMAGE.into();
    config.defaults.memory_mb = None;
    config.defaults.cpus = None;
    let manager = agent_manager::AgentManager::new(backend.clone(), store, config);
    let agent = manager
        .spawn(agent_manager::NewAgent { name: "watched".into(), ..agent_manager::NewAgent::default() })
        .await
        .expect("spawn");
    proxy.cut();

    let unavailable = |what: &str, e: backend_core::BackendError| {
        assert!(e.is_retryable(), "{what}: expected Unavailable, got {e}");
    };
    match backend.session_exists(&spec.session).await {
        Err(e) => unavailable("session_exists", e),
        Ok(found) => panic!("session_exists answered {found} with the engine gone"),
    }
    match backend.session_state(&spec.session).await {
        Err(e) => unavailable("session_state", e),
        Ok(state) => panic!("session_state answered {:?} with the engine gone", state.status),
    }
    match backend.snapshot().await {
        Err(e) => unavailable("snapshot", e),
        Ok(list) => panic!("snapshot answered {} sessions with the engine gone", list.len()),
    }
    for pass in 1..=3 {
        let err = manager.reconcile().await.expect_err("a pass with the engine gone fails");
        assert!(err.is_engine_unavailable(), "pass {pass}: {err}");
        let view = manager.get("watched").await.expect("get");
        assert_eq!(
            view.agent.status,
            agent_manager::AgentStatus::Running,
            "pass {pass}: an unreachable engine read as a dead agent"
        );
    }

    // The engine comes back: everything reads as it really is.
    let _proxy = EngineProxy::start(path.clone()).await;
    manager.reconcile().await.expect("a pass with the engine back");
    assert_eq!(manager.get("watched").await.expect("get").agent.status, agent_manager::AgentStatus::Running);
    assert!(backend.session_exists(&spec.session).await.expect("exists"));
    backend.kill_session(&agent.agent.session, Duration::ZERO).await.expect("cleanup");
    backend.kill_session(&spec.session, Duration::ZERO).await.expect("cleanup");
    let _ = std::fs::remove_file(&path);
}

/// The isolated network as the host firewall sees it: the bridge Docker made for it (it
/// exists on this host), the host's address on it, on this host.
#[tokio::test]
async fn the_isolated_network_names_its_bridge_and_gateway() {
    let Some(_h) = common::harness().await else { return };
    let backend = DockerBackend::connect(DockerConfig::default(), owner()).await.expect("connect");
    let network = backend.isolated_network().await.expect("read").expect("an isolated network");
    let id = std::process::Command::new("docker")
        .args(["network", "inspect", "--format", "{{.Id}}", &network.name])
        .output()
        .expect("docker network inspect");
    let id = String::from_utf8_lossy(&id.stdout).trim().to_owned();
    assert_eq!(network.interface, format!("br-{}", &id[..12]), "{network:?}");
    assert!(std::path::Path::new("/sys/class/net").join(&network.interface).exists(), "{network:?}");
    let gateway = backend.gateway_addresses().await.expect("gateways").isolated.expect("isolated gateway");
    assert!(network.gateways.contains(&gateway), "{network:?}");
    assert!(network.on_this_host);
    assert!(!network.subnets.is_empty(), "{network:?}");
}
