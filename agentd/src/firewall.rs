//! The host firewall rules that confine containers on the isolated network: from its
//! bridge they reach agentd's gateway ports on the host's address on that network, and
//! nothing else (no other host service on any address, no other container, nothing routed
//! out of the host).
//!
//! The rules are iptables rules (the `iptables` command, nf_tables or legacy backend, as
//! Docker's and netavark's own are), in two chains per bridge that only agentd writes:
//!
//! - `AGENTD-IN-<bridge>`, jumped to from `INPUT` for `-i <bridge>`: accept replies
//!   (conntrack `RELATED,ESTABLISHED`), accept TCP to `<gateway>:<port>` for each of this
//!   daemon's ports, then reject (TCP reset, ICMP admin-prohibited for the rest);
//! - `AGENTD-FWD-<bridge>`, jumped to from `FORWARD` for `-i <bridge>`: reject.
//!
//! Every rule a daemon adds carries the comment `agentd:<instance>`. Accepts go to the top
//! of a chain and rejects to its end, so two daemons sharing the network (with different
//! ports) never block each other's ports; a daemon removes only the rules with its own
//! comment, and a chain (with the jumps to it) goes when it is empty. The same rules go into
//! `ip6tables` when this host has IPv6 (the bridge has a link-local address even when the
//! network has no IPv6 subnet). Changes are serialised between daemons by a lock file.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use backend_core::IsolatedNetwork;
use tracing::{debug, info, warn};

use crate::config::FirewallConfig;

/// Serialises rule changes between the daemons of this host.
const LOCK_FILE: &str = "/run/agentd-firewall.lock";
/// The comment on the jumps from `INPUT` and `FORWARD` (shared by every daemon).
const JUMP_COMMENT: &str = "agentd";
/// The longest chain name iptables takes.
const MAX_CHAIN: usize = 28;

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn matches(self, ip: &IpAddr) -> bool {
        match self {
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        }
    }

    fn reject_with(self) -> &'static str {
        match self {
            Family::V4 => "icmp-admin-prohibited",
            Family::V6 => "icmp6-adm-prohibited",
        }
    }
}

/// One daemon's view of the host firewall: which commands, which comment, which ports.
#[derive(Debug, Clone)]
pub struct Firewall {
    iptables: String,
    ip6tables: String,
    timeout: Duration,
    /// `agentd:<instance>`: marks every rule of this daemon.
    tag: String,
    /// The gateway ports the isolated containers may reach.
    ports: Vec<u16>,
}

/// What [`Firewall::install`] put in place, for [`Firewall::remove`].
#[derive(Debug, Clone)]
pub struct Installed {
    /// The bridge interface.
    pub interface: String,
    /// The families the rules are in.
    pub families: Vec<Family>,
}

impl Installed {
    /// The chain jumped to from `INPUT` for the bridge.
    pub fn input_chain(&self) -> String {
        input_chain(&self.interface)
    }

    /// The chain jumped to from `FORWARD` for the bridge.
    pub fn forward_chain(&self) -> String {
        forward_chain(&self.interface)
    }
}

/// The chain jumped to from `INPUT` for `interface`.
pub fn input_chain(interface: &str) -> String {
    format!("AGENTD-IN-{interface}")
}

/// The chain jumped to from `FORWARD` for `interface`.
pub fn forward_chain(interface: &str) -> String {
    format!("AGENTD-FWD-{interface}")
}

/// The comment on every rule of the daemon with instance id `instance`.
pub fn rule_tag(instance: &str) -> String {
    let safe: String = instance
        .chars()
        .take(200)
        .map(|c| if c.is_ascii_alphanumeric() || "_.:-".contains(c) { c } else { '_' })
        .collect();
    format!("agentd:{safe}")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// A rule line of `iptables -S`, split into its words (quotes removed; agentd's comments
/// have no spaces).
fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(|w| w.trim_matches('"').to_owned()).collect()
}

/// Whether this host has IPv6 (then the bridge has a link-local address a container could
/// reach host services on).
fn host_has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Holds the host-wide lock file while rules change (released when dropped).
struct HostLock(Option<std::fs::File>);

impl HostLock {
    async fn take() -> Self {
        let file = match std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(LOCK_FILE) {
            Ok(file) => file,
            Err(e) => {
                // Without it only concurrent changes by two daemons could interleave.
                debug!(path = LOCK_FILE, error = %e, "Cannot open the firewall lock file; changing rules without it.");
                return Self(None);
            }
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Self(Some(file)),
                Err(rustix::io::Errno::WOULDBLOCK) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    warn!(path = LOCK_FILE, error = %e, "Cannot take the firewall lock; changing rules without it.");
                    return Self(None);
                }
            }
        }
    }
}

