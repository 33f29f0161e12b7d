//! The uplink over IPv6: NodePorts on the node's IPv6 address to local and
//! remote backends (SNAT to the node's IPv6 address, FIB next hops, the
//! replies), one client port dialling two NodePorts of one backend, rejects
//! as ICMPv6, the Local policy, loadBalancerSourceRanges and frontend ids past
//! 16 bits. XDP hands IPv6 to the tc program, which serves it.

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
fn one_ipv6_client_port_to_two_nodeports_of_one_local_backend_gets_a_second_port() {
    // np-local6 and etp-local6 both go to LOCAL_POD6:8080: the second flow
    // from the client's port would have the first one's tuple at the backend.
    with_programs(|p| {
        let first = from_outside(packet::TCP, 41040, NODE6, 30080);
        let (verdict, out) = p.tc(&first.bytes());
        assert_eq!(verdict, TC_ACT_UNSPEC, "{:?}", p.nonzero_stats());
        let first_at_backend = first.with_dst(ip6(LOCAL_POD6), 8080);
        assert_eq!(out, first_at_backend.bytes());
        let second = from_outside(packet::TCP, 41040, NODE6, 30081);
        let port = proxy_common::remap_ports::nth(second.flow_hash(), 0);
        let (verdict, out) = p.tc(&second.bytes());
        assert_eq!(verdict, TC_ACT_UNSPEC, "{:?}", p.nonzero_stats());
        let second_at_backend = second
            .with_dst(ip6(LOCAL_POD6), 8080)
            .with_src(ip6(CLIENT6), port);
        assert_eq!(
            out,
            second_at_backend.bytes(),
            "the client's address kept, its port remapped to {port}"
        );
        packet::assert_checksums_valid(&out);
        // Two reply entries at the backend: the first flow's at the client's
        // port, the second's at the remapped one, which gives 41040 back.
        let ct =
            p.dp.v6
                .conntrack
                .iter()
                .map(Result::unwrap)
                .collect::<Vec<_>>();
        let reply_at = |port: u16| {
            ct.iter()
                .find(|(k, _)| k.dir == ct_dir::REPLY && k.dport_be == port.to_be())
                .map(|(_, v)| v.remap_port_be)
        };
        assert_eq!(reply_at(41040), Some(0));
        assert_eq!(reply_at(port), Some(41040u16.to_be()));
        assert_eq!(p.stat("fwd_local"), 2);
        // The backend's replies leave its veth each from the NodePort its
        // flow dialled, to the client's own port, straight to the client.
        for (at_backend, nodeport) in [(second_at_backend, 30081), (first_at_backend, 30080)] {
            let reply = at_backend.reply();
            let run =
                p.h.run(Hook::Tc(FROM_POD, Some(p.ifindex)), &reply.bytes())
                    .unwrap();
            assert_eq!(run.verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
            let mut back = reply
                .with_src(ip6(NODE6), nodeport)
                .with_dst(ip6(CLIENT6), 41040);
            (back.dst_mac, back.src_mac) = (CLIENT_MAC, NODE_MAC);
            assert_eq!(
                run.frame,
                back.bytes(),
                "from [{NODE6}]:{nodeport} to port 41040"
            );
            packet::assert_checksums_valid(&run.frame);
        }
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

/// An IPv6 address as the maps hold it.
fn octets6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

#[test]
fn ipv6_nodeport_to_a_remote_backend_has_one_nat_entry_its_later_packets_keep() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 41045, NODE6, 30090);
        let (verdict, out) = p.tc(&f.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&f, REMOTE_POD6, 8080).bytes(), "FIB MACs");
        packet::assert_checksums_valid(&out);
        // Keyed by the backend's reply as it will arrive.
        let nat = p.dp.v6.nat.iter().map(Result::unwrap).collect::<Vec<_>>();
        assert_eq!(nat.len(), 1);
        let (key, value) = nat[0];
        assert_eq!(
            (
                key.saddr,
                key.daddr,
                key.sport_be,
                key.dport_be,
                key.proto,
                key.dir
            ),
            (
                octets6(REMOTE_POD6),
                octets6(NODE6),
                8080u16.to_be(),
                nat_port(&f).to_be(),
                packet::TCP,
                ct_dir::NAT
            )
        );
        assert_eq!(
            (value.client_addr, value.client_port_be),
            (octets6(CLIENT6), 41045u16.to_be())
        );
        // Later packets of the flow keep their NAT port.
        let mut ack = f.clone();
        ack.tcp_flags = 0x10;
        let (verdict, out) = p.tc(&ack.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, snated(&ack, REMOTE_POD6, 8080).bytes());
        assert_eq!(p.dp.v6.nat.iter().count(), 1);
        assert_eq!(p.stat("fwd_snat"), 2);
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
fn ipv6_local_policy_with_a_local_endpoint_keeps_the_client_address() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 41046, NODE6, 30081);
        let (verdict, out) = p.tc(&f.bytes());
        assert_eq!(verdict, TC_ACT_UNSPEC, "{:?}", p.nonzero_stats());
        assert_eq!(
            out,
            f.with_dst(ip6(LOCAL_POD6), 8080).bytes(),
            "client address kept, MACs untouched"
        );
        packet::assert_checksums_valid(&out);
        assert_eq!(p.stat("fwd_local"), 1);
        assert!(p.dp.v6.nat.iter().next().is_none(), "not SNATed");
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

#[test]
fn ipv6_load_balancer_source_ranges_with_no_valid_range_drop_every_client() {
    with_programs(|p| {
        // CLIENT6 is inside lb6's ranges; lb-closed6's only range is IPv4,
        // so no IPv6 client is in one.
        let bytes = from_outside(packet::TCP, 41047, LB_IP6, 81).bytes();
        assert_eq!(p.tc(&bytes), (TC_ACT_SHOT, bytes));
        assert_eq!(p.stat("drop_source_range"), 1);
        assert!(p.dp.v6.nat.iter().next().is_none());
    });
}

/// A client port's IPv6 NAT entry: its NAT port and flags.
fn nat6_of(p: &Programs, client_port: u16) -> Option<(u16, u16)> {
    p.dp.v6
        .nat
        .iter()
        .map(Result::unwrap)
        .find(|(_, v)| v.client_port_be == client_port.to_be())
        .map(|(k, v)| (u16::from_be(k.dport_be), v.flags))
}

/// The NAT port a SNATed IPv6 frame leaves with (its TCP or UDP source port).
fn sent_port6(out: &[u8]) -> u16 {
    u16::from_be_bytes([out[14 + 40], out[14 + 41]])
}

#[test]
fn ipv6_external_ip_and_load_balancer_ip_are_served() {
    with_programs(|p| {
        for (daddr, sport) in [(EXTERNAL_IP6, 41010), (LB_IP6, 41011)] {
            let f = from_outside(packet::TCP, sport, daddr, 80);
            let (verdict, out) = p.tc(&f.bytes());
            assert_eq!(verdict, TC_ACT_REDIRECT, "{daddr}: {:?}", p.nonzero_stats());
            assert_eq!(out, snated(&f, REMOTE_POD6, 8080).bytes(), "{daddr}");
            packet::assert_checksums_valid(&out);
            // The reply leaves from the address the client dialled.
            let mut reply = snated(&f, REMOTE_POD6, 8080).reply();
            (reply.src_mac, reply.dst_mac) = (NODE2_MAC, NODE_MAC);
            let (verdict, out) = p.tc(&reply.bytes());
            assert_eq!(verdict, TC_ACT_REDIRECT);
            let mut back = reply.with_dst(ip6(CLIENT6), sport).with_src(ip6(daddr), 80);
            (back.dst_mac, back.src_mac) = (CLIENT_MAC, NODE_MAC);
            assert_eq!(out, back.bytes(), "{daddr}");
        }
        assert_eq!((p.stat("fwd_snat"), p.stat("rev_snat")), (2, 2));
    });
}

#[test]
fn ipv6_traffic_for_the_node_itself_is_untouched() {
    with_programs(|p| {
        for f in [
            from_outside(packet::TCP, 41012, NODE6, 22),
            from_outside(packet::UDP, 41012, NODE6, 61000),
        ] {
            let bytes = f.bytes();
            assert_eq!(p.xdp(&bytes), (XDP_PASS, bytes.clone()));
            assert_eq!(p.tc(&bytes), (TC_ACT_UNSPEC, bytes));
        }
        assert!(p.dp.v6.conntrack.iter().next().is_none());
        assert!(p.dp.v6.nat.iter().next().is_none());
    });
}

#[test]
fn an_ipv6_fin_or_rst_closes_the_nat_entry_and_a_collection_frees_its_port() {
    with_programs(|p| {
        for (port, flags) in [(41020, 0x11), (41021, 0x04)] {
            let f = from_outside(packet::TCP, port, NODE6, 30090);
            assert_eq!(p.tc(&f.bytes()).0, TC_ACT_REDIRECT);
            assert_eq!(nat6_of(p, port), Some((nat_port(&f), 0)), "open");
            let mut close = f.clone();
            close.tcp_flags = flags;
            let (verdict, out) = p.tc(&close.bytes());
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_eq!(out, snated(&close, REMOTE_POD6, 8080).bytes());
            assert_eq!(nat6_of(p, port), Some((nat_port(&f), ct_flags::CLOSING)));
        }
        let open = from_outside(packet::TCP, 41022, NODE6, 30090);
        assert_eq!(p.tc(&open.bytes()).0, TC_ACT_REDIRECT);
        // After the close timeout the collection removes the closed flows'
        // entries and frees their ports; the open one stays.
        let later = proxy_agent::kernel::monotonic_ns() + 11_000_000_000;
        let report = p.dp.gc(later, &Lifetimes::default()).unwrap();
        assert_eq!(report.nat_removed, 2, "{report:?}");
        assert_eq!(nat6_of(p, 41020), None);
        assert_eq!(nat6_of(p, 41021), None);
        assert_eq!(nat6_of(p, 41022), Some((nat_port(&open), 0)));
        let held: u32 =
            p.dp.v6
                .nat_ports
                .iter()
                .map(Result::unwrap)
                .filter(|(k, _)| k.index < nat_ports::WORDS)
                .map(|(_, w)| w.count_ones())
                .sum();
        assert_eq!(held, 1, "only the open flow's port is marked held");
    });
}

#[test]
fn ipv6_flows_past_the_nat_port_range_are_dropped_until_one_ends() {
    with_programs(|p| {
        // A range of 100 ports, 101 flows: every port given once, then none.
        const RANGE: u16 = 100;
        p.dp.set_config(&settings::node_config(
            None,
            NODE6.parse().ok(),
            (62000, 62000 + RANGE - 1),
            Default::default(),
        ))
        .unwrap();
        let mut ports = std::collections::BTreeSet::new();
        for i in 0..RANGE {
            let f = from_outside(packet::TCP, 43000 + i, NODE6, 30090);
            let (verdict, out) = p.tc(&f.bytes());
            assert_eq!(
                verdict,
                TC_ACT_REDIRECT,
                "flow {i}: {:?}",
                p.nonzero_stats()
            );
            let port = sent_port6(&out);
            let mut expected = f
                .with_dst(ip6(REMOTE_POD6), 8080)
                .with_src(ip6(NODE6), port);
            (expected.dst_mac, expected.src_mac) = (NODE2_MAC, NODE_MAC);
            assert_eq!(out, expected.bytes(), "flow {i}");
            assert!((62000..62000 + RANGE).contains(&port), "{port}");
            assert!(ports.insert(port), "port {port} given twice");
        }
        assert_eq!(p.dp.v6.nat.iter().count(), usize::from(RANGE));
        let extra = from_outside(packet::TCP, 43500, NODE6, 30090);
        assert_eq!(p.tc(&extra.bytes()).0, TC_ACT_SHOT);
        assert_eq!(p.stat("drop_nat_ports"), 1);
        // One flow resets; once collected, its port serves the next new flow.
        let mut rst = from_outside(packet::TCP, 43007, NODE6, 30090);
        rst.tcp_flags = 0x04;
        assert_eq!(p.tc(&rst.bytes()).0, TC_ACT_REDIRECT);
        let freed = nat6_of(p, 43007).unwrap().0;
        let later = proxy_agent::kernel::monotonic_ns() + 11_000_000_000;
        let report = p.dp.gc(later, &Lifetimes::default()).unwrap();
        assert_eq!(report.nat_removed, 1);
        assert_eq!(
            report.exhausted.first().map(|(b, n)| (b.to_string(), *n)),
            Some((format!("[{REMOTE_POD6}]:8080/TCP"), 1)),
            "counted by backend"
        );
        let next = from_outside(packet::TCP, 43501, NODE6, 30090);
        let (verdict, out) = p.tc(&next.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
        assert_eq!(sent_port6(&out), freed);
    });
}

#[test]
fn an_ipv6_next_hop_without_a_neighbour_entry_is_left_to_the_kernel() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 41030, NODE6, 30099);
        let (verdict, out) = p.tc(&f.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "bpf_redirect_neigh");
        let mut expected = f
            .with_dst(ip6(UNRESOLVED_POD6), 8080)
            .with_src(ip6(NODE6), nat_port(&f));
        (expected.src_mac, expected.dst_mac) = (f.src_mac, f.dst_mac);
        assert_eq!(
            out,
            expected.bytes(),
            "translated; the kernel fills in the MACs"
        );
        assert_eq!(p.dp.v6.nat.iter().count(), 1);
    });
}

