//! `proxy-agent monitor`: drops, rejects and (asked for) traces as the
//! programs report them (see `kernel::monitor`), one line each: when, why,
//! which program and interface, the packet's flow (a reject's ICMP error is
//! read for the packet it quotes; a trace's packet is as the program sent
//! it on, translated) and the Service of its frontend, as the agent names
//! it on `/frontends`. Filters by kind, reason, address and Service.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use proxy_common::{
    ct_dir, map_names, monitor::PROGRAMS, pinned::Pinned, proto, stats::Stat, CtKey4, CtKey6,
    CtValue, Ip4, MonitorEvent, Nat4, Nat6, RevNat4, RevNat6,
};

use crate::{kernel::monitor::Monitor, serve::http};

/// A report as read from the perf buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub stat: Stat,
    pub program: &'static str,
    pub ifindex: u32,
    /// The packet's length (its first bytes came with the report).
    pub len: u32,
    /// None when the bytes are not a TCP, UDP or SCTP packet over IP (or an
    /// ICMP error quoting one).
    pub flow: Option<Flow>,
    /// A forward trace's frontend (its packet left with the backend's
    /// address), from the flow's conntrack entry.
    pub frontend: Option<SocketAddr>,
    /// The Service (`namespace/name`) whose frontend the flow is to, when
    /// the agent named it.
    pub service: Option<String>,
}

/// A packet's flow: its source and destination, or (`quoted`) those of the
/// client's packet an ICMP error quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Read from the packet an ICMP error quotes (a reject).
    pub quoted: bool,
}

const ETH_LEN: usize = 14;

/// Reads one report: the event header, then the packet's first bytes.
pub fn decode(sample: &[u8]) -> Option<Report> {
    let header = std::mem::size_of::<MonitorEvent>();
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(
            sample.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    let (stat, ifindex, len, program) = (word(0)?, word(1)?, word(2)?, word(3)?);
    let stat = *Stat::ALL.get(usize::try_from(stat).ok()?)?;
    let program = PROGRAMS.get(usize::try_from(program).ok()?).copied()?;
    let packet = sample.get(header..).unwrap_or_default();
    // The kernel pads a sample to 8 bytes: keep what the packet had.
    let packet = &packet[..packet.len().min(usize::try_from(len).unwrap_or(0))];
    let flow = match packet.get(12..ETH_LEN) {
        Some([0x08, 0x00]) => ip4(&packet[ETH_LEN..], false),
        Some([0x86, 0xdd]) => ip6(&packet[ETH_LEN..], false),
        _ => None,
    };
    Some(Report {
        stat,
        program,
        ifindex,
        len,
        flow,
        frontend: None,
        service: None,
    })
}

fn ports(l4: &[u8]) -> Option<(u16, u16)> {
    Some((
        u16::from_be_bytes([*l4.first()?, *l4.get(1)?]),
        u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
    ))
}

fn flow(proto: u8, src: IpAddr, dst: IpAddr, l4: &[u8], quoted: bool) -> Option<Flow> {
    let (sport, dport) = ports(l4)?;
    let (src, dst) = (SocketAddr::new(src, sport), SocketAddr::new(dst, dport));
    Some(Flow {
        proto,
        // A quoted packet is the client's; the error goes back to it.
        client: src,
        server: dst,
        quoted,
    })
}

fn ip4(ip: &[u8], quoted: bool) -> Option<Flow> {
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let proto = *ip.get(9)?;
    let src = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
    let l4 = ip.get(ihl..)?;
    match proto {
        proto::TCP | proto::UDP | proto::SCTP => flow(proto, src.into(), dst.into(), l4, quoted),
        // Destination unreachable: the packet it answers follows 8 bytes on.
        1 if !quoted && l4.first() == Some(&3) => ip4(l4.get(8..)?, true),
        _ => None,
    }
}

fn ip6(ip: &[u8], quoted: bool) -> Option<Flow> {
    let proto = *ip.get(6)?;
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?);
    let l4 = ip.get(40..)?;
    match proto {
        proto::TCP | proto::UDP | proto::SCTP => flow(proto, src.into(), dst.into(), l4, quoted),
        58 if !quoted && l4.first() == Some(&1) => ip6(l4.get(8..)?, true),
        _ => None,
    }
}

