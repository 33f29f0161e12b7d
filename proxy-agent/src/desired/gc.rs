//! Conntrack and NAT garbage collection, decided from a snapshot of the maps
//! (pure; `kernel/` reads the maps and applies the plan):
//!
//! - conntrack entries idle past their lifetime go (a closing TCP flow's after
//!   the close timeout);
//! - NAT entries go with their flow: idle or closed past the same lifetimes,
//!   or left without the forward conntrack entry that names their port;
//! - the NAT-port bitmaps are brought back in step with the NAT entries that
//!   stay, so that a port is free again as soon as its entry is gone;
//! - each backend's count of new flows dropped for want of a port is taken.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    hash::Hash,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use proxy_common::{
    ct_dir, ct_flags, ct_lifetime, nat_ports, proto, CtKey4, CtKey6, CtValue, Nat4, Nat6,
    NatPortKey4, NatPortKey6, RevNat4, RevNat6,
};

/// A NAT entry younger than this is never taken for an orphan: its flow may
/// be between creating its conntrack entry and recording its port there.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// How long entries live without a packet. The programs' own lifetimes
/// (`proxy_common::ct_lifetime`) bound them: the agent may only collect sooner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// A TCP flow after its FIN or RST.
    pub tcp_closing: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            tcp_closing: Duration::from_secs(ct_lifetime::TCP_CLOSING_SECS),
        }
    }
}

impl Lifetimes {
    /// The lifetime of an entry of `proto` with conntrack `flags`, in ns.
    pub fn nanos(&self, proto: u8, flags: u16) -> u64 {
        let programs = ct_lifetime::nanos(proto, flags);
        let connected = proto == proxy_common::proto::TCP || proto == proxy_common::proto::SCTP;
        if connected && flags & ct_flags::CLOSING != 0 {
            programs.min(u64::try_from(self.tcp_closing.as_nanos()).unwrap_or(u64::MAX))
        } else {
            programs
        }
    }

    /// Whether an entry last seen at `last_seen_ns` has outlived its lifetime at `now_ns`.
    pub fn expired(&self, now_ns: u64, proto: u8, flags: u16, last_seen_ns: u64) -> bool {
        now_ns.saturating_sub(last_seen_ns) > self.nanos(proto, flags)
    }
}

/// A remote backend, as the NAT-port words name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NatBackend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
}

impl fmt::Display for NatBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            proto::TCP => "TCP",
            proto::UDP => "UDP",
            proto::SCTP => "SCTP",
            _ => "?",
        };
        write!(f, "{}/{proto}", SocketAddr::new(self.addr, self.port))
    }
}

/// The conntrack, NAT and NAT-port layouts of one address family, as the
/// collection reads them.
pub trait Family {
    type CtKey: Copy + Eq + Hash + fmt::Debug;
    type Nat: Copy + PartialEq + fmt::Debug;
    type Word: Copy + Ord + fmt::Debug;
    type RevNat: Copy + fmt::Debug;
    /// The family's name in metrics.
    const NAME: &'static str;

    fn proto(key: &Self::CtKey) -> u8;
    fn dir(key: &Self::CtKey) -> u8;
    /// A NAT key's node port (host order) and the backend it goes to.
    fn nat_port(key: &Self::CtKey) -> (u16, NatBackend);
    /// A NAT value's frontend (reverse-NAT id), flags and last-seen time.
    fn nat_state(nat: &Self::Nat) -> (u32, u16, u64);
    /// The forward conntrack key of the flow a NAT value belongs to.
    fn forward(nat: &Self::Nat, frontend: &Self::RevNat, proto: u8) -> Self::CtKey;
    fn word(backend: &NatBackend, index: u16) -> Self::Word;
    fn word_of(word: &Self::Word) -> (NatBackend, u16);
}

/// IPv4's maps.
#[derive(Debug)]
pub struct V4;

/// IPv6's maps.
#[derive(Debug)]
pub struct V6;

impl Family for V4 {
    type CtKey = CtKey4;
    type Nat = Nat4;
    type Word = NatPortKey4;
    type RevNat = RevNat4;
    const NAME: &'static str = "ipv4";

    fn proto(key: &CtKey4) -> u8 {
        key.proto
    }

    fn dir(key: &CtKey4) -> u8 {
        key.dir
    }

