//! IPv6 on the pod hooks, byte for byte: DNAT and reverse NAT for TCP and
//! UDP, extension headers walked, fragments and waypoints left alone,
//! malformed headers, a frontend without backends rejected with ICMPv6,
//! hairpin, what is no frontend's, the Local policy, frontend ids past 16
//! bits, the counters, a wrapped run; conntrack, ICMPv6 errors, the
//! schedulers, full maps and random frames in the modules below. The maps
//! are programmed as the agent programs them, IPv4 and IPv6 frontends
//! together.

use std::net::{IpAddr, Ipv6Addr};

use proxy_common::{proto::TCP, CtKey6, HAIRPIN_ADDR6};

use super::*;

mod conntrack;
mod full_maps;
mod icmp;
mod random_frames;
mod schedulers;

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
fn round_trip(p: &mut Programs, f: &Frame) -> (IpAddr, u16) {
    let backend = assert_dnat_ip(p, f);
    assert_reverse_nat_ip(p, f, backend);
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
        p.programmed.applied().services[&slot0].rev_nat_id
    );
    let IpAddr::V6(backend_addr) = backend.0 else {
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
        service("empty6-udp", EMPTY_VIP6, 53, Protocol::Udp, &[]),
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
fn udp_to_an_ipv6_frontend_without_backends_is_rejected_with_icmpv6_port_unreachable() {
    let mut p = dual_stack();
    let mut f = Frame::udp(CLIENT6, 41040, EMPTY_VIP6, 53);
    f.payload = vec![0x42; 300];
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, packet::port_unreachable(&f));
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("reject_no_backend"), 1);
}

#[test]
fn an_ipv6_tcp_segment_with_odd_payload_is_dnated() {
    let mut p = dual_stack();
    let mut f = Frame::tcp(CLIENT6, 40150, VIP6, 80);
    f.tcp_flags = 0x18;
    f.ack = 99;
    f.payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n!".to_vec();
    assert_dnat_ip(&mut p, &f);
}

#[test]
fn ethernet_padding_after_an_ipv6_packet_is_kept() {
    let mut p = dual_stack();
    let mut f = Frame::udp(CLIENT6, 41150, VIP6, 53);
    f.payload = vec![7];
    f.trailer = vec![0xee; 6];
    assert_dnat_ip(&mut p, &f);
}

#[test]
fn icmpv6_to_an_ipv6_clusterip_is_untouched() {
    let mut p = dual_stack();
    let mut f = Frame::tcp(CLIENT6, 0, VIP6, 0);
    f.proto = 58; // ICMPv6: an echo request
    f.payload = vec![128, 0, 0, 0, 0, 1, 0, 1];
    assert_untouched(&mut p, FROM_POD, &f.bytes(), TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_not_tcp_udp"), 1);
}

#[test]
fn malformed_ipv6_headers_are_dropped_and_a_truncated_tcp_header_passes() {
    let mut p = dual_stack();
    let frame = Frame::tcp(CLIENT6, 40160, VIP6, 80).bytes();
    // A payload length past the frame's end.
    let mut long = frame.clone();
    long[18..20].copy_from_slice(&200u16.to_be_bytes());
    assert_untouched(&mut p, FROM_POD, &long, TC_ACT_SHOT);
    // Another IP version under IPv6's EtherType.
    let mut version = frame.clone();
    version[14] = 0x45;
    assert_untouched(&mut p, FROM_POD, &version, TC_ACT_SHOT);
    assert_eq!(p.stat("drop_malformed_ip"), 2);
    // A TCP header of 12 bytes: no flags to read, nothing to rewrite.
    let mut short = frame.clone();
    short.truncate(14 + 40 + 12);
    short[18..20].copy_from_slice(&12u16.to_be_bytes());
    assert_untouched(&mut p, FROM_POD, &short, TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_truncated_l4"), 1);
    assert!(conntrack6(&p).is_empty());
}

#[test]
fn every_ipv6_packet_is_counted_once_with_its_bytes() {
    let mut p = dual_stack();
    crate::verdicts::assert_counted_once(
        &mut p,
        &[
            Frame::tcp(CLIENT6, 40170, VIP6, 80),
            Frame::tcp(CLIENT6, 40170, BACKEND6_B, 80),
            Frame::udp(CLIENT6, 40170, EMPTY_VIP6, 53),
        ],
    );
}

#[test]
fn an_ipv6_frontend_id_past_16_bits_is_reverse_nated_to_its_own_frontend() {
    // web6 keeps id 5; "a-wide6" sorts first among the new frontends and
    // gets 65541, which a 16-bit id would have made into web6's 5.
    let wide_vip = "fd00:10:96::90";
    let mut services = dual_stack_services(|_| {});
    services.push(service(
        "a-wide6",
        wide_vip,
        443,
        Protocol::Tcp,
        &[(BACKEND6_A, 8443), (BACKEND6_B, 8443)],
    ));
    let slot0 = |vip: &str, port| ServiceKey::new(ip6(vip), port, TCP, 0);
    let mut found = MapState::default();
    for (key, rev_nat_id) in [(slot0(VIP6, 80), 5), (slot0("fd00:10:96::99", 80), 65_540)] {
        let value = ServiceValue {
            rev_nat_id,
            ..ServiceValue::default()
        };
        found.services.insert(key, value);
    }
    let mut p = Programs::with_ids(&services, Ids::from_state(&found));
    let id =
        |p: &Programs, vip, port| p.programmed.applied().services[&slot0(vip, port)].rev_nat_id;
    assert_eq!((id(&p, VIP6, 80), id(&p, wide_vip, 443)), (5, 65_541));
    let f = Frame::tcp(CLIENT6, 40180, wide_vip, 443);
    round_trip(&mut p, &f);
    assert!(conntrack6(&p).iter().all(|(_, v)| v.rev_nat_id == 65_541));
    // And web6, with the id the wide one would have collided with, is itself.
    let g = Frame::tcp(CLIENT6, 40181, VIP6, 80);
    round_trip(&mut p, &g);
    assert_eq!(p.stat("rev_nat"), 2);
}

#[test]
fn a_wrapped_ipv6_run_takes_the_real_path_every_time() {
    // The benchmarks time programs N runs at a time through a wrapper that
    // restores the frame before each run: every run must be the established
    // DNAT, and the last leave what a single run leaves.
    let mut p = dual_stack();
    let f = Frame::tcp(CLIENT6, 40700, VIP6, 80);
    let backend = assert_dnat_ip(&mut p, &f);
    let mut ack = f.clone();
    ack.tcp_flags = 0x10;
    let run =
        p.dp.run_wrapped(FROM_POD, &ack.bytes(), 100, Tuples::Same)
            .unwrap();
    assert_eq!(run.verdict, TC_ACT_UNSPEC);
    assert_eq!(run.frame, ack.with_dst(backend.0, backend.1).bytes());
    assert_eq!(p.stat("fwd_established"), 100, "each run found the Service");
    let run =
        p.dp.run_wrapped(bench::PASS_ONLY_TC, &f.bytes(), 100, Tuples::Same)
            .unwrap();
    assert_eq!((run.verdict, run.frame), (TC_ACT_UNSPEC, f.bytes()));
    // Headers without payload only.
    let mut longer = f.clone();
    longer.payload = vec![1];
    assert!(p
        .dp
        .run_wrapped(FROM_POD, &longer.bytes(), 1, Tuples::Same)
        .is_err());
}
