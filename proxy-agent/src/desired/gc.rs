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
    net::Ipv4Addr,
    time::Duration,
};

use proxy_common::{
    ct_dir, ct_flags, ct_lifetime, nat_ports, proto, CtKey4, CtKey6, CtValue, Nat4, NatPortKey4,
    RevNat4,
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
        if proto == proxy_common::proto::TCP && flags & ct_flags::CLOSING != 0 {
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
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl NatBackend {
    fn of_word(key: &NatPortKey4) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from_be(key.backend_addr_be)),
            port: u16::from_be(key.backend_port_be),
            proto: key.proto,
        }
    }

    fn of_nat(key: &CtKey4) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from_be(key.saddr_be)),
            port: u16::from_be(key.sport_be),
            proto: key.proto,
        }
    }

    fn word(&self, index: u16) -> NatPortKey4 {
        NatPortKey4 {
            backend_addr_be: u32::from(self.addr).to_be(),
            backend_port_be: self.port.to_be(),
            proto: self.proto,
            _pad: 0,
            index,
            _pad2: 0,
        }
    }
}

impl fmt::Display for NatBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            proto::TCP => "TCP",
            proto::UDP => "UDP",
            _ => "?",
        };
        write!(f, "{}:{}/{proto}", self.addr, self.port)
    }
}

/// What the maps held when the collection started.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub conntrack: Vec<(CtKey4, CtValue)>,
    /// IPv6 conntrack (no NAT: IPv6 flows are not SNATed).
    pub conntrack6: Vec<(CtKey6, CtValue)>,
    pub nat: Vec<(CtKey4, Nat4)>,
    pub nat_ports: Vec<(NatPortKey4, u64)>,
    pub revnat: BTreeMap<u32, RevNat4>,
    /// The node's NAT port range (`None` while it has none).
    pub nat_range: Option<(u16, u16)>,
}

/// What to change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Conntrack entries that ended.
    pub conntrack: Vec<CtKey4>,
    pub conntrack6: Vec<CtKey6>,
    /// NAT entries whose flow ended.
    pub nat: Vec<CtKey4>,
    /// NAT-port words to write (`Some`) or delete (`None`), with the value
    /// the snapshot had (bits the programs set since are kept).
    pub nat_ports: Vec<(NatPortKey4, u64, Option<u64>)>,
    /// Per backend: new flows dropped for want of a port since the last
    /// collection (their counters are deleted).
    pub exhausted: Vec<(NatBackend, u64)>,
    /// Per backend: ports its remaining NAT entries hold.
    pub held: BTreeMap<NatBackend, u32>,
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
}

