//! IPv6 on the pod hooks, byte for byte: DNAT and reverse NAT for TCP and
//! UDP, extension headers walked, fragments and waypoints left alone, a
//! frontend without backends rejected with ICMPv6, hairpin, what is no
//! frontend's, backend changes, the Local policy, conntrack lifetimes. The maps are
//! programmed as the agent programs them, IPv4 and IPv6 frontends together.

use std::net::Ipv6Addr;

use proxy_agent::frontend::Scheduler;
use proxy_common::{proto::TCP, CtKey6, HAIRPIN_ADDR6};

use super::*;

const CLIENT6: &str = "fd00:10:244:1::2";
const VIP6: &str = "fd00:10:96::10";
const EMPTY_VIP6: &str = "fd00:10:96::11";
const BACKEND6_A: &str = "fd00:10:244:1::3";
const BACKEND6_B: &str = "fd00:10:244:2::3";

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// The IPv4 cluster, and its IPv6 twin.
fn dual_stack() -> Programs {
    Programs::new(&dual_stack_services(|_| {}))
}

/// Sends `f` from the pod: DNATed to its hashed backend, then the
/// backend's reply towards the pod: from the frontend again. Byte for byte.
fn round_trip(p: &mut Programs, f: &Frame) -> (std::net::IpAddr, u16) {
    let backend = p.hashed(f);
    let (verdict, out) = p.send_from_pod(f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let dnated = f.with_dst(backend.0, backend.1);
    assert_eq!(out, dnated.bytes(), "DNAT to {backend:?}");
    packet::assert_checksums_valid(&out);
    let reply = dnated.reply();
    let (verdict, out) = p.send_to_pod(&reply);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, reply.with_src(f.daddr, f.dport).bytes(), "reverse NAT");
    packet::assert_checksums_valid(&out);
    backend
}

fn conntrack6(p: &Programs) -> Vec<(CtKey6, proxy_common::CtValue)> {
    p.dp.v6.conntrack.iter().map(Result::unwrap).collect()
}

const WEB: [(&str, u16); 2] = [(BACKEND6_A, 8080), (BACKEND6_B, 8080)];
const DNS: [(&str, u16); 2] = [(BACKEND6_A, 5353), (BACKEND6_B, 5353)];

#[test]
fn tcp_to_an_ipv6_clusterip_is_dnated_and_its_reply_reverse_nated() {
    let mut p = dual_stack();
    let f = Frame::tcp(CLIENT6, 40000, VIP6, 80);
    let backend = round_trip(&mut p, &f);
    assert_eq!(p.stat("fwd_new"), 1);
    assert_eq!(p.stat("rev_nat"), 1);
    let entries = conntrack6(&p);
    assert_eq!(entries.len(), 2, "forward and reply entries");
    let forward = CtKey6 {
        saddr: ip6(CLIENT6).octets(),
        daddr: ip6(VIP6).octets(),
        sport_be: 40000u16.to_be(),
        dport_be: 80u16.to_be(),
        proto: TCP,
        dir: ct_dir::FORWARD,
        _pad: 0,
    };
    let (_, value) = entries
        .iter()
        .find(|(k, _)| *k == forward)
        .expect("forward entry");
    let slot0 = ServiceKey::new(ip6(VIP6), 80, TCP, 0);
    assert_eq!(
        value.rev_nat_id,
        p.programmed.applied.services[&slot0].rev_nat_id
    );
    let std::net::IpAddr::V6(backend_addr) = backend.0 else {
        panic!("an IPv4 backend for an IPv6 frontend")
    };
    let reply = CtKey6 {
        saddr: backend_addr.octets(),
        daddr: ip6(CLIENT6).octets(),
        sport_be: backend.1.to_be(),
        dport_be: 40000u16.to_be(),
        proto: TCP,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    assert!(entries.iter().any(|(k, _)| *k == reply), "reply entry");
    assert!(
        p.dp.conntrack().unwrap().is_empty(),
        "nothing in IPv4's map"
    );
}

#[test]
fn an_established_ipv6_flow_keeps_its_backend() {
    let mut p = dual_stack();
    let f = Frame::tcp(CLIENT6, 40001, VIP6, 80);
    let first = round_trip(&mut p, &f);
    let mut ack = f.clone();
    ack.tcp_flags = 0x10;
    ack.payload = b"GET / HTTP/1.1\r\n\r\n!".to_vec();
    let (verdict, out) = p.send_from_pod(&ack);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, ack.with_dst(first.0, first.1).bytes());
    assert_eq!(p.stat("fwd_established"), 1);
}

