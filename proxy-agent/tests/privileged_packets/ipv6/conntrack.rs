//! IPv6 conntrack: a flow pinned to its backend while it exists, expiry by
//! protocol and TCP state, a flow that lost its entries, a reused closing
//! tuple, a lost reply entry, and a second client port where one port
//! reaches a backend twice: the twins of `conntrack.rs`.

use proxy_common::{remap_ports, CtValue};

use super::*;

/// The conntrack key of `f`'s direction of its flow, as the client sent it.
fn forward_key6(f: &Frame) -> CtKey6 {
    let (IpAddr::V6(saddr), IpAddr::V6(daddr)) = (f.saddr, f.daddr) else {
        panic!("an IPv4 frame in an IPv6 test")
    };
    CtKey6 {
        saddr: saddr.octets(),
        daddr: daddr.octets(),
        sport_be: f.sport.to_be(),
        dport_be: f.dport.to_be(),
        proto: f.proto,
        dir: ct_dir::FORWARD,
        _pad: 0,
    }
}

/// The conntrack entries of `f`'s flow: (forward, reply), each if present.
fn flow_entries6(p: &Programs, f: &Frame) -> (Option<CtValue>, Option<CtValue>) {
    let IpAddr::V6(client) = f.saddr else {
        panic!("an IPv4 frame in an IPv6 test")
    };
    let client = (client.octets(), f.sport.to_be());
    let entries = conntrack6(p);
    let forward = entries
        .iter()
        .find(|(k, _)| k.dir == ct_dir::FORWARD && (k.saddr, k.sport_be) == client)
        .map(|(_, v)| *v);
    let reply = entries
        .iter()
        .find(|(k, _)| k.dir == ct_dir::REPLY && (k.daddr, k.dport_be) == client)
        .map(|(_, v)| *v);
    (forward, reply)
}

/// Leaves only `f`'s forward entry, as if the agent's expiry sweep had
/// deleted the reply direction just as the tuple was reused.
fn lose_reply_entry6(p: &mut Programs, f: &Frame) -> CtValue {
    let forward = flow_entries6(p, f).0.expect("a forward entry");
    p.dp.flush_conntrack().unwrap();
    p.dp.v6
        .conntrack
        .insert(forward_key6(f), forward, 0)
        .unwrap();
    forward
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

/// A connection whose entries went (evicted from a full conntrack map, say):
/// its next packet is scheduled as a new flow, to the backend the flow hash
/// picks again, and counted apart from new connections.
#[test]
fn an_ipv6_connection_that_lost_its_entries_keeps_its_backend_and_is_counted() {
    let mut p = dual_stack();
    let f = Frame::tcp(CLIENT6, 40400, VIP6, 80);
    let first = assert_dnat_ip(&mut p, &f);
    assert_eq!(p.dp.flush_conntrack().unwrap(), 2);
    let mut ack = f.clone();
    ack.tcp_flags = 0x10;
    assert_eq!(
        assert_dnat_ip(&mut p, &ack),
        first,
        "the hash picks it again"
    );
    assert_eq!(conntrack6(&p).len(), 2, "both entries are back");
    assert_eq!(
        (p.stat("fwd_new"), p.stat("fwd_new_mid_flow")),
        (1, 1),
        "the SYN was new; the ACK found its entries gone"
    );
}

#[test]
fn an_ipv6_flow_keeps_its_backend_after_its_slot_is_rewritten() {
    let mut p = dual_stack();
    // A flow on backend A; then A is replaced by C in web6: the slot that
    // held A names C, but the flow stays on A while A exists (another
    // frontend keeps it).
    let f = (40410..40510)
        .map(|port| Frame::tcp(CLIENT6, port, VIP6, 80))
        .find(|f| p.hashed(f).0 == ip6(BACKEND6_A))
        .unwrap();
    assert_dnat_ip(&mut p, &f);
    let c = "fd00:10:244:1::9"; // sorts into A's slot
    let mut services = dual_stack_services(|web6| web6.endpoints[0].address = ip6(c).into());
    services.push(service(
        "keeps-a6",
        "fd00:10:96::99",
        80,
        Protocol::Tcp,
        &[(BACKEND6_A, 8080)],
    ));
    p.serve(&services);
    assert_eq!(p.hashed(&f).0, ip6(c), "the slot now names the new backend");
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, f.with_dst(ip6(BACKEND6_A), 8080).bytes());
    assert_eq!(p.stat("fwd_established"), 1);
    // A new flow that hashes to the same slot goes to the new backend.
    let g = (40510..40710)
        .map(|port| Frame::tcp(CLIENT6, port, VIP6, 80))
        .find(|g| p.hashed(g).0 == ip6(c))
        .unwrap();
    assert_eq!(assert_dnat_ip(&mut p, &g).0, ip6(c));
}