/// Decides what goes at `now_ns` (the programs' clock).
pub fn plan(snapshot: &Snapshot, now_ns: u64, lifetimes: &Lifetimes) -> Plan {
    let mut plan = Plan::default();
    let mut forward: HashMap<CtKey4, u16> = HashMap::new();
    for (key, value) in &snapshot.conntrack {
        if lifetimes.expired(now_ns, key.proto, value.flags, value.last_seen_ns) {
            plan.conntrack.push(*key);
        } else if key.dir == ct_dir::FORWARD {
            forward.insert(*key, value.nat_port_be);
        }
    }
    plan.conntrack6 = snapshot
        .conntrack6
        .iter()
        .filter(|(k, v)| lifetimes.expired(now_ns, k.proto, v.flags, v.last_seen_ns))
        .map(|(k, _)| *k)
        .collect();
    let grace = u64::try_from(ORPHAN_GRACE.as_nanos()).unwrap_or(u64::MAX);
    let mut held: BTreeMap<NatBackend, BTreeSet<u16>> = BTreeMap::new();
    for (key, value) in &snapshot.nat {
        let ended = lifetimes.expired(now_ns, key.proto, value.flags, value.last_seen_ns);
        let orphan = now_ns.saturating_sub(value.last_seen_ns) > grace
            && snapshot
                .revnat
                .get(&value.rev_nat_id)
                .is_none_or(|frontend| {
                    let flow = CtKey4 {
                        saddr_be: value.client_addr_be,
                        daddr_be: frontend.addr_be,
                        sport_be: value.client_port_be,
                        dport_be: frontend.port_be,
                        proto: key.proto,
                        dir: ct_dir::FORWARD,
                        _pad: 0,
                    };
                    forward.get(&flow) != Some(&key.dport_be)
                });
        if ended || orphan {
            plan.nat.push(*key);
        } else {
            held.entry(NatBackend::of_nat(key))
                .or_default()
                .insert(u16::from_be(key.dport_be));
        }
    }
    plan.held = held
        .iter()
        .map(|(b, ports)| (*b, ports.len() as u32))
        .collect();

    // The words the remaining entries call for, by backend.
    let mut wanted: BTreeMap<NatPortKey4, u64> = BTreeMap::new();
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
                wanted.insert(backend.word(*w as u16), *bits);
                let full = nat_ports::word_mask(size, *w);
                if bits & full == full {
                    *summaries.entry(w / 64).or_default() |= 1 << (w % 64);
                }
            }
            for (s, bits) in summaries {
                wanted.insert(backend.word(nat_ports::SUMMARY + s as u16), bits);
            }
        }
    }
    for (key, value) in &snapshot.nat_ports {
        if key.index == nat_ports::DROPS {
            if *value > 0 {
                plan.exhausted.push((NatBackend::of_word(key), *value));
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
    use super::*;

    const S: u64 = 1_000_000_000;
    const TCP: u8 = proto::TCP;
    const UDP: u8 = proto::UDP;
    const MIN: u16 = 62_000;
    const BACKEND: NatBackend = NatBackend {
        addr: Ipv4Addr::new(10, 244, 2, 3),
        port: 8080,
        proto: TCP,
    };
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 100);
    const NODE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
    const NODE_PORT: u16 = 30090;

    fn be(a: Ipv4Addr) -> u32 {
        u32::from(a).to_be()
    }

    /// A SNATed flow's forward conntrack entry and NAT entry.
    type Flow = ((CtKey4, CtValue), (CtKey4, Nat4));

    /// A SNATed flow from CLIENT:`client_port` through the NodePort, holding
    /// `nat_port`.
    fn flow(client_port: u16, nat_port: u16, flags: u16, last_seen: u64) -> Flow {
        let forward = CtKey4 {
            saddr_be: be(CLIENT),
            daddr_be: be(NODE),
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
        let nat_key = CtKey4 {
            saddr_be: be(BACKEND.addr),
            daddr_be: be(NODE),
            sport_be: BACKEND.port.to_be(),
            dport_be: nat_port.to_be(),
            proto: TCP,
            dir: ct_dir::NAT,
            _pad: 0,
        };
        let nat = Nat4 {
            client_addr_be: be(CLIENT),
            rev_nat_id: 7,
            client_port_be: client_port.to_be(),
            flags,
            _pad: 0,
            last_seen_ns: last_seen,
        };
        ((forward, ct), (nat_key, nat))
    }

    fn snapshot(flows: &[Flow], range: u16) -> Snapshot {
        Snapshot {
            conntrack: flows.iter().map(|f| f.0).collect(),
            conntrack6: Vec::new(),
            nat: flows.iter().map(|f| f.1).collect(),
            nat_ports: Vec::new(),
            revnat: BTreeMap::from([(
                7,
                RevNat4 {
                    addr_be: be(NODE),
                    port_be: NODE_PORT.to_be(),
                    _pad: 0,
                },
            )]),
            nat_range: Some((MIN, MIN + range - 1)),
        }
    }

    fn words(plan: &Plan) -> BTreeMap<u16, Option<u64>> {
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
            (BACKEND.word(0), u64::MAX),
            (BACKEND.word(1), 0b1010),
            (BACKEND.word(nat_ports::SUMMARY), 0b11),
            (BACKEND.word(nat_ports::DROPS), 12),
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
        let snapshot = Snapshot {
            conntrack6: vec![
                (key(1, UDP), seen(0, now - 61 * S)),
                (key(2, UDP), seen(0, now - 59 * S)),
                (key(3, TCP), seen(ct_flags::CLOSING, now - 11 * S)),
                (key(4, TCP), seen(0, now - 11 * S)),
            ],
            ..Snapshot::default()
        };
        let plan = plan(&snapshot, now, &Lifetimes::default());
        assert_eq!(plan.conntrack6, [key(1, UDP), key(3, TCP)]);
    }
}
