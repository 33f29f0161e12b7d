//! An upgrade over maps an older agent pinned in the previous layouts
//! (`proxy_common::previous`): the new agent's start-up path (load, first
//! pass, the swap, second pass) carries conntrack, NAT, affinity and the
//! frontends with their ids over, and established flows keep their backend
//! and their NAT port through the new programs, byte for byte.

mod support;

use std::{net::Ipv4Addr, path::Path};

use aya::maps::{lpm_trie::Key, LpmTrie, MapData};
use proxy_agent::{
    desired::{self, gc::Lifetimes, Ids, MapState, ServiceKey},
    frontend::{Endpoint, Frontend, FrontendSpec, Protocol, Scheduler},
    harness::{self, Hook},
    kernel::{migrate::Migration, monotonic_ns, Dataplane, MapSizes},
    settings,
};
use proxy_common::{
    ct_dir, hash, map_names, nat_ports, previous,
    program_names::{FROM_POD, TO_POD, UPLINK_TC},
    proto, AffinityKey4, AffinityValue, Backend4, CtKey4, Ip4, NatPortKey4, RevNat4, ServiceKey4,
};
use support::{
    fib::{self, CLIENT, CLIENT_MAC, NODE, NODE2_MAC, NODE_MAC},
    netns::{in_netns, Lab},
    packet::{self, Frame},
    pins,
};

const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;
const ACK: u8 = 0x10;

const POD_CLIENT: &str = "10.244.1.2";
const VIP: &str = "10.96.0.10";
const STICKY_VIP: &str = "10.96.0.60";
const MAGLEV_VIP: &str = "10.96.0.70";
const LB_IP: &str = "203.0.113.5";
const BACKEND_A: &str = "10.244.1.3";
const BACKEND_B: &str = "10.244.1.4";
const BACKEND_C: &str = "10.244.1.5";
const REMOTE_POD: &str = "10.244.2.3";
const NAT_PORTS: (u16, u16) = settings::DEFAULT_NAT_PORTS;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn be(s: &str) -> Ip4 {
    Ip4::new(ip(s))
}

fn service(name: &str, vip: &str, port: u16, endpoints: &[(&str, bool)]) -> FrontendSpec {
    let endpoints = endpoints
        .iter()
        .map(|(a, local)| Endpoint {
            local: *local,
            ..Endpoint::new(ip(a), 8080)
        })
        .collect();
    let frontend = Frontend {
        address: ip(vip).into(),
        port,
        protocol: Protocol::Tcp,
    };
    FrontendSpec::new(name, frontend, endpoints)
}

/// A ClusterIP, an affinity Service, a NodePort to a remote backend, a
/// LoadBalancer IP with source ranges and a Maglev Service: every map the
/// previous layouts had.
fn services() -> Vec<FrontendSpec> {
    let mut sticky = service(
        "sticky",
        STICKY_VIP,
        80,
        &[(BACKEND_A, true), (BACKEND_B, true), (BACKEND_C, true)],
    );
    sticky.affinity_timeout = Some(10_800);
    let mut lb = service("lb", LB_IP, 80, &[(REMOTE_POD, false)]);
    lb.source_ranges = Some(vec!["10.250.0.96/28".parse().unwrap()]);
    let mut maglev = service(
        "maglev",
        MAGLEV_VIP,
        80,
        &[(BACKEND_A, true), (BACKEND_B, true)],
    );
    maglev.scheduler = Some(Scheduler::Maglev);
    vec![
        service("web", VIP, 80, &[(BACKEND_A, true), (BACKEND_B, true)]),
        sticky,
        service("np-remote", NODE, 30090, &[(REMOTE_POD, false)]),
        lb,
        maglev,
    ]
}

/// The id `state` gives the backend `addr:8080`.
fn backend_id(state: &MapState, addr: &str) -> u32 {
    let found = state.backends.iter().find(|(_, b)| b.addr() == ip(addr));
    *found.expect("a backend of the services").0
}

/// The id `state` gives the TCP frontend `addr:port`.
fn frontend_id(state: &MapState, addr: &str, port: u16) -> u32 {
    state.services[&ServiceKey::new(ip(addr), port, proto::TCP, 0)].rev_nat_id
}

