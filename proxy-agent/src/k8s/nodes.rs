//! This node as the frontends need it: its name (endpoint locality), its
//! addresses (NodePort frontends, the SNAT address) and its zone (topology
//! hints); and its InternalIPs, from which the uplink is found.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::Node;

use crate::frontend::Cidr;

/// What this node knows of itself: its name (for endpoint locality) and its
/// addresses (NodePort frontends listen on each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    /// Its IPv6 InternalIP and ExternalIP addresses (a dual-stack node's
    /// kubelet reports both families, `--node-ip=<v4>,<v6>`).
    pub addresses6: Vec<Ipv6Addr>,
    /// Its pod CIDRs (`spec.podCIDRs`): routes into them mark pod
    /// interfaces (see `kernel::ifaces`).
    pub pod_cidrs: Vec<Cidr>,
    /// The `topology.kubernetes.io/zone` label, for topology hints.
    pub zone: Option<String>,
    /// NodePorts answer on 127.0.0.1 too, for the node's own clients
    /// (`--nodeport-loopback`; the socket hooks serve them).
    pub node_port_loopback: bool,
    /// The addresses NodePorts answer on, where `--nodeport-addresses`
    /// chose them (see [`NodePortAddresses`]); `None`: every one of
    /// `addresses` and `addresses6`.
    pub node_port_only: Option<Vec<IpAddr>>,
}

/// kube-proxy's `--nodeport-addresses`: which of the node's addresses
/// NodePorts answer on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's primary address of each family: its first InternalIP (else
    /// ExternalIP), as kube-proxy's nftables mode has by default.
    Primary,
    /// Every address of the node's interfaces in one of these ranges.
    Cidrs(Vec<Cidr>),
}

impl NodePortAddresses {
    /// From the flag's values: `primary`, or ranges. None when unset.
    pub fn parse(values: &[String]) -> Result<Option<Self>> {
        if values.is_empty() {
            return Ok(None);
        }
        if values.iter().any(|v| v.trim() == "primary") {
            if values.len() > 1 {
                bail!("--nodeport-addresses: `primary` stands alone, without ranges");
            }
            return Ok(Some(Self::Primary));
        }
        let cidrs = values
            .iter()
            .map(|v| v.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?;
        Ok(Some(Self::Cidrs(cidrs)))
    }

    /// The addresses NodePorts answer on for `node`, whose interfaces hold
    /// `local` (read only for ranges).
    pub fn choose(&self, node: &NodeInfo, local: &[IpAddr]) -> Vec<IpAddr> {
        match self {
            Self::Primary => {
                let v4 = node.addresses.first().copied().map(IpAddr::from);
                let v6 = node.addresses6.first().copied().map(IpAddr::from);
                v4.into_iter().chain(v6).collect()
            }
            Self::Cidrs(cidrs) => local
                .iter()
                .copied()
                .filter(|a| !a.is_loopback() && cidrs.iter().any(|c| c.contains(*a)))
                .collect(),
        }
    }
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
            pod_cidrs: node.map(pod_cidrs).unwrap_or_default(),
            zone,
            node_port_loopback: false,
            node_port_only: None,
        }
    }

    /// The addresses NodePorts answer on, of both families (the loopback
    /// is IPv4's only, as with kube-proxy).
    pub fn node_port_addresses(&self) -> Vec<IpAddr> {
        let loopback = self
            .node_port_loopback
            .then_some(IpAddr::from(Ipv4Addr::LOCALHOST));
        let mut out: Vec<IpAddr> = match &self.node_port_only {
            Some(only) => only.clone(),
            None => self
                .addresses
                .iter()
                .copied()
                .map(IpAddr::from)
                .chain(self.addresses6.iter().copied().map(IpAddr::from))
                .collect(),
        };
        out.extend(loopback);
        out
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

/// The Node's addresses of one family (`A`) and of the given types, in the
/// types' order and then in its own, each once.
/// A Node's InternalIP addresses of both families, in the Node's order.
pub fn internal_addresses(node: &Node) -> Vec<IpAddr> {
    addresses_of(Some(node), &["InternalIP"])
}

/// A Node's pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`): what the
/// cluster routes to it. Unparsable entries are left out.
pub fn pod_cidrs(node: &Node) -> Vec<Cidr> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    let listed = match &spec.pod_cidrs {
        Some(list) if !list.is_empty() => list.clone(),
        _ => spec.pod_cidr.iter().cloned().collect(),
    };
    listed.iter().filter_map(|c| c.parse().ok()).collect()
}

fn addresses_of<A: std::str::FromStr + PartialEq>(node: Option<&Node>, types: &[&str]) -> Vec<A> {
    let mut addresses = Vec::new();
    let listed = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref());
    // By type first (InternalIPs before ExternalIPs), then in the Node's order.
    for kind in types {
        for addr in listed.into_iter().flatten().filter(|a| a.type_ == *kind) {
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

    fn with_addresses(addresses: &[(&str, &str)]) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "status": {"addresses": addresses
                .iter()
                .map(|(kind, a)| serde_json::json!({"type": kind, "address": a}))
                .collect::<Vec<_>>()},
        }))
        .unwrap()
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn internal_ips_come_before_external_ones() {
        let node = with_addresses(&[
            ("ExternalIP", "198.51.100.11"),
            ("Hostname", "n"),
            ("InternalIP", "10.250.0.11"),
            ("InternalIP", "fd00::11"),
        ]);
        let info = NodeInfo::from_node("n", Some(&node));
        assert_eq!(info.snat_address(), Some(Ipv4Addr::new(10, 250, 0, 11)));
        assert_eq!(
            info.node_port_addresses(),
            ips(&["10.250.0.11", "198.51.100.11", "fd00::11"])
        );
    }

    #[test]
    fn nodeport_addresses_follow_kube_proxys_flag() {
        let node = with_addresses(&[
            ("ExternalIP", "198.51.100.11"),
            ("InternalIP", "10.250.0.11"),
            ("InternalIP", "10.250.1.11"),
            ("InternalIP", "fd00::11"),
        ]);
        let mut info = NodeInfo::from_node("n", Some(&node));
        let parse = |v: &[&str]| {
            NodePortAddresses::parse(&v.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(parse(&[]).unwrap(), None);
        assert!(parse(&["primary", "10.0.0.0/8"]).is_err());
        assert!(parse(&["10.0.0.0/33"]).is_err());
        let primary = parse(&["primary"]).unwrap().unwrap();
        assert_eq!(
            primary.choose(&info, &[]),
            ips(&["10.250.0.11", "fd00::11"])
        );
        // Ranges pick the interfaces' addresses, of either family, never a
        // loopback one.
        let ranges = parse(&["10.250.1.0/24", "fd00::/64", "127.0.0.0/8"])
            .unwrap()
            .unwrap();
        let local = ips(&[
            "127.0.0.1",
            "10.250.0.11",
            "10.250.1.11",
            "10.250.1.12",
            "fd00::11",
            "fe80::1",
        ]);
        let chosen = ranges.choose(&info, &local);
        assert_eq!(chosen, ips(&["10.250.1.11", "10.250.1.12", "fd00::11"]));
        info.node_port_only = Some(chosen.clone());
        info.node_port_loopback = true;
        let mut with_loopback = chosen;
        with_loopback.push("127.0.0.1".parse().unwrap());
        assert_eq!(info.node_port_addresses(), with_loopback);
    }

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
