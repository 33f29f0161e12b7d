//! `proxy-agent simulate`: where does this packet go? The real programs, in
//! private maps filled by the real desired-state code from Kubernetes manifests,
//! run one packet through BPF_PROG_TEST_RUN.

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
}

pub fn simulate(
    manifests: &Manifests,
    node: &str,
    packet: &PacketSpec,
    hook: Hook,
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
        Hook::Uplink => harness::Hook::UplinkTc(None),
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
        &programs.programmed.applied,
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
    }
}

impl Outcome {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "verdict:    {}", self.verdict);
        let _ = writeln!(s, "counter:    {}", self.counter);
        let _ = writeln!(s, "packet out: {} -> {}", self.src, self.dst);
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
        s
    }
}
