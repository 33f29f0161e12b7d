//! ICMP errors about SNATed flows: a router on the way to a remote backend
//! (or the backend) sends them to the node's address, quoting the packet
//! the node sent from its NAT port. They must reach the client about the
//! packet it sent, from the frontend it dialled, as the flow's replies do.

use packet::IcmpError;

use super::*;

/// A router between this node and node2.
const ROUTER: &str = "10.0.0.254";
const ROUTER6: &str = "fd00:10::fe";

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn frag_needed_about_a_snated_flow_reaches_the_client_from_the_nodeport() {
    with_programs(|p| {
        let syn = from_outside(packet::TCP, 40950, NODE, 30090);
        assert_eq!(p.xdp(&syn.bytes()).0, XDP_TX, "{:?}", p.nonzero_stats());
        let data = syn.segment(1400);
        let (verdict, sent) = p.xdp(&data.bytes());
        assert_eq!(verdict, XDP_TX);
        let at_backend = snated(&data, REMOTE_POD, 8080);
        assert_eq!(sent, at_backend.bytes());
        let quote = 576 - 20 - 8;
        let error = packet::icmp_error(
            IcmpError::TooBig(1300),
            addr(ROUTER),
            addr(NODE),
            &at_backend,
            quote,
        );
        // Both hooks: XDP, and its tc twin where XDP cannot attach.
        let expected = packet::icmp_error(
            IcmpError::TooBig(1300),
            addr(NODE),
            addr(CLIENT),
            &data,
            quote,
        );
        let (verdict, out) = p.xdp(&error);
        assert_eq!(verdict, XDP_TX, "{:?}", p.nonzero_stats());
        assert_eq!(
            out, expected,
            "from the NodePort, about the client's segment"
        );
        packet::assert_checksums_valid(&out);
        let (verdict, out) = p.tc(&error);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, expected);
        assert_eq!(p.stat("rev_nat_icmp"), 2);
    });
}

#[test]
fn port_unreachable_from_a_remote_udp_backend_reaches_the_client_from_the_nodeport() {
    with_programs(|p| {
        let query = from_outside(packet::UDP, 41950, NODE, 30053);
        assert_eq!(p.xdp(&query.bytes()).0, XDP_TX);
        let at_backend = snated(&query, REMOTE_POD, 5353);
        let error = packet::icmp_error(
            IcmpError::PortUnreachable,
            addr(REMOTE_POD),
            addr(NODE),
            &at_backend,
            576,
        );
        let (verdict, out) = p.xdp(&error);
        assert_eq!(verdict, XDP_TX);
        let expected = packet::icmp_error(
            IcmpError::PortUnreachable,
            addr(NODE),
            addr(CLIENT),
            &query,
            576,
        );
        assert_eq!(out, expected);
        packet::assert_checksums_valid(&out);
        // An error about a NAT port no flow holds is not the node's to
        // translate: it goes on to the stack untouched.
        let stray = packet::icmp_error(
            IcmpError::PortUnreachable,
            addr(REMOTE_POD),
            addr(NODE),
            &at_backend.with_src(addr(NODE), at_backend.sport.wrapping_add(1)),
            576,
        );
        assert_eq!(p.xdp(&stray), (XDP_PASS, stray.clone()));
        assert_eq!(p.stat("rev_nat_icmp"), 1);
    });
}

#[test]
fn packet_too_big_about_an_ipv6_snated_flow_reaches_the_client_from_the_nodeport() {
    with_programs(|p| {
        let syn = from_outside(packet::TCP, 40951, NODE6, 30090);
        assert_eq!(
            p.tc(&syn.bytes()).0,
            TC_ACT_REDIRECT,
            "{:?}",
            p.nonzero_stats()
        );
        let data = syn.segment(1400);
        let at_backend = snated(&data, REMOTE_POD6, 8080);
        assert_eq!(p.tc(&data.bytes()), (TC_ACT_REDIRECT, at_backend.bytes()));
        let quote = 1280 - 40 - 8;
        let error = packet::icmp_error(
            IcmpError::TooBig(1280),
            addr(ROUTER6),
            addr(NODE6),
            &at_backend,
            quote,
        );
        let (verdict, out) = p.tc(&error);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
        let expected = packet::icmp_error(
            IcmpError::TooBig(1280),
            addr(NODE6),
            addr(CLIENT6),
            &data,
            quote,
        );
        assert_eq!(out, expected);
        packet::assert_checksums_valid(&out);
        assert_eq!(p.stat("rev_nat_icmp"), 1);
    });
}