impl Drop for HostLock {
    fn drop(&mut self) {
        if let Some(file) = self.0.take() {
            let _ = rustix::fs::flock(&file, rustix::fs::FlockOperation::Unlock);
        }
    }
}

impl Firewall {
    /// The firewall of the daemon with instance id `instance`, letting isolated containers
    /// reach `ports` on their gateway.
    pub fn new(config: &FirewallConfig, instance: &str, ports: &[u16]) -> Self {
        let mut ports = ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        Self {
            iptables: config.iptables_command.clone(),
            ip6tables: config.ip6tables_command.clone(),
            timeout: Duration::from_secs(config.command_timeout_secs),
            tag: rule_tag(instance),
            ports,
        }
    }

    /// The comment on this daemon's rules.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn program(&self, family: Family) -> &str {
        match family {
            Family::V4 => &self.iptables,
            Family::V6 => &self.ip6tables,
        }
    }

    /// Runs the family's command with `args`; the exit code and output, or an error when it
    /// could not run or timed out.
    async fn run(&self, family: Family, args: &[String]) -> Result<(i32, String, String)> {
        let program = self.program(family);
        let shown = format!("`{program} {}`", args.join(" "));
        let mut command = tokio::process::Command::new(program);
        command.arg("-w").arg("5").args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.kill_on_drop(true);
        let child = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!("{program} is not installed (or not on PATH): {e}"),
            _ => anyhow!("cannot run {shown}: {e}"),
        })?;
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| anyhow!("{shown} did not finish within {} s", self.timeout.as_secs()))?
            .with_context(|| format!("running {shown}"))?;
        let code = output.status.code().unwrap_or(-1);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        Ok((code, stdout, stderr))
    }

    /// Runs a command that must succeed.
    async fn must(&self, family: Family, args: Vec<String>) -> Result<String> {
        let (code, stdout, stderr) = self.run(family, &args).await?;
        if code != 0 {
            let detail = if stderr.is_empty() { String::new() } else { format!(": {stderr}") };
            bail!("`{} {}` exited with {code}{detail}", self.program(family), args.join(" "));
        }
        Ok(stdout)
    }

    /// Whether `rule` is in `chain` (`-C`): exit 0 yes, 1 no, anything else an error.
    async fn has(&self, family: Family, chain: &str, rule: &[String]) -> Result<bool> {
        let mut args = vec!["-C".to_owned(), chain.to_owned()];
        args.extend_from_slice(rule);
        let (code, _, stderr) = self.run(family, &args).await?;
        match code {
            0 => Ok(true),
            1 => Ok(false),
            _ => bail!("`{} {}` exited with {code}: {stderr}", self.program(family), args.join(" ")),
        }
    }

    /// The rule lines of `chain` (`-S`), `None` when the chain does not exist.
    async fn rules(&self, family: Family, chain: &str) -> Result<Option<Vec<Vec<String>>>> {
        let args = strings(&["-S", chain]);
        let (code, stdout, stderr) = self.run(family, &args).await?;
        match code {
            0 => Ok(Some(stdout.lines().filter(|l| l.starts_with("-A ")).map(words).collect())),
            1 => Ok(None),
            _ => bail!("`{} -S {chain}` exited with {code}: {stderr}", self.program(family)),
        }
    }

    fn commented(&self, mut rule: Vec<String>, comment: &str) -> Vec<String> {
        let at = rule.iter().position(|w| w == "-j").unwrap_or(rule.len());
        rule.splice(at..at, strings(&["-m", "comment", "--comment", comment]));
        rule
    }

    /// This daemon's accepts in the input chain: replies, then its ports on each gateway.
    fn accepts(&self, family: Family, gateways: &[IpAddr]) -> Vec<Vec<String>> {
        let mut rules = vec![self
            .commented(strings(&["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"]), &self.tag)];
        if family == Family::V6 {
            // Neighbour discovery, without which no IPv6 gateway is reachable.
            for kind in ["neighbour-solicitation", "neighbour-advertisement"] {
                let rule = strings(&["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", kind, "-j", "ACCEPT"]);
                rules.push(self.commented(rule, &self.tag));
            }
        }
        for gateway in gateways.iter().filter(|g| family.matches(g)) {
            for port in &self.ports {
                let (gateway, port) = (gateway.to_string(), port.to_string());
                let rule = strings(&["-d", &gateway, "-p", "tcp", "-m", "tcp", "--dport", &port, "-j", "ACCEPT"]);
                rules.push(self.commented(rule, &self.tag));
            }
        }
        rules
    }

    /// This daemon's rejects, at the end of both chains.
    fn rejects(&self, family: Family) -> Vec<Vec<String>> {
        vec![
            self.commented(strings(&["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]), &self.tag),
            self.commented(strings(&["-j", "REJECT", "--reject-with", family.reject_with()]), &self.tag),
        ]
    }

    fn jump(interface: &str, chain: &str) -> Vec<String> {
        strings(&["-i", interface, "-m", "comment", "--comment", JUMP_COMMENT, "-j", chain])
    }

    /// Installs (or completes) this daemon's rules for `network`, idempotently: rules already
    /// there are not added again, and rules of this daemon for ports or gateways it no longer
    /// has are removed once the new ones are in.
    pub async fn install(&self, network: &IsolatedNetwork) -> Result<Installed> {
        let interface = &network.interface;
        let name_ok = !interface.is_empty()
            && interface.len() <= 15
            && interface.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !name_ok || forward_chain(interface).len() > MAX_CHAIN {
            bail!(
                "the isolated network {}'s bridge {interface:?} is no interface name agentd can write rules for",
                network.name
            );
        }
        if !network.gateways.iter().any(IpAddr::is_ipv4) {
            bail!("the isolated network {} has no IPv4 gateway on this host", network.name);
        }
        let mut families = vec![Family::V4];
        if host_has_ipv6() {
            families.push(Family::V6);
        }
        let _lock = HostLock::take().await;
        for &family in &families {
            self.install_family(family, network)
                .await
                .with_context(|| format!("installing the {} rules for bridge {interface}", self.program(family)))?;
        }
        Ok(Installed { interface: interface.clone(), families })
    }

    async fn install_family(&self, family: Family, network: &IsolatedNetwork) -> Result<()> {
        let interface = &network.interface;
        let input = input_chain(interface);
        let forward = forward_chain(interface);
        for chain in [&input, &forward] {
            if self.rules(family, chain).await?.is_none() {
                self.must(family, strings(&["-N", chain])).await?;
            }
        }
        // Accepts at the top (above every daemon's rejects), rejects at the end.
        let accepts = self.accepts(family, &network.gateways);
        for rule in accepts.iter().rev() {
            if !self.has(family, &input, rule).await? {
                let mut args = strings(&["-I", &input, "1"]);
                args.extend_from_slice(rule);
                self.must(family, args).await?;
            }
        }
        for chain in [&input, &forward] {
            for rule in self.rejects(family) {
                if !self.has(family, chain, &rule).await? {
                    let mut args = strings(&["-A", chain]);
                    args.extend(rule);
                    self.must(family, args).await?;
                }
            }
        }
        // Accepts of an earlier run of this daemon for ports or gateways it has no longer.
        let wanted: Vec<(String, String)> = network
            .gateways
            .iter()
            .filter(|g| family.matches(g))
            .flat_map(|g| self.ports.iter().map(move |p| (g.to_string(), p.to_string())))
            .collect();
        for line in self.rules(family, &input).await?.unwrap_or_default() {
            if !self.is_ours(&line) {
                continue;
            }
            let value = |flag: &str| line.iter().position(|w| w == flag).and_then(|i| line.get(i + 1)).cloned();
            let Some(port) = value("--dport") else { continue };
            let address = value("-d").unwrap_or_default();
            let address = address.split('/').next().unwrap_or_default().to_owned();
            if !wanted.contains(&(address, port)) {
                self.delete_line(family, &line).await?;
            }
        }
        // The jumps last, to chains that are complete.
        for (builtin, chain) in [("INPUT", &input), ("FORWARD", &forward)] {
            let jump = Self::jump(interface, chain);
            if !self.has(family, builtin, &jump).await? {
                let mut args = strings(&["-I", builtin, "1"]);
                args.extend(jump);
                self.must(family, args).await?;
            }
        }
        Ok(())
    }

    fn is_ours(&self, line: &[String]) -> bool {
        line.windows(2).any(|w| w[0] == "--comment" && w[1] == self.tag)
    }

    /// Deletes the rule of a `-S` line (`-A CHAIN …`).
    async fn delete_line(&self, family: Family, line: &[String]) -> Result<()> {
        let mut args = line.to_vec();
        if let Some(first) = args.first_mut() {
            *first = "-D".to_owned();
        }
        self.must(family, args).await.map(drop)
    }

    /// Removes this daemon's rules; a chain left empty goes too, with the jumps to it.
    /// Rules of other daemons stay.
    pub async fn remove(&self, installed: &Installed) -> Result<()> {
        let _lock = HostLock::take().await;
        for &family in &installed.families {
            let interface = &installed.interface;
            for (builtin, chain) in [("INPUT", installed.input_chain()), ("FORWARD", installed.forward_chain())] {
                let Some(lines) = self.rules(family, &chain).await? else { continue };
                let mut left = lines.len();
                for line in lines.iter().filter(|l| self.is_ours(l)) {
                    self.delete_line(family, line).await?;
                    left -= 1;
                }
                if left > 0 {
                    info!(chain = %chain, rules = left, "Rules of other agentd daemons stay in the chain.");
                    continue;
                }
                let jump = Self::jump(interface, &chain);
                // Duplicates (inserted by hand, say) go too; a bound keeps a broken command
                // from looping.
                for _ in 0..16 {
                    if !self.has(family, builtin, &jump).await? {
                        break;
                    }
                    let mut args = strings(&["-D", builtin]);
                    args.extend(jump.clone());
                    self.must(family, args).await?;
                }
                self.must(family, strings(&["-X", &chain])).await?;
            }
        }
        Ok(())
    }
}

/// What the daemon's firewall set-up came to.
#[derive(Debug)]
pub enum Protection {
    /// The backend's sessions do not use this host's network (an in-memory backend).
    NotNeeded,
    /// The rules are in place.
    Installed(Firewall, Installed),
    /// They could not be installed: why, and what to do. Isolated agents are refused.
    Refused(String),
}

impl Protection {
    /// Why isolated agents cannot run, if they cannot.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Protection::Refused(reason) => Some(reason.clone()),
            _ => None,
        }
    }
}

