//! Verdicts other than a rewrite: rejects, frames left untouched or dropped as
//! the kernel would, every packet counted once, and the benchmarks' wrapper.

use super::*;

#[test]
fn tcp_without_backends_is_rejected_with_port_unreachable() {
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40040, EMPTY_VIP, 80);
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "sent back out of the pod's interface"
    );
    assert_eq!(out, packet::port_unreachable(&f));
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("reject_no_backend"), 1);
    assert_eq!(p.conntrack_len(), 0);
}

#[test]
fn udp_without_backends_is_rejected_with_port_unreachable() {
    let mut p = Programs::new(&cluster());
    let mut f = Frame::udp(CLIENT, 41040, EMPTY_VIP, 53);
    f.payload = vec![0x42; 300];
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        packet::port_unreachable(&f),
        "quotes the IP and UDP headers only"
    );
    packet::assert_checksums_valid(&out);
}

#[test]
fn reject_quotes_ip_options() {
    let mut p = Programs::new(&cluster());
    let mut f = Frame::tcp(CLIENT, 40041, EMPTY_VIP, 80);
    f.options = vec![1; 12];
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, packet::port_unreachable(&f));
    packet::assert_checksums_valid(&out);
}

#[test]
fn deleted_service_rejects_nothing_and_passes() {
    let mut p = Programs::new(&cluster());
    p.serve(&cluster()[1..]);
    let f = Frame::tcp(CLIENT, 40042, VIP, 80);
    assert_untouched(&mut p, FROM_POD, &f.bytes(), TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_not_service"), 1);
}

#[test]
fn non_service_address_is_untouched() {
    let mut p = Programs::new(&cluster());
    assert_untouched(
        &mut p,
        FROM_POD,
        &Frame::tcp(CLIENT, 40050, BACKEND_B, 8080).bytes(),
        TC_ACT_UNSPEC,
    );
    assert_untouched(
        &mut p,
        FROM_POD,
        &Frame::udp(CLIENT, 40050, "8.8.8.8", 53).bytes(),
        TC_ACT_UNSPEC,
    );
    assert_eq!(p.stat("pass_not_service"), 2);
    assert_eq!(p.conntrack_len(), 0);
}

#[test]
fn service_address_on_another_port_is_untouched() {
    let mut p = Programs::new(&cluster());
    assert_untouched(
        &mut p,
        FROM_POD,
        &Frame::tcp(CLIENT, 40051, VIP, 443).bytes(),
        TC_ACT_UNSPEC,
    );
}

#[test]
fn service_port_with_another_protocol_is_untouched() {
    let mut p = Programs::new(&cluster());
    assert_untouched(
        &mut p,
        FROM_POD,
        &Frame::udp(CLIENT, 40052, VIP, 80).bytes(),
        TC_ACT_UNSPEC,
    );
    assert_untouched(
        &mut p,
        FROM_POD,
        &Frame::tcp(CLIENT, 40052, VIP, 53).bytes(),
        TC_ACT_UNSPEC,
    );
}

#[test]
fn icmp_to_clusterip_is_untouched() {
    let mut p = Programs::new(&cluster());
    let mut f = Frame::tcp(CLIENT, 0, VIP, 0);
    f.proto = packet::ICMP;
    f.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    assert_untouched(&mut p, FROM_POD, &f.bytes(), TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_not_tcp_udp"), 1);
}

#[test]
fn arp_is_untouched() {
    let mut p = Programs::new(&cluster());
    let mut arp = packet::ethernet([0xff; 6], packet::CLIENT_MAC, 0x0806);
    arp.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend(packet::CLIENT_MAC);
    arp.extend([10, 244, 1, 2, 0, 0, 0, 0, 0, 0, 10, 96, 0, 10]);
    assert_untouched(&mut p, FROM_POD, &arp, TC_ACT_UNSPEC);
    assert_untouched(&mut p, TO_POD, &arp, TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_not_ip"), 2);
}

#[test]
fn ipv6_is_untouched() {
    let mut p = Programs::new(&cluster());
    let mut v6 = packet::ethernet(packet::NODE_MAC, packet::CLIENT_MAC, 0x86dd);
    v6.extend([0x60, 0, 0, 0, 0, 8, 17, 64]);
    v6.extend([0xfd; 32]);
    v6.extend([0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
    assert_untouched(&mut p, FROM_POD, &v6, TC_ACT_UNSPEC);
}

// BPF_PROG_TEST_RUN itself refuses frames shorter than Ethernet, and IPv4
// frames shorter than an IPv4 header, so the shortest frames it can carry are
// tested: a bare Ethernet header, and an IPv4 header whose IHL runs past the end.
#[test]
fn bare_ethernet_header_is_untouched() {
    let mut p = Programs::new(&cluster());
    let frame = packet::ethernet(packet::NODE_MAC, packet::CLIENT_MAC, 0x0806);
    assert_untouched(&mut p, FROM_POD, &frame, TC_ACT_UNSPEC);
    assert_untouched(&mut p, TO_POD, &frame, TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_not_ip"), 2);
}

#[test]
fn ihl_below_five_is_dropped() {
    let mut p = Programs::new(&cluster());
    let mut frame = Frame::tcp(CLIENT, 40061, VIP, 80).bytes();
    frame[14] = 0x44;
    assert_untouched(&mut p, FROM_POD, &frame, TC_ACT_SHOT);
    assert_untouched(&mut p, TO_POD, &frame, TC_ACT_SHOT);
    assert_eq!(p.conntrack_len(), 0);
}

#[test]
fn ihl_beyond_the_packet_is_dropped() {
    let mut p = Programs::new(&cluster());
    let mut frame = Frame::udp(CLIENT, 40062, VIP, 53).bytes();
    frame[14] = 0x4f; // 60-byte header in a 34-byte packet
    assert_untouched(&mut p, FROM_POD, &frame, TC_ACT_SHOT);
    assert_eq!(p.stat("drop_malformed_ip"), 1);
}

#[test]
fn total_length_beyond_the_frame_is_dropped() {
    let mut p = Programs::new(&cluster());
    let mut frame = Frame::tcp(CLIENT, 40063, VIP, 80).bytes();
    frame[16..18].copy_from_slice(&200u16.to_be_bytes());
    assert_untouched(&mut p, FROM_POD, &frame, TC_ACT_SHOT);
}

#[test]
fn ip_version_other_than_four_is_dropped() {
    let mut p = Programs::new(&cluster());
    let mut frame = Frame::tcp(CLIENT, 40064, VIP, 80).bytes();
    frame[14] = 0x65;
    assert_untouched(&mut p, FROM_POD, &frame, TC_ACT_SHOT);
}

#[test]
fn truncated_tcp_header_is_untouched() {
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40071, VIP, 80);
    let mut frame = f.bytes();
    frame.truncate(14 + 20 + 12);
    frame[16..18].copy_from_slice(&32u16.to_be_bytes());
    assert_untouched(&mut p, FROM_POD, &frame, TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_truncated_l4"), 1);
}

#[test]
fn reply_without_conntrack_is_untouched() {
    let mut p = Programs::new(&cluster());
    let stray = Frame::tcp(BACKEND_A, 8080, CLIENT, 40080);
    assert_untouched(&mut p, TO_POD, &stray.bytes(), TC_ACT_UNSPEC);
    // The forward direction of a flow is no reply either.
    let f = Frame::tcp(CLIENT, 40081, VIP, 80);
    let backend = assert_dnat(&mut p, &f);
    assert_untouched(
        &mut p,
        TO_POD,
        &f.with_dst(backend.0, backend.1).bytes(),
        TC_ACT_UNSPEC,
    );
    assert_eq!(p.stat("pass_no_conntrack"), 2);
}

#[test]
fn reply_after_its_frontend_is_gone_is_dropped() {
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40090, VIP, 80);
    let backend = assert_dnat(&mut p, &f);
    p.serve(&cluster()[1..]);
    let reply = f.with_dst(backend.0, backend.1).reply();
    assert_untouched(&mut p, TO_POD, &reply.bytes(), TC_ACT_SHOT);
    assert_eq!(p.stat("drop_no_revnat"), 1);
}

#[test]
fn every_packet_is_counted_once_with_its_bytes() {
    let mut p = Programs::new(&cluster());
    assert_counted_once(
        &mut p,
        &[
            Frame::tcp(CLIENT, 40095, VIP, 80),
            Frame::tcp(CLIENT, 40095, BACKEND_B, 80),
            Frame::udp(CLIENT, 40095, EMPTY_VIP, 53),
        ],
    );
}

/// Sends `frames` (to a frontend, to no frontend, to a frontend without
/// backends) from the pod and checks that the counters hold each packet
/// once, with its bytes, under its verdict.
pub(super) fn assert_counted_once(p: &mut Programs, frames: &[Frame; 3]) {
    let mut bytes = 0;
    for f in frames {
        bytes += f.bytes().len() as u64;
        p.send_from_pod(f);
    }
    let stats = p.dp.stats().unwrap();
    let total: (u64, u64) = stats
        .iter()
        .fold((0, 0), |t, (_, c)| (t.0 + c.packets, t.1 + c.bytes));
    assert_eq!(total, (3, bytes));
    assert_eq!(
        (
            p.stat("fwd_new"),
            p.stat("pass_not_service"),
            p.stat("reject_no_backend")
        ),
        (1, 1, 1)
    );
}

#[test]
fn a_wrapped_run_takes_the_real_path_every_time() {
    // The benchmarks time programs N runs at a time through a wrapper that
    // restores the frame before each run: every run must be the established
    // DNAT, and the last leave what a single run leaves.
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40700, VIP, 80);
    let backend = assert_dnat(&mut p, &f);
    // The flow's packets after its SYN, as the benchmark times them.
    let mut ack = f.clone();
    ack.tcp_flags = 0x10;
    let run = p.dp.run_wrapped(FROM_POD, &ack.bytes(), 100).unwrap();
    assert_eq!(run.verdict, TC_ACT_UNSPEC);
    assert_eq!(run.frame, ack.with_dst(backend.0, backend.1).bytes());
    assert_eq!(p.stat("fwd_established"), 100, "each run found the Service");
    // The wrapper's own cost is timed around a program that only passes.
    let run =
        p.dp.run_wrapped(bench::PASS_ONLY_TC, &f.bytes(), 100)
            .unwrap();
    assert_eq!((run.verdict, run.frame), (TC_ACT_UNSPEC, f.bytes()));
    // The wrappers restore headers without options or payload, and nothing else.
    let mut longer = f.clone();
    longer.payload = vec![1];
    assert!(p.dp.run_wrapped(FROM_POD, &longer.bytes(), 1).is_err());
}

#[test]
fn local_traffic_policy_without_a_local_endpoint_drops_instead_of_rejecting() {
    let mut services = cluster();
    let mut itp = service("itp-local", "10.96.0.80", 80, Protocol::Tcp, &[]);
    itp.local_only = true;
    services.push(itp);
    let mut p = Programs::new(&services);
    let frame = Frame::tcp(CLIENT, 49900, "10.96.0.80", 80).bytes();
    let (verdict, out) = p.run(FROM_POD, &frame);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "dropped: the Service has endpoints, none on this node"
    );
    assert_eq!(out, frame);
    assert_eq!(p.stat("drop_no_local_backend"), 1);
    assert_eq!(p.stat("reject_no_backend"), 0);
}
