//! `proxy-agent simulate`: where does this packet go? The real programs, in
//! private maps filled by the real desired-state code from Kubernetes manifests,
//! run one packet through BPF_PROG_TEST_RUN, in a network namespace of their
//! own whose routes are the node's as the manifests' Nodes give them (each
//! other Node's pod CIDRs through its InternalIP), so a packet to a backend
//! on another node is shown leaving with its SNAT.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    str::FromStr,
};

use anyhow::{bail, Result};
use proxy_common::{program_names, proto};

pub use crate::k8s::manifests::{read_manifests, Manifests};
use crate::{
    desired::{MapState, ServiceKey},
    frontend::{FrontendSpec, Scheduler},
    harness::{
        self,
        packet::{self, Frame},
        Programs,
    },
    k8s::nodes,
    kernel::fib_model::{self, GatewayRoute},
    settings,
};

/// Which hook the packet enters: a pod's veth or the node's uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Pod,
    Uplink,
}

impl FromStr for Hook {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pod" => Ok(Self::Pod),
            "uplink" => Ok(Self::Uplink),
            other => Err(format!("{other}: expected pod or uplink")),
        }
    }
}

/// `PROTO SRC:PORT -> DST:PORT`, e.g. `TCP 10.244.1.2:40000 -> 10.96.0.10:80`
/// or `UDP [fd00::2]:40000 -> [fd00:96::10]:53`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketSpec {
    pub proto: u8,
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
}

impl FromStr for PacketSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?}: expected 'TCP 10.244.1.2:40000 -> 10.96.0.10:80' \
                 (or IPv6: 'UDP [fd00::2]:40000 -> [fd00:96::10]:53')"
            )
        };
        let mut words = s.split_whitespace();
        let proto = match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("TCP") => proto::TCP,
            Some("UDP") => proto::UDP,
            Some("SCTP") => proto::SCTP,
            _ => return Err(bad()),
        };
        let endpoint = |w: Option<&str>| -> Option<(IpAddr, u16)> {
            let at: SocketAddr = w?.parse().ok()?;
            Some((at.ip(), at.port()))
        };
        let src = endpoint(words.next()).ok_or_else(bad)?;
        if words.next() != Some("->") {
            return Err(bad());
        }
        let dst = endpoint(words.next()).ok_or_else(bad)?;
        if words.next().is_some() || src.0.is_ipv6() != dst.0.is_ipv6() {
            return Err(bad());
        }
        Ok(Self { proto, src, dst })
    }
}

/// An Ethernet frame for the packet (a TCP SYN or an empty UDP datagram),
/// checksums complete.
pub fn frame(p: &PacketSpec) -> Vec<u8> {
    let mut f = Frame::of(p.proto, p.src.0, p.src.1, p.dst.0, p.dst.1);
    f.id = 1;
    f.seq = 1;
    f.bytes()
}

/// What happened to the packet.
#[derive(Debug, serde::Serialize)]
pub struct Outcome {
    pub verdict: String,
    pub counter: String,
    pub src: String,
    pub dst: String,
    /// The frontend the packet matched, if any.
    pub frontend: Option<String>,
    /// The backends a packet to that frontend could go to.
    pub candidates: Vec<String>,
    /// For a packet sent on to another node: the next hop, and the Node
    /// whose pod CIDR routed it there.
    pub next_hop: Option<String>,
    /// Routes of the model the kernel refused (the model goes without).
    pub notes: Vec<String>,
}

/// The node's routes as the manifests give them: its own addresses, and
/// each other Node's pod CIDRs through that Node's InternalIP of the family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRoutes {
    pub addresses: Vec<IpAddr>,
    /// Each route, with the Node it leads to.
    pub routes: Vec<(GatewayRoute, String)>,
}

impl NodeRoutes {
    pub fn of(manifests: &Manifests, node: &str) -> Self {
        let info = manifests.node(node);
        let mut addresses: Vec<IpAddr> = info.addresses.iter().map(|&a| a.into()).collect();
        addresses.extend(info.addresses6.iter().map(|&a| IpAddr::from(a)));
        let mut routes = Vec::new();
        for other in &manifests.nodes {
            let name = other.metadata.name.clone().unwrap_or_default();
            if name == node {
                continue;
            }
            let internal = nodes::internal_addresses(other);
            for dst in nodes::pod_cidrs(other) {
                let via = internal
                    .iter()
                    .find(|a| a.is_ipv6() == dst.address.is_ipv6());
                if let Some(&via) = via {
                    routes.push((GatewayRoute { dst, via }, name.clone()));
                }
            }
        }
        Self { addresses, routes }
    }

