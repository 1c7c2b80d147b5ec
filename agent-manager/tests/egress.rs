//! Caller identity by peer address, the egress allow-list setting and the proxy
//! variables, on the mock engine.

mod common;

use std::collections::BTreeMap;

use agent_manager::{EventKind, GatewayEndpoints, ManagerError, NewAgent};
use backend_core::{NetworkGateways, NetworkPolicy};
use backend_mock::MockCall;
use common::{test_config, Fixture};

fn address_calls(fx: &Fixture) -> usize {
    fx.engine.calls().iter().filter(|c| matches!(c, MockCall::Addresses(_))).count()
}

#[tokio::test]
async fn a_peer_address_names_its_live_agent_and_is_cached_per_container() {
    let fx = Fixture::new().await;
    let a = fx.spawn("peer-a").await.agent;
    let b = fx.spawn("peer-b").await.agent;
    let addr_a = fx.engine.session_address(&a.session).expect("a's address");
    let addr_b = fx.engine.session_address(&b.session).expect("b's address");
    assert_ne!(addr_a, addr_b);

    fx.engine.clear_calls();
    assert_eq!(fx.manager.agent_for_peer(addr_a).await.map(|x| x.id), Some(a.id.clone()));
    assert_eq!(fx.manager.agent_for_peer(addr_b).await.map(|x| x.id), Some(b.id.clone()));
    let asked = address_calls(&fx);
    assert_eq!(asked, 2, "one question per running agent");
    for _ in 0..100 {
        assert_eq!(fx.manager.agent_for_peer(addr_a).await.map(|x| x.id), Some(a.id.clone()));
    }
    assert_eq!(address_calls(&fx), asked, "a cached address costs no engine call");

    // An address nobody has asks about nobody new, and not again within a second.
    let stranger = "127.77.250.250".parse().expect("ip");
    assert!(fx.manager.agent_for_peer(stranger).await.is_none());
    assert!(fx.manager.agent_for_peer(stranger).await.is_none());
    assert_eq!(address_calls(&fx), asked, "every running agent's container was asked about already");

    // A restart gives the agent a new container and address; the old one names nobody.
    fx.manager.restart("peer-a").await.expect("restart");
    let new_a = fx.engine.session_address(&a.session).expect("a's new address");
    assert_ne!(new_a, addr_a, "the mock gives each container its own address");
    assert!(fx.manager.agent_for_peer(addr_a).await.is_none(), "the old container's address still names the agent");
    assert_eq!(fx.manager.agent_for_peer(new_a).await.map(|x| x.id), Some(a.id.clone()));

    // A stopped agent is nobody.
    fx.manager.stop("peer-b").await.expect("stop");
    assert!(fx.manager.agent_for_peer(addr_b).await.is_none(), "a stopped agent still answers for its address");
}

#[tokio::test]
async fn an_unknown_address_asks_the_engine_at_most_once_a_second() {
    let fx = Fixture::new().await;
    // The agent's container appears after a first miss: found once the second is over.
    let stranger = "127.77.251.1".parse().expect("ip");
    assert!(fx.manager.agent_for_peer(stranger).await.is_none());
    let a = fx.spawn("late").await.agent;
    let address = fx.engine.session_address(&a.session).expect("address");
    assert!(fx.manager.agent_for_peer(stranger).await.is_none());
    fx.engine.clear_calls();
    // Within the second, the same unknown address asks nothing.
    for _ in 0..50 {
        assert!(fx.manager.agent_for_peer(stranger).await.is_none());
    }
    assert_eq!(address_calls(&fx), 0, "misses within a second must not ask the engine");
    // The agent's own address is another address: asked about at once.
    assert_eq!(fx.manager.agent_for_peer(address).await.map(|x| x.id), Some(a.id));
}

#[tokio::test]
async fn host_network_agents_have_no_address() {
    let fx = Fixture::new().await;
    let new = NewAgent { name: "on-host".into(), network: Some(NetworkPolicy::Host), ..NewAgent::default() };
    let agent = fx.spawn_with(new).await.agent;
    assert_eq!(fx.engine.session_address(&agent.session), None);
    for ip in ["127.0.0.1", "127.77.0.1", "172.17.0.1"] {
        let found = fx.manager.agent_for_peer(ip.parse().expect("ip")).await;
        assert!(found.is_none(), "{ip} named {found:?}");
    }
}