    fn nat_port(key: &CtKey4) -> (u16, NatBackend) {
        let backend = NatBackend {
            addr: key.saddr.addr().into(),
            port: u16::from_be(key.sport_be),
            proto: key.proto,
        };
        (u16::from_be(key.dport_be), backend)
    }

    fn nat_state(nat: &Nat4) -> (u32, u16, u64) {
        (nat.rev_nat_id, nat.flags, nat.last_seen_ns)
    }

    fn forward(nat: &Nat4, frontend: &RevNat4, proto: u8) -> CtKey4 {
        CtKey4 {
            saddr: nat.client_addr,
            daddr: frontend.addr,
            sport_be: nat.client_port_be,
            dport_be: frontend.port_be,
            proto,
            dir: ct_dir::FORWARD,
            _pad: 0,
        }
    }

    fn word(backend: &NatBackend, index: u16) -> NatPortKey4 {
        let addr = match backend.addr {
            IpAddr::V4(a) => a.into(),
            IpAddr::V6(_) => proxy_common::Ip4::default(),
        };
        NatPortKey4 {
            backend_addr: addr,
            backend_port_be: backend.port.to_be(),
            proto: backend.proto,
            _pad: 0,
            index,
            _pad2: 0,
        }
    }

    fn word_of(word: &NatPortKey4) -> (NatBackend, u16) {
        let backend = NatBackend {
            addr: word.backend_addr.addr().into(),
            port: u16::from_be(word.backend_port_be),
            proto: word.proto,
        };
        (backend, word.index)
    }
}

impl Family for V6 {
    type CtKey = CtKey6;
    type Nat = Nat6;
    type Word = NatPortKey6;
    type RevNat = RevNat6;
    const NAME: &'static str = "ipv6";

    fn proto(key: &CtKey6) -> u8 {
        key.proto
    }

    fn dir(key: &CtKey6) -> u8 {
        key.dir
    }

    fn nat_port(key: &CtKey6) -> (u16, NatBackend) {
        let backend = NatBackend {
            addr: Ipv6Addr::from(key.saddr).into(),
            port: u16::from_be(key.sport_be),
            proto: key.proto,
        };
        (u16::from_be(key.dport_be), backend)
    }

    fn nat_state(nat: &Nat6) -> (u32, u16, u64) {
        (nat.rev_nat_id, nat.flags, nat.last_seen_ns)
    }

    fn forward(nat: &Nat6, frontend: &RevNat6, proto: u8) -> CtKey6 {
        CtKey6 {
            saddr: nat.client_addr,
            daddr: frontend.addr,
            sport_be: nat.client_port_be,
            dport_be: frontend.port_be,
            proto,
            dir: ct_dir::FORWARD,
            _pad: 0,
        }
    }

    fn word(backend: &NatBackend, index: u16) -> NatPortKey6 {
        let addr = match backend.addr {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => [0; 16],
        };
        NatPortKey6 {
            backend_addr: addr,
            backend_port_be: backend.port.to_be(),
            proto: backend.proto,
            _pad: 0,
            index,
            _pad2: 0,
        }
    }

    fn word_of(word: &NatPortKey6) -> (NatBackend, u16) {
        let backend = NatBackend {
            addr: Ipv6Addr::from(word.backend_addr).into(),
            port: u16::from_be(word.backend_port_be),
            proto: word.proto,
        };
        (backend, word.index)
    }
}

/// What one family's maps held when the collection started.
#[derive(Debug)]
pub struct Snapshot<F: Family> {
    pub conntrack: Vec<(F::CtKey, CtValue)>,
    pub nat: Vec<(F::CtKey, F::Nat)>,
    pub nat_ports: Vec<(F::Word, u64)>,
    pub revnat: BTreeMap<u32, F::RevNat>,
    /// The node's NAT port range (`None` while it has none).
    pub nat_range: Option<(u16, u16)>,
}

impl<F: Family> Default for Snapshot<F> {
    fn default() -> Self {
        Self {
            conntrack: Vec::new(),
            nat: Vec::new(),
            nat_ports: Vec::new(),
            revnat: BTreeMap::new(),
            nat_range: None,
        }
    }
}

