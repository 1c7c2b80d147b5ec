//! The host firewall rules on this host's real iptables, for a bridge name no interface
//! has (so the rules never match a packet): idempotence, two daemons on one network,
//! removal. Needs root and iptables; skips without them (fails with `CI` set).

use agentd::config::FirewallConfig;
use agentd::firewall::{forward_chain, input_chain, rule_tag, Firewall};
use backend_core::conformance::skip_or_fail;
use backend_core::IsolatedNetwork;

fn iptables(family: &str, args: &[&str]) -> (bool, String) {
    match std::process::Command::new(family).args(args).output() {
        Ok(out) => (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()),
        Err(e) => (false, e.to_string()),
    }
}

/// The rule lines of `chain` (`-S`), `None` when it does not exist.
fn chain(family: &str, name: &str) -> Option<Vec<String>> {
    let (ok, out) = iptables(family, &["-S", name]);
    ok.then(|| out.lines().filter(|l| l.starts_with("-A ")).map(str::to_owned).collect())
}

fn jumps(family: &str, builtin: &str, to: &str) -> usize {
    let (_, out) = iptables(family, &["-S", builtin]);
    out.lines().filter(|l| l.ends_with(&format!("-j {to}"))).count()
}

fn usable() -> bool {
    let (ok, out) = iptables("iptables", &["-S", "INPUT"]);
    if !ok {
        return skip_or_fail::<()>("firewall", format!("iptables cannot list rules here (root needed): {out}"))
            .is_some();
    }
    true
}

fn network(interface: &str) -> IsolatedNetwork {
    IsolatedNetwork {
        name: "agentd-isolated".into(),
        interface: interface.into(),
        gateways: vec!["198.51.100.1".parse().expect("ip"), "fd00:5e:1::1".parse().expect("ip")],
        subnets: vec!["198.51.100.0/24".into()],
        on_this_host: true,
    }
}

/// Removes whatever a failed run left (only the chains of this test's bridge).
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for family in ["iptables", "ip6tables"] {
            for (builtin, name) in [("INPUT", input_chain(&self.0)), ("FORWARD", forward_chain(&self.0))] {
                let jump = ["-D", builtin, "-i", &self.0, "-m", "comment", "--comment", "agentd", "-j", &name];
                while iptables(family, &jump).0 {}
                iptables(family, &["-F", &name]);
                iptables(family, &["-X", &name]);
            }
        }
    }
}

fn count_tag(lines: &[String], tag: &str) -> usize {
    lines.iter().filter(|l| l.contains(&format!("\"{tag}\""))).count()
}