    /// The route `dst` takes (the longest prefix holding it), and its Node.
    pub fn route(&self, dst: IpAddr) -> Option<&(GatewayRoute, String)> {
        self.routes
            .iter()
            .filter(|(r, _)| r.dst.contains(dst))
            .max_by_key(|(r, _)| r.dst.prefix)
    }
}

pub fn simulate(
    manifests: &Manifests,
    node: &str,
    packet: &PacketSpec,
    hook: Hook,
    scheduler: Scheduler,
    service_cidrs: proxy_common::ServiceCidrs,
) -> Result<Outcome> {
    let routes = NodeRoutes::of(manifests, node);
    let fib: Vec<GatewayRoute> = routes.routes.iter().map(|(r, _)| r.clone()).collect();
    fib_model::in_new_netns(|| {
        let (uplink, notes) = fib_model::build(&routes.addresses, &fib)?;
        let mut outcome = run(
            manifests,
            node,
            packet,
            hook,
            uplink,
            scheduler,
            service_cidrs,
        )?;
        if outcome.verdict == "redirect" {
            if let Ok(dst) = outcome.dst.parse::<SocketAddr>() {
                outcome.next_hop = routes
                    .route(dst.ip())
                    .map(|(r, node)| format!("{} ({node}), out of the uplink", r.via));
            }
        }
        outcome.notes = notes;
        Ok(outcome)
    })
}

/// [`simulate`] inside the model namespace, whose uplink is `uplink`.
fn run(
    manifests: &Manifests,
    node: &str,
    packet: &PacketSpec,
    hook: Hook,
    uplink: u32,
    scheduler: Scheduler,
    service_cidrs: proxy_common::ServiceCidrs,
) -> Result<Outcome> {
    let info = manifests.node(node);
    let served = manifests.frontends(&info, scheduler);
    let mut programs = Programs::load()?;
    let problems = programs.serve(&served.frontends)?;
    if let Some(p) = problems.first() {
        bail!("the manifests give a state Ferry cannot program: {p}");
    }
    programs.dp.set_config(&settings::node_config(
        info.snat_address(),
        info.snat_address6(),
        settings::DEFAULT_NAT_PORTS,
        service_cidrs,
    ))?;
    let from_pod = matches!(hook, Hook::Pod);
    let hook = match hook {
        Hook::Pod => harness::Hook::Tc(program_names::FROM_POD, None),
        Hook::Uplink => harness::Hook::UplinkTc(Some(uplink)),
    };
    let run = programs.run(hook, &frame(packet))?;
    let out = run.frame;
    let counter = programs
        .nonzero_stats()?
        .into_iter()
        .next()
        .map_or_else(|| "none".to_string(), |(name, _)| name.to_string());
    let verdict = match run.verdict as i32 {
        -1 | 0 => "pass",
        2 => "drop",
        7 => "redirect",
        other => return Ok(unknown(&format!("{hook:?}"), other, counter)),
    }
    .to_string();
    let (icmp, src, dst) = addresses(&out);
    let (frontend, candidates) = candidates(
        programs.programmed.applied(),
        &served.frontends,
        packet,
        from_pod,
    );
    Ok(Outcome {
        verdict: if icmp && src.0.is_ipv6() {
            "reject (ICMPv6 port unreachable)".into()
        } else if icmp {
            "reject (ICMP port unreachable)".into()
        } else {
            verdict
        },
        counter,
        src: SocketAddr::new(src.0, src.1).to_string(),
        dst: SocketAddr::new(dst.0, dst.1).to_string(),
        frontend,
        candidates,
        next_hop: None,
        notes: Vec::new(),
    })
}

