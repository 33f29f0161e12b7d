//! ICMPv6 errors about translated flows, the twins of `crate::icmp`'s: the
//! ICMPv6 checksum also covers the outer addresses (its pseudo-header).

use packet::IcmpError;

use super::*;
use crate::icmp::{addr, assert_error_translated, open};

/// A router between the node and a remote backend.
const ROUTER6: &str = "fd00:10:244:2::1";
/// As much of a packet as an ICMPv6 error quotes in 1280 bytes (RFC 4443).
const QUOTE_1280: usize = 1280 - 40 - 8;

#[test]
fn packet_too_big_from_a_router_reaches_the_client_about_the_ipv6_frontend() {
    let mut p = dual_stack();
    let syn = Frame::tcp(CLIENT6, 40900, VIP6, 80);
    open(&mut p, &syn);
    let data = syn.segment(1400);
    assert_error_translated(
        &mut p,
        &data,
        IcmpError::TooBig(1280),
        Some(ROUTER6),
        QUOTE_1280,
    );
}

#[test]
fn port_unreachable_and_time_exceeded_about_ipv6_udp_reach_the_client_about_the_frontend() {
    let mut p = dual_stack();
    let query = Frame::udp(CLIENT6, 41900, VIP6, 53);
    assert_error_translated(&mut p, &query, IcmpError::PortUnreachable, None, QUOTE_1280);
    let query = Frame::udp(CLIENT6, 41903, VIP6, 53);
    assert_error_translated(
        &mut p,
        &query,
        IcmpError::TimeExceeded,
        Some(ROUTER6),
        QUOTE_1280,
    );
}

#[test]
fn an_ipv6_pod_that_reached_itself_gets_its_error_back_from_the_frontend() {
    let mut p = dual_stack();
    // The client is the backend the flow hashes to.
    let query = (41910..)
        .map(|port| Frame::udp(BACKEND6_A, port, VIP6, 53))
        .find(|f| p.hashed(f).0 == ip6(BACKEND6_A))
        .unwrap();
    let (verdict, out) = p.send_from_pod(&query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let hairpin = Ipv6Addr::from(HAIRPIN_ADDR6);
    let mut to_itself = query
        .with_dst(ip6(BACKEND6_A), 5353)
        .with_src(hairpin, query.sport);
    (to_itself.src_mac, to_itself.dst_mac) = (query.dst_mac, query.src_mac);
    assert_eq!(out, to_itself.bytes());

    let error = packet::icmp_error(
        IcmpError::PortUnreachable,
        addr(BACKEND6_A),
        hairpin.into(),
        &to_itself,
        QUOTE_1280,
    );
    let (verdict, out) = p.run(FROM_POD, &error);
    assert_eq!(verdict, TC_ACT_REDIRECT, "straight back into the pod");
    let expected = packet::icmp_error(
        IcmpError::PortUnreachable,
        addr(VIP6),
        addr(BACKEND6_A),
        &query,
        QUOTE_1280,
    );
    assert_eq!(out, expected);
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("rev_nat_icmp"), 1);
}

/// A quote with extension headers is not walked: such an error passes
/// untouched (as do errors about flows conntrack does not know).
#[test]
fn ipv6_errors_quoting_extension_headers_or_unknown_flows_are_untouched() {
    let mut p = dual_stack();
    let mut query = Frame::udp(CLIENT6, 41901, VIP6, 53);
    query.ext6 = vec![packet::DEST_OPTS];
    let at_backend = open(&mut p, &query);
    let direct = Frame::udp(CLIENT6, 41902, BACKEND6_B, 5353);
    for (about, from) in [(&at_backend, at_backend.daddr), (&direct, addr(BACKEND6_B))] {
        let error = packet::icmp_error(
            IcmpError::PortUnreachable,
            from,
            addr(CLIENT6),
            about,
            QUOTE_1280,
        );
        assert_untouched(&mut p, TO_POD, &error, TC_ACT_UNSPEC);
    }
    assert_eq!(p.stat("pass_not_tcp_udp"), 2);
    assert_eq!(p.stat("rev_nat_icmp"), 0);
}
