//! NodePort, externalIP and LoadBalancer traffic to local and remote backends:
//! DNAT, SNAT with NAT ports and FIB next hops, the replies, closing and
//! exhaustion, next hops not resolved yet, and frontend ids past 16 bits.

use super::*;

#[test]
fn nodeport_to_a_local_backend_is_dnated_and_passed_up() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40000, NODE, 30080);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(
            out,
            f.with_dst(ip(LOCAL_POD), 8080).bytes(),
            "client address kept, MACs untouched"
        );
        packet::assert_checksums_valid(&out);
        assert_eq!(p.stat("fwd_local"), 1);
        let ct = p.dp.conntrack().unwrap();
        assert!(
            ct.iter().any(|(k, _)| k.dir == ct_dir::REPLY),
            "the backend's reply is reverse-NATed on its veth"
        );
    });
}

#[test]
fn one_client_port_to_two_nodeports_of_one_local_backend_gets_a_second_port() {
    // np-local and etp-local both go to LOCAL_POD:8080: the second flow from
    // the client's port would have the first one's tuple at the backend.
    with_programs(|p| {
        let first = from_outside(packet::TCP, 40010, NODE, 30080);
        let (verdict, out) = p.xdp(&first.bytes());
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, first.with_dst(ip(LOCAL_POD), 8080).bytes());
        let second = from_outside(packet::TCP, 40010, NODE, 30081);
        let port = proxy_common::remap_ports::nth(second.flow_hash(), 0);
        let (verdict, out) = p.xdp(&second.bytes());
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(
            out,
            second
                .with_dst(ip(LOCAL_POD), 8080)
                .with_src(ip(CLIENT), port)
                .bytes(),
            "the client's address kept, its port remapped to {port}"
        );
        packet::assert_checksums_valid(&out);
        // Two reply entries at the backend: the first flow's at the client's
        // port, the second's at the remapped one, which gives 40010 back.
        let ct = p.dp.conntrack().unwrap();
        let reply_at = |port: u16| {
            ct.iter()
                .find(|(k, _)| k.dir == ct_dir::REPLY && k.dport_be == port.to_be())
                .map(|(_, v)| v.remap_port_be)
        };
        assert_eq!(reply_at(40010), Some(0));
        assert_eq!(reply_at(port), Some(40010u16.to_be()));
        assert_eq!(p.stat("fwd_local"), 2);
        // The backend's reply to the remapped port leaves its veth from the
        // second NodePort to the client's own port, straight to the client.
        let reply = second
            .with_dst(ip(LOCAL_POD), 8080)
            .with_src(ip(CLIENT), port)
            .reply();
        let run =
            p.h.run(Hook::Tc(FROM_POD, Some(p.ifindex)), &reply.bytes())
                .unwrap();
        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        let mut back = reply.with_src(ip(NODE), 30081).with_dst(ip(CLIENT), 40010);
        (back.dst_mac, back.src_mac) = (CLIENT_MAC, NODE_MAC);
        assert_eq!(run.frame, back.bytes(), "from NODE:30081 to port 40010");
        packet::assert_checksums_valid(&run.frame);
    });
}

#[test]
fn nodeport_to_a_remote_backend_is_snated_and_sent_back_out_with_fib_macs() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40001, NODE, 30090);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_TX, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&f, REMOTE_POD, 8080).bytes());
        packet::assert_checksums_valid(&out);
        let nat = p.dp.nat().unwrap();
        assert_eq!(nat.len(), 1);
        let (key, value) = nat[0];
        assert_eq!(
            (key.saddr, key.daddr, key.sport_be, key.dport_be, key.dir),
            (
                proxy_common::Ip4::new(ip(REMOTE_POD)),
                proxy_common::Ip4::new(ip(NODE)),
                8080u16.to_be(),
                nat_port(&f).to_be(),
                ct_dir::NAT
            )
        );
        assert_eq!(
            (value.client_addr, value.client_port_be),
            (proxy_common::Ip4::new(ip(CLIENT)), 40001u16.to_be())
        );
        // Later packets of the flow keep their NAT port.
        let mut ack = f.clone();
        ack.tcp_flags = 0x10;
        let (verdict, out) = p.xdp(&ack.bytes());
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, snated(&ack, REMOTE_POD, 8080).bytes());
        assert_eq!(p.dp.nat().unwrap().len(), 1);
        assert_eq!(p.stat("fwd_snat"), 2);
    });
}

