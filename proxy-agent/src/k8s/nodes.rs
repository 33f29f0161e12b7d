//! This node as the frontends need it: its name (endpoint locality), its
//! addresses (NodePort frontends, the SNAT address) and its zone (topology hints).

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
}

impl NodeInfo {
    /// From the Node object: its InternalIP and ExternalIP IPv4 addresses.
    pub fn from_node(name: &str, node: Option<&Node>) -> Self {
        let mut addresses = Vec::new();
        for addr in node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
        {
            if matches!(addr.type_.as_str(), "InternalIP" | "ExternalIP") {
                if let Ok(ip) = addr.address.parse::<Ipv4Addr>() {
                    if !addresses.contains(&ip) {
                        addresses.push(ip);
                    }
                }
            }
        }
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .cloned();
        Self {
            name: name.to_string(),
            addresses,
            zone,
        }
    }

    /// The address SNATed traffic leaves with: the first InternalIP.
    pub fn snat_address(&self) -> Option<Ipv4Addr> {
        self.addresses.first().copied()
    }
}