/// The backend a new flow `f` hashes to (flow-hash scheduler).
fn hashed_backend(state: &MapState, f: &Frame) -> u32 {
    let key = |slot| ServiceKey::new(f.daddr, f.dport, f.proto, slot);
    let count = state.services[&key(0)].count;
    let h = f.flow_hash();
    state.services[&key(hash::slot_for(h, count))].backend_id
}

/// The NAT port a new flow `f` would take first.
fn hashed_nat_port(f: &Frame) -> u16 {
    let h = f.flow_hash();
    NAT_PORTS.0 + (h % u32::from(NAT_PORTS.1 - NAT_PORTS.0 + 1)) as u16
}

/// A backend of `choices` other than `not`.
fn other_than(state: &MapState, choices: &[&str], not: u32) -> (u32, Ipv4Addr) {
    let addr = choices
        .iter()
        .find(|a| backend_id(state, a) != not)
        .unwrap();
    (backend_id(state, addr), ip(addr))
}

fn forward_key(f: &Frame) -> CtKey4 {
    CtKey4 {
        saddr: Ip4::new(f.saddr4()),
        daddr: Ip4::new(f.daddr4()),
        sport_be: f.sport.to_be(),
        dport_be: f.dport.to_be(),
        proto: f.proto,
        dir: ct_dir::FORWARD,
        _pad: 0,
    }
}

/// The reply direction's key of `f`, answered by `backend:8080`.
fn reply_key(f: &Frame, backend: Ipv4Addr) -> CtKey4 {
    CtKey4 {
        saddr: Ip4::new(backend),
        daddr: Ip4::new(f.saddr4()),
        sport_be: 8080u16.to_be(),
        dport_be: f.sport.to_be(),
        proto: f.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    }
}

/// A `ct4_v2` value.
fn old_ct(backend_id: u32, rev_nat_id: u32, nat_port: u16, now: u64) -> previous::CtValue4 {
    previous::CtValue4 {
        backend_id,
        rev_nat_id: u16::try_from(rev_nat_id).unwrap(),
        nat_port_be: nat_port.to_be(),
        last_seen_ns: now,
        ..Default::default()
    }
}

/// Pins the maps an agent of the previous layouts leaves with `state`
/// programmed (backend4_v1, a hash map, where backend4_v2 is an array), and a
/// `nat4_v1`, two versions old, that cannot be carried over.
fn pin_previous_agent(dir: &Path, state: &MapState) {
    std::fs::create_dir_all(dir).unwrap();
    pins::create(dir, previous::names::SERVICES_V4, "hash", 12, 12, None);
    pins::create(dir, previous::names::REVNAT_V4, "hash", 2, 8, None);
    pins::create(dir, previous::names::CONNTRACK_V4, "lru_hash", 16, 24, None);
    pins::create(dir, previous::names::NAT_V4, "lru_hash", 16, 24, None);
    pins::create(dir, previous::names::AFFINITY_V4, "lru_hash", 8, 16, None);
    pins::create(dir, previous::names::MAGLEV_V4, "hash", 8, 4, None);
    pins::create(
        dir,
        previous::names::SOURCE_RANGES_V4,
        "lpm_trie",
        12,
        1,
        Some("1"),
    );
    pins::create(dir, "nat4_v1", "lru_hash", 16, 16, None);
    pins::previous_backends(
        dir,
        state
            .backends
            .iter()
            .map(|(&id, b)| (id, b.kernel(id).v4().unwrap())),
    );
    let mut svc =
        pins::hash::<ServiceKey4, previous::ServiceValue>(dir, previous::names::SERVICES_V4);
    for (k, v) in &state.services {
        let old = previous::ServiceValue {
            backend_id: v.backend_id,
            count: v.count,
            rev_nat_id: u16::try_from(v.rev_nat_id).unwrap(),
            flags: v.flags,
            maglev_size: v.maglev_size,
        };
        svc.insert(k.kernel().v4().unwrap(), old, 0).unwrap();
    }
    let mut revnat = pins::hash::<u16, RevNat4>(dir, previous::names::REVNAT_V4);
    for (id, r) in &state.revnat {
        revnat
            .insert(u16::try_from(*id).unwrap(), r.kernel().v4().unwrap(), 0)
            .unwrap();
    }
    let mut maglev = pins::hash::<previous::MaglevKey4, u32>(dir, previous::names::MAGLEV_V4);
    for (k, backend) in &state.maglev {
        let old = previous::MaglevKey4 {
            rev_nat_id: u16::try_from(k.rev_nat_id).unwrap(),
            _pad: 0,
            index: k.index,
        };
        maglev.insert(old, backend, 0).unwrap();
    }
    let mut ranges: LpmTrie<MapData, previous::SourceRange4, u8> =
        LpmTrie::try_from(pins::open(dir, previous::names::SOURCE_RANGES_V4)).unwrap();
    for range in &state.source_ranges {
        let (prefix, data) = range.kernel().v4().unwrap();
        let old = previous::SourceRange4 {
            rev_nat_id_be: u16::try_from(u32::from_be(data.rev_nat_id_be))
                .unwrap()
                .to_be(),
            _pad: 0,
            addr_be: data.addr.raw(),
        };
        ranges.insert(&Key::new(prefix, old), 1, 0).unwrap();
    }
}