/// Installs the rules for the backend's isolated network. Never fails: what went wrong
/// becomes a [`Protection::Refused`], logged as a warning.
pub async fn protect(
    config: &FirewallConfig,
    instance: &str,
    ports: &[u16],
    backend: &dyn backend_core::ExecutionBackend,
) -> Protection {
    let firewall = Firewall::new(config, instance, ports);
    const REMEDY: &str = "run agentd as root on a host with iptables (nf_tables or legacy), \
                          or give agents network \"internet\"";
    let network = match backend.isolated_network().await {
        Ok(None) => return Protection::NotNeeded,
        Ok(Some(network)) => network,
        Err(e) => {
            return refused(format!(
                "the isolated network could not be read from the engine: {e}; restart agentd once the engine answers"
            ))
        }
    };
    if !network.on_this_host {
        return refused(format!(
            "the isolated network {} is not on this host (the engine is remote), so this host's firewall cannot \
             protect it; run agentd on the engine's host, or give agents network \"internet\"",
            network.name
        ));
    }
    match firewall.install(&network).await {
        Ok(installed) => {
            info!(
                interface = %installed.interface,
                input_chain = %installed.input_chain(),
                forward_chain = %installed.forward_chain(),
                ipv6 = installed.families.contains(&Family::V6),
                ports = ?firewall.ports,
                tag = %firewall.tag,
                "Host firewall rules for isolated agents are in place."
            );
            Protection::Installed(firewall, installed)
        }
        Err(e) => refused(format!(
            "the host firewall rules for the isolated network {} (bridge {}) could not be installed: {e:#}; {REMEDY}",
            network.name, network.interface
        )),
    }
}

