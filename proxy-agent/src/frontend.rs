//! What the stages hand each other: a frontend (address, port, protocol) and the
//! endpoints that serve it, independent of where it came from (`k8s/`, or a
//! services file). `desired/` turns these into map contents.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::proto::TCP,
            Self::Udp => proxy_common::proto::UDP,
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

/// An IPv4 prefix, written `10.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let address: Ipv4Addr = addr.trim().parse().map_err(|e| format!("{s}: {e}"))?;
        let prefix: u8 = prefix.trim().parse().map_err(|e| format!("{s}: {e}"))?;
        if prefix > 32 {
            return Err(format!("{s}: prefix longer than 32"));
        }
        // Keep only the network part, as the kernel's LPM trie compares it.
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(Self {
            address: (u32::from(address) & mask).into(),
            prefix,
        })
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
    /// loadBalancerSourceRanges: `None` lets every client through; `Some`
    /// only the clients in these ranges, and none when it is empty (a Service
    /// whose ranges are all invalid or of the other family fails closed).
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
}