/// What to change in one family's maps.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan<F: Family> {
    /// Conntrack entries that ended.
    pub conntrack: Vec<F::CtKey>,
    /// NAT entries whose flow ended.
    pub nat: Vec<F::CtKey>,
    /// NAT-port words to write (`Some`) or delete (`None`), with the value
    /// the snapshot had (bits the programs set since are kept).
    pub nat_ports: Vec<(F::Word, u64, Option<u64>)>,
    /// Per backend: new flows dropped for want of a port since the last
    /// collection (their counters are deleted).
    pub exhausted: Vec<(NatBackend, u64)>,
    /// Per backend: ports its remaining NAT entries hold.
    pub held: BTreeMap<NatBackend, u32>,
    /// The flows that remain (their forward entries), by [`FlowState`].
    pub flows: BTreeMap<FlowState, usize>,
}

/// What a metric says of a flow: its protocol and whether it is closing
/// (a TCP FIN or RST, an SCTP ABORT or SHUTDOWN COMPLETE went by).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowState {
    pub proto: u8,
    pub closing: bool,
}

impl FlowState {
    pub fn protocol(&self) -> &'static str {
        match self.proto {
            6 => "tcp",
            17 => "udp",
            132 => "sctp",
            _ => "other",
        }
    }

    pub fn state(&self) -> &'static str {
        if self.closing {
            "closing"
        } else {
            "open"
        }
    }
}

impl<F: Family> Default for Plan<F> {
    fn default() -> Self {
        Self {
            conntrack: Vec::new(),
            nat: Vec::new(),
            nat_ports: Vec::new(),
            exhausted: Vec::new(),
            held: BTreeMap::new(),
            flows: BTreeMap::new(),
        }
    }
}

/// What a collection did and saw.
#[derive(Debug, Default)]
pub struct Report {
    pub conntrack_removed: usize,
    pub nat_removed: usize,
    /// Entries left.
    pub conntrack_entries: usize,
    pub nat_entries: usize,
    /// See [`Plan::exhausted`].
    pub exhausted: Vec<(NatBackend, u64)>,
    /// See [`Plan::held`].
    pub held: BTreeMap<NatBackend, u32>,
    /// See [`Plan::flows`]; both families.
    pub flows: BTreeMap<FlowState, usize>,
    /// Entries left, by map (conntrack, nat) and family.
    pub entries: Vec<(&'static str, &'static str, usize)>,
}

