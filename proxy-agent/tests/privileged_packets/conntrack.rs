//! Conntrack: both directions of a flow, a flow pinned to its backend while it
//! exists, expiry by protocol and TCP state, reopened tuples, lost reply
//! entries, and a second client port where one port reaches a backend twice.

use proxy_common::remap_ports;

use super::*;

#[test]
fn conntrack_holds_both_directions_of_a_flow() {
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40020, VIP, 80);
    let backend = assert_dnat(&mut p, &f);
    let entries = p.dp.conntrack().unwrap();
    assert_eq!(entries.len(), 2);
    let be = |a: Ipv4Addr| proxy_common::Ip4::new(a);
    let fwd = entries
        .iter()
        .find(|(k, _)| k.dir == ct_dir::FORWARD)
        .expect("forward entry");
    assert_eq!(
        (
            fwd.0.saddr,
            fwd.0.daddr,
            fwd.0.sport_be,
            fwd.0.dport_be,
            fwd.0.proto
        ),
        (
            be(f.saddr4()),
            be(f.daddr4()),
            f.sport.to_be(),
            f.dport.to_be(),
            packet::TCP
        )
    );
    let rev = entries
        .iter()
        .find(|(k, _)| k.dir == ct_dir::REPLY)
        .expect("reply entry");
    assert_eq!(
        (rev.0.saddr, rev.0.daddr, rev.0.sport_be, rev.0.dport_be),
        (
            be(backend.0),
            be(f.saddr4()),
            backend.1.to_be(),
            f.sport.to_be()
        )
    );
    assert_eq!(fwd.1.backend_id, rev.1.backend_id);
    assert_eq!(
        p.programmed.applied().backends[&fwd.1.backend_id].addr,
        backend.0
    );
    assert!(fwd.1.last_seen_ns > 0);
}

/// The programs stamp flows with the coarse clock where the kernel has it
/// (a clock-source read less per packet), else with the precise one: the
/// stamp lies between two readings of the clock they were told to use.
/// Had they read the precise clock where told the coarse one, the stamp
/// would be past the second coarse reading unless a tick fell between.
#[test]
fn flows_are_stamped_with_the_clock_the_kernel_has() {
    let clock = if proxy_agent::kernel::coarse_clock() {
        libc::CLOCK_MONOTONIC_COARSE
    } else {
        libc::CLOCK_MONOTONIC
    };
    let read = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the struct it is given.
        assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40021, VIP, 80);
    let before = read();
    assert_dnat(&mut p, &f);
    let after = read();
    for (_, entry) in p.dp.conntrack().unwrap() {
        assert!(
            (before..=after).contains(&entry.last_seen_ns),
            "stamped {} outside {before}..={after}",
            entry.last_seen_ns
        );
    }
}

/// A connection whose entries went (evicted from a full conntrack map, say):
/// its next packet is scheduled as a new flow, to the backend the flow hash
/// picks again, and counted apart from new connections.
#[test]
fn a_connection_that_lost_its_entries_keeps_its_backend_and_is_counted() {
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40040, VIP, 80);
    let first = assert_dnat(&mut p, &f);
    assert_eq!(p.dp.flush_conntrack().unwrap(), 2);
    let mut ack = f.clone();
    ack.tcp_flags = 0x10;
    assert_eq!(assert_dnat(&mut p, &ack), first, "the hash picks it again");
    assert_eq!(p.dp.conntrack().unwrap().len(), 2, "both entries are back");
    assert_eq!(
        (p.stat("fwd_new"), p.stat("fwd_new_mid_flow")),
        (1, 1),
        "the SYN was new; the ACK found its entries gone"
    );
}

#[test]
fn repeated_packets_of_a_flow_are_established() {
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40030, VIP, 80);
    let first = assert_dnat(&mut p, &f);
    let mut ack = f.clone();
    ack.tcp_flags = 0x10;
    for _ in 0..3 {
        assert_eq!(assert_dnat(&mut p, &ack), first);
    }
    assert_eq!((p.stat("fwd_new"), p.stat("fwd_established")), (1, 3));
}