#[test]
fn an_expired_ipv6_conntrack_entry_no_longer_pins_its_flow() {
    let mut p = dual_stack();
    // A UDP flow (60 s lifetime) the hash sends to A, pinned (by hand) to B.
    let f = (41100..41300)
        .map(|port| Frame::udp(CLIENT6, port, VIP6, 53))
        .find(|f| p.hashed(f).0 == ip6(BACKEND6_A))
        .unwrap();
    let backend_b = *p
        .programmed
        .applied()
        .backends
        .iter()
        .find(|(_, b)| b.addr == ip6(BACKEND6_B) && b.port == 5353)
        .unwrap()
        .0;
    let rev_nat_id = *p
        .programmed
        .applied()
        .revnat
        .iter()
        .find(|(_, r)| r.addr == ip6(VIP6) && r.port == 53)
        .unwrap()
        .0;
    let pinned = |last_seen_ns| CtValue {
        backend_id: backend_b,
        rev_nat_id,
        last_seen_ns,
        ..Default::default()
    };
    let key = forward_key6(&f);
    let now = proxy_agent::kernel::monotonic_ns();
    p.dp.v6.conntrack.insert(key, pinned(now), 0).unwrap();
    let (_, out) = p.send_from_pod(&f);
    assert_eq!(
        out,
        f.with_dst(ip6(BACKEND6_B), 5353).bytes(),
        "a live entry pins the flow"
    );
    let stale = pinned(proxy_agent::kernel::monotonic_ns().wrapping_sub(61 * 1_000_000_000));
    p.dp.v6.conntrack.insert(key, stale, 0).unwrap();
    let (_, out) = p.send_from_pod(&f);
    assert_eq!(
        out,
        f.with_dst(ip6(BACKEND6_A), 5353).bytes(),
        "an expired one does not"
    );
}

#[test]
fn a_new_ipv6_connection_on_a_closing_tuple_opens_it_again_with_its_reply_direction() {
    let mut p = dual_stack();
    let f = Frame::tcp(CLIENT6, 40720, VIP6, 80);
    let backend = assert_dnat_ip(&mut p, &f);
    let mut rst = f.clone();
    rst.tcp_flags = 0x04;
    assert_eq!(assert_dnat_ip(&mut p, &rst), backend);
    let closing = lose_reply_entry6(&mut p, &f);
    assert_ne!(closing.flags & ct_flags::CLOSING, 0);
    // The client reuses the port: a SYN on the closing tuple.
    assert_eq!(
        assert_dnat_ip(&mut p, &f),
        backend,
        "the entry still pins it"
    );
    let (forward, reply) = flow_entries6(&p, &f);
    assert_eq!(forward.unwrap().flags & ct_flags::CLOSING, 0, "open again");
    let reply = reply.expect("the SYN wrote the reply direction again");
    assert_eq!(reply.backend_id, closing.backend_id);
    assert_eq!(reply.flags & ct_flags::CLOSING, 0);
    // Without it the SYN-ACK would reach the client from the backend's address.
    assert_reverse_nat_ip(&mut p, &f, backend);
}

#[test]
fn an_ipv6_udp_flow_that_lost_its_reply_entry_gets_it_back_within_a_second() {
    let mut p = dual_stack();
    let f = Frame::udp(CLIENT6, 41500, VIP6, 53);
    let backend = assert_dnat_ip(&mut p, &f);
    let mut forward = lose_reply_entry6(&mut p, &f);
    // Last refreshed over a second ago (entries are refreshed once a second).
    forward.last_seen_ns -= 2_000_000_000;
    p.dp.v6
        .conntrack
        .insert(forward_key6(&f), forward, 0)
        .unwrap();
    assert_eq!(assert_dnat_ip(&mut p, &f), backend);
    assert!(flow_entries6(&p, &f).1.is_some(), "the reply entry is back");
    assert_reverse_nat_ip(&mut p, &f, backend);
}

/// The dual-stack cluster with two more IPv6 frontends, `fd00:10:96::61`
/// and `::62` port 80, both of the one backend `backend`.
fn two_frontends_of(backend: &str) -> Programs {
    let mut services = dual_stack_services(|_| {});
    for (name, vip) in [("one-a6", "fd00:10:96::61"), ("one-b6", "fd00:10:96::62")] {
        services.push(service(name, vip, 80, Protocol::Tcp, &[(backend, 8080)]));
    }
    Programs::new(&services)
}