fn refused(reason: String) -> Protection {
    warn!(reason = %reason, "Isolated agents will be refused: their network cannot be protected.");
    Protection::Refused(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_chains_are_safe_words() {
        assert_eq!(rule_tag("i-1a2b"), "agentd:i-1a2b");
        assert_eq!(rule_tag("a b\"c"), "agentd:a_b_c");
        assert_eq!(input_chain("br-6357e042ad88"), "AGENTD-IN-br-6357e042ad88");
        assert!(forward_chain("123456789012345").len() <= MAX_CHAIN);
    }

    #[test]
    fn rules_carry_the_comment_before_the_target() {
        let config = FirewallConfig::default();
        let firewall = Firewall::new(&config, "i-x", &[7008, 7007, 7007]);
        let gateways = ["10.89.0.1".parse().expect("ip"), "fd00::1".parse().expect("ip")];
        let accepts = firewall.accepts(Family::V4, &gateways);
        assert_eq!(accepts.len(), 3, "replies and two ports on the one IPv4 gateway: {accepts:?}");
        assert_eq!(
            accepts[1].join(" "),
            "-d 10.89.0.1 -p tcp -m tcp --dport 7007 -m comment --comment agentd:i-x -j ACCEPT"
        );
        let v6 = firewall.accepts(Family::V6, &gateways);
        assert_eq!(v6.len(), 5, "replies, neighbour discovery twice, two ports: {v6:?}");
        assert_eq!(v6[3][1], "fd00::1");
        let line =
            words(r#"-A AGENTD-IN-podman1 -p tcp -m comment --comment "agentd:i-x" -j REJECT --reject-with tcp-reset"#);
        assert!(firewall.is_ours(&line));
        assert!(!Firewall::new(&config, "i-y", &[1]).is_ours(&line));
    }
}