/// The client's ACK from outside the node, to the NodePort.
fn from_outside(sport: u16) -> Frame {
    let mut f = Frame::tcp(CLIENT, sport, NODE, 30090);
    f.tcp_flags = ACK;
    f.src_mac = CLIENT_MAC;
    f.dst_mac = NODE_MAC;
    f
}

#[test]
fn an_upgrade_carries_flows_affinity_and_ids_over_and_unpins_the_old_maps() {
    support::require_root();
    let mut lab = Lab::new("mig");
    let (ns, ifindex) = fib::namespace(&mut lab);
    let dir = lab.pin_dir.clone();
    in_netns(&ns, move || upgrade(&dir, ifindex));
    lab.teardown();
    lab.assert_gone();
}

fn upgrade(dir: &Path, ifindex: u32) {
    let services = services();
    let (state, problems) = desired::map_state(&services, &mut Ids::default());
    assert!(problems.is_empty(), "{problems:?}");
    pin_previous_agent(dir, &state);
    let now = monotonic_ns();
    let mut ct = pins::hash::<CtKey4, previous::CtValue4>(dir, previous::names::CONNTRACK_V4);

    // A ClusterIP flow on the backend its hash does not pick: only its
    // conntrack entries keep it there.
    let mut web = Frame::tcp(POD_CLIENT, 40000, VIP, 80);
    web.tcp_flags = ACK;
    let web_id = frontend_id(&state, VIP, 80);
    let (kept, kept_addr) = other_than(
        &state,
        &[BACKEND_A, BACKEND_B],
        hashed_backend(&state, &web),
    );
    ct.insert(forward_key(&web), old_ct(kept, web_id, 0, now), 0)
        .unwrap();
    ct.insert(reply_key(&web, kept_addr), old_ct(kept, web_id, 0, now), 0)
        .unwrap();

    // A NodePort flow SNATed to a remote backend, on a NAT port its hash
    // does not pick.
    let np = from_outside(40001);
    let np_id = frontend_id(&state, NODE, 30090);
    let remote = backend_id(&state, REMOTE_POD);
    let nat_port = if hashed_nat_port(&np) == NAT_PORTS.1 {
        NAT_PORTS.0
    } else {
        hashed_nat_port(&np) + 1
    };
    ct.insert(forward_key(&np), old_ct(remote, np_id, nat_port, now), 0)
        .unwrap();
    let nat_key = CtKey4 {
        saddr: be(REMOTE_POD),
        daddr: be(NODE),
        sport_be: 8080u16.to_be(),
        dport_be: nat_port.to_be(),
        proto: proto::TCP,
        dir: ct_dir::NAT,
        _pad: 0,
    };
    let old_nat = previous::Nat4 {
        client_addr_be: be(CLIENT).raw(),
        rev_nat_id: np_id,
        client_port_be: 40001u16.to_be(),
        _pad: [0; 3],
        last_seen_ns: now,
    };
    pins::hash(dir, previous::names::NAT_V4)
        .insert(nat_key, old_nat, 0)
        .unwrap();

    // The affinity Service's client, affine to a backend its next
    // connection would not hash to.
    let sticky_id = frontend_id(&state, STICKY_VIP, 80);
    let next = Frame::tcp(POD_CLIENT, 43000, STICKY_VIP, 80);
    let (affine, affine_addr) = other_than(
        &state,
        &[BACKEND_A, BACKEND_B, BACKEND_C],
        hashed_backend(&state, &next),
    );
    let old_affinity_key = previous::AffinityKey4 {
        client_addr_be: be(POD_CLIENT).raw(),
        rev_nat_id: u16::try_from(sticky_id).unwrap(),
        _pad: 0,
    };
    let affinity = AffinityValue {
        backend_id: affine,
        _pad: 0,
        last_used_ns: now,
    };
    pins::hash(dir, previous::names::AFFINITY_V4)
        .insert(old_affinity_key, affinity, 0)
        .unwrap();

    // The new agent's start-up: load with today's maps pinned beside the
    // old ones (config_v1 did not change: it stands for the adopted one).
    let mut dp = Dataplane::load_pinned(
        dir,
        &Default::default(),
        true,
        proxy_agent::kernel::diag::LogLevel::ALL,
    )
    .expect("load the new programs");
    dp.set_config(&settings::node_config(
        Some(ip(NODE)),
        None,
        NAT_PORTS,
        Default::default(),
    ))
    .unwrap();
    let mut migration = Migration::begin(&mut dp, dir).expect("first pass");
    assert_eq!(
        migration
            .report
            .failed
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>(),
        ["nat4_v1"],
        "named, with its reason: {:?}",
        migration.report.failed
    );

    // Between the passes the old programs still run: one opens a flow, one
    // refreshes the NodePort flow. And the new programs (here run by hand,
    // as they would be once attached) open a flow whose tuple the old ones
    // also opened, to another backend: theirs must stand.
    let late = Frame::tcp(POD_CLIENT, 40002, VIP, 80);
    ct.insert(forward_key(&late), old_ct(kept, web_id, 0, now), 0)
        .unwrap();
    ct.insert(
        forward_key(&np),
        old_ct(remote, np_id, nat_port, now + 1),
        0,
    )
    .unwrap();
    // The pod interfaces are swapped, the uplinks not yet: a pass between
    // the two carries the late flow, so that its reply, which meets a new
    // program, finds it.
    let mut p = harness::Programs::with(dp).unwrap();
    migration.carry_flows(&mut p.dp);
    let ct_between: std::collections::HashMap<CtKey4, _> =
        p.dp.conntrack().unwrap().into_iter().collect();
    assert_eq!(ct_between[&forward_key(&late)].backend_id, kept);
    assert_eq!(ct_between[&forward_key(&np)].last_seen_ns, now + 1);
    // And after it, the old uplink programs still open flows.
    let later = Frame::tcp(POD_CLIENT, 40004, VIP, 80);
    ct.insert(forward_key(&later), old_ct(kept, web_id, 0, now), 0)
        .unwrap();
    let both = Frame::tcp(POD_CLIENT, 40003, VIP, 80);
    let (verdict, _) = send(&mut p, Hook::Tc(FROM_POD, None), &both);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let new_programs_choice = hashed_backend(&state, &both);
    let (old_programs_choice, _) = other_than(&state, &[BACKEND_A, BACKEND_B], new_programs_choice);
    ct.insert(
        forward_key(&both),
        old_ct(old_programs_choice, web_id, 0, now),
        0,
    )
    .unwrap();

    let report = migration.finish(&mut p.dp, &Lifetimes::default());
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    let carried: std::collections::BTreeMap<_, _> = report.carried.into_iter().collect();
    assert_eq!(
        carried["ct4_v2"],
        3 + 2 + 1,
        "three, then a late flow and a refresh, then a later flow"
    );
    assert_eq!(carried["nat4_v2"], 1);
    assert_eq!(carried["affinity4_v1"], 1);
    assert_eq!(carried["svc4_v1"], state.services.len());

    // (a) The new maps hold the converted entries; the ids are the old ones:
    // the first round after the upgrade has nothing to rewrite.
    let found = p.dp.read_state().unwrap();
    assert_eq!(found, state, "frontends, backends and ids carried over");
    let mut ids = Ids::from_state(&found);
    let (wanted, _) = desired::map_state(&services, &mut ids);
    assert_eq!(desired::diff(&wanted, &found), []);
    let ct_now: std::collections::HashMap<CtKey4, _> =
        p.dp.conntrack().unwrap().into_iter().collect();
    assert_eq!(ct_now[&forward_key(&web)].backend_id, kept);
    assert_eq!(
        ct_now[&forward_key(&late)].backend_id,
        kept,
        "the late flow"
    );
    assert_eq!(
        ct_now[&forward_key(&later)].backend_id,
        kept,
        "the later flow"
    );
    assert_eq!(
        ct_now[&forward_key(&both)].backend_id,
        new_programs_choice,
        "the new programs' entry stands"
    );
    let np_entry = ct_now[&forward_key(&np)];
    assert_eq!(
        (np_entry.nat_port_be, np_entry.last_seen_ns),
        (nat_port.to_be(), now + 1),
        "the refresh since the first pass"
    );
    assert_eq!(p.dp.nat().unwrap(), [(nat_key, previous::nat(old_nat))]);
    let affinity_key = AffinityKey4 {
        client_addr: be(POD_CLIENT),
        rev_nat_id: sticky_id,
    };
    assert_eq!(p.dp.affinity().unwrap(), [(affinity_key, affinity)]);
    // natport4_v1 came after nat4_v2: the bitmap is rebuilt from the NAT entry.
    let offset = nat_port - NAT_PORTS.0;
    let word = NatPortKey4 {
        backend_addr: be(REMOTE_POD),
        backend_port_be: 8080u16.to_be(),
        proto: proto::TCP,
        _pad: 0,
        index: offset / 64,
        _pad2: 0,
    };
    let bits =
        p.dp.nat_ports()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == word);
    assert_eq!(
        bits.map(|(_, b)| b & (1 << (offset % 64))),
        Some(1 << (offset % 64))
    );
    assert!(word.index < nat_ports::WORDS);

    // (b) Packets of the established flows take the carried entries.
    let (verdict, out) = send(&mut p, Hook::Tc(FROM_POD, None), &web);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(
        out,
        web.with_dst(kept_addr, 8080).bytes(),
        "the same backend"
    );
    let reply = web.with_dst(kept_addr, 8080).reply();
    let (verdict, out) = send(&mut p, Hook::Tc(TO_POD, None), &reply);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, reply.with_src(ip(VIP), 80).bytes());

    let (verdict, out) = send(&mut p, Hook::Tc(UPLINK_TC, Some(ifindex)), &np);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut snated = np
        .with_dst(ip(REMOTE_POD), 8080)
        .with_src(ip(NODE), nat_port);
    snated.src_mac = NODE_MAC;
    snated.dst_mac = NODE2_MAC;
    assert_eq!(out, snated.bytes(), "the same backend and NAT port");
    let mut back = snated.reply();
    back.src_mac = NODE2_MAC;
    back.dst_mac = NODE_MAC;
    let (verdict, out) = send(&mut p, Hook::Tc(UPLINK_TC, Some(ifindex)), &back);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut to_client = back.with_dst(ip(CLIENT), 40001).with_src(ip(NODE), 30090);
    to_client.src_mac = NODE_MAC;
    to_client.dst_mac = CLIENT_MAC;
    assert_eq!(
        out,
        to_client.bytes(),
        "translated back by the carried NAT entry"
    );

    let (verdict, out) = send(&mut p, Hook::Tc(FROM_POD, None), &next);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(
        out,
        next.with_dst(affine_addr, 8080).bytes(),
        "a new connection of the affine client"
    );

    // (c) The old pins are gone; today's stay.
    for (old, _) in previous::names::ALL.into_iter().chain([("nat4_v1", "")]) {
        assert!(!dir.join(old).exists(), "{old} still pinned");
    }
    for name in map_names::ALL {
        assert!(dir.join(name).exists(), "{name} not pinned");
    }
}