/// Which reports `monitor` prints.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Of [`KINDS`] (none: drops and rejects).
    pub kinds: Vec<String>,
    /// A verdict's name (`drop_source_range`, `reject_no_backend`, ...).
    pub reason: Option<String>,
    /// The client's or the server's address.
    pub address: Option<IpAddr>,
    /// The Service, `namespace/name`.
    pub service: Option<String>,
}

/// The kinds `--type` takes: `all` is the other three.
pub const KINDS: [&str; 4] = ["drop", "reject", "trace", "all"];

/// A report's kind, of [`KINDS`].
fn kind(stat: Stat) -> &'static str {
    if stat.is_reject() {
        "reject"
    } else if stat.is_translation() {
        "trace"
    } else {
        "drop"
    }
}

impl Filter {
    /// Refuses a reason no verdict has.
    pub fn check(&self) -> Result<()> {
        if let Some(reason) = &self.reason {
            if !Stat::ALL.iter().any(|s| s.name() == reason) {
                let names: Vec<&str> = Stat::ALL
                    .iter()
                    .map(|s| s.name())
                    .filter(|n| n.starts_with("drop_") || n.starts_with("reject_"))
                    .collect();
                bail!(
                    "no verdict is named {reason}; drops and rejects are: {}",
                    names.join(", ")
                );
            }
        }
        Ok(())
    }

    /// Whether the monitor asks the programs for traces: a report of every
    /// packet they translate, which costs each of them a perf event.
    pub fn traces(&self) -> bool {
        self.kinds.iter().any(|k| k == "trace" || k == "all")
    }

    pub fn admits(&self, report: &Report) -> bool {
        let name = report.stat.name();
        let kind = kind(report.stat);
        let kind = if self.kinds.is_empty() {
            kind != "trace"
        } else {
            self.kinds.iter().any(|k| k == kind || k == "all")
        };
        let reason = self.reason.as_deref().is_none_or(|r| r == name);
        let address = self.address.is_none_or(|a| {
            report
                .flow
                .is_some_and(|f| f.client.ip() == a || f.server.ip() == a)
                || report.frontend.is_some_and(|f| f.ip() == a)
        });
        let service = self
            .service
            .as_deref()
            .is_none_or(|s| report.service.as_deref() == Some(s));
        kind && reason && address && service
    }
}

fn protocol(p: u8) -> &'static str {
    match p {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        _ => "?",
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<22} {:<10} if {:<4} {:>5} bytes",
            self.stat.name(),
            self.program,
            self.ifindex,
            self.len
        )?;
        match self.flow {
            Some(flow) => write!(
                f,
                "  {} {} -> {}{}",
                protocol(flow.proto),
                flow.client,
                flow.server,
                if flow.quoted {
                    " (quoted by the ICMP error)"
                } else {
                    ""
                }
            ),
            None => write!(f, "  (not a TCP, UDP or SCTP packet)"),
        }?;
        if let Some(frontend) = self.frontend {
            write!(f, "  frontend {frontend}")?;
        }
        match &self.service {
            Some(service) => write!(f, "  service {service}"),
            None => Ok(()),
        }
    }
}

/// The Services of frontends, as the agent at `agent` names them on
/// `/frontends`: read at the start, and again (at most every few seconds)
/// when a report is to a frontend not named yet.
struct Names {
    agent: SocketAddr,
    services: HashMap<String, String>,
    read: Option<Instant>,
    failed: bool,
}

const NAMES_AGAIN: Duration = Duration::from_secs(3);

impl Names {
    fn new(agent: SocketAddr) -> Self {
        let mut names = Self {
            agent,
            services: HashMap::new(),
            read: None,
            failed: false,
        };
        names.read_again();
        names
    }