#[test]
fn flow_keeps_its_backend_after_its_slot_is_rewritten() {
    let mut p = Programs::new(&cluster());
    // Find a flow on backend A, then replace A with C in the service: the slot
    // that held A now names C, but the flow stays on A while A exists.
    let f = (40100..40200)
        .map(|port| Frame::tcp(CLIENT, port, VIP, 80))
        .find(|f| p.hashed_backend(f).0 == ip(BACKEND_A))
        .unwrap();
    assert_dnat(&mut p, &f);
    let mut services = cluster();
    services[0].endpoints[0].address = ip("10.244.1.9").into(); // sorts into A's slot
    services.push(service(
        "keeps-a",
        "10.96.0.99",
        80,
        Protocol::Tcp,
        &[(BACKEND_A, 8080)],
    ));
    p.serve(&services);
    assert_eq!(
        p.hashed_backend(&f).0,
        ip("10.244.1.9"),
        "the slot now names the new backend"
    );
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, f.with_dst(ip(BACKEND_A), 8080).bytes());
    assert_eq!(p.stat("fwd_established"), 1);
    // A new flow that hashes to the same slot goes to the new backend.
    let g = (40200..40400)
        .map(|port| Frame::tcp(CLIENT, port, VIP, 80))
        .find(|g| p.hashed_backend(g).0 == ip("10.244.1.9"))
        .unwrap();
    assert_eq!(assert_dnat(&mut p, &g).0, ip("10.244.1.9"));
}

#[test]
fn flow_moves_when_its_backend_is_removed() {
    let mut p = Programs::new(&cluster());
    let f = (40300..40400)
        .map(|port| Frame::tcp(CLIENT, port, VIP, 80))
        .find(|f| p.hashed_backend(f).0 == ip(BACKEND_A))
        .unwrap();
    assert_dnat(&mut p, &f);
    let mut services = cluster();
    services[0].endpoints.remove(0);
    p.serve(&services);
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, f.with_dst(ip(BACKEND_B), 8080).bytes());
    assert_eq!(p.stat("fwd_new"), 2);
}

#[test]
fn new_flows_spread_over_all_backends() {
    let mut p = Programs::new(&cluster());
    let mut on_a = 0;
    for port in 42000..42064 {
        if assert_dnat(&mut p, &Frame::tcp(CLIENT, port, VIP, 80)).0 == ip(BACKEND_A) {
            on_a += 1;
        }
    }
    assert!((16..=48).contains(&on_a), "{on_a} of 64 flows on backend A");
}

/// A UDP flow (60 s lifetime) of the dns Service that the hash sends to A,
/// its forward conntrack key, its frontend id, and B's backend id: for
/// tests that pin it to B by hand.
fn a_flow_the_hash_sends_to_a(p: &Programs) -> (Frame, proxy_common::CtKey4, u32, u32) {
    let f = (49000..49200)
        .map(|port| Frame::udp(CLIENT, port, VIP, 53))
        .find(|f| p.hashed_backend(f).0 == ip(BACKEND_A))
        .unwrap();
    let applied = p.programmed.applied();
    let rev_nat_id = *applied
        .revnat
        .iter()
        .find(|(_, r)| r.port == 53 && r.addr == ip(VIP))
        .unwrap()
        .0;
    let backend_b = *applied
        .backends
        .iter()
        .find(|(_, b)| b.addr == ip(BACKEND_B) && b.port == 5353)
        .unwrap()
        .0;
    (f.clone(), forward_key(&f), rev_nat_id, backend_b)
}

#[test]
fn an_expired_conntrack_entry_no_longer_pins_its_flow() {
    let mut p = Programs::new(&cluster());
    let (f, key, rev_nat_id, backend_b) = a_flow_the_hash_sends_to_a(&p);
    let pinned = |last_seen_ns| proxy_common::CtValue {
        backend_id: backend_b,
        rev_nat_id,
        last_seen_ns,
        ..Default::default()
    };
    // The agent's clock may run a tick ahead of the programs' coarse one: a
    // stamp a little ahead is now, one far ahead long past. Each stamp is
    // taken from the clock just before its packet: on a loaded machine (a
    // VM without KVM) the rows before can take seconds.
    for (offset_ns, backend, why) in [
        (0, BACKEND_B, "a live entry pins the flow"),
        (-61_000_000_000, BACKEND_A, "an expired one does not"),
        (500_000_000, BACKEND_B, "stamped half a second ahead: live"),
        (5_000_000_000, BACKEND_A, "stamped seconds ahead: expired"),
    ] {
        let now = proxy_agent::kernel::monotonic_ns();
        p.dp.set_conntrack(key, pinned(now.wrapping_add_signed(offset_ns)))
            .unwrap();
        let (verdict, out) = p.send_from_pod(&f);
        assert_eq!(verdict, TC_ACT_UNSPEC, "{why}");
        assert_eq!(out, f.with_dst(ip(backend), 5353).bytes(), "{why}");
    }
}