#[test]
fn udp_to_an_ipv6_clusterip_is_dnated_and_its_reply_reverse_nated() {
    let mut p = dual_stack();
    round_trip(&mut p, &Frame::udp(CLIENT6, 41000, VIP6, 53));
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_l4_header() {
    let mut p = dual_stack();
    let mut f = Frame::tcp(CLIENT6, 40002, VIP6, 80);
    f.ext6 = vec![packet::HOP_BY_HOP, packet::DEST_OPTS, packet::ROUTING];
    round_trip(&mut p, &f);
    let mut u = Frame::udp(CLIENT6, 41002, VIP6, 53);
    u.ext6 = vec![packet::DEST_OPTS];
    round_trip(&mut p, &u);
}

#[test]
fn ipv6_fragments_and_waypoints_are_untouched() {
    let mut p = dual_stack();
    let mut fragment = Frame::udp(CLIENT6, 41003, VIP6, 53);
    fragment.ext6 = vec![packet::FRAGMENT];
    assert_untouched(&mut p, FROM_POD, &fragment.bytes(), TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_fragment"), 1);
    // A routing header with a segment left: the frontend is a waypoint,
    // not the packet's destination.
    let mut routed = Frame::tcp(CLIENT6, 40003, VIP6, 80);
    routed.ext6 = vec![packet::ROUTING];
    routed.segments_left = 1;
    assert_untouched(&mut p, FROM_POD, &routed.bytes(), TC_ACT_UNSPEC);
    // Past the walk's bound: five headers.
    let mut deep = Frame::tcp(CLIENT6, 40004, VIP6, 80);
    deep.ext6 = vec![packet::DEST_OPTS; 5];
    assert_untouched(&mut p, FROM_POD, &deep.bytes(), TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_not_tcp_udp"), 2);
    assert!(conntrack6(&p).is_empty());
}

#[test]
fn an_ipv6_frontend_without_backends_is_rejected_with_icmpv6_port_unreachable() {
    let mut p = dual_stack();
    for f in [Frame::tcp(CLIENT6, 40005, EMPTY_VIP6, 80), {
        let mut f = Frame::tcp(CLIENT6, 40006, EMPTY_VIP6, 80);
        f.ext6 = vec![packet::HOP_BY_HOP];
        f
    }] {
        let (verdict, out) = p.send_from_pod(&f);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, packet::port_unreachable(&f));
        packet::assert_checksums_valid(&out);
    }
    assert_eq!(p.stat("reject_no_backend"), 2);
}

#[test]
fn an_ipv6_pod_that_reaches_itself_is_hairpinned() {
    let mut p = dual_stack();
    // The client is the backend the flow hashes to.
    let f = (40010..)
        .map(|port| Frame::tcp(BACKEND6_A, port, VIP6, 80))
        .find(|f| p.hashed(f).0 == ip6(BACKEND6_A))
        .unwrap();
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_REDIRECT, "back out into the pod");
    let hairpin = Ipv6Addr::from(HAIRPIN_ADDR6);
    let mut to_itself = f.with_dst(ip6(BACKEND6_A), 8080).with_src(hairpin, f.sport);
    (to_itself.src_mac, to_itself.dst_mac) = (f.dst_mac, f.src_mac);
    assert_eq!(out, to_itself.bytes());
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("fwd_hairpin"), 1);
    // The pod answers the hairpin address; that comes back from the frontend.
    let mut reply = to_itself.reply();
    (reply.src_mac, reply.dst_mac) = (f.src_mac, f.dst_mac);
    let (verdict, out) = p.send_from_pod(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut back = reply
        .with_dst(ip6(BACKEND6_A), f.sport)
        .with_src(ip6(VIP6), 80);
    (back.src_mac, back.dst_mac) = (f.dst_mac, f.src_mac);
    assert_eq!(out, back.bytes());
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("rev_nat"), 1);
}

/// The IPv4 cluster and its IPv6 twin, `web6` changed by `change`.
fn dual_stack_services(change: impl FnOnce(&mut FrontendSpec)) -> Vec<FrontendSpec> {
    let mut services = cluster();
    let mut web6 = service("web6", VIP6, 80, Protocol::Tcp, &WEB);
    change(&mut web6);
    services.extend([
        web6,
        service("dns6", VIP6, 53, Protocol::Udp, &DNS),
        service("empty6", EMPTY_VIP6, 80, Protocol::Tcp, &[]),
    ]);
    services
}