/// Runs `f` through `hook`, checks the checksums of what comes out.
fn send(p: &mut harness::Programs, hook: Hook<'_>, f: &Frame) -> (u32, Vec<u8>) {
    let run = p.run(hook, &f.bytes()).expect("test run");
    packet::assert_checksums_valid(&run.frame);
    (run.verdict, run.frame)
}

/// An old map whose layout is not the one its name says is named with the
/// reason, its new map starts empty, its pin goes, and the others are carried.
#[test]
fn a_map_that_does_not_convert_is_named_and_the_others_are_carried() {
    support::require_root();
    let lab = Lab::new("migbad");
    let dir = lab.pin_dir.clone();
    std::fs::create_dir_all(&dir).unwrap();
    // An affinity map with 12-byte keys: neither layout of its name.
    pins::create(&dir, previous::names::AFFINITY_V4, "lru_hash", 12, 16, None);
    pins::create(
        &dir,
        previous::names::CONNTRACK_V4,
        "lru_hash",
        16,
        24,
        None,
    );
    let key = CtKey4 {
        saddr: be(POD_CLIENT),
        daddr: be(VIP),
        sport_be: 40000u16.to_be(),
        dport_be: 80u16.to_be(),
        proto: proto::TCP,
        dir: ct_dir::FORWARD,
        _pad: 0,
    };
    let old = old_ct(3, 1, 0, monotonic_ns());
    pins::hash(&dir, previous::names::CONNTRACK_V4)
        .insert(key, old, 0)
        .unwrap();

    let mut dp = Dataplane::load_pinned(
        &dir,
        &Default::default(),
        true,
        proxy_agent::kernel::diag::LogLevel::ALL,
    )
    .expect("load the new programs");
    let migration = Migration::begin(&mut dp, &dir).expect("first pass");
    let report = migration.finish(&mut dp, &Lifetimes::default());
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    let (name, reason) = &report.failed[0];
    assert_eq!(name, previous::names::AFFINITY_V4);
    assert!(reason.contains("not the one its name says"), "{reason}");
    assert_eq!(dp.affinity().unwrap(), []);
    assert_eq!(dp.conntrack().unwrap(), [(key, previous::conntrack(old))]);
    assert!(!dir.join(previous::names::AFFINITY_V4).exists());
    assert!(!dir.join(previous::names::CONNTRACK_V4).exists());
    drop(dp);
    drop(lab);
    assert!(!dir.exists());
}