/// The IPv4 backends are an array at the ids' low bits: an entry naming an
/// id whose slot holds another backend (B's, whose id has the same low
/// bits) finds no backend, and the flow gets the scheduler's, never B.
#[test]
fn a_flow_naming_an_id_whose_slot_holds_another_backend_is_scheduled_again() {
    let mut p = Programs::new(&cluster());
    let (f, key, rev_nat_id, backend_b) = a_flow_the_hash_sends_to_a(&p);
    let slots = u32::try_from(p.dp.capacity().unwrap().backends).unwrap();
    let pinned = |backend_id| proxy_common::CtValue {
        backend_id,
        rev_nat_id,
        last_seen_ns: proxy_agent::kernel::monotonic_ns(),
        ..Default::default()
    };
    for (id, backend, why) in [
        (backend_b, BACKEND_B, "B's own id"),
        (
            backend_b + slots,
            BACKEND_A,
            "an id of B's slot but not B's",
        ),
    ] {
        p.dp.set_conntrack(key, pinned(id)).unwrap();
        let (verdict, out) = p.send_from_pod(&f);
        assert_eq!(verdict, TC_ACT_UNSPEC, "{why}");
        assert_eq!(out, f.with_dst(ip(backend), 5353).bytes(), "{why}");
    }
}

/// A backend written over a slot that still holds an id whose removal
/// failed takes it; removing that old id afterwards leaves the new one.
#[test]
fn removing_an_id_whose_slot_another_took_leaves_the_other() {
    use proxy_agent::desired::{Backend, MapOp};
    let mut p = Programs::new(&[]);
    let slots = u32::try_from(p.dp.capacity().unwrap().backends).unwrap();
    let backend = |last: u8| Backend {
        addr: Ipv4Addr::new(10, 0, 0, last).into(),
        port: 8080,
        proto: packet::TCP,
        state: 0,
        flags: 0,
    };
    let (old, new) = (7, 7 + slots);
    p.dp.write(&MapOp::PutBackend(old, backend(1))).unwrap();
    p.dp.write(&MapOp::PutBackend(new, backend(2))).unwrap();
    p.dp.write(&MapOp::DelBackend(old)).unwrap();
    let held = p.dp.read_state().unwrap().backends;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held.get(&new), Some(&backend(2)));
    p.dp.write(&MapOp::DelBackend(new)).unwrap();
    assert!(p.dp.read_state().unwrap().backends.is_empty());
}

/// The conntrack entries of `f`'s flow: (forward, reply), each if present.
fn flow_entries(
    p: &Programs,
    f: &Frame,
) -> (Option<proxy_common::CtValue>, Option<proxy_common::CtValue>) {
    let entries = p.dp.conntrack().unwrap();
    let client = (proxy_common::Ip4::new(f.saddr4()), f.sport.to_be());
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

/// Leaves only `f`'s forward entry, as if the agent's expiry sweep had deleted
/// the reply direction just as the tuple was reused.
fn lose_reply_entry(p: &mut Programs, f: &Frame) -> proxy_common::CtValue {
    let (forward, _) = flow_entries(p, f);
    let forward = forward.expect("a forward entry");
    let key = forward_key(f);
    p.dp.flush_conntrack().unwrap();
    p.dp.set_conntrack(key, forward).unwrap();
    forward
}

#[test]
fn a_new_connection_on_a_closing_tuple_opens_it_again_with_its_reply_direction() {
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40500, VIP, 80);
    let backend = assert_dnat(&mut p, &f);
    let mut rst = f.clone();
    rst.tcp_flags = 0x04;
    assert_eq!(assert_dnat(&mut p, &rst), backend);
    let closing = lose_reply_entry(&mut p, &f);
    assert_ne!(closing.flags & ct_flags::CLOSING, 0);
    // The client reuses the port: a SYN on the closing tuple.
    assert_eq!(assert_dnat(&mut p, &f), backend, "the entry still pins it");
    let (forward, reply) = flow_entries(&p, &f);
    assert_eq!(forward.unwrap().flags & ct_flags::CLOSING, 0, "open again");
    let reply = reply.expect("the SYN wrote the reply direction again");
    assert_eq!(reply.backend_id, closing.backend_id);
    assert_eq!(reply.flags & ct_flags::CLOSING, 0);
    // Without it the SYN-ACK would reach the client from the backend's address.
    assert_reverse_nat(&mut p, &f, backend);
}