    fn read_again(&mut self) {
        self.read = Some(Instant::now());
        let got = tokio::runtime::Handle::current()
            .block_on(http::get(self.agent, "/frontends", Duration::from_secs(1)))
            .and_then(|body| {
                serde_json::from_str::<HashMap<String, String>>(&body)
                    .context("reading the agent's /frontends")
            });
        match got {
            Ok(services) => {
                self.services = services;
                self.failed = false;
            }
            Err(e) if !self.failed => {
                eprintln!(
                    "monitor: no Service names ({e:#}); --agent names the agent's metrics address"
                );
                self.failed = true;
            }
            Err(_) => {}
        }
    }

    fn service(&mut self, frontend: SocketAddr, proto: u8) -> Option<String> {
        let frontend = format!("{frontend}/{}", protocol(proto));
        if !self.services.contains_key(&frontend)
            && self.read.is_none_or(|at| at.elapsed() >= NAMES_AGAIN)
        {
            self.read_again();
        }
        self.services.get(&frontend).cloned()
    }
}

/// The frontends translated flows were to, read from the agent's pinned
/// conntrack maps: a forward trace's packet left with its backend's
/// address, and the flow's reply entry (or, SNATed, its NAT entry) names
/// the frontend by id.
struct Frontends {
    ct4: BpfHashMap<MapData, CtKey4, CtValue>,
    nat4: BpfHashMap<MapData, CtKey4, Nat4>,
    revnat4: BpfHashMap<MapData, u32, RevNat4>,
    ct6: BpfHashMap<MapData, CtKey6, CtValue>,
    nat6: BpfHashMap<MapData, CtKey6, Nat6>,
    revnat6: BpfHashMap<MapData, u32, RevNat6>,
}

impl Frontends {
    fn pinned(pin_dir: &Path) -> Result<Self> {
        let pinned = Pinned::new(pin_dir);
        Ok(Self {
            ct4: pinned.hash_map(map_names::CONNTRACK_V4)?,
            nat4: pinned.hash_map(map_names::NAT_V4)?,
            revnat4: pinned.hash_map(map_names::REVNAT_V4)?,
            ct6: pinned.hash_map(map_names::CONNTRACK_V6)?,
            nat6: pinned.hash_map(map_names::NAT_V6)?,
            revnat6: pinned.hash_map(map_names::REVNAT_V6)?,
        })
    }

    /// The frontend of the translated packet `flow` (source and
    /// destination as it left for the backend), if its entries are there.
    fn of(&self, flow: &Flow) -> Option<SocketAddr> {
        let (src, dst) = (flow.client, flow.server);
        // The backend's replies come back as dst -> src: on a NAT port
        // (dir NAT) when the flow was SNATed, else as conntrack's reply.
        let sport_be = dst.port().to_be();
        let dport_be = src.port().to_be();
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let key = |dir| CtKey4 {
                    saddr: Ip4::new(d),
                    daddr: Ip4::new(s),
                    sport_be,
                    dport_be,
                    proto: flow.proto,
                    dir,
                    _pad: 0,
                };
                let id = match self.nat4.get(&key(ct_dir::NAT), 0) {
                    Ok(nat) => nat.rev_nat_id,
                    Err(_) => self.ct4.get(&key(ct_dir::REPLY), 0).ok()?.rev_nat_id,
                };
                let front = self.revnat4.get(&id, 0).ok()?;
                Some(SocketAddr::new(front.addr().into(), front.port()))
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let key = |dir| CtKey6 {
                    saddr: d.octets(),
                    daddr: s.octets(),
                    sport_be,
                    dport_be,
                    proto: flow.proto,
                    dir,
                    _pad: 0,
                };
                let id = match self.nat6.get(&key(ct_dir::NAT), 0) {
                    Ok(nat) => nat.rev_nat_id,
                    Err(_) => self.ct6.get(&key(ct_dir::REPLY), 0).ok()?.rev_nat_id,
                };
                let front = self.revnat6.get(&id, 0).ok()?;
                Some(SocketAddr::new(front.addr().into(), front.port()))
            }
            _ => None,
        }
    }
}