#[test]
fn ipv6_packets_to_no_frontend_are_untouched() {
    let mut p = dual_stack();
    for f in [
        // Not a Service address; a Service address on another port, and
        // with another protocol.
        Frame::tcp(CLIENT6, 40100, BACKEND6_B, 8080),
        Frame::tcp(CLIENT6, 40101, VIP6, 443),
        Frame::udp(CLIENT6, 40102, VIP6, 80),
        Frame::tcp(CLIENT6, 40103, VIP6, 53),
    ] {
        assert_untouched(&mut p, FROM_POD, &f.bytes(), TC_ACT_UNSPEC);
    }
    assert_eq!(p.stat("pass_not_service"), 4);
    assert!(conntrack6(&p).is_empty());
}

#[test]
fn an_ipv6_frontend_served_no_more_passes_and_its_flows_replies_are_dropped() {
    let mut p = dual_stack();
    let f = Frame::tcp(CLIENT6, 40110, VIP6, 80);
    let backend = round_trip(&mut p, &f);
    // web6 goes: its frontend passes new packets, and a reply of the flow
    // it had has no frontend to come from.
    let mut without = dual_stack_services(|_| {});
    without.retain(|s| s.name != "web6");
    p.serve(&without);
    let next = Frame::tcp(CLIENT6, 40111, VIP6, 80);
    assert_untouched(&mut p, FROM_POD, &next.bytes(), TC_ACT_UNSPEC);
    let reply = f.with_dst(backend.0, backend.1).reply();
    assert_untouched(&mut p, TO_POD, &reply.bytes(), TC_ACT_SHOT);
    assert_eq!(p.stat("drop_no_revnat"), 1);
}

#[test]
fn an_ipv6_reply_without_conntrack_is_untouched() {
    let mut p = dual_stack();
    let stray = Frame::tcp(BACKEND6_A, 8080, CLIENT6, 40120);
    assert_untouched(&mut p, TO_POD, &stray.bytes(), TC_ACT_UNSPEC);
}

#[test]
fn an_ipv6_flow_moves_when_its_backend_is_removed() {
    let mut p = dual_stack();
    let f = (40200..40300)
        .map(|port| Frame::tcp(CLIENT6, port, VIP6, 80))
        .find(|f| p.hashed(f).0 == ip6(BACKEND6_A))
        .unwrap();
    round_trip(&mut p, &f);
    p.serve(&dual_stack_services(|web6| {
        web6.endpoints.remove(0);
    }));
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, f.with_dst(ip6(BACKEND6_B), 8080).bytes());
}

#[test]
fn new_ipv6_flows_spread_over_all_backends() {
    let mut p = dual_stack();
    let mut on_a = 0;
    for port in 42000..42064 {
        if round_trip(&mut p, &Frame::tcp(CLIENT6, port, VIP6, 80)).0 == ip6(BACKEND6_A) {
            on_a += 1;
        }
    }
    assert!((16..=48).contains(&on_a), "{on_a} of 64 flows on backend A");
}

#[test]
fn an_ipv6_local_policy_without_a_local_endpoint_drops_instead_of_rejecting() {
    let mut services = dual_stack_services(|_| {});
    let mut itp = service("itp-local6", "fd00:10:96::80", 80, Protocol::Tcp, &[]);
    itp.local_only = true;
    services.push(itp);
    let mut p = Programs::new(&services);
    let frame = Frame::tcp(CLIENT6, 40130, "fd00:10:96::80", 80).bytes();
    assert_untouched(&mut p, FROM_POD, &frame, TC_ACT_SHOT);
    assert_eq!(p.stat("drop_no_local_backend"), 1);
    assert_eq!(p.stat("reject_no_backend"), 0);
}