#[test]
fn a_udp_flow_that_lost_its_reply_entry_gets_it_back_within_a_second() {
    let mut p = Programs::new(&cluster());
    let f = Frame::udp(CLIENT, 41500, VIP, 53);
    let backend = assert_dnat(&mut p, &f);
    let mut forward = lose_reply_entry(&mut p, &f);
    // Last refreshed over a second ago (entries are refreshed once a second).
    forward.last_seen_ns -= 2_000_000_000;
    let key = forward_key(&f);
    p.dp.set_conntrack(key, forward).unwrap();
    assert_eq!(assert_dnat(&mut p, &f), backend);
    assert!(flow_entries(&p, &f).1.is_some(), "the reply entry is back");
    assert_reverse_nat(&mut p, &f, backend);
}

#[test]
fn conntrack_entries_expire_by_protocol_and_tcp_state() {
    let mut p = Programs::new(&cluster());
    let open = Frame::tcp(CLIENT, 49500, VIP, 80);
    let mut closing = Frame::tcp(CLIENT, 49501, VIP, 80);
    let udp = Frame::udp(CLIENT, 49502, VIP, 53);
    for f in [&open, &closing, &udp] {
        p.send_from_pod(f);
    }
    closing.tcp_flags = 0x04; // RST
    p.send_from_pod(&closing);
    let now = proxy_agent::kernel::monotonic_ns();
    let s = 1_000_000_000u64;
    let forward = |p: &Programs| {
        let mut ports: Vec<u16> =
            p.dp.conntrack()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.dir == ct_dir::FORWARD)
                .map(|(k, _)| u16::from_be(k.sport_be))
                .collect();
        ports.sort();
        ports
    };
    assert_eq!(
        p.dp.gc(now, &Default::default()).unwrap().conntrack_removed,
        0,
        "nothing is old yet"
    );
    // 11 s on: the reset TCP connection is gone (both directions), the rest stays.
    assert_eq!(
        p.dp.gc(now + 11 * s, &Default::default())
            .unwrap()
            .conntrack_removed,
        2
    );
    assert_eq!(forward(&p), [49500, 49502]);
    // 61 s on: UDP too.
    assert_eq!(
        p.dp.gc(now + 61 * s, &Default::default())
            .unwrap()
            .conntrack_removed,
        2
    );
    assert_eq!(forward(&p), [49500]);
    // 6 hours on: the open TCP connection.
    p.dp.gc(now + 21_601 * s, &Default::default()).unwrap();
    assert!(p.dp.conntrack().unwrap().is_empty());
}

