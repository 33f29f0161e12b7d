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
    let run =
        p.dp.run_wrapped(FROM_POD, &ack.bytes(), 100, Tuples::Same)
            .unwrap();
    assert_eq!(run.verdict, TC_ACT_UNSPEC);
    assert_eq!(run.frame, ack.with_dst(backend.0, backend.1).bytes());
    assert_eq!(p.stat("fwd_established"), 100, "each run found the Service");
    // The wrapper's own cost is timed around a program that only passes.
    let run =
        p.dp.run_wrapped(bench::PASS_ONLY_TC, &f.bytes(), 100, Tuples::Same)
            .unwrap();
    assert_eq!((run.verdict, run.frame), (TC_ACT_UNSPEC, f.bytes()));
    // The wrappers restore headers without options or payload, and nothing else.
    let mut longer = f.clone();
    longer.payload = vec![1];
    assert!(p
        .dp
        .run_wrapped(FROM_POD, &longer.bytes(), 1, Tuples::Same)
        .is_err());
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

#[test]
fn external_traffic_policy_local_sends_pods_to_the_cluster_endpoints() {
    // A NodePort under externalTrafficPolicy=Local with no endpoint on this
    // node, and one with an endpoint here (BACKEND_A): a pod dialling either
    // is served from the cluster's endpoints, as kube-proxy short-circuits
    // it ("pod traffic for external destinations").
    let mut services = cluster();
    let mut none_here = service("etp-local-none", "10.250.0.11", 30082, Protocol::Tcp, &[]);
    none_here.local_only = true;
    none_here.cluster_endpoints = vec![Endpoint::new(ip(BACKEND_B), 8080)];
    let mut one_here = service(
        "etp-local",
        "10.250.0.11",
        30081,
        Protocol::Tcp,
        &[(BACKEND_A, 8080)],
    );
    one_here.local_only = true;
    one_here.scheduler = Some(proxy_agent::frontend::Scheduler::Maglev);
    one_here.cluster_endpoints = vec![Endpoint::new(ip(BACKEND_B), 8080)];
    services.extend([none_here, one_here]);
    let mut p = Programs::new(&services);
    for dport in [30082, 30081] {
        // Ports of their own: the same tuple to the same backend would be remapped.
        let f = Frame::tcp(CLIENT, dport + 10000, "10.250.0.11", dport);
        let (verdict, out) = p.send_from_pod(&f);
        assert_eq!(verdict, TC_ACT_UNSPEC);
        assert_eq!(
            out,
            f.with_dst(ip(BACKEND_B), 8080).bytes(),
            "NodePort {dport}"
        );
        assert_reverse_nat(&mut p, &f, (ip(BACKEND_B), 8080));
    }
    assert_eq!(p.stat("drop_no_local_backend"), 0);
    assert_eq!(p.stat("fwd_new"), 2);
}

#[test]
fn new_flows_into_the_service_cidrs_that_no_frontend_serves_are_refused() {
    let mut p = Programs::new(&cluster());
    let cidrs: Vec<Cidr> = vec![
        "10.96.0.0/16".parse().unwrap(),
        "fd00:10:96::/112".parse().unwrap(),
    ];
    p.dp.set_config(&settings::node_config(
        None,
        None,
        settings::DEFAULT_NAT_PORTS,
        settings::service_cidrs(&cidrs).unwrap(),
    ))
    .unwrap();
    for f in [
        // An unallocated ClusterIP (a deleted Service's), TCP and UDP.
        Frame::tcp(CLIENT, 40100, "10.96.0.99", 80),
        Frame::udp(CLIENT, 40101, "10.96.0.99", 53),
        // A port the ClusterIP does not serve.
        Frame::tcp(CLIENT, 40102, VIP, 81),
        // IPv6.
        Frame::tcp("fd00:10:244:1::2", 40103, "fd00:10:96::99", 80),
    ] {
        let (verdict, out) = p.send_from_pod(&f);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{f:?}");
        assert_eq!(out, packet::port_unreachable(&f), "{f:?}");
        packet::assert_checksums_valid(&out);
    }
    assert_eq!(p.stat("reject_no_service"), 4);
    // A segment of a connection that began before (its Service deleted
    // under it) passes as before; so does anything outside the ranges.
    let established = Frame::tcp(CLIENT, 40104, "10.96.0.99", 80).segment(10);
    assert_untouched(&mut p, FROM_POD, &established.bytes(), TC_ACT_UNSPEC);
    let outside = Frame::tcp(CLIENT, 40105, "10.97.0.1", 80);
    assert_untouched(&mut p, FROM_POD, &outside.bytes(), TC_ACT_UNSPEC);
    // A live frontend still works.
    assert_dnat(&mut p, &Frame::tcp(CLIENT, 40106, VIP, 80));
    assert_eq!(p.stat("reject_no_service"), 4);
    assert_eq!(p.stat("reject_no_backend"), 0);
}