#[test]
fn ipv6_conntrack_entries_expire_by_protocol_and_tcp_state() {
    let mut p = dual_stack();
    let open = Frame::tcp(CLIENT6, 40140, VIP6, 80);
    let mut closing = Frame::tcp(CLIENT6, 40141, VIP6, 80);
    let udp = Frame::udp(CLIENT6, 40142, VIP6, 53);
    for f in [&open, &closing, &udp] {
        p.send_from_pod(f);
    }
    closing.tcp_flags = 0x04; // RST
    p.send_from_pod(&closing);
    let forward = |p: &Programs| {
        let mut ports: Vec<u16> = conntrack6(p)
            .iter()
            .filter(|(k, _)| k.dir == ct_dir::FORWARD)
            .map(|(k, _)| u16::from_be(k.sport_be))
            .collect();
        ports.sort();
        ports
    };
    assert_eq!(forward(&p), [40140, 40141, 40142]);
    let now = proxy_agent::kernel::monotonic_ns();
    let s = 1_000_000_000u64;
    // 11 s on: the reset connection is gone (both directions); 61 s on,
    // the UDP flow too; the open TCP connection stays.
    let removed = p.dp.gc(now + 11 * s, &Default::default()).unwrap();
    assert_eq!(removed.conntrack_removed, 2, "{removed:?}");
    assert_eq!(forward(&p), [40140, 40142]);
    p.dp.gc(now + 61 * s, &Default::default()).unwrap();
    assert_eq!(forward(&p), [40140]);
}

/// An IPv6 ClusterIP of five backends, new flows by `scheduler`, clients
/// sticking to their backend for `affinity` seconds if given.
fn scheduled6(scheduler: Scheduler, affinity: Option<u32>) -> Programs {
    let backends: Vec<(String, u16)> = (1..=5)
        .map(|i| (format!("fd00:10:244:5::{i}"), 8080))
        .collect();
    let refs: Vec<(&str, u16)> = backends.iter().map(|(a, p)| (a.as_str(), *p)).collect();
    let mut s = service("sched6", "fd00:10:96::70", 80, Protocol::Tcp, &refs);
    s.scheduler = Some(scheduler);
    s.affinity_timeout = affinity;
    Programs::new(&[s])
}

/// The backend a new IPv6 flow to `fd00:10:96::70` got, its conntrack
/// entries removed afterwards so that the same flow is scheduled afresh.
fn schedule6_once(p: &mut Programs, client: &str, sport: u16) -> std::net::IpAddr {
    let f = Frame::tcp(client, sport, "fd00:10:96::70", 80);
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let dst: [u8; 16] = out[14 + 24..14 + 40].try_into().unwrap();
    let backend = std::net::IpAddr::from(dst);
    assert_eq!(out, f.with_dst(backend, 8080).bytes());
    p.dp.flush_conntrack().unwrap();
    backend
}

#[test]
fn ipv6_maglev_picks_the_table_slot_of_the_flow_hash() {
    let mut p = scheduled6(Scheduler::Maglev, None);
    let maglev = p.programmed.applied.maglev.clone();
    let size = maglev.len() as u32;
    let rev_nat_id = maglev.keys().next().unwrap().rev_nat_id;
    for port in 46000..46040 {
        let f = Frame::tcp(CLIENT6, port, "fd00:10:96::70", 80);
        let index = f.flow_hash() % size;
        let id = maglev[&proxy_common::MaglevKey { rev_nat_id, index }];
        let want = p.programmed.applied.backends[&id].addr;
        assert_eq!(schedule6_once(&mut p, CLIENT6, port), want, "port {port}");
        assert_eq!(schedule6_once(&mut p, CLIENT6, port), want, "same flow");
    }
}

#[test]
fn ipv6_source_hash_sends_every_flow_of_a_client_to_one_backend() {
    let mut p = scheduled6(Scheduler::SourceHash, None);
    let first = schedule6_once(&mut p, CLIENT6, 47000);
    for port in 47001..47050 {
        assert_eq!(schedule6_once(&mut p, CLIENT6, port), first);
    }
    let others: std::collections::BTreeSet<_> = (1..=40)
        .map(|i| schedule6_once(&mut p, &format!("fd00:10:244:9::{i}"), 47000))
        .collect();
    assert!(others.len() > 1, "different clients spread: {others:?}");
}

#[test]
fn ipv6_session_affinity_keeps_a_client_on_one_backend_across_source_ports() {
    let mut p = scheduled6(Scheduler::FlowHash, Some(10_800));
    let first = schedule6_once(&mut p, CLIENT6, 43000);
    let mut by_hash = std::collections::BTreeSet::new();
    for port in 43001..43101 {
        let f = Frame::tcp(CLIENT6, port, "fd00:10:96::70", 80);
        by_hash.insert(p.hashed(&f));
        assert_eq!(schedule6_once(&mut p, CLIENT6, port), first, "port {port}");
    }
    assert!(
        by_hash.len() > 1,
        "without affinity these flows would have spread"
    );
    assert_eq!(p.dp.v6.affinity.iter().count(), 1, "one client, one entry");
}