#[test]
fn one_client_port_to_two_frontends_of_one_backend_gets_a_second_port() {
    // Two Services, one backend: a client that dials both from one port would
    // reach the backend twice on one tuple. The second flow gets another port.
    let mut services = cluster();
    for (name, vip) in [("one-a", "10.96.0.61"), ("one-b", "10.96.0.62")] {
        services.push(service(name, vip, 80, Protocol::Tcp, &[(BACKEND_B, 8080)]));
    }
    let mut p = Programs::new(&services);
    let backend = (ip(BACKEND_B), 8080);
    let first = Frame::tcp(CLIENT, 40600, "10.96.0.61", 80);
    assert_eq!(assert_dnat(&mut p, &first), backend);

    let second = Frame::tcp(CLIENT, 40600, "10.96.0.62", 80);
    let port = remap_ports::nth(second.flow_hash(), 0);
    let (verdict, out) = p.send_from_pod(&second);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let remapped = second
        .with_dst(backend.0, backend.1)
        .with_src(ip(CLIENT), port);
    assert_eq!(out, remapped.bytes(), "to the backend from port {port}");
    packet::assert_checksums_valid(&out);

    // Each flow's replies go back from its own frontend, to the client's own port.
    assert_reverse_nat(&mut p, &first, backend);
    let reply = remapped.reply();
    let (verdict, out) = p.send_to_pod(&reply);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let back = reply
        .with_src(ip("10.96.0.62"), 80)
        .with_dst(ip(CLIENT), 40600);
    assert_eq!(
        out,
        back.bytes(),
        "back to port 40600 from the second frontend"
    );
    packet::assert_checksums_valid(&out);

    // Later packets of both flows keep their ports; the first flow's replies
    // are still its own.
    let mut ack = second.clone();
    ack.tcp_flags = 0x10;
    let mut remapped_ack = remapped.clone();
    remapped_ack.tcp_flags = 0x10;
    assert_eq!(p.send_from_pod(&ack).1, remapped_ack.bytes());
    let mut ack = first.clone();
    ack.tcp_flags = 0x10;
    assert_eq!(assert_dnat(&mut p, &ack), backend);
    assert_reverse_nat(&mut p, &first, backend);
    assert_eq!((p.stat("fwd_new"), p.stat("fwd_established")), (2, 2));

    // Its closing marks the remapped reply entry, which the agent then collects.
    let mut fin = second.clone();
    fin.tcp_flags = 0x11;
    p.send_from_pod(&fin);
    let entries = p.dp.conntrack().unwrap();
    let remapped_reply = entries
        .iter()
        .find(|(k, _)| k.dir == ct_dir::REPLY && k.dport_be == port.to_be())
        .expect("the remapped flow's reply entry");
    assert_eq!(remapped_reply.1.remap_port_be, 40600u16.to_be());
    assert_ne!(remapped_reply.1.flags & ct_flags::CLOSING, 0);
}

#[test]
fn a_flow_that_finds_its_own_reply_entry_keeps_its_port() {
    // A flow whose forward entry was lost finds the reply entry of its own
    // tuple at the backend: that is no other flow's, so the port stays.
    let mut services = cluster();
    services.push(service(
        "one",
        "10.96.0.61",
        80,
        Protocol::Tcp,
        &[(BACKEND_B, 8080)],
    ));
    let mut p = Programs::new(&services);
    let f = Frame::tcp(CLIENT, 40700, "10.96.0.61", 80);
    assert_dnat(&mut p, &f);
    let entries = p.dp.conntrack().unwrap();
    p.dp.flush_conntrack().unwrap();
    for (key, value) in entries.iter().filter(|(k, _)| k.dir == ct_dir::REPLY) {
        p.dp.set_conntrack(*key, *value).unwrap();
    }
    assert_dnat(&mut p, &f);
    assert_reverse_nat(&mut p, &f, (ip(BACKEND_B), 8080));
    assert_eq!(p.stat("fwd_new"), 2);
}

#[test]
fn a_pod_reaching_itself_through_two_frontends_from_one_port_gets_a_second_port() {
    let mut services = cluster();
    for (name, vip) in [("self-a", "10.96.0.51"), ("self-b", "10.96.0.52")] {
        services.push(service(name, vip, 80, Protocol::Tcp, &[(CLIENT, 8080)]));
    }
    let mut p = Programs::new(&services);
    let hairpin = Ipv4Addr::from(proxy_common::HAIRPIN_ADDR);
    let first = Frame::tcp(CLIENT, 40800, "10.96.0.51", 80);
    let (verdict, out) = p.send_from_pod(&first);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut to_itself = first.with_dst(ip(CLIENT), 8080).with_src(hairpin, 40800);
    (to_itself.src_mac, to_itself.dst_mac) = (first.dst_mac, first.src_mac);
    assert_eq!(out, to_itself.bytes());

    let second = Frame::tcp(CLIENT, 40800, "10.96.0.52", 80);
    let port = remap_ports::nth(second.flow_hash(), 0);
    let (verdict, out) = p.send_from_pod(&second);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut remapped = second.with_dst(ip(CLIENT), 8080).with_src(hairpin, port);
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
        .with_dst(ip(CLIENT), 40800)
        .with_src(ip("10.96.0.52"), 80);
    (back.src_mac, back.dst_mac) = (second.dst_mac, second.src_mac);
    assert_eq!(out, back.bytes());
    packet::assert_checksums_valid(&out);
}
