//! Podman's networks: the host's address on the default network, and the internal
//! network for `isolated` sessions, created with a free subnet and a gateway (libpod gives
//! an internal network none unless asked, and without one the host is unreachable from it).

use std::net::{IpAddr, Ipv4Addr};

use backend_core::{BackendError, NetworkGateways, Result};
use podman_api::models::Network;
use podman_api::opts::{NetworkCreateOpts, NetworkListFilter, NetworkListOpts};
use tracing::{info, warn};

use super::Inner;
use crate::config::is_local;
use crate::convert::DEFAULT_NETWORK;
use crate::error::{map_err, status_of, timed_out, Subject, NAME};

/// The pool the isolated network's subnet is taken from (Podman's own default pool):
/// `10.89.N.0/24`.
const ISOLATED_POOL: [u8; 2] = [10, 89];

/// The gateway of a network, if it is (or, for a local engine, becomes) an address of
/// this host. netavark brings a bridge up when its first container starts and tears it
/// down when its last one stops, so while no session runs the address may be missing
/// here; for an engine on this host it is still the host's. For a remote engine it
/// counts only if it is bound here.
fn host_gateway(network: &Network, engine_is_local: bool) -> Option<IpAddr> {
    let gateways = network.subnets.iter().flatten().filter_map(|s| s.gateway.as_deref()?.parse::<IpAddr>().ok());
    backend_core::host_address(gateways, engine_is_local)
}

/// IPv4 routes of this host as (network, mask), from `/proc/net/route`.
fn host_routes() -> Vec<(u32, u32)> {
    let Ok(table) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // The kernel prints each address as the native integer of its network-order bytes.
            let addr = |s: &str| u32::from_str_radix(s, 16).ok().map(|v| u32::from_be_bytes(v.to_ne_bytes()));
            Some((addr(fields.get(1)?)?, addr(fields.get(7)?)?))
        })
        .filter(|(_, mask)| *mask != 0)
        .collect()
}

/// The first `10.89.N.0/24` that overlaps no used subnet (given as network, mask).
fn free_subnet(used: &[(u32, u32)]) -> Option<Ipv4Addr> {
    (0..=255u8).map(|n| Ipv4Addr::new(ISOLATED_POOL[0], ISOLATED_POOL[1], n, 0)).find(|candidate| {
        let net = u32::from(*candidate);
        let mask = 0xffff_ff00;
        used.iter().all(|(other, other_mask)| net & other_mask != other & other_mask && other & mask != net)
    })
}

/// A CIDR subnet (`10.88.0.0/16`) as (network, mask).
fn parse_cidr(cidr: &str) -> Option<(u32, u32)> {
    let (net, bits) = cidr.split_once('/')?;
    let net: Ipv4Addr = net.parse().ok()?;
    let bits: u32 = bits.parse().ok()?;
    let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits.min(32)) };
    Some((u32::from(net) & mask, mask))
}

impl Inner {
    /// Prepares the networks: the host's addresses on the default network and on the
    /// isolated one (created when missing).
    pub(super) async fn prepare_networks(&self) -> Result<NetworkGateways> {
        Ok(NetworkGateways {
            internet: self.default_network_gateway().await?,
            isolated: self.ensure_isolated_network().await?,
        })
    }

    /// The isolated network as the host firewall sees it (the oldest of its name, the one
    /// sessions join).
    pub(super) async fn isolated_network_info(&self) -> Result<Option<backend_core::IsolatedNetwork>> {
        let Some(network) = self.isolated_networks().await?.into_iter().next() else {
            return Ok(None);
        };
        let local = is_local(&self.address);
        let Some(interface) = network.network_interface.clone().filter(|i| !i.is_empty()) else {
            return Err(BackendError::engine(
                NAME,
                format!("network {} names no bridge interface", self.config.isolated_network),
            ));
        };
        let subnets = network.subnets.iter().flatten();
        let gateways = subnets.clone().filter_map(|s| s.gateway.as_deref()?.parse::<IpAddr>().ok()).collect();
        Ok(Some(backend_core::IsolatedNetwork {
            name: network.name.clone().unwrap_or_else(|| self.config.isolated_network.clone()),
            interface,
            gateways,
            subnets: subnets.filter_map(|s| s.subnet.clone()).collect(),
            on_this_host: local,
        }))
    }

