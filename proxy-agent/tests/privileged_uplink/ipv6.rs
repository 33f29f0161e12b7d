//! The uplink over IPv6: NodePorts on the node's IPv6 address to local and
//! remote backends (SNAT to the node's IPv6 address, FIB next hops, the
//! replies), rejects as ICMPv6, the Local policy and loadBalancerSourceRanges.
//! XDP hands IPv6 to the tc program, which serves it.

use super::*;

#[test]
fn xdp_hands_ipv6_to_the_tc_program_untouched() {
    with_programs(|p| {
        let bytes = from_outside(packet::TCP, 41000, NODE6, 30080).bytes();
        assert_eq!(p.xdp(&bytes), (XDP_PASS, bytes));
        assert_eq!(p.stat("pass_ipv6_to_tc"), 1);
        assert!(p.dp.v6.conntrack.iter().next().is_none());
    });
}

#[test]
fn ipv6_nodeport_to_a_local_backend_is_dnated_and_passed_up() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 41001, NODE6, 30080);
        let (verdict, out) = p.tc(&f.bytes());
        assert_eq!(verdict, TC_ACT_UNSPEC, "{:?}", p.nonzero_stats());
        assert_eq!(out, f.with_dst(ip6(LOCAL_POD6), 8080).bytes());
        packet::assert_checksums_valid(&out);
        assert_eq!(p.stat("fwd_local"), 1);
    });
}

#[test]
fn ipv6_nodeport_to_a_remote_backend_is_snated_and_its_reply_goes_back() {
    with_programs(|p| {
        for (proto, dport, backend_port) in [(packet::TCP, 30090, 8080), (packet::UDP, 30053, 5353)]
        {
            let f = from_outside(proto, 41002, NODE6, dport);
            let (verdict, out) = p.tc(&f.bytes());
            assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
            let sent = snated(&f, REMOTE_POD6, backend_port);
            assert_eq!(out, sent.bytes(), "from the node's IPv6 address");
            packet::assert_checksums_valid(&out);
            let nat = p.dp.v6.nat.iter().map(Result::unwrap).collect::<Vec<_>>();
            assert!(nat.iter().any(|(k, v)| k.dport_be == nat_port(&f).to_be()
                && v.client_port_be == 41002u16.to_be()
                && v.client_addr == CLIENT6.parse::<std::net::Ipv6Addr>().unwrap().octets()));
            let mut reply = sent.reply();
            (reply.src_mac, reply.dst_mac) = (NODE2_MAC, NODE_MAC);
            let (verdict, out) = p.tc(&reply.bytes());
            assert_eq!(verdict, TC_ACT_REDIRECT);
            let mut back = reply
                .with_dst(ip6(CLIENT6), 41002)
                .with_src(ip6(NODE6), dport);
            (back.dst_mac, back.src_mac) = (CLIENT_MAC, NODE_MAC);
            assert_eq!(out, back.bytes(), "from the NodePort the client dialled");
            packet::assert_checksums_valid(&out);
        }
        assert_eq!((p.stat("fwd_snat"), p.stat("rev_snat")), (2, 2));
        // Their NAT ports are marked held, and a collection keeps them while
        // their flows live.
        let words = p.dp.v6.nat_ports.iter().count();
        assert_eq!(words, 2, "one bitmap word per backend");
        let report =
            p.dp.gc(proxy_agent::kernel::monotonic_ns(), &Lifetimes::default())
                .unwrap();
        assert_eq!((report.nat_removed, report.nat_entries), (0, 2));
        assert_eq!(report.held.values().sum::<u32>(), 2);
    });
}

#[test]
fn ipv6_nat_entries_go_with_their_flow_and_free_their_port() {
    with_programs(|p| {
        let f = from_outside(packet::UDP, 41003, NODE6, 30053);
        assert_eq!(p.tc(&f.bytes()).0, TC_ACT_REDIRECT);
        // Past the UDP lifetime: the conntrack and NAT entries go, and the
        // bit of the port with them.
        let later = proxy_agent::kernel::monotonic_ns() + 61 * 1_000_000_000;
        let report = p.dp.gc(later, &Lifetimes::default()).unwrap();
        assert_eq!(report.nat_removed, 1);
        assert_eq!(p.dp.v6.nat.iter().count(), 0);
        let bits: u64 = p.dp.v6.nat_ports.iter().map(|w| w.unwrap().1).sum();
        assert_eq!(bits, 0, "the port is free again");
    });
}

#[test]
fn ipv6_frontend_without_backends_is_rejected_with_icmpv6() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 41004, NODE6, 30070);
        let (verdict, out) = p.tc(&f.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, packet::port_unreachable(&f));
        packet::assert_checksums_valid(&out);
    });
}

#[test]
fn ipv6_local_policy_without_a_local_endpoint_drops() {
    with_programs(|p| {
        let bytes = from_outside(packet::TCP, 41005, NODE6, 30082).bytes();
        assert_eq!(p.tc(&bytes), (TC_ACT_SHOT, bytes));
        assert_eq!(p.stat("drop_no_local_backend"), 1);
    });
}

#[test]
fn ipv6_clients_outside_a_load_balancers_ranges_are_dropped() {
    with_programs(|p| {
        let mut outsider = from_outside(packet::TCP, 41006, LB_IP6, 80);
        outsider.saddr = ip6("fd00:10:250::50");
        let bytes = outsider.bytes();
        assert_eq!(p.tc(&bytes), (TC_ACT_SHOT, bytes));
        assert_eq!(p.stat("drop_source_range"), 1);
        assert!(p.dp.v6.nat.iter().next().is_none());
    });
}

#[test]
fn ipv6_clients_in_a_load_balancers_ranges_reach_its_backend() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 41007, LB_IP6, 80);
        let (verdict, out) = p.tc(&f.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&f, REMOTE_POD6, 8080).bytes());
        assert_eq!(p.stat("drop_source_range"), 0);
    });
}