fn gateway_config() -> agent_manager::ManagerConfig {
    let mut config = test_config();
    config.gateway = Some(GatewayEndpoints {
        addresses: NetworkGateways {
            internet: Some("172.17.0.1".parse().expect("ip")),
            isolated: Some("172.30.0.1".parse().expect("ip")),
        },
        model_port: 7007,
        proxy_port: 7008,
    });
    config.defaults.egress_allow = vec!["example.com".into()];
    config
}

#[tokio::test]
async fn agents_get_the_proxy_of_their_network_and_its_values_win() {
    let fx = Fixture::with_config(gateway_config()).await;
    let env = BTreeMap::from([("HTTPS_PROXY".to_owned(), "http://evil:1".to_owned())]);
    let cases = [
        ("net", NetworkPolicy::Internet, Some("172.17.0.1")),
        ("iso", NetworkPolicy::Isolated, Some("172.30.0.1")),
        ("host", NetworkPolicy::Host, None),
        ("off", NetworkPolicy::None, None),
    ];
    for (name, network, gateway) in cases {
        let new = NewAgent { name: name.into(), network: Some(network), env: env.clone(), ..NewAgent::default() };
        let agent = fx.spawn_with(new).await.agent;
        let spec = fx.manager.session_spec_for(&agent).expect("spec");
        match gateway {
            Some(gw) => {
                let url = format!("http://{gw}:7008");
                for key in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
                    assert_eq!(spec.env.get(key), Some(&url), "{name}: {key}");
                }
                for key in ["NO_PROXY", "no_proxy"] {
                    assert_eq!(spec.env.get(key).map(String::as_str), Some(&*format!("{gw},localhost,127.0.0.1")));
                }
            }
            None => {
                assert!(!spec.env.contains_key("HTTP_PROXY"), "{name}: {:?}", spec.env.keys());
                assert!(!spec.env.contains_key("NO_PROXY"), "{name}: {:?}", spec.env.keys());
            }
        }
    }
    // Without a gateway, no variables.
    let fx = Fixture::new().await;
    let agent = fx.spawn("plain").await.agent;
    let spec = fx.manager.session_spec_for(&agent).expect("spec");
    assert!(!spec.env.contains_key("HTTPS_PROXY"), "{:?}", spec.env.keys());
}

#[tokio::test]
async fn the_allow_list_defaults_and_is_checked_at_spawn() {
    let fx = Fixture::with_config(gateway_config()).await;
    let default = fx.spawn("defaults").await.agent;
    assert_eq!(default.spec.egress_allow, vec!["example.com".to_owned()]);
    let own = NewAgent {
        name: "own".into(),
        egress_allow: Some(vec!["git.example.org:22".into(), "*.corp.example".into()]),
        ..NewAgent::default()
    };
    let own = fx.spawn_with(own).await.agent;
    assert_eq!(own.spec.egress_allow, vec!["git.example.org:22".to_owned(), "*.corp.example".to_owned()]);
    let none = fx.spawn_with(NewAgent { name: "none".into(), egress_allow: Some(vec![]), ..NewAgent::default() }).await;
    assert!(none.agent.spec.egress_allow.is_empty());

    let bad = NewAgent { name: "bad".into(), egress_allow: Some(vec!["https://x.org/".into()]), ..NewAgent::default() };
    match fx.manager.spawn(bad).await {
        Err(ManagerError::Invalid { field: "egress_allow", message }) => {
            assert!(message.contains("https://x.org/") && message.contains("not a URL"), "{message}")
        }
        other => panic!("a bad entry was not refused: {other:?}"),
    }
    let mut config = test_config();
    config.defaults.egress_allow = vec!["ok.example".into(), "trailing.dot.".into()];
    let problems = config.defaults.check();
    assert!(problems.iter().any(|v| v.field == "egress_allow" && v.value.contains("trailing dot")), "{problems:?}");
}

#[tokio::test]
async fn a_refusal_is_an_egress_denied_event() {
    let fx = Fixture::new().await;
    let agent = fx.spawn("refused").await.agent;
    let mut events = fx.manager.subscribe();
    fx.manager.note_egress_denied(&agent, "evil.example:443").await.expect("record");
    let event = events.recv().await.expect("event");
    assert_eq!(event.kind, EventKind::EgressDenied);
    assert_eq!(event.agent_id, agent.id);
    assert!(event.detail.contains("evil.example:443"), "{}", event.detail);
    let stored = fx.store.list_events(Some(&agent.id), 0, 100).await.expect("events");
    assert!(stored.iter().any(|e| e.kind == EventKind::EgressDenied), "{stored:?}");
}