#[tokio::test]
async fn rules_are_idempotent_shared_and_removed_per_daemon() {
    if !usable() {
        return;
    }
    let pid = std::process::id() % 100_000;
    let interface = format!("agtfw{pid}");
    let _cleanup = Cleanup(interface.clone());
    let net = network(&interface);
    let config = FirewallConfig::default();
    let (input, forward) = (input_chain(&interface), forward_chain(&interface));
    let a = Firewall::new(&config, "test-a", &[17007, 17008]);
    let b = Firewall::new(&config, "test-b", &[27007, 27008]);
    let (tag_a, tag_b) = (rule_tag("test-a"), rule_tag("test-b"));

    let installed_a = a.install(&net).await.expect("install a");
    let once = chain("iptables", &input).expect("input chain");
    a.install(&net).await.expect("install a again (a restart)");
    let twice = chain("iptables", &input).expect("input chain");
    assert_eq!(once, twice, "a second install adds nothing");
    // Replies, two ports, two rejects.
    assert_eq!(count_tag(&twice, &tag_a), 5, "{twice:#?}");
    assert_eq!(jumps("iptables", "INPUT", &input), 1);
    assert_eq!(jumps("iptables", "FORWARD", &forward), 1);
    assert_eq!(count_tag(&chain("iptables", &forward).expect("forward chain"), &tag_a), 2);
    assert!(twice.iter().any(|l| l.contains("-d 198.51.100.1/32 -p tcp -m tcp --dport 17007")), "{twice:#?}");

    // IPv6 as well, with this gateway's accepts and neighbour discovery, when the host has it.
    let v6 = std::path::Path::new("/proc/net/if_inet6").exists();
    assert_eq!(installed_a.families.len(), if v6 { 2 } else { 1 });
    if v6 {
        let lines = chain("ip6tables", &input).expect("ip6 input chain");
        assert!(lines.iter().any(|l| l.contains("-d fd00:5e:1::1/128 -p tcp -m tcp --dport 17007")), "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains("--icmpv6-type 135")), "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains("icmp6-adm-prohibited")), "{lines:#?}");
        assert_eq!(jumps("ip6tables", "INPUT", &input), 1);
    }

    // A second daemon on the same network: every accept precedes every reject.
    let installed_b = b.install(&net).await.expect("install b");
    let both = chain("iptables", &input).expect("input chain");
    assert_eq!(count_tag(&both, &tag_a), 5);
    assert_eq!(count_tag(&both, &tag_b), 5);
    let last_accept = both.iter().rposition(|l| l.ends_with("-j ACCEPT")).expect("accepts");
    let first_reject = both.iter().position(|l| l.contains("-j REJECT")).expect("rejects");
    assert!(last_accept < first_reject, "a reject blocks a port: {both:#?}");
    assert_eq!(jumps("iptables", "INPUT", &input), 1, "one jump for both daemons");

    // Daemon a restarts with other ports: its old accepts go, the new ones come.
    let a2 = Firewall::new(&config, "test-a", &[17009, 17008]);
    a2.install(&net).await.expect("install a with new ports");
    let moved = chain("iptables", &input).expect("input chain");
    assert!(!moved.iter().any(|l| l.contains("--dport 17007")), "{moved:#?}");
    assert!(moved.iter().any(|l| l.contains("--dport 17009")), "{moved:#?}");
    assert_eq!(count_tag(&moved, &tag_a), 5);

    // Removing a leaves b's rules, chains and jumps.
    a2.remove(&installed_a).await.expect("remove a");
    let left = chain("iptables", &input).expect("input chain stays");
    assert_eq!(count_tag(&left, &tag_a), 0, "{left:#?}");
    assert_eq!(count_tag(&left, &tag_b), 5, "{left:#?}");
    assert_eq!(jumps("iptables", "INPUT", &input), 1);
    assert_eq!(jumps("iptables", "FORWARD", &forward), 1);

    // Removing b too leaves nothing.
    b.remove(&installed_b).await.expect("remove b");
    for family in if v6 { vec!["iptables", "ip6tables"] } else { vec!["iptables"] } {
        assert_eq!(chain(family, &input), None, "{family} input chain gone");
        assert_eq!(chain(family, &forward), None, "{family} forward chain gone");
        assert_eq!(jumps(family, "INPUT", &input), 0);
        assert_eq!(jumps(family, "FORWARD", &forward), 0);
    }
}

#[tokio::test]
async fn a_failing_or_missing_iptables_is_a_clear_error() {
    let net = network("agtfwnone0");
    let missing = FirewallConfig { iptables_command: "/nonexistent/iptables".into(), ..FirewallConfig::default() };
    let e = Firewall::new(&missing, "t", &[1]).install(&net).await.expect_err("no iptables");
    let text = format!("{e:#}");
    assert!(text.contains("/nonexistent/iptables is not installed"), "{text}");

    let failing = FirewallConfig { iptables_command: "false".into(), ..FirewallConfig::default() };
    let e = Firewall::new(&failing, "t", &[1]).install(&net).await.expect_err("iptables fails");
    let text = format!("{e:#}");
    assert!(
        text.contains("bridge agtfwnone0") && text.contains("`false -N AGENTD-IN-agtfwnone0` exited with 1"),
        "{text}"
    );

    let bad = IsolatedNetwork { interface: "not a name".into(), ..net };
    let e = Firewall::new(&FirewallConfig::default(), "t", &[1]).install(&bad).await.expect_err("bad name");
    assert!(e.to_string().contains("no interface name"), "{e}");
}