#[test]
fn an_ipv6_reply_to_a_client_without_a_neighbour_entry_is_left_to_the_kernel() {
    with_programs(|p| {
        let mut f = from_outside(packet::TCP, 41031, NODE6, 30090);
        f.saddr = ip6("fd00:10:250::200");
        assert_eq!(p.tc(&f.bytes()).0, TC_ACT_REDIRECT);
        let mut reply = snated(&f, REMOTE_POD6, 8080).reply();
        (reply.src_mac, reply.dst_mac) = (NODE2_MAC, NODE_MAC);
        let (verdict, out) = p.tc(&reply.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let back = reply
            .with_dst(ip6("fd00:10:250::200"), 41031)
            .with_src(ip6(NODE6), 30090);
        assert_eq!(out, back.bytes(), "translated; the MACs are the kernel's");
    });
}

#[test]
fn ipv6_frontend_ids_past_16_bits_reach_the_nat6_and_source_range6_maps() {
    // Recovered from maps where an IPv6 frontend holds 65535: every frontend
    // of these tests (ids are one space over both families) gets an id past
    // 16 bits.
    let mut taken = MapState::default();
    let slot0 = proxy_agent::desired::ServiceKey::new(
        ip6("fd00:10:96::1"),
        80,
        proxy_common::proto::TCP,
        0,
    );
    let value = ServiceValue {
        rev_nat_id: 65_535,
        ..ServiceValue::default()
    };
    taken.services.insert(slot0, value);
    with_programs_numbered(Ids::from_state(&taken), |p| {
        // The SNATed flow's NAT entry names its frontend by the wide id, and
        // the reply finds the NodePort by it.
        let f = from_outside(packet::TCP, 41050, NODE6, 30090);
        let (verdict, out) = p.tc(&f.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&f, REMOTE_POD6, 8080).bytes());
        let nat = p.dp.v6.nat.iter().map(Result::unwrap).collect::<Vec<_>>();
        assert_eq!(nat.len(), 1);
        assert!(nat[0].1.rev_nat_id > u32::from(u16::MAX), "{:?}", nat[0].1);
        let mut reply = snated(&f, REMOTE_POD6, 8080).reply();
        (reply.src_mac, reply.dst_mac) = (NODE2_MAC, NODE_MAC);
        let (verdict, out) = p.tc(&reply.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
        let mut back = reply
            .with_dst(ip6(CLIENT6), 41050)
            .with_src(ip6(NODE6), 30090);
        (back.dst_mac, back.src_mac) = (CLIENT_MAC, NODE_MAC);
        assert_eq!(out, back.bytes());
        packet::assert_checksums_valid(&out);
        // The LoadBalancer IP's IPv6 source ranges, keyed by its wide id: an
        // allowed client is served, another dropped.
        let ids =
            p.dp.v6
                .source_ranges
                .iter()
                .map(|e| u32::from_be(e.unwrap().0.data().rev_nat_id_be))
                .collect::<Vec<_>>();
        assert!(
            !ids.is_empty() && ids.iter().all(|&id| id > u32::from(u16::MAX)),
            "{ids:?}"
        );
        let allowed = from_outside(packet::TCP, 41051, LB_IP6, 80);
        let (verdict, out) = p.tc(&allowed.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&allowed, REMOTE_POD6, 8080).bytes());
        let mut outsider = from_outside(packet::TCP, 41052, LB_IP6, 80);
        outsider.saddr = ip6("fd00:10:250::50");
        let bytes = outsider.bytes();
        assert_eq!(p.tc(&bytes), (TC_ACT_SHOT, bytes));
        assert_eq!(p.stat("drop_source_range"), 1);
    });
}