#[test]
fn remote_backends_reply_is_translated_back_to_the_client() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40002, NODE, 30090);
        let (_, sent) = p.xdp(&f.bytes());
        assert_eq!(sent, snated(&f, REMOTE_POD, 8080).bytes());
        let mut reply = snated(&f, REMOTE_POD, 8080).reply();
        reply.src_mac = NODE2_MAC;
        reply.dst_mac = NODE_MAC;
        let (verdict, out) = p.xdp(&reply.bytes());
        assert_eq!(verdict, XDP_TX);
        let mut expected = reply.with_dst(ip(CLIENT), 40002).with_src(ip(NODE), 30090);
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        assert_eq!(
            out,
            expected.bytes(),
            "from the NodePort the client dialled, to the client"
        );
        packet::assert_checksums_valid(&out);
        assert_eq!(p.stat("rev_snat"), 1);
        // Both ways counted under the flow's frontend and backend: the NAT
        // entry names the backend for its replies.
        let traffic = p.dp.traffic().unwrap();
        assert_eq!(traffic.len(), 1, "{traffic:?}");
        let (pair, counts) = traffic[0];
        let backend = p.programmed.applied().backends[&pair.backend_id];
        assert_eq!(
            (backend.addr, backend.port),
            (IpAddr::from(ip(REMOTE_POD)), 8080)
        );
        assert_eq!(
            counts,
            proxy_common::Traffic {
                to_backend_packets: 1,
                to_backend_bytes: f.bytes().len() as u64,
                to_client_packets: 1,
                to_client_bytes: reply.bytes().len() as u64,
            }
        );
    });
}

#[test]
fn udp_nodeport_round_trip_through_snat() {
    with_programs(|p| {
        let f = from_outside(packet::UDP, 41000, NODE, 30053);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, snated(&f, REMOTE_POD, 5353).bytes());
        let mut reply = snated(&f, REMOTE_POD, 5353).reply();
        reply.src_mac = NODE2_MAC;
        reply.dst_mac = NODE_MAC;
        let (verdict, out) = p.xdp(&reply.bytes());
        assert_eq!(verdict, XDP_TX);
        let mut expected = reply.with_dst(ip(CLIENT), 41000).with_src(ip(NODE), 30053);
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        assert_eq!(out, expected.bytes());
        packet::assert_checksums_valid(&out);
    });
}

/// SCTP's checksum fix lives in tc (XDP's program has no room for it in
/// the verifier's budget): XDP hands SCTP on, tc SNATs it with both ports
/// changed and the CRC32c moved with them, and translates the answer back.
#[test]
fn sctp_nodeport_round_trip_through_snat_in_tc() {
    with_programs(|p| {
        let f = from_outside(packet::SCTP, 42000, NODE, 30132);
        assert_eq!(
            p.xdp(&f.bytes()),
            (XDP_PASS, f.bytes()),
            "on to tc untouched"
        );
        assert_eq!(p.stat("pass_sctp_to_tc"), 1);
        let (verdict, out) = p.tc(&f.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&f, REMOTE_POD, 3868).bytes());
        packet::assert_checksums_valid(&out);
        assert_eq!(p.stat("fwd_snat"), 1);
        let mut reply = snated(&f, REMOTE_POD, 3868).reply();
        reply.src_mac = NODE2_MAC;
        reply.dst_mac = NODE_MAC;
        let (verdict, out) = p.tc(&reply.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let mut expected = reply.with_dst(ip(CLIENT), 42000).with_src(ip(NODE), 30132);
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        assert_eq!(out, expected.bytes(), "the INIT ACK from the NodePort");
        packet::assert_checksums_valid(&out);
        assert_eq!(p.stat("rev_snat"), 1);
    });
}

#[test]
fn external_ip_and_load_balancer_ip_are_served() {
    with_programs(|p| {
        for daddr in [EXTERNAL_IP, LB_IP] {
            let f = from_outside(packet::TCP, 40003, daddr, 80);
            let (verdict, out) = p.xdp(&f.bytes());
            assert_eq!(verdict, XDP_TX, "{daddr}");
            assert_eq!(out, snated(&f, REMOTE_POD, 8080).bytes(), "{daddr}");
        }
    });
}

/// The NAT entry of a client port's flow: (NAT port, flags).
fn nat_of(p: &Programs, client_port: u16) -> Option<(u16, u16)> {
    p.dp.nat()
        .unwrap()
        .into_iter()
        .find(|(_, v)| v.client_port_be == client_port.to_be())
        .map(|(k, v)| (u16::from_be(k.dport_be), v.flags))
}

/// The flags of a client port's forward conntrack entry.
fn forward_flags(p: &Programs, client_port: u16) -> u16 {
    p.dp.conntrack()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.dir == ct_dir::FORWARD && k.sport_be == client_port.to_be())
        .map(|(_, v)| v.flags)
        .expect("forward entry")
}

