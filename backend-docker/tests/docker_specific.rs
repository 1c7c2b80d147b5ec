//! Docker behaviour beyond the shared suite: stale containers, network isolation.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, TcpListener};

use std::time::Duration;

use backend_core::conformance::{wait_for, Harness};
use backend_core::{BackendError, ExecutionBackend, NetworkPolicy, OwnershipLabels, SessionSpec};
use backend_core::{LABEL_AGENT_ID, LABEL_INSTANCE, LABEL_PREFIX, LABEL_SESSION};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_container_of_ours_is_replaced_and_a_foreign_one_is_left_alone() {
    let Some(h) = common::harness().await else { return };
    let owner = owner();
    let _leftovers = Leftovers(owner.prefix().to_owned());
    let backend = h.backend(owner.clone()).await;
    let stale = format!("{}-stale", owner.prefix());
    let labels = BTreeMap::from([
        (LABEL_PREFIX.to_owned(), owner.prefix().to_owned()),
        (LABEL_INSTANCE.to_owned(), owner.instance().to_owned()),
        (LABEL_SESSION.to_owned(), stale.clone()),
        (LABEL_AGENT_ID.to_owned(), "old".to_owned()),
    ]);
    let fixture = h.start_fixture(&stale, labels).await;
    let old_id = backend.session_state(&stale).await.expect("state").id;
    let new_id = backend
        .create_session(&SessionSpec::new(stale.clone(), "new", common::IMAGE))
        .await
        .expect("create over a stale container of ours");
    assert_ne!(old_id, new_id, "the stale container was reused");
    backend.kill_session(&stale, Duration::ZERO).await.expect("cleanup");
    h.remove_fixture(&fixture).await;

    let foreign = format!("{}-foreign", owner.prefix());
    let fixture = h.start_fixture(&foreign, BTreeMap::new()).await;
    let outcome = backend.create_session(&SessionSpec::new(foreign.clone(), "x", common::IMAGE)).await;
    h.remove_fixture(&fixture).await;
    match outcome {
        Err(BackendError::AlreadyExists { detail, .. }) => assert!(detail.contains("not owned"), "{detail}"),
        other => panic!("a foreign container must not be replaced: {other:?}"),
    }
}

/// Starts an echo agent under `policy` that keeps trying to connect to `target:port`.
async fn start_client(
    backend: &dyn ExecutionBackend,
    name: &str,
    policy: NetworkPolicy,
    target: IpAddr,
    port: u16,
) -> String {
    let mut spec = SessionSpec::new(format!("{}-{name}", backend.prefix()), name, common::IMAGE);
    spec.network = policy;
    spec.env.insert("ECHO_CONNECT_TO".into(), format!("{target}:{port}"));
    backend.create_session(&spec).await.expect("create");
    backend.start_session(&spec.session).await.expect("start");
    spec.session
}

async fn logs_contain(backend: &dyn ExecutionBackend, session: &str, needle: &str) -> bool {
    backend.session_logs(session, None).await.map(|l| l.contains(needle)).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_agents_reach_the_agent_channel_and_nothing_routed_beyond_it() {
    let Some(h) = common::harness().await else { return };
    let owner = owner();
    let _leftovers = Leftovers(owner.prefix().to_owned());
    let backend = h.backend(owner).await;
    let backend = backend.as_ref();
    let addresses = backend.gateway_addresses().await.expect("addresses");
    assert_eq!(addresses.len(), 2, "the bridge and the isolated network each give a channel address: {addresses:?}");
    let isolated_gateway = addresses[1];

    // Half one: the agent channel on the host side of the isolated network is reachable.
    let channel = TcpListener::bind((isolated_gateway, 0)).expect("listen like the daemon's channel");
    channel.set_nonblocking(true).expect("nonblocking");
    let port = channel.local_addr().expect("addr").port();
    start_client(backend, "iso-channel", NetworkPolicy::Isolated, isolated_gateway, port).await;
    wait_for(Duration::from_secs(30), "the isolated agent to reach the channel", || {
        let accepted = channel.accept().is_ok();
        async move {
            if accepted {
                Ok(())
            } else {
                Err("no connection yet".to_owned())
            }
        }
    })
    .await;

    // Half two: a peer beyond the isolated network (a container on the default bridge,
    // one forwarding hop away, as the internet would be) is not.
    let mut target = SessionSpec::new(format!("{}-target", backend.prefix()), "target", common::IMAGE);
    target.env.insert("ECHO_LISTEN_PORT".into(), "8080".into());
    backend.create_session(&target).await.expect("create target");
    backend.start_session(&target.session).await.expect("start target");
    let docker = bollard::Docker::connect_with_defaults().expect("docker");
    let inspect = docker.inspect_container(&target.session, None).await.expect("inspect target");
    let target_ip: IpAddr = inspect
        .network_settings
        .and_then(|n| n.networks)
        .and_then(|n| n.get("bridge").and_then(|e| e.ip_address.clone()))
        .and_then(|ip| ip.parse().ok())
        .expect("target IP on the bridge");
    wait_for(Duration::from_secs(30), "the target to listen", || async {
        if logs_contain(backend, &target.session, "listening on port 8080").await {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    let blocked = start_client(backend, "iso-out", NetworkPolicy::Isolated, target_ip, 8080).await;
    wait_for(Duration::from_secs(30), "the isolated agent's connection attempt to fail", || async {
        if logs_contain(backend, &blocked, "cannot connect").await {
            Ok(())
        } else {
            Err("no attempt logged yet".into())
        }
    })
    .await;
    assert!(
        !logs_contain(backend, &target.session, "accepted connection").await,
        "an isolated agent reached a peer outside its network"
    );
    // The control: the same peer is reachable under `internet`, so the test can tell.
    start_client(backend, "net-out", NetworkPolicy::Internet, target_ip, 8080).await;
    wait_for(Duration::from_secs(30), "the internet agent to reach the peer", || async {
        if logs_contain(backend, &target.session, "accepted connection").await {
            Ok(())
        } else {
            Err("no connection yet".into())
        }
    })
    .await;
    backend.shutdown_all_sessions(Duration::ZERO).await.expect("cleanup");
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
