//! This node as the frontends need it: its name (endpoint locality), its
//! addresses (NodePort frontends, the SNAT address) and its zone (topology
//! hints); and its InternalIPs, from which the uplink is found.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Node;

/// What this node knows of itself: its name (for endpoint locality) and its
/// addresses (NodePort frontends listen on each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    /// Its IPv6 InternalIP and ExternalIP addresses (a dual-stack node's
    /// kubelet reports both families, `--node-ip=<v4>,<v6>`).
    pub addresses6: Vec<Ipv6Addr>,
    /// The `topology.kubernetes.io/zone` label, for topology hints.
    pub zone: Option<String>,
    /// NodePorts answer on 127.0.0.1 too, for the node's own clients
    /// (`--nodeport-loopback`; the socket hooks serve them).
    pub node_port_loopback: bool,
}

impl NodeInfo {
    /// From the Node object: its InternalIP and ExternalIP addresses.
    pub fn from_node(name: &str, node: Option<&Node>) -> Self {
        let addresses = addresses_of(node, &["InternalIP", "ExternalIP"]);
        let addresses6 = addresses_of(node, &["InternalIP", "ExternalIP"]);
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .cloned();
        Self {
            name: name.to_string(),
            addresses,
            addresses6,
            zone,
            node_port_loopback: false,
        }
    }

    /// The addresses NodePorts answer on, of both families (the loopback
    /// is IPv4's only, as with kube-proxy).
    pub fn node_port_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let loopback = self.node_port_loopback.then_some(Ipv4Addr::LOCALHOST);
        let v4 = self
            .addresses
            .iter()
            .copied()
            .chain(loopback)
            .map(IpAddr::from);
        v4.chain(self.addresses6.iter().copied().map(IpAddr::from))
    }

    /// The address SNATed traffic leaves with: the first InternalIP.
    pub fn snat_address(&self) -> Option<Ipv4Addr> {
        self.addresses.first().copied()
    }

    /// The address SNATed IPv6 traffic leaves with: the first IPv6 one.
    pub fn snat_address6(&self) -> Option<Ipv6Addr> {
        self.addresses6.first().copied()
    }
}

/// The taint the cluster autoscaler puts on a Node it is about to remove.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Why this node should get no new traffic from load balancers, if it
/// should not: kube-proxy's `nodeEligible` rule, which `/healthz` follows
/// (503 while the Node is being deleted or the autoscaler has marked it for
/// removal), so that an externalTrafficPolicy=Cluster load balancer drains
/// it before it goes. A Node not (yet) read is eligible.
pub fn leaving(node: Option<&Node>) -> Option<&'static str> {
    let node = node?;
    if node.metadata.deletion_timestamp.is_some() {
        return Some("the Node is being deleted");
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    tainted.then_some("the Node has the cluster autoscaler's ToBeDeletedByClusterAutoscaler taint")
}

/// The Node's IPv4 InternalIPs, in its order: the uplink is the interface
/// holding one of them.
pub fn internal_ips(node: Option<&Node>) -> Vec<Ipv4Addr> {
    addresses_of(node, &["InternalIP"])
}

/// The Node's addresses of one family (`A`) and of the given types, in its
/// order, each once.
fn addresses_of<A: std::str::FromStr + PartialEq>(node: Option<&Node>, types: &[&str]) -> Vec<A> {
    let mut addresses = Vec::new();
    for addr in node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if types.contains(&addr.type_.as_str()) {
            if let Ok(ip) = addr.address.parse::<A>() {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
    }
    addresses
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::Time,
    };

    use super::*;

    fn tainted(key: &str) -> Node {
        Node {
            spec: Some(NodeSpec {
                taints: Some(vec![Taint {
                    key: key.into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]),
                ..NodeSpec::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn a_node_being_deleted_or_marked_for_removal_is_leaving() {
        assert_eq!(leaving(None), None, "not read yet");
        assert_eq!(leaving(Some(&Node::default())), None);
        assert_eq!(
            leaving(Some(&tainted("node.kubernetes.io/unschedulable"))),
            None
        );
        assert!(leaving(Some(&tainted(TO_BE_DELETED_TAINT))).is_some());
        let mut deleted = Node::default();
        deleted.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        assert_eq!(leaving(Some(&deleted)), Some("the Node is being deleted"));
    }
}