/// Decides what goes at `now_ns` (the programs' clock).
pub fn plan<F: Family>(snapshot: &Snapshot<F>, now_ns: u64, lifetimes: &Lifetimes) -> Plan<F> {
    let mut plan = Plan::default();
    let mut forward: HashMap<F::CtKey, u16> = HashMap::new();
    for (key, value) in &snapshot.conntrack {
        if lifetimes.expired(now_ns, F::proto(key), value.flags, value.last_seen_ns) {
            plan.conntrack.push(*key);
        } else if F::dir(key) == ct_dir::FORWARD {
            forward.insert(*key, value.nat_port_be);
            let state = FlowState {
                proto: F::proto(key),
                closing: value.flags & ct_flags::CLOSING != 0,
            };
            *plan.flows.entry(state).or_default() += 1;
        }
    }
    let grace = u64::try_from(ORPHAN_GRACE.as_nanos()).unwrap_or(u64::MAX);
    let mut held: BTreeMap<NatBackend, BTreeSet<u16>> = BTreeMap::new();
    for (key, value) in &snapshot.nat {
        let (rev_nat_id, flags, last_seen) = F::nat_state(value);
        let (port, backend) = F::nat_port(key);
        let ended = lifetimes.expired(now_ns, F::proto(key), flags, last_seen);
        let orphan = now_ns.saturating_sub(last_seen) > grace
            && snapshot.revnat.get(&rev_nat_id).is_none_or(|frontend| {
                let flow = F::forward(value, frontend, F::proto(key));
                forward.get(&flow) != Some(&port.to_be())
            });
        if ended || orphan {
            plan.nat.push(*key);
        } else {
            held.entry(backend).or_default().insert(port);
        }
    }
    plan.held = held
        .iter()
        .map(|(b, ports)| (*b, ports.len() as u32))
        .collect();

    // The words the remaining entries call for, by backend.
    let mut wanted: BTreeMap<F::Word, u64> = BTreeMap::new();
    if let Some((min, max)) = snapshot
        .nat_range
        .filter(|(min, max)| *min != 0 && min <= max)
    {
        let size = u32::from(max) - u32::from(min) + 1;
        for (backend, ports) in &held {
            let mut words: BTreeMap<u32, u64> = BTreeMap::new();
            for port in ports {
                let Some(offset) = u32::from(*port).checked_sub(u32::from(min)) else {
                    continue;
                };
                if offset < size {
                    *words.entry(offset / 64).or_default() |= 1 << (offset % 64);
                }
            }
            let mut summaries: BTreeMap<u32, u64> = BTreeMap::new();
            for (w, bits) in &words {
                wanted.insert(F::word(backend, *w as u16), *bits);
                let full = nat_ports::word_mask(size, *w);
                if bits & full == full {
                    *summaries.entry(w / 64).or_default() |= 1 << (w % 64);
                }
            }
            for (s, bits) in summaries {
                wanted.insert(F::word(backend, nat_ports::SUMMARY + s as u16), bits);
            }
        }
    }
    for (key, value) in &snapshot.nat_ports {
        let (backend, index) = F::word_of(key);
        if index == nat_ports::DROPS {
            if *value > 0 {
                plan.exhausted.push((backend, *value));
            }
            plan.nat_ports.push((*key, *value, None));
            continue;
        }
        match wanted.remove(key) {
            Some(bits) if bits == *value => {}
            bits => plan.nat_ports.push((*key, *value, bits)),
        }
    }
    // Words the entries call for that the programs never wrote (or lost).
    plan.nat_ports
        .extend(wanted.into_iter().map(|(key, bits)| (key, 0, Some(bits))));
    plan
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proxy_common::Ip4;

    use super::*;

    const S: u64 = 1_000_000_000;
    const TCP: u8 = proto::TCP;
    const UDP: u8 = proto::UDP;
    const MIN: u16 = 62_000;
    const BACKEND: NatBackend = NatBackend {
        addr: IpAddr::V4(Ipv4Addr::new(10, 244, 2, 3)),
        port: 8080,
        proto: TCP,
    };
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 100);
    const NODE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
    const NODE_PORT: u16 = 30090;

    fn be(a: Ipv4Addr) -> Ip4 {
        a.into()
    }

    /// A SNATed flow's forward conntrack entry and NAT entry.
    type Flow = ((CtKey4, CtValue), (CtKey4, Nat4));

    /// A SNATed flow from CLIENT:`client_port` through the NodePort, holding
    /// `nat_port`.
    fn flow(client_port: u16, nat_port: u16, flags: u16, last_seen: u64) -> Flow {
        let forward = CtKey4 {
            saddr: be(CLIENT),
            daddr: be(NODE),
            sport_be: client_port.to_be(),
            dport_be: NODE_PORT.to_be(),
            proto: TCP,
            dir: ct_dir::FORWARD,
            _pad: 0,
        };
        let ct = CtValue {
            backend_id: 1,
            rev_nat_id: 7,
            flags,
            nat_port_be: nat_port.to_be(),
            last_seen_ns: last_seen,
            ..Default::default()
        };
        let IpAddr::V4(backend) = BACKEND.addr else {
            unreachable!()
        };
        let nat_key = CtKey4 {
            saddr: be(backend),
            daddr: be(NODE),
            sport_be: BACKEND.port.to_be(),
            dport_be: nat_port.to_be(),
            proto: TCP,
            dir: ct_dir::NAT,
            _pad: 0,
        };
        let nat = Nat4 {
            client_addr: be(CLIENT),
            rev_nat_id: 7,
            client_port_be: client_port.to_be(),
            flags,
            backend_id: 0,
            last_seen_ns: last_seen,
        };
        ((forward, ct), (nat_key, nat))
    }

    fn snapshot(flows: &[Flow], range: u16) -> Snapshot<V4> {
        Snapshot {
            conntrack: flows.iter().map(|f| f.0).collect(),
            nat: flows.iter().map(|f| f.1).collect(),
            nat_ports: Vec::new(),
            revnat: BTreeMap::from([(
                7,
                RevNat4 {
                    addr: be(NODE),
                    port_be: NODE_PORT.to_be(),
                    _pad: 0,
                },
            )]),
            nat_range: Some((MIN, MIN + range - 1)),
        }
    }

    fn words(plan: &Plan<V4>) -> BTreeMap<u16, Option<u64>> {
        plan.nat_ports
            .iter()
            .map(|(k, _, v)| (k.index, *v))
            .collect()
    }

    #[test]
    fn closed_flows_go_after_the_close_timeout_and_free_their_ports() {
        let now = 1_000 * S;
        let open = flow(40_000, MIN, 0, now - 100 * S);
        let closed = flow(40_001, MIN + 1, ct_flags::CLOSING, now - 3 * S);
        let snap = snapshot(&[open, closed], 200);
        let lifetimes = Lifetimes {
            tcp_closing: Duration::from_secs(2),
        };
        let plan = plan(&snap, now, &lifetimes);
        assert_eq!(plan.conntrack, [closed.0 .0]);
        assert_eq!(plan.nat, [closed.1 .0]);
        assert_eq!(plan.held, BTreeMap::from([(BACKEND, 1)]));
        assert_eq!(words(&plan), BTreeMap::from([(0, Some(0b1))]));
        // With the default close timeout (10 s) both stay.
        let plan = super::plan(&snap, now, &Lifetimes::default());
        assert!(plan.conntrack.is_empty() && plan.nat.is_empty());
        assert_eq!(words(&plan), BTreeMap::from([(0, Some(0b11))]));
    }

    #[test]
    fn the_close_timeout_never_outlives_the_programs_own() {
        let lifetimes = Lifetimes {
            tcp_closing: Duration::from_secs(3_600),
        };
        assert_eq!(
            lifetimes.nanos(TCP, ct_flags::CLOSING),
            ct_lifetime::TCP_CLOSING_SECS * S
        );
        assert_eq!(lifetimes.nanos(TCP, 0), ct_lifetime::TCP_SECS * S);
        assert_eq!(lifetimes.nanos(UDP, 0), ct_lifetime::UDP_SECS * S);
    }

    #[test]
    fn a_nat_entry_without_its_conntrack_entry_goes_after_the_grace() {
        let now = 1_000 * S;
        let (_, orphan) = flow(40_000, MIN, 0, now - 6 * S);
        let (_, young) = flow(40_001, MIN + 1, 0, now - S);
        // A forward entry that names another port (the flow got a new one).
        let (mut moved_ct, moved) = flow(40_002, MIN + 2, 0, now - 6 * S);
        moved_ct.1.nat_port_be = (MIN + 3).to_be();
        let mut snap = snapshot(&[], 200);
        snap.nat = vec![orphan, young, moved];
        snap.conntrack = vec![moved_ct];
        let plan = plan(&snap, now, &Lifetimes::default());
        assert_eq!(plan.nat, [orphan.0, moved.0]);
        assert_eq!(words(&plan), BTreeMap::from([(0, Some(0b10))]));
    }

    #[test]
    fn a_nat_entry_of_a_removed_frontend_is_an_orphan() {
        let now = 1_000 * S;
        let f = flow(40_000, MIN, 0, now - 6 * S);
        let mut snap = snapshot(&[f], 200);
        snap.revnat.clear();
        assert_eq!(plan(&snap, now, &Lifetimes::default()).nat, [f.1 .0]);
    }

    #[test]
    fn stale_bits_are_cleared_and_full_words_summarised() {
        let now = 1_000 * S;
        // 64 live flows fill word 0; word 1 and a summary bit are stale.
        let flows: Vec<_> = (0..64u16)
            .map(|i| flow(40_000 + i, MIN + i, 0, now - S))
            .collect();
        let mut snap = snapshot(&flows, 200);
        snap.nat_ports = vec![
            (V4::word(&BACKEND, 0), u64::MAX),
            (V4::word(&BACKEND, 1), 0b1010),
            (V4::word(&BACKEND, nat_ports::SUMMARY), 0b11),
            (V4::word(&BACKEND, nat_ports::DROPS), 12),
        ];
        let plan = plan(&snap, now, &Lifetimes::default());
        assert_eq!(
            words(&plan),
            BTreeMap::from([
                (1, None),
                (nat_ports::SUMMARY, Some(0b1)),
                (nat_ports::DROPS, None)
            ]),
            "word 0 is right as it is"
        );
        assert_eq!(plan.exhausted, [(BACKEND, 12)]);
        assert_eq!(plan.held, BTreeMap::from([(BACKEND, 64)]));
    }

    #[test]
    fn the_last_word_of_a_range_is_full_at_its_last_port() {
        let now = 1_000 * S;
        // A range of 66 ports: word 1 holds two, and is full with both.
        let flows = [
            flow(40_000, MIN + 64, 0, now),
            flow(40_001, MIN + 65, 0, now),
        ];
        let plan = plan(&snapshot(&flows, 66), now, &Lifetimes::default());
        assert_eq!(
            words(&plan),
            BTreeMap::from([(1, Some(0b11)), (nat_ports::SUMMARY, Some(0b10))])
        );
    }

    #[test]
    fn backends_print_as_address_port_protocol() {
        assert_eq!(BACKEND.to_string(), "10.244.2.3:8080/TCP");
    }

    #[test]
    fn ipv6_conntrack_entries_end_with_their_lifetime() {
        let key = |sport: u16, proto| CtKey6 {
            saddr: [0xfd; 16],
            daddr: [0xfe; 16],
            sport_be: sport.to_be(),
            dport_be: 80u16.to_be(),
            proto,
            dir: ct_dir::FORWARD,
            _pad: 0,
        };
        let seen = |flags, last_seen_ns| CtValue {
            flags,
            last_seen_ns,
            ..CtValue::default()
        };
        let now = 100_000 * S;
        let snapshot = Snapshot::<V6> {
            conntrack: vec![
                (key(1, UDP), seen(0, now - 61 * S)),
                (key(2, UDP), seen(0, now - 59 * S)),
                (key(3, TCP), seen(ct_flags::CLOSING, now - 11 * S)),
                (key(4, TCP), seen(0, now - 11 * S)),
            ],
            ..Snapshot::default()
        };
        let plan = plan(&snapshot, now, &Lifetimes::default());
        assert_eq!(plan.conntrack, [key(1, UDP), key(3, TCP)]);
    }

    #[test]
    fn ipv6_nat_entries_hold_their_ports_until_their_flow_ends() {
        let backend = NatBackend {
            addr: "fd00:10:244:2::3".parse().unwrap(),
            port: 8080,
            proto: TCP,
        };
        let node: Ipv6Addr = "fd00:10:250::11".parse().unwrap();
        let client: Ipv6Addr = "fd00:10:250::100".parse().unwrap();
        let now = 100_000 * S;
        let nat = |client_port: u16, nat_port: u16, last_seen| {
            let IpAddr::V6(b) = backend.addr else {
                unreachable!()
            };
            let key = CtKey6 {
                saddr: b.octets(),
                daddr: node.octets(),
                sport_be: 8080u16.to_be(),
                dport_be: nat_port.to_be(),
                proto: TCP,
                dir: ct_dir::NAT,
                _pad: 0,
            };
            let value = Nat6 {
                client_addr: client.octets(),
                rev_nat_id: 7,
                client_port_be: client_port.to_be(),
                flags: 0,
                last_seen_ns: last_seen,
            };
            (key, value)
        };
        let frontend = RevNat6 {
            addr: node.octets(),
            port_be: 30090u16.to_be(),
            _pad: 0,
        };
        let live = nat(40_000, MIN, now - S);
        let ended = nat(40_001, MIN + 1, now - 7 * 3_600 * S);
        let forward = V6::forward(&live.1, &frontend, TCP);
        let snapshot = Snapshot::<V6> {
            conntrack: vec![(
                forward,
                CtValue {
                    nat_port_be: MIN.to_be(),
                    last_seen_ns: now - S,
                    ..CtValue::default()
                },
            )],
            nat: vec![live, ended],
            nat_ports: vec![(V6::word(&backend, 0), 0b11)],
            revnat: BTreeMap::from([(7, frontend)]),
            nat_range: Some((MIN, MIN + 199)),
        };
        let plan = plan(&snapshot, now, &Lifetimes::default());
        assert_eq!(plan.nat, [ended.0]);
        assert_eq!(plan.held, BTreeMap::from([(backend, 1)]));
        assert_eq!(plan.nat_ports, [(V6::word(&backend, 0), 0b11, Some(0b1))]);
        assert_eq!(backend.to_string(), "[fd00:10:244:2::3]:8080/TCP");
    }
}