/// Whether the frame that came out is an ICMP (ICMPv6) error, and its source
/// and destination (the ports of the L4 header right behind the IP header).
fn addresses(out: &[u8]) -> (bool, (IpAddr, u16), (IpAddr, u16)) {
    let none = (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    let port = |at: usize| {
        out.get(at..at + 2)
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
    };
    if out.get(12..14) == Some(&[0x86, 0xdd]) && out.len() >= 54 {
        let addr = |at: usize| {
            let bytes: [u8; 16] = out[at..at + 16].try_into().unwrap();
            IpAddr::from(bytes)
        };
        let icmp = out[20] == packet::ICMP6;
        return (icmp, (addr(22), port(54)), (addr(38), port(56)));
    }
    if out.len() < 38 {
        return (false, none, none);
    }
    let l4 = 14 + usize::from(out[14] & 0x0f) * 4;
    let addr = |at: usize| IpAddr::from([out[at], out[at + 1], out[at + 2], out[at + 3]]);
    let icmp = out[23] == packet::ICMP;
    (icmp, (addr(26), port(l4)), (addr(30), port(l4 + 2)))
}

/// The frontend a packet to `packet`'s destination matches (by its name), and
/// the backends it could go to: from a pod (`from_pod`), those for clients
/// inside the cluster.
fn candidates(
    map_state: &MapState,
    frontends: &[FrontendSpec],
    packet: &PacketSpec,
    from_pod: bool,
) -> (Option<String>, Vec<String>) {
    let key = ServiceKey::new(packet.dst.0, packet.dst.1, packet.proto, 0);
    match map_state.services.get(&key) {
        None => (None, Vec::new()),
        Some(slot0) => {
            let mut set = BTreeSet::new();
            let slots = if from_pod && slot0.cluster_count != 0 {
                slot0.count + 1..=slot0.slots()
            } else {
                1..=slot0.count
            };
            for slot in slots {
                if let Some(v) = map_state.services.get(&key.with_slot(slot)) {
                    if let Some(b) = map_state.backends.get(&v.backend_id) {
                        set.insert(SocketAddr::new(b.addr, b.port).to_string());
                    }
                }
            }
            let name = frontends
                .iter()
                .find(|s| s.frontend.address == packet.dst.0 && s.frontend.port == packet.dst.1)
                .map(|s| s.name.clone());
            (name, set.into_iter().collect())
        }
    }
}

fn unknown(program: &str, code: i32, counter: String) -> Outcome {
    Outcome {
        verdict: format!("{program} returned {code}"),
        counter,
        src: String::new(),
        dst: String::new(),
        frontend: None,
        candidates: Vec::new(),
        next_hop: None,
        notes: Vec::new(),
    }
}

impl Outcome {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "verdict:    {}", self.verdict);
        let _ = writeln!(s, "counter:    {}", self.counter);
        let _ = writeln!(s, "packet out: {} -> {}", self.src, self.dst);
        if let Some(hop) = &self.next_hop {
            let _ = writeln!(s, "next hop:   {hop}");
        } else if self.counter == "drop_fib" {
            let _ = writeln!(
                s,
                "next hop:   none (no Node in the manifests has a pod CIDR holding the backend)"
            );
        }
        match &self.frontend {
            Some(f) => {
                let _ = writeln!(s, "frontend:   {f}");
                let _ = writeln!(
                    s,
                    "backends:   {}",
                    if self.candidates.is_empty() {
                        "none".to_string()
                    } else {
                        self.candidates.join(", ")
                    }
                );
            }
            None => {
                let _ = writeln!(s, "frontend:   none (not a Service address)");
            }
        }
        for note in &self.notes {
            let _ = writeln!(s, "note:       route not modelled: {note}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "
apiVersion: v1
kind: Node
metadata: {name: a}
spec: {podCIDRs: [10.1.0.0/24, 'fd00:1::/64']}
status: {addresses: [{type: InternalIP, address: 192.0.2.1}, {type: InternalIP, address: '2001:db8::1'}]}
---
apiVersion: v1
kind: Node
metadata: {name: b}
spec: {podCIDR: 10.2.0.0/16}
status: {addresses: [{type: ExternalIP, address: 198.51.100.2}, {type: InternalIP, address: 192.0.2.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: c}
spec: {podCIDRs: [10.2.3.0/24, 'fd00:3::/64']}
status: {addresses: [{type: InternalIP, address: 192.0.2.3}]}
";

    #[test]
    fn other_nodes_pod_cidrs_route_through_their_internal_ip_of_the_family() {
        let mut m = Manifests::default();
        m.add_text("nodes", NODES).unwrap();
        let routes = NodeRoutes::of(&m, "a");
        assert_eq!(
            routes.addresses,
            ["192.0.2.1", "2001:db8::1"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        let listed: Vec<String> = routes
            .routes
            .iter()
            .map(|(r, n)| format!("{} via {} ({n})", r.dst, r.via))
            .collect();
        // c's IPv6 pod CIDR has no IPv6 address to go through.
        assert_eq!(
            listed,
            [
                "10.2.0.0/16 via 192.0.2.2 (b)",
                "10.2.3.0/24 via 192.0.2.3 (c)"
            ]
        );
        let via = |dst: &str| routes.route(dst.parse().unwrap()).map(|(_, n)| n.as_str());
        assert_eq!(via("10.2.3.9"), Some("c"), "the longest prefix");
        assert_eq!(via("10.2.4.9"), Some("b"));
        assert_eq!(via("10.1.0.9"), None, "a's own pods are not routed out");
    }
}
