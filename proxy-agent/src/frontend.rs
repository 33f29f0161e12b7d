//! What the stages hand each other: a frontend (address, port, protocol) and the
//! endpoints that serve it, independent of where it came from (`k8s/`, or a
//! services file). `desired/` turns these into map contents.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::proto::TCP,
            Self::Udp => proxy_common::proto::UDP,
            Self::Sctp => proxy_common::proto::SCTP,
        }
    }
}

/// An address (IPv4 or IPv6) and port clients dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct Frontend {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for Frontend {
    /// `10.96.0.10:53/UDP` or `[fd00::10]:53/UDP`, as the map dumps write
    /// frontends.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        };
        let at = std::net::SocketAddr::new(self.address, self.port);
        write!(f, "{at}/{protocol}")
    }
}

/// A backend serving a frontend (of the frontend's family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    /// Runs on this node: reached by DNAT alone from the uplink, never by SNAT.
    #[serde(default)]
    pub local: bool,
    /// Terminating (serving only because no ready endpoint is left, or kept
    /// only for the connections it already has).
    #[serde(default)]
    pub terminating: bool,
}

/// How a frontend picks a new flow's backend (the `ferry.dev/scheduler`
/// annotation, or the agent's `--scheduler`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// A hash of the flow's 5-tuple: random-like spread, no state.
    #[default]
    FlowHash,
    /// Maglev consistent hashing: when one of N backends goes, about 1/N of the
    /// flows move.
    Maglev,
    /// A hash of the client's address: one client, one backend.
    SourceHash,
    /// Round robin per CPU.
    RoundRobin,
}

impl std::str::FromStr for Scheduler {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flow-hash" | "random" => Ok(Self::FlowHash),
            "maglev" => Ok(Self::Maglev),
            "source-hash" => Ok(Self::SourceHash),
            "round-robin" => Ok(Self::RoundRobin),
            other => Err(format!(
                "unknown scheduler {other:?}: flow-hash, maglev, source-hash or round-robin"
            )),
        }
    }
}

/// An address prefix of either family, written `10.0.0.0/8` or
/// `fd00::/8` (a bare address is the whole address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network part only (host bits zero), as the kernel's LPM tries
    /// compare it.
    pub address: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// The prefix of `prefix` bits holding `address`; `None` when `prefix`
    /// is longer than the address.
    pub fn new(address: IpAddr, prefix: u8) -> Option<Self> {
        let address = match address {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32u32.checked_sub(prefix.into())?);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask.unwrap_or(0)))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128u32.checked_sub(prefix.into())?);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask.unwrap_or(0)))
            }
        };
        Some(Self { address, prefix })
    }

    /// Whether `address` lies in the prefix (never across families).
    pub fn contains(&self, address: IpAddr) -> bool {
        Self::new(address, self.prefix).is_some_and(|net| net.address == self.address)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let address: IpAddr = addr.trim().parse().map_err(|e| format!("{s}: {e}"))?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = match prefix {
            Some(p) => p.trim().parse().map_err(|e| format!("{s}: {e}"))?,
            None => bits,
        };
        Self::new(address, prefix).ok_or_else(|| format!("{s}: prefix longer than {bits}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One frontend of a Service and the endpoints that serve it: what `k8s/`
/// produces per Service port and address, and `desired/` programs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct FrontendSpec {
    /// For logs: `namespace/name:port` or any label.
    pub name: String,
    #[serde(flatten)]
    pub frontend: Frontend,
    /// The endpoints new connections go to.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Endpoints no new connection goes to that keep the connections they have
    /// (terminating, or not selected by the traffic policy on this node).
    #[serde(default)]
    pub reachable: Vec<Endpoint>,
    /// A Local traffic policy applies (externalTrafficPolicy on an external
    /// frontend, internalTrafficPolicy on a ClusterIP): `endpoints` are this
    /// node's only, and without one traffic is dropped rather than rejected.
    #[serde(default)]
    pub local_only: bool,
    /// An external frontend under externalTrafficPolicy=Local: the endpoints
    /// clients inside the cluster (this node's pods, the node itself) go to
    /// past the policy, as kube-proxy sends them. Empty elsewhere.
    #[serde(default)]
    pub cluster_endpoints: Vec<Endpoint>,
    /// loadBalancerSourceRanges: `None` lets every client through; `Some`
    /// only the clients in the ranges of the frontend's family, and none when
    /// there is no such range (the Kubernetes layer fills in `None` for a
    /// family the Service lists no range of, `Some(vec![])` when it lists
    /// only invalid ones: see `k8s::frontends`).
    #[serde(default)]
    pub source_ranges: Option<Vec<Cidr>>,
    /// sessionAffinity ClientIP: how long (seconds) a client sticks to its backend.
    #[serde(default)]
    pub affinity_timeout: Option<u32>,
    /// How new flows pick a backend; `None` leaves it to the agent's default.
    #[serde(default)]
    pub scheduler: Option<Scheduler>,
}

impl Endpoint {
    /// A ready endpoint on another node.
    pub fn new(address: impl Into<IpAddr>, port: u16) -> Self {
        Self {
            address: address.into(),
            port,
            local: false,
            terminating: false,
        }
    }
}

impl FrontendSpec {
    /// A frontend served by `endpoints`, with no policy, affinity, ranges or
    /// scheduler of its own.
    pub fn new(name: impl Into<String>, frontend: Frontend, endpoints: Vec<Endpoint>) -> Self {
        Self {
            name: name.into(),
            frontend,
            endpoints,
            reachable: Vec::new(),
            local_only: false,
            cluster_endpoints: Vec::new(),
            source_ranges: None,
            affinity_timeout: None,
            scheduler: None,
        }
    }
}

/// The file format of `proxy-agent run --services-file`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceFile {
    pub services: Vec<FrontendSpec>,
    /// The node's addresses, as a Node's InternalIPs would give them: flows
    /// from the uplink to endpoints on other nodes are SNATed to the first
    /// of their family. Without one of a family, such flows of that family
    /// cannot be SNATed, and are dropped.
    #[serde(default)]
    pub node_addresses: Vec<IpAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_of_both_families_keep_their_network_part() {
        let cases = [
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("10.1.2.3", "10.1.2.3/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("fd00:10:250::1:2/112", "fd00:10:250::1:0/112"),
            ("fd00:10:250::1:2/96", "fd00:10:250::/96"),
            ("fd00::1", "fd00::1/128"),
            ("2001:db8:ffff::/33", "2001:db8:8000::/33"),
            ("::/0", "::/0"),
        ];
        for (written, network) in cases {
            let cidr: Cidr = written.parse().unwrap();
            assert_eq!(cidr.to_string(), network, "{written}");
        }
        for bad in ["10.0.0.0/33", "fd00::/129", "nonsense", "10.0.0.0/x", "/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_services_file_may_name_the_node_addresses() {
        let with: ServiceFile = serde_json::from_str(
            r#"{"services": [{"name": "np", "address": "172.30.1.1", "port": 30080,
                "protocol": "UDP", "endpoints": [{"address": "10.244.2.10", "port": 8080}]}],
                "node_addresses": ["172.30.1.1", "fd00::1"]}"#,
        )
        .unwrap();
        assert_eq!(
            with.node_addresses,
            [
                "172.30.1.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert!(!with.services[0].endpoints[0].local);
        let without: ServiceFile = serde_json::from_str(r#"{"services": []}"#).unwrap();
        assert!(without.node_addresses.is_empty());
    }
}