/// The frontend a report's flow was to: a drop's or reject's destination,
/// a reverse-translated packet's source, a forward trace's from conntrack.
fn frontend_of(report: &Report, frontends: Option<&Frontends>) -> Option<SocketAddr> {
    let flow = report.flow?;
    if !report.stat.is_translation() {
        return Some(flow.server);
    }
    if report.stat.name().starts_with("rev_") {
        return Some(flow.client);
    }
    frontends?.of(&flow)
}

/// Prints reports through the maps pinned under `pin_dir` until `seconds`
/// passed or `count` reports were printed (either None: no limit), with
/// the Services the agent at `agent` names. Blocks: run it where a tokio
/// runtime's handle may block (`spawn_blocking`).
pub fn run(
    pin_dir: &Path,
    agent: SocketAddr,
    filter: &Filter,
    seconds: Option<u64>,
    count: Option<u64>,
) -> Result<()> {
    filter.check()?;
    let traces = filter.traces();
    let mut monitor = Monitor::pinned(pin_dir, traces)?;
    let frontends = if traces {
        Frontends::pinned(pin_dir)
            .inspect_err(|e| eprintln!("monitor: traces without their frontends ({e:#})"))
            .ok()
    } else {
        None
    };
    let mut names = Names::new(agent);
    let start = Instant::now();
    let end = seconds.map(|s| start + Duration::from_secs(s));
    let mut printed = 0u64;
    eprintln!(
        "monitor: reading {} (Ctrl-C stops)",
        if traces {
            "translated packets too"
        } else {
            "drops and rejects"
        }
    );
    loop {
        if end.is_some_and(|end| Instant::now() >= end) || count.is_some_and(|c| printed >= c) {
            return Ok(());
        }
        let mut reports = Vec::new();
        let lost = monitor.poll(Duration::from_millis(200), |sample| match decode(sample) {
            Some(report) => reports.push(report),
            None => eprintln!("monitor: a report of {} bytes did not decode", sample.len()),
        })?;
        if lost > 0 {
            eprintln!("monitor: {lost} reports lost (a perf buffer was full)");
        }
        for mut report in reports {
            if count.is_some_and(|c| printed >= c) {
                break;
            }
            let frontend = frontend_of(&report, frontends.as_ref());
            if report.stat.is_translation() && !report.stat.name().starts_with("rev_") {
                report.frontend = frontend;
            }
            report.service = frontend
                .zip(report.flow)
                .and_then(|(front, flow)| names.service(front, flow.proto));
            if filter.admits(&report) {
                println!("{:>9.3}s {report}", start.elapsed().as_secs_f64());
                printed += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(stat: Stat, program: u32, packet: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        for w in [stat.index(), 7, packet.len() as u32, program] {
            s.extend_from_slice(&w.to_ne_bytes());
        }
        s.extend_from_slice(packet);
        // The kernel's padding.
        s.extend_from_slice(&[0; 5]);
        s
    }

    fn eth(ethertype: [u8; 2]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype);
        f
    }

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, proto::TCP, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&sport.to_be_bytes());
        ip.extend_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(&[0; 16]);
        ip
    }

    #[test]
    fn a_dropped_tcp_segment_names_its_flow() {
        let mut packet = eth([0x08, 0x00]);
        packet.extend(tcp4([10, 0, 0, 1], [10, 96, 0, 10], 40000, 80));
        let report = decode(&sample(Stat::DropSourceRange, 2, &packet)).unwrap();
        assert_eq!(report.stat, Stat::DropSourceRange);
        assert_eq!(report.program, "uplink_xdp");
        assert_eq!(report.ifindex, 7);
        assert_eq!(report.len, 54);
        let flow = report.flow.unwrap();
        assert_eq!(flow.client, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(flow.server, "10.96.0.10:80".parse().unwrap());
        assert!(!flow.quoted);
        assert!(report.to_string().contains("drop_source_range"));
        assert!(report
            .to_string()
            .contains("TCP 10.0.0.1:40000 -> 10.96.0.10:80"));
    }

    #[test]
    fn a_reject_is_read_for_the_packet_its_error_quotes() {
        let mut packet = eth([0x08, 0x00]);
        let quoted = tcp4([10, 0, 0, 1], [10, 96, 0, 10], 40000, 80);
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted[..28]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        ip.extend_from_slice(&[10, 96, 0, 10, 10, 0, 0, 1]);
        packet.extend(ip);
        packet.extend(icmp);
        let report = decode(&sample(Stat::RejectNoBackend, 0, &packet)).unwrap();
        let flow = report.flow.unwrap();
        assert_eq!(flow.client, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(flow.server, "10.96.0.10:80".parse().unwrap());
        assert!(flow.quoted);
    }

    #[test]
    fn ipv6_and_short_samples() {
        let mut packet = eth([0x86, 0xdd]);
        let mut ip = vec![0x60, 0, 0, 0, 0, 8, proto::UDP, 64];
        ip.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&"fd00::10".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
        packet.extend(ip);
        let flow = decode(&sample(Stat::DropNoLocalBackend, 4, &packet))
            .unwrap()
            .flow
            .unwrap();
        assert_eq!(flow.client, "[fd00::1]:40000".parse().unwrap());
        assert_eq!(flow.server, "[fd00::10]:53".parse().unwrap());
        // A header cut short, an unknown verdict: no flow, no report.
        assert_eq!(
            decode(&sample(Stat::DropFib, 1, &packet[..30]))
                .unwrap()
                .flow,
            None
        );
        assert_eq!(decode(&[0; 10]), None);
        let mut unknown = sample(Stat::DropFib, 1, &packet);
        unknown[..4].copy_from_slice(&999u32.to_ne_bytes());
        assert_eq!(decode(&unknown), None);
    }

    #[test]
    fn filters_by_kind_reason_and_address() {
        let mut packet = eth([0x08, 0x00]);
        packet.extend(tcp4([10, 0, 0, 1], [10, 96, 0, 10], 40000, 80));
        let drop = decode(&sample(Stat::DropSourceRange, 2, &packet)).unwrap();
        let reject = decode(&sample(Stat::RejectNoBackend, 0, &packet)).unwrap();
        let trace = decode(&sample(Stat::FwdNew, 0, &packet)).unwrap();
        let only = |kind: &str| Filter {
            kinds: vec![kind.into()],
            ..Filter::default()
        };
        assert!(only("drop").admits(&drop) && !only("drop").admits(&reject));
        assert!(only("reject").admits(&reject) && !only("reject").admits(&drop));
        assert!(only("trace").admits(&trace) && !only("trace").admits(&drop));
        assert!(only("all").admits(&drop) && only("all").admits(&trace));
        let default = Filter::default();
        assert!(default.admits(&drop) && default.admits(&reject) && !default.admits(&trace));
        assert!(!default.traces() && only("trace").traces() && only("all").traces());
        assert!(!only("drop").traces());
        let reason = Filter {
            reason: Some("reject_no_backend".into()),
            ..Filter::default()
        };
        assert!(reason.admits(&reject) && !reason.admits(&drop));
        let at = |a: &str| Filter {
            address: Some(a.parse().unwrap()),
            ..Filter::default()
        };
        assert!(at("10.96.0.10").admits(&drop) && at("10.0.0.1").admits(&drop));
        assert!(!at("10.0.0.2").admits(&drop));
        let mut named = drop.clone();
        named.service = Some("default/web".into());
        let web = Filter {
            service: Some("default/web".into()),
            ..Filter::default()
        };
        assert!(web.admits(&named) && !web.admits(&drop));
        assert!(named.to_string().ends_with("service default/web"));
        assert!(Filter {
            reason: Some("drop_everything".into()),
            ..Filter::default()
        }
        .check()
        .is_err());
    }
}
