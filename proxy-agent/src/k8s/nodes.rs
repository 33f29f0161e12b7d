//! This node as the frontends need it: its name (endpoint locality), its
//! addresses (NodePort frontends, the SNAT address) and its zone (topology
//! hints); and its InternalIPs, from which the uplink is found.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;

/// What this node knows of itself: its name (for endpoint locality) and its
/// addresses (NodePort frontends listen on each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    /// The `topology.kubernetes.io/zone` label, for topology hints.
    pub zone: Option<String>,
    /// NodePorts answer on 127.0.0.1 too, for the node's own clients
    /// (`--nodeport-loopback`; the socket hooks serve them).
    pub node_port_loopback: bool,
}

impl NodeInfo {
    /// From the Node object: its InternalIP and ExternalIP IPv4 addresses.
    pub fn from_node(name: &str, node: Option<&Node>) -> Self {
        let addresses = ipv4_addresses(node, &["InternalIP", "ExternalIP"]);
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .cloned();
        Self {
            name: name.to_string(),
            addresses,
            zone,
            node_port_loopback: false,
        }
    }

    /// The addresses NodePorts answer on.
    pub fn node_port_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let loopback = self.node_port_loopback.then_some(Ipv4Addr::LOCALHOST);
        self.addresses.iter().copied().chain(loopback)
    }

    /// The address SNATed traffic leaves with: the first InternalIP.
    pub fn snat_address(&self) -> Option<Ipv4Addr> {
        self.addresses.first().copied()
    }
}

/// The Node's IPv4 InternalIPs, in its order: the uplink is the interface
/// holding one of them.
pub fn internal_ips(node: Option<&Node>) -> Vec<Ipv4Addr> {
    ipv4_addresses(node, &["InternalIP"])
}

/// The Node's IPv4 addresses of the given types, in its order, each once.
fn ipv4_addresses(node: Option<&Node>, types: &[&str]) -> Vec<Ipv4Addr> {
    let mut addresses = Vec::new();
    for addr in node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if types.contains(&addr.type_.as_str()) {
            if let Ok(ip) = addr.address.parse::<Ipv4Addr>() {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
    }
    addresses
}