#[test]
fn a_fin_or_rst_either_way_closes_the_nat_entry_and_the_flow() {
    with_programs(|p| {
        // From the client: a FIN, and an RST.
        for (port, flags) in [(42000, 0x11), (42001, 0x04)] {
            let f = from_outside(packet::TCP, port, NODE, 30090);
            p.xdp(&f.bytes());
            assert_eq!(nat_of(p, port), Some((nat_port(&f), 0)), "open");
            let mut close = f.clone();
            close.tcp_flags = flags;
            let (verdict, out) = p.xdp(&close.bytes());
            assert_eq!(verdict, XDP_TX);
            assert_eq!(out, snated(&close, REMOTE_POD, 8080).bytes());
            assert_eq!(nat_of(p, port), Some((nat_port(&f), ct_flags::CLOSING)));
            assert_eq!(
                forward_flags(p, port) & ct_flags::CLOSING,
                ct_flags::CLOSING
            );
        }
        // From the backend: its FIN closes the NAT entry and the client's
        // forward entry.
        let f = from_outside(packet::TCP, 42002, NODE, 30090);
        p.xdp(&f.bytes());
        let mut fin = snated(&f, REMOTE_POD, 8080).reply();
        fin.tcp_flags = 0x11;
        fin.src_mac = NODE2_MAC;
        fin.dst_mac = NODE_MAC;
        let (verdict, out) = p.xdp(&fin.bytes());
        assert_eq!(verdict, XDP_TX);
        let mut expected = fin.with_dst(ip(CLIENT), 42002).with_src(ip(NODE), 30090);
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        assert_eq!(out, expected.bytes());
        assert_eq!(nat_of(p, 42002), Some((nat_port(&f), ct_flags::CLOSING)));
        assert_eq!(
            forward_flags(p, 42002) & ct_flags::CLOSING,
            ct_flags::CLOSING
        );
        // The client reuses the tuple for a new connection: open again, same port.
        p.xdp(&f.bytes());
        assert_eq!(nat_of(p, 42002), Some((nat_port(&f), 0)));

        // After the close timeout the collection removes the closed flows'
        // entries, frees their ports, and leaves the open one.
        let now = proxy_agent::kernel::monotonic_ns();
        let report =
            p.dp.gc(now + 11_000_000_000, &Lifetimes::default())
                .unwrap();
        assert_eq!(report.nat_removed, 2, "{report:?}");
        assert_eq!(nat_of(p, 42000), None);
        assert_eq!(nat_of(p, 42001), None);
        assert_eq!(nat_of(p, 42002), Some((nat_port(&f), 0)));
        let held: u32 =
            p.dp.nat_ports()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.index < nat_ports::WORDS)
                .map(|(_, w)| w.count_ones())
                .sum();
        assert_eq!(held, 1, "only the open flow's port is marked held");
    });
}

#[test]
fn a_new_flow_finds_the_last_free_port_and_exhaustion_recovers_as_flows_end() {
    with_programs(|p| {
        const RANGE: u16 = 200;
        p.dp.set_config(&settings::node_config(
            Some(ip(NODE)),
            None,
            (62000, 62000 + RANGE - 1),
            Default::default(),
        ))
        .unwrap();
        let send = |p: &mut Programs, client_port: u16| {
            let f = from_outside(packet::TCP, client_port, NODE, 30090);
            let (verdict, out) = p.xdp(&f.bytes());
            (f, verdict, out)
        };
        // Every port of the range, one flow each: the last flows find the
        // last free ports, which their hashes rarely name.
        let mut ports = std::collections::BTreeSet::new();
        for i in 0..RANGE {
            let (f, verdict, out) = send(p, 43000 + i);
            assert_eq!(verdict, XDP_TX, "flow {i}: {:?}", p.nonzero_stats());
            let port = u16::from_be_bytes([out[34], out[35]]);
            let mut expected = f.with_dst(ip(REMOTE_POD), 8080).with_src(ip(NODE), port);
            expected.dst_mac = NODE2_MAC;
            expected.src_mac = NODE_MAC;
            assert_eq!(out, expected.bytes(), "flow {i}");
            packet::assert_checksums_valid(&out);
            assert!((62000..62000 + RANGE).contains(&port), "{port}");
            assert!(ports.insert(port), "port {port} given twice");
        }
        assert_eq!(p.dp.nat().unwrap().len(), usize::from(RANGE));
        // One more: none is free. Dropped, counted, named by backend.
        let (_, verdict, _) = send(p, 43500);
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(p.stat("drop_nat_ports"), 1);
        // One flow resets; once the collection removed it, its port serves
        // the next new flow.
        let mut rst = from_outside(packet::TCP, 43007, NODE, 30090);
        rst.tcp_flags = 0x04;
        assert_eq!(p.xdp(&rst.bytes()).0, XDP_TX);
        let freed = nat_of(p, 43007).unwrap().0;
        let now = proxy_agent::kernel::monotonic_ns();
        let report =
            p.dp.gc(now + 11_000_000_000, &Lifetimes::default())
                .unwrap();
        assert_eq!(report.nat_removed, 1);
        assert_eq!(report.exhausted.len(), 1);
        assert_eq!(
            report.exhausted[0].0.to_string(),
            format!("{REMOTE_POD}:8080/TCP")
        );
        assert_eq!(report.exhausted[0].1, 1);
        let (_, verdict, out) = send(p, 43501);
        assert_eq!(verdict, XDP_TX, "{:?}", p.nonzero_stats());
        assert_eq!(u16::from_be_bytes([out[34], out[35]]), freed);
        assert_eq!(p.stat("drop_nat_ports"), 1);
    });
}