    async fn default_network_gateway(&self) -> Result<Option<IpAddr>> {
        let network = self.podman.networks().get(DEFAULT_NETWORK);
        match self.call("the default network's inspection", Subject::Other, network.inspect()).await {
            Ok(network) => Ok(host_gateway(&network, is_local(&self.address))),
            Err(BackendError::Engine { message, .. }) => {
                warn!(network = DEFAULT_NETWORK, error = %message, "No default network: internet agents get no channel URL.");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The networks named like the isolated network, oldest first.
    async fn isolated_networks(&self) -> Result<Vec<Network>> {
        let name = &self.config.isolated_network;
        let opts = NetworkListOpts::builder().filter([NetworkListFilter::Name(name.clone())]).build();
        let mut networks: Vec<Network> = self
            .call("the network listing", Subject::Other, self.podman.networks().list(&opts))
            .await?
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name.as_str()))
            .collect();
        networks.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(networks)
    }

    /// Creates the internal network for isolated sessions unless it exists, and returns
    /// the host's address on it. libpod gives an internal network no gateway unless one
    /// is asked for, and without one the host (and the agent channel) is unreachable
    /// from it, so the network is created with an explicit subnet and gateway. An
    /// internal network has no route out of its subnet.
    async fn ensure_isolated_network(&self) -> Result<Option<IpAddr>> {
        static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = CREATING.lock().await;
        let name = &self.config.isolated_network;
        let local = is_local(&self.address);
        if let Some(network) = self.isolated_networks().await?.into_iter().next() {
            let gateway = host_gateway(&network, local);
            if gateway.is_none() {
                warn!(
                    network = %name,
                    "The isolated network has no gateway: isolated agents cannot reach the agent channel. Remove it \
                     (`podman network rm {name}`) to have agentd recreate it with one."
                );
            }
            return Ok(gateway);
        }
        let all = self
            .call("the network listing", Subject::Other, self.podman.networks().list(&NetworkListOpts::default()))
            .await?;
        let mut used: Vec<(u32, u32)> = all
            .iter()
            .flat_map(|n| n.subnets.iter().flatten())
            .filter_map(|s| parse_cidr(s.subnet.as_deref()?))
            .collect();
        if local {
            used.extend(host_routes());
        }
        let Some(subnet) = free_subnet(&used) else {
            return Err(BackendError::engine(
                NAME,
                format!("no free 10.89.N.0/24 subnet for the isolated network {name}"),
            ));
        };
        let gateway = Ipv4Addr::from(u32::from(subnet) + 1);
        let opts = NetworkCreateOpts::builder()
            .name(name)
            .driver("bridge")
            .internal(true)
            .labels([("agentd.network", "isolated")])
            .subnets([podman_api::models::Subnet {
                gateway: Some(gateway.to_string()),
                lease_range: None,
                subnet: Some(format!("{subnet}/24")),
            }])
            .build();
        match tokio::time::timeout(self.config.request_timeout, self.podman.networks().create(&opts)).await {
            Ok(Ok(_)) => {
                info!(network = %name, subnet = %subnet, gateway = %gateway, "Created the internal network for isolated agents.")
            }
            // Created meanwhile by another agentd.
            Ok(Err(e)) if status_of(&e).is_some_and(|s| s.as_u16() == 409) => {}
            Ok(Err(e)) => return Err(map_err(e, Subject::Other)),
            Err(_) => return Err(timed_out("the network creation", self.config.request_timeout)),
        }
        let network =
            self.isolated_networks().await?.into_iter().next().ok_or_else(|| {
                BackendError::engine(NAME, format!("network {name} vanished right after it was created"))
            })?;
        Ok(host_gateway(&network, local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_isolated_subnet_avoids_every_used_one() {
        let used = vec![parse_cidr("10.88.0.0/16").expect("cidr"), parse_cidr("10.89.0.0/24").expect("cidr")];
        assert_eq!(free_subnet(&used), Some(Ipv4Addr::new(10, 89, 1, 0)));
        let wide = vec![parse_cidr("10.89.0.0/23").expect("cidr")];
        assert_eq!(free_subnet(&wide), Some(Ipv4Addr::new(10, 89, 2, 0)), "a wider subnet covers two /24s");
        let whole = vec![parse_cidr("10.0.0.0/8").expect("cidr")];
        assert_eq!(free_subnet(&whole), None);
        assert_eq!(parse_cidr("10.88.0.0/16"), Some((0x0a58_0000, 0xffff_0000)));
    }

    #[test]
    fn a_remote_gateway_counts_only_if_bound_here() {
        let network = Network {
            created: None,
            dns_enabled: None,
            driver: None,
            id: None,
            internal: None,
            ipam_options: None,
            ipv_6_enabled: None,
            labels: None,
            name: Some("podman".into()),
            network_interface: None,
            options: None,
            subnets: Some(vec![podman_api::models::Subnet {
                gateway: Some("192.0.2.123".into()),
                lease_range: None,
                subnet: Some("192.0.2.0/24".into()),
            }]),
        };
        assert_eq!(host_gateway(&network, true), Some("192.0.2.123".parse().expect("ip")));
        assert_eq!(host_gateway(&network, false), None, "TEST-NET-1 is no address of this host");
    }
}