#[test]
fn one_ipv6_client_port_to_two_frontends_of_one_backend_gets_a_second_port() {
    // A client that dials both frontends from one port would reach the
    // backend twice on one tuple. The second flow gets another port.
    let mut p = two_frontends_of(BACKEND6_B);
    let backend = (IpAddr::from(ip6(BACKEND6_B)), 8080);
    let first = Frame::tcp(CLIENT6, 40730, "fd00:10:96::61", 80);
    assert_eq!(assert_dnat_ip(&mut p, &first), backend);

    let second = Frame::tcp(CLIENT6, 40730, "fd00:10:96::62", 80);
    let port = remap_ports::nth(second.flow_hash(), 0);
    let (verdict, out) = p.send_from_pod(&second);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let remapped = second
        .with_dst(backend.0, backend.1)
        .with_src(ip6(CLIENT6), port);
    assert_eq!(out, remapped.bytes(), "to the backend from port {port}");
    packet::assert_checksums_valid(&out);

    // Each flow's replies go back from its own frontend, to the client's own port.
    assert_reverse_nat_ip(&mut p, &first, backend);
    let reply = remapped.reply();
    let (verdict, out) = p.send_to_pod(&reply);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let back = reply
        .with_src(ip6("fd00:10:96::62"), 80)
        .with_dst(ip6(CLIENT6), 40730);
    assert_eq!(
        out,
        back.bytes(),
        "back to port 40730 from the second frontend"
    );
    packet::assert_checksums_valid(&out);

    // Later packets of both flows keep their ports.
    let mut ack = second.clone();
    ack.tcp_flags = 0x10;
    let mut remapped_ack = remapped.clone();
    remapped_ack.tcp_flags = 0x10;
    assert_eq!(p.send_from_pod(&ack).1, remapped_ack.bytes());
    let mut ack = first.clone();
    ack.tcp_flags = 0x10;
    assert_eq!(assert_dnat_ip(&mut p, &ack), backend);
    assert_reverse_nat_ip(&mut p, &first, backend);
    assert_eq!((p.stat("fwd_new"), p.stat("fwd_established")), (2, 2));

    // Its closing marks the remapped reply entry, which the agent then collects.
    let mut fin = second.clone();
    fin.tcp_flags = 0x11;
    p.send_from_pod(&fin);
    let entries = conntrack6(&p);
    let remapped_reply = entries
        .iter()
        .find(|(k, _)| k.dir == ct_dir::REPLY && k.dport_be == port.to_be())
        .expect("the remapped flow's reply entry");
    assert_eq!(remapped_reply.1.remap_port_be, 40730u16.to_be());
    assert_ne!(remapped_reply.1.flags & ct_flags::CLOSING, 0);
    let s = 1_000_000_000u64;
    let now = proxy_agent::kernel::monotonic_ns();
    p.dp.gc(now + 11 * s, &Default::default()).unwrap();
    assert!(
        !conntrack6(&p)
            .iter()
            .any(|(k, _)| k.dport_be == port.to_be()),
        "collected"
    );
}

#[test]
fn an_ipv6_flow_that_finds_its_own_reply_entry_keeps_its_port() {
    // A flow whose forward entry was lost finds the reply entry of its own
    // tuple at the backend: that is no other flow's, so the port stays.
    let mut p = two_frontends_of(BACKEND6_B);
    let f = Frame::tcp(CLIENT6, 40740, "fd00:10:96::61", 80);
    assert_dnat_ip(&mut p, &f);
    let entries = conntrack6(&p);
    p.dp.flush_conntrack().unwrap();
    for (key, value) in entries.iter().filter(|(k, _)| k.dir == ct_dir::REPLY) {
        p.dp.v6.conntrack.insert(*key, *value, 0).unwrap();
    }
    assert_dnat_ip(&mut p, &f);
    assert_reverse_nat_ip(&mut p, &f, (ip6(BACKEND6_B).into(), 8080));
    assert_eq!(p.stat("fwd_new"), 2);
}

#[test]
fn an_ipv6_pod_reaching_itself_through_two_frontends_from_one_port_gets_a_second_port() {
    let mut p = two_frontends_of(CLIENT6);
    let hairpin = Ipv6Addr::from(HAIRPIN_ADDR6);
    let first = Frame::tcp(CLIENT6, 40750, "fd00:10:96::61", 80);
    let (verdict, out) = p.send_from_pod(&first);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut to_itself = first.with_dst(ip6(CLIENT6), 8080).with_src(hairpin, 40750);
    (to_itself.src_mac, to_itself.dst_mac) = (first.dst_mac, first.src_mac);
    assert_eq!(out, to_itself.bytes());

    let second = Frame::tcp(CLIENT6, 40750, "fd00:10:96::62", 80);
    let port = remap_ports::nth(second.flow_hash(), 0);
    let (verdict, out) = p.send_from_pod(&second);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut remapped = second.with_dst(ip6(CLIENT6), 8080).with_src(hairpin, port);
    (remapped.src_mac, remapped.dst_mac) = (second.dst_mac, second.src_mac);
    assert_eq!(
        out,
        remapped.bytes(),
        "into the pod from hairpin port {port}"
    );
    packet::assert_checksums_valid(&out);

    // The pod's answer to the remapped port goes back from the second
    // frontend to its own port.
    let mut reply = remapped.reply();
    (reply.src_mac, reply.dst_mac) = (second.src_mac, second.dst_mac);
    let (verdict, out) = p.send_from_pod(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut back = reply
        .with_dst(ip6(CLIENT6), 40750)
        .with_src(ip6("fd00:10:96::62"), 80);
    (back.src_mac, back.dst_mac) = (second.dst_mac, second.src_mac);
    assert_eq!(out, back.bytes());
    packet::assert_checksums_valid(&out);
}