#[test]
fn unresolved_next_hop_goes_to_the_tc_program_which_lets_the_kernel_resolve_it() {
    with_programs(|p| {
        let f = from_outside(packet::TCP, 40006, NODE, 30099);
        let bytes = f.bytes();
        let (verdict, out) = p.xdp(&bytes);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, bytes, "XDP hands it on untouched");
        assert_eq!(p.stat("pass_no_neigh"), 1);
        let (verdict, out) = p.tc(&bytes);
        assert_eq!(verdict, TC_ACT_REDIRECT, "bpf_redirect_neigh");
        let mut expected = f
            .with_dst(ip(UNRESOLVED_POD), 8080)
            .with_src(ip(NODE), nat_port(&f));
        expected.src_mac = f.src_mac;
        expected.dst_mac = f.dst_mac;
        assert_eq!(
            out,
            expected.bytes(),
            "translated; the kernel fills in the MACs"
        );
        assert_eq!(p.dp.nat().unwrap().len(), 1, "tc reused the entry XDP made");
    });
}

#[test]
fn reply_to_a_client_without_neighbour_entry_goes_to_tc() {
    with_programs(|p| {
        let mut f = from_outside(packet::TCP, 40007, NODE, 30090);
        f.saddr = ip(FAR_CLIENT).into();
        p.xdp(&f.bytes());
        let mut reply = snated(&f, REMOTE_POD, 8080).reply();
        reply.src_mac = NODE2_MAC;
        reply.dst_mac = NODE_MAC;
        let bytes = reply.bytes();
        let (verdict, out) = p.xdp(&bytes);
        assert_eq!((verdict, out), (XDP_PASS, bytes.clone()));
        let (verdict, out) = p.tc(&bytes);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(
            out,
            reply
                .with_dst(ip(FAR_CLIENT), 40007)
                .with_src(ip(NODE), 30090)
                .bytes()
        );
    });
}

#[test]
fn frontend_ids_past_16_bits_reach_the_nat_and_source_range_maps() {
    // Recovered from maps where a frontend holds 65535: every frontend of
    // these tests gets an id past 16 bits.
    let mut taken = MapState::default();
    let slot0 =
        proxy_agent::desired::ServiceKey::new(ip("10.96.0.1"), 80, proxy_common::proto::TCP, 0);
    let value = ServiceValue {
        rev_nat_id: 65_535,
        ..ServiceValue::default()
    };
    taken.services.insert(slot0, value);
    with_programs_numbered(Ids::from_state(&taken), |p| {
        // The SNATed flow's NAT entry names its frontend by the wide id, and
        // the reply finds the NodePort by it.
        let f = from_outside(packet::TCP, 40010, NODE, 30090);
        let (verdict, out) = p.xdp(&f.bytes());
        assert_eq!(verdict, XDP_TX, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&f, REMOTE_POD, 8080).bytes());
        let nat = p.dp.nat().unwrap();
        assert!(nat[0].1.rev_nat_id > u32::from(u16::MAX), "{:?}", nat[0].1);
        let mut reply = snated(&f, REMOTE_POD, 8080).reply();
        reply.src_mac = NODE2_MAC;
        reply.dst_mac = NODE_MAC;
        let (verdict, out) = p.xdp(&reply.bytes());
        assert_eq!(verdict, XDP_TX);
        let mut expected = reply.with_dst(ip(CLIENT), 40010).with_src(ip(NODE), 30090);
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        assert_eq!(out, expected.bytes());
        // The LoadBalancer IP's source ranges, keyed by its wide id: an allowed
        // client is served, another dropped.
        let allowed = from_outside(packet::TCP, 40011, LB_IP, 80);
        let (verdict, out) = p.xdp(&allowed.bytes());
        assert_eq!(verdict, XDP_TX, "{:?}", p.nonzero_stats());
        assert_eq!(out, snated(&allowed, REMOTE_POD, 8080).bytes());
        let mut outsider = from_outside(packet::TCP, 40012, LB_IP, 80);
        outsider.saddr = ip("10.250.0.50").into();
        let bytes = outsider.bytes();
        assert_eq!(p.xdp(&bytes), (XDP_DROP, bytes));
        assert_eq!(p.stat("drop_source_range"), 1);
    });
}