/// Maps pinned with other sizes than the agent is asked for (a changed
/// `--map-*` flag) are never reused as they are: the agent sets each aside,
/// makes one of the new size and carries the entries into it. Entries that do
/// not fit a smaller map are named; the ones that fit are carried.
#[test]
fn maps_pinned_with_another_size_are_carried_into_maps_of_the_new_size() {
    support::require_root();
    let lab = Lab::new("migsize");
    let dir = lab.pin_dir.clone();
    let flows: Vec<(CtKey4, proxy_common::CtValue)> = (0..40u16)
        .map(|i| {
            let key = CtKey4 {
                saddr: be(POD_CLIENT),
                daddr: be(VIP),
                sport_be: (40000 + i).to_be(),
                dport_be: 80u16.to_be(),
                proto: proto::TCP,
                dir: ct_dir::FORWARD,
                _pad: 0,
            };
            let value = proxy_common::CtValue {
                backend_id: 1 + u32::from(i % 3),
                rev_nat_id: 1,
                last_seen_ns: monotonic_ns(),
                ..Default::default()
            };
            (key, value)
        })
        .collect();
    let backends: Vec<(u32, Backend4)> = (1..=20u32)
        .map(|id| {
            let backend = Backend4 {
                addr: Ip4::new(Ipv4Addr::new(10, 244, 1, id as u8)),
                port_be: 8080u16.to_be(),
                proto: proto::TCP,
                ..Default::default()
            };
            (id, backend)
        })
        .collect();
    // A statistics array of an agent that had fewer counters.
    std::fs::create_dir_all(&dir).unwrap();
    pins::create(&dir, map_names::STATS, "percpu_array", 4, 16, None);
    {
        let dp = Dataplane::load_pinned(
            &dir,
            &Default::default(),
            true,
            proxy_agent::kernel::diag::LogLevel::ALL,
        )
        .expect("load");
        let mut ct = pins::hash::<CtKey4, proxy_common::CtValue>(&dir, map_names::CONNTRACK_V4);
        for (key, value) in &flows {
            ct.insert(key, value, 0).unwrap();
        }
        let mut table = pins::array::<Backend4>(&dir, map_names::BACKENDS_V4);
        for (id, backend) in &backends {
            table
                .set(
                    *id,
                    Backend4 {
                        id: *id,
                        ..*backend
                    },
                    0,
                )
                .unwrap();
        }
        let mut revnat = pins::hash::<u32, RevNat4>(&dir, map_names::REVNAT_V4);
        for id in 1..=5u32 {
            let frontend = RevNat4 {
                addr: be(VIP),
                port_be: (80 + id as u16).to_be(),
                _pad: 0,
            };
            revnat.insert(id, frontend, 0).unwrap();
        }
        drop(dp);
    }
    let max_entries = |name: &str| {
        MapData::from_pin(dir.join(name))
            .unwrap()
            .info()
            .unwrap()
            .max_entries()
    };
    assert_eq!(
        max_entries(map_names::CONNTRACK_V4),
        proxy_common::capacity::CONNTRACK
    );

    // Conntrack grows room; the backends map shrinks below what it holds;
    // the reverse-NAT maps follow --map-frontends, IPv6 conntrack IPv4's.
    let sizes = MapSizes {
        conntrack: 1024,
        backends: 16,
        frontends: 64,
        ..Default::default()
    };
    let mut dp =
        Dataplane::load_pinned(&dir, &sizes, true, proxy_agent::kernel::diag::LogLevel::ALL)
            .expect("load with new sizes");
    let aside = |name: &str| dir.join(format!("{name}{}", previous::RESIZED_SUFFIX));
    assert!(aside(map_names::CONNTRACK_V4).exists());
    assert!(aside(map_names::BACKENDS_V4).exists());
    assert!(
        !aside(map_names::SERVICES_V4).exists(),
        "its size did not change"
    );
    let migration = Migration::begin(&mut dp, &dir).expect("first pass");
    let report = migration.finish(&mut dp, &Lifetimes::default());

    assert_eq!(max_entries(map_names::CONNTRACK_V4), 1024);
    assert_eq!(max_entries(map_names::CONNTRACK_V6), 256);
    assert_eq!(max_entries(map_names::BACKENDS_V4), 16);
    assert_eq!(max_entries(map_names::REVNAT_V4), 64);
    assert_eq!(max_entries(map_names::ROUND_ROBIN), 64);
    assert_eq!(
        dp.read_state().unwrap().revnat.len(),
        5,
        "every frontend carried"
    );
    let mut carried = dp.conntrack().unwrap();
    carried.sort_by_key(|(k, _)| u16::from_be(k.sport_be));
    assert_eq!(carried, flows, "every flow carried, as it was");
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    let (name, reason) = &report.failed[0];
    assert_eq!(
        *name,
        format!("{}{}", map_names::BACKENDS_V4, previous::RESIZED_SUFFIX)
    );
    // Ids 1 to 16 have slots of their own in 16; 17 to 20 would share
    // 1 to 4's.
    assert!(
        reason.contains("backends [17, 18, 19, 20]") && reason.contains("(16 were carried)"),
        "{reason}"
    );
    assert_eq!(dp.read_state().unwrap().backends.len(), 16);
    assert!(!aside(map_names::CONNTRACK_V4).exists(), "the old pins go");
    assert!(!aside(map_names::BACKENDS_V4).exists());
    assert!(!aside(map_names::STATS).exists(), "counters start again");
    assert_eq!(max_entries(map_names::STATS), proxy_common::stats::COUNT);

    // Started again with the same sizes: nothing is set aside.
    drop(dp);
    let dp = Dataplane::load_pinned(&dir, &sizes, true, proxy_agent::kernel::diag::LogLevel::ALL)
        .expect("load again");
    assert!(!aside(map_names::CONNTRACK_V4).exists());
    assert_eq!(dp.conntrack().unwrap().len(), flows.len());
    drop(dp);
    drop(lab);
    assert!(!dir.exists());
}
