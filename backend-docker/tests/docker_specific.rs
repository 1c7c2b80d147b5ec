//! Docker behaviour beyond the shared suite: stale containers, network isolation.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, TcpListener};

use std::time::Duration;

use backend_core::conformance::{wait_for, Harness};
use backend_core::{BackendError, ExecutionBackend, NetworkPolicy, OwnershipLabels, SessionSpec};
use backend_core::{LABEL_AGENT_ID, LABEL_INSTANCE, LABEL_PREFIX, LABEL_SESSION};

fn owner() -> OwnershipLabels {
    let run = &uuid_like()[..10];
    OwnershipLabels::new(format!("dk{run}"), format!("inst-{run}")).expect("labels")
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

/// Starts an echo agent under `policy` whose channel URL points at `target:port`.
async fn start_client(
    backend: &dyn ExecutionBackend,
    name: &str,
    policy: NetworkPolicy,
    target: IpAddr,
    port: u16,
) -> String {
    let mut spec = SessionSpec::new(format!("{}-{name}", backend.prefix()), name, common::IMAGE);
    spec.network = policy;
    spec.env.insert("AGENTD_WS_URL".into(), format!("ws://{target}:{port}/ws/{name}"));
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
    let backend = h.backend(owner()).await;
    let backend = backend.as_ref();
    let addresses = backend.agent_channel_addresses().await.expect("addresses");
    assert_eq!(addresses.len(), 2, "the bridge and the isolated network each give a channel address: {addresses:?}");
    let isolated_gateway = addresses[1];
    let url = backend.agent_ws_url("a", NetworkPolicy::Isolated, 7007).expect("isolated URL");
    assert_eq!(url, format!("ws://{isolated_gateway}:7007/ws/a"));

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
