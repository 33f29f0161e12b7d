//! Packet tests: real frames through the real tc programs with BPF_PROG_TEST_RUN,
//! asserting the verdict and every byte of the frame that comes out.

mod support;

use std::{
    net::Ipv4Addr,
    ops::{Deref, DerefMut},
};

use proxy_agent::{
    desired::{Ids, MapState},
    frontend::{Endpoint, Frontend, FrontendSpec, Protocol},
    harness::{self, Hook},
};
use proxy_common::{
    bench, ct_dir, ct_flags, hash,
    program_names::{FROM_POD, TO_POD},
    proto, ServiceKey4, ServiceValue,
};
use support::packet::{self, Frame};

const TC_ACT_UNSPEC: u32 = u32::MAX; // -1: continue
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: &str = "10.244.1.2";
const VIP: &str = "10.96.0.10";
const EMPTY_VIP: &str = "10.96.0.11";
const BACKEND_A: &str = "10.244.1.3";
const BACKEND_B: &str = "10.244.2.3";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn service(
    name: &str,
    vip: &str,
    port: u16,
    protocol: Protocol,
    endpoints: &[(&str, u16)],
) -> FrontendSpec {
    let frontend = Frontend {
        address: ip(vip),
        port,
        protocol,
    };
    FrontendSpec::new(
        name,
        frontend,
        endpoints
            .iter()
            .map(|(a, p)| Endpoint::new(ip(a), *p))
            .collect(),
    )
}

fn cluster() -> Vec<FrontendSpec> {
    vec![
        service(
            "web",
            VIP,
            80,
            Protocol::Tcp,
            &[(BACKEND_A, 8080), (BACKEND_B, 8080)],
        ),
        service(
            "dns",
            VIP,
            53,
            Protocol::Udp,
            &[(BACKEND_A, 5353), (BACKEND_B, 5353)],
        ),
        service("empty-tcp", EMPTY_VIP, 80, Protocol::Tcp, &[]),
        service("empty-udp", EMPTY_VIP, 53, Protocol::Udp, &[]),
    ]
}

/// The shared harness, with what these tests ask of it on top.
struct Programs(harness::Programs);

impl Deref for Programs {
    type Target = harness::Programs;

    fn deref(&self) -> &harness::Programs {
        &self.0
    }
}

impl DerefMut for Programs {
    fn deref_mut(&mut self) -> &mut harness::Programs {
        &mut self.0
    }
}

impl Programs {
    fn new(services: &[FrontendSpec]) -> Self {
        Self::with_ids(services, Ids::default())
    }

    /// With the ids an agent recovered from maps it found (see [`ids_taken`]).
    fn with_ids(services: &[FrontendSpec], ids: Ids) -> Self {
        support::require_root();
        let mut p = Self(harness::Programs::load().expect("load the programs"));
        p.ids = ids;
        p.serve(services);
        p
    }

    /// The frontend id the agent gave `vip:port` (TCP).
    fn frontend_id(&self, vip: &str, port: u16) -> u32 {
        self.state.services[&slot0(vip, port)].rev_nat_id
    }

    /// Programs the maps for `services`, as the agent would, and checks they
    /// held what was written before and hold what is wanted after.
    fn serve(&mut self, services: &[FrontendSpec]) {
        let problems = self.0.serve_checked(services).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }

    fn run(&mut self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let run = self.0.run(Hook::Tc(program, None), frame).unwrap();
        (run.verdict, run.frame)
    }

    fn send_from_pod(&mut self, frame: &Frame) -> (u32, Vec<u8>) {
        self.run(FROM_POD, &frame.bytes())
    }

    fn send_to_pod(&mut self, frame: &Frame) -> (u32, Vec<u8>) {
        self.run(TO_POD, &frame.bytes())
    }

    /// The backend the agent's own view says this flow hashes to.
    fn hashed_backend(&self, f: &Frame) -> (Ipv4Addr, u16) {
        let key = |slot| ServiceKey4::new(f.daddr, f.dport, f.proto, slot);
        let count = self.state.services[&key(0)].count;
        let h = hash::flow_hash4(
            u32::from(f.saddr).to_be(),
            u32::from(f.daddr).to_be(),
            f.sport.to_be(),
            f.dport.to_be(),
            f.proto,
        );
        let id = self.state.services[&key(hash::slot_for(h, count))].backend_id;
        let b = self.state.backends[&id];
        (b.addr(), b.port())
    }

    fn stat(&self, name: &str) -> u64 {
        self.0.stat(name).unwrap()
    }

    fn conntrack_len(&self) -> usize {
        self.dp.conntrack().unwrap().len()
    }
}

/// Sends `f` from the pod and asserts it comes out DNATed to its hashed backend,
/// byte for byte. Returns the backend.
fn assert_dnat(p: &mut Programs, f: &Frame) -> (Ipv4Addr, u16) {
    let backend = p.hashed_backend(f);
    let (verdict, out) = p.send_from_pod(f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(
        out,
        f.with_dst(backend.0, backend.1).bytes(),
        "DNAT to {backend:?}"
    );
    packet::assert_checksums_valid(&out);
    backend
}

/// Sends the backend's reply to `f` towards the pod and asserts the source is
/// the frontend again, byte for byte.
fn assert_reverse_nat(p: &mut Programs, f: &Frame, backend: (Ipv4Addr, u16)) {
    let reply = f.with_dst(backend.0, backend.1).reply();
    let (verdict, out) = p.send_to_pod(&reply);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(
        out,
        reply.with_src(f.daddr, f.dport).bytes(),
        "reverse NAT to {}:{}",
        f.daddr,
        f.dport
    );
    packet::assert_checksums_valid(&out);
}

/// The conntrack key of `f`'s direction of its flow, as the client sent it.
fn forward_key(f: &Frame) -> proxy_common::CtKey4 {
    proxy_common::CtKey4 {
        saddr_be: u32::from(f.saddr).to_be(),
        daddr_be: u32::from(f.daddr).to_be(),
        sport_be: f.sport.to_be(),
        dport_be: f.dport.to_be(),
        proto: f.proto,
        dir: ct_dir::FORWARD,
        _pad: 0,
    }
}

/// The slot-0 key of the TCP frontend `vip:port`.
fn slot0(vip: &str, port: u16) -> ServiceKey4 {
    ServiceKey4::new(ip(vip), port, proto::TCP, 0)
}

/// Ids as an agent recovers them from maps in which the TCP frontends `taken`
/// hold the given frontend ids: those keep them (while they stay), and new
/// frontends are numbered on from the highest.
fn ids_taken(taken: &[(&str, u16, u32)]) -> Ids {
    let mut found = MapState::default();
    for &(vip, port, rev_nat_id) in taken {
        let slot0_value = ServiceValue {
            rev_nat_id,
            ..ServiceValue::default()
        };
        found.services.insert(slot0(vip, port), slot0_value);
    }
    Ids::from_state(&found)
}

fn assert_untouched(p: &mut Programs, program: &str, frame: &[u8], verdict: u32) {
    let (got, out) = p.run(program, frame);
    assert_eq!(got, verdict);
    assert_eq!(out, frame, "frame must not change");
}

#[test]
fn tcp_syn_to_clusterip_is_dnated_to_hashed_backend() {
    let mut p = Programs::new(&cluster());
    assert_dnat(&mut p, &Frame::tcp(CLIENT, 40000, VIP, 80));
    assert_eq!(p.stat("fwd_new"), 1);
    assert_eq!(p.conntrack_len(), 2, "forward and reply entries");
}

#[test]
fn udp_to_clusterip_is_dnated() {
    let mut p = Programs::new(&cluster());
    assert_dnat(&mut p, &Frame::udp(CLIENT, 41000, VIP, 53));
}

#[test]
fn udp_zero_checksum_stays_zero_after_dnat() {
    let mut p = Programs::new(&cluster());
    let mut f = Frame::udp(CLIENT, 41001, VIP, 53);
    f.udp_no_csum = true;
    assert_dnat(&mut p, &f);
    let backend = p.hashed_backend(&f);
    let (_, out) = p.send_from_pod(&f);
    assert_eq!(out[14 + 20 + 6..14 + 20 + 8], [0, 0]);
    assert_eq!(out, f.with_dst(backend.0, backend.1).bytes());
}

#[test]
fn tcp_segment_with_odd_payload_is_dnated() {
    let mut p = Programs::new(&cluster());
    let mut f = Frame::tcp(CLIENT, 40001, VIP, 80);
    f.tcp_flags = 0x18;
    f.ack = 99;
    f.payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n!".to_vec();
    assert_dnat(&mut p, &f);
}

#[test]
fn ip_options_are_skipped_by_ihl() {
    let mut p = Programs::new(&cluster());
    let mut f = Frame::tcp(CLIENT, 40002, VIP, 80);
    f.options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert, NOPs, end
    assert_dnat(&mut p, &f);
    let mut u = Frame::udp(CLIENT, 40002, VIP, 53);
    u.options = vec![1, 1, 1, 0];
    assert_dnat(&mut p, &u);
}

#[test]
fn ethernet_padding_is_kept() {
    let mut p = Programs::new(&cluster());
    let mut f = Frame::tcp(CLIENT, 40003, VIP, 80);
    f.trailer = vec![0xee; 6];
    assert_dnat(&mut p, &f);
}

#[test]
fn tcp_reply_is_reverse_nated() {
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40010, VIP, 80);
    let backend = assert_dnat(&mut p, &f);
    assert_reverse_nat(&mut p, &f, backend);
    assert_eq!(p.stat("rev_nat"), 1);
}

#[test]
fn udp_reply_is_reverse_nated() {
    let mut p = Programs::new(&cluster());
    let f = Frame::udp(CLIENT, 41010, VIP, 53);
    let backend = assert_dnat(&mut p, &f);
    assert_reverse_nat(&mut p, &f, backend);
}

#[test]
fn udp_reply_without_checksum_stays_zero() {
    let mut p = Programs::new(&cluster());
    let mut f = Frame::udp(CLIENT, 41011, VIP, 53);
    f.udp_no_csum = true;
    let backend = assert_dnat(&mut p, &f);
    assert_reverse_nat(&mut p, &f, backend);
}

#[test]
fn conntrack_holds_both_directions_of_a_flow() {
    let mut p = Programs::new(&cluster());
    let f = Frame::tcp(CLIENT, 40020, VIP, 80);
    let backend = assert_dnat(&mut p, &f);
    let entries = p.dp.conntrack().unwrap();
    assert_eq!(entries.len(), 2);
    let be = |a: Ipv4Addr| u32::from(a).to_be();
    let fwd = entries
        .iter()
        .find(|(k, _)| k.dir == ct_dir::FORWARD)
        .expect("forward entry");
    assert_eq!(
        (
            fwd.0.saddr_be,
            fwd.0.daddr_be,
            fwd.0.sport_be,
            fwd.0.dport_be,
            fwd.0.proto
        ),
        (
            be(f.saddr),
            be(f.daddr),
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
        (
            rev.0.saddr_be,
            rev.0.daddr_be,
            rev.0.sport_be,
            rev.0.dport_be
        ),
        (
            be(backend.0),
            be(f.saddr),
            backend.1.to_be(),
            f.sport.to_be()
        )
    );
    assert_eq!(fwd.1.backend_id, rev.1.backend_id);
    assert_eq!(p.state.backends[&fwd.1.backend_id].addr_be, be(backend.0));
    assert!(fwd.1.last_seen_ns > 0);
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
    services[0].endpoints[0].address = ip("10.244.1.9"); // sorts into A's slot
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
    assert_eq!(p.stat("pass_not_ipv4"), 2);
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
    assert_eq!(p.stat("pass_not_ipv4"), 2);
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
fn fragments_are_untouched() {
    let mut p = Programs::new(&cluster());
    let mut first = Frame::udp(CLIENT, 41070, VIP, 53);
    first.frag = 0x2000; // more fragments
    assert_untouched(&mut p, FROM_POD, &first.bytes(), TC_ACT_UNSPEC);
    let mut later = Frame::udp(CLIENT, 41070, VIP, 53);
    later.frag = 0x0010; // offset 128 bytes
    assert_untouched(&mut p, FROM_POD, &later.bytes(), TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_fragment"), 2);
    assert_eq!(p.conntrack_len(), 0);
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
    let frames = [
        Frame::tcp(CLIENT, 40095, VIP, 80),
        Frame::tcp(CLIENT, 40095, BACKEND_B, 80),
        Frame::udp(CLIENT, 40095, EMPTY_VIP, 53),
    ];
    let mut bytes = 0;
    for f in &frames {
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
fn a_pod_reaching_itself_is_hairpinned_through_the_link_local_address() {
    let mut services = cluster();
    services.push(service(
        "self",
        "10.96.0.50",
        80,
        Protocol::Tcp,
        &[(CLIENT, 8080)],
    ));
    let mut p = Programs::new(&services);
    let hairpin = Ipv4Addr::from(proxy_common::HAIRPIN_ADDR);
    let f = Frame::tcp(CLIENT, 40500, "10.96.0.50", 80);
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_REDIRECT, "straight back into the pod");
    let mut to_itself = f.with_dst(ip(CLIENT), 8080).with_src(hairpin, 40500);
    (to_itself.src_mac, to_itself.dst_mac) = (f.dst_mac, f.src_mac);
    assert_eq!(
        out,
        to_itself.bytes(),
        "addressed to the pod itself, also in Ethernet"
    );
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("fwd_hairpin"), 1);
    // The pod answers the hairpin address; that comes back from the frontend.
    let mut reply = to_itself.reply();
    (reply.src_mac, reply.dst_mac) = (f.src_mac, f.dst_mac);
    let (verdict, out) = p.send_from_pod(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut back = reply
        .with_dst(ip(CLIENT), 40500)
        .with_src(ip("10.96.0.50"), 80);
    (back.src_mac, back.dst_mac) = (f.dst_mac, f.src_mac);
    assert_eq!(out, back.bytes());
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("rev_nat"), 1);
}

#[test]
fn a_frontend_id_past_16_bits_is_reverse_nated_to_its_own_frontend() {
    // web keeps id 5; "a-wide" sorts first among the new frontends and gets
    // 65541, which a 16-bit id would have made into web's 5.
    let wide_vip = "10.96.0.90";
    let mut services = cluster();
    services.push(service(
        "a-wide",
        wide_vip,
        443,
        Protocol::Tcp,
        &[(BACKEND_A, 8443), (BACKEND_B, 8443)],
    ));
    let ids = ids_taken(&[(VIP, 80, 5), ("10.96.0.99", 80, 65_540)]);
    let mut p = Programs::with_ids(&services, ids);
    assert_eq!(
        (p.frontend_id(VIP, 80), p.frontend_id(wide_vip, 443)),
        (5, 65_541)
    );
    let f = Frame::tcp(CLIENT, 40600, wide_vip, 443);
    let backend = assert_dnat(&mut p, &f);
    assert!(p
        .dp
        .conntrack()
        .unwrap()
        .iter()
        .all(|(_, v)| v.rev_nat_id == 65_541));
    assert_reverse_nat(&mut p, &f, backend);
    // And web, with the id the wide one would have collided with, is itself.
    let g = Frame::tcp(CLIENT, 40601, VIP, 80);
    let backend = assert_dnat(&mut p, &g);
    assert_reverse_nat(&mut p, &g, backend);
    assert_eq!(p.stat("rev_nat"), 2);
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

/// A service with three backends whose clients stick to their backend.
fn sticky(timeout: u32) -> Vec<FrontendSpec> {
    let mut s = service(
        "sticky",
        "10.96.0.60",
        80,
        Protocol::Tcp,
        &[(BACKEND_A, 8080), (BACKEND_B, 8080), ("10.244.3.3", 8080)],
    );
    s.affinity_timeout = Some(timeout);
    vec![s]
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend_across_source_ports() {
    let mut p = Programs::new(&sticky(10_800));
    let first = Frame::tcp(CLIENT, 43000, "10.96.0.60", 80);
    let backend = assert_dnat(&mut p, &first);
    let mut by_hash = std::collections::BTreeSet::new();
    for port in 43001..43101 {
        let f = Frame::tcp(CLIENT, port, "10.96.0.60", 80);
        by_hash.insert(p.hashed_backend(&f));
        let (verdict, out) = p.send_from_pod(&f);
        assert_eq!(verdict, TC_ACT_UNSPEC);
        assert_eq!(
            out,
            f.with_dst(backend.0, backend.1).bytes(),
            "source port {port} left its backend"
        );
    }
    assert!(
        by_hash.len() > 1,
        "without affinity these flows would have spread"
    );
    // Another client has its own.
    let other = Frame::tcp("10.244.1.77", 43000, "10.96.0.60", 80);
    assert_eq!(assert_dnat(&mut p, &other), p.hashed_backend(&other));
    let entries = p.dp.affinity().unwrap();
    assert_eq!(entries.len(), 2);
}

#[test]
fn session_affinity_expires_after_its_timeout() {
    let mut p = Programs::new(&sticky(1));
    let first = Frame::tcp(CLIENT, 44000, "10.96.0.60", 80);
    let backend = assert_dnat(&mut p, &first);
    // A flow the hash sends elsewhere: within the timeout it still sticks.
    let elsewhere = (44001..44200)
        .map(|port| Frame::tcp(CLIENT, port, "10.96.0.60", 80))
        .find(|f| p.hashed_backend(f) != backend)
        .unwrap();
    let (_, out) = p.send_from_pod(&elsewhere);
    assert_eq!(out, elsewhere.with_dst(backend.0, backend.1).bytes());
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let later = (44200..44400)
        .map(|port| Frame::tcp(CLIENT, port, "10.96.0.60", 80))
        .find(|f| p.hashed_backend(f) != backend)
        .unwrap();
    assert_dnat(&mut p, &later);
}

#[test]
fn affinity_to_a_departed_backend_is_dropped() {
    let mut p = Programs::new(&sticky(10_800));
    let first = Frame::tcp(CLIENT, 45000, "10.96.0.60", 80);
    let backend = assert_dnat(&mut p, &first);
    let mut remaining = sticky(10_800);
    remaining[0]
        .endpoints
        .retain(|e| (e.address, e.port) != backend);
    p.serve(&remaining);
    let state = p.dp.read_state().unwrap();
    assert_eq!(p.dp.prune_affinity(&state).unwrap(), 1);
    let next = Frame::tcp(CLIENT, 45001, "10.96.0.60", 80);
    let moved = assert_dnat(&mut p, &next);
    assert_ne!(moved, backend);
}

fn scheduled(scheduler: proxy_agent::frontend::Scheduler) -> Vec<FrontendSpec> {
    let backends: Vec<(String, u16)> = (1..=5).map(|i| (format!("10.244.5.{i}"), 8080)).collect();
    let refs: Vec<(&str, u16)> = backends.iter().map(|(a, p)| (a.as_str(), *p)).collect();
    let mut s = service("sched", "10.96.0.70", 80, Protocol::Tcp, &refs);
    s.scheduler = Some(scheduler);
    vec![s]
}

/// The backend a new flow got, with its conntrack entry removed afterwards so
/// that the next packet of the same flow is scheduled afresh.
fn schedule_once(p: &mut Programs, f: &Frame) -> Ipv4Addr {
    let (verdict, out) = p.send_from_pod(f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    assert_eq!(out, f.with_dst(backend, 8080).bytes());
    p.dp.flush_conntrack().unwrap();
    backend
}

#[test]
fn maglev_picks_the_table_slot_of_the_flow_hash_and_is_stable_per_flow() {
    use proxy_agent::frontend::Scheduler;
    let mut p = Programs::new(&scheduled(Scheduler::Maglev));
    assert!(!p.state.maglev.is_empty());
    let size = p.state.maglev.len() as u32;
    for port in 46000..46040 {
        let f = Frame::tcp(CLIENT, port, "10.96.0.70", 80);
        let h = hash::flow_hash4(
            u32::from(f.saddr).to_be(),
            u32::from(f.daddr).to_be(),
            f.sport.to_be(),
            f.dport.to_be(),
            f.proto,
        );
        let rev_nat_id = p.state.maglev.keys().next().unwrap().rev_nat_id;
        let key = proxy_common::MaglevKey4 {
            rev_nat_id,
            index: h % size,
        };
        let id = p.state.maglev[&key];
        let want = Ipv4Addr::from(u32::from_be(p.state.backends[&id].addr_be));
        assert_eq!(schedule_once(&mut p, &f), want, "port {port}");
        assert_eq!(
            schedule_once(&mut p, &f),
            want,
            "port {port}: same flow, same backend"
        );
    }
}

#[test]
fn source_hash_sends_every_flow_of_a_client_to_one_backend() {
    use proxy_agent::frontend::Scheduler;
    let mut p = Programs::new(&scheduled(Scheduler::SourceHash));
    let first = schedule_once(&mut p, &Frame::tcp(CLIENT, 47000, "10.96.0.70", 80));
    for port in 47001..47050 {
        assert_eq!(
            schedule_once(&mut p, &Frame::tcp(CLIENT, port, "10.96.0.70", 80)),
            first
        );
    }
    let others: std::collections::BTreeSet<Ipv4Addr> = (1..=40)
        .map(|i| {
            schedule_once(
                &mut p,
                &Frame::tcp(&format!("10.244.9.{i}"), 47000, "10.96.0.70", 80),
            )
        })
        .collect();
    assert!(others.len() > 1, "different clients spread: {others:?}");
}

/// Round-robin counters are per CPU: one CPU, one counter.
fn pin_to_cpu0() {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

#[test]
fn round_robin_takes_the_backends_in_turn() {
    use proxy_agent::frontend::Scheduler;
    pin_to_cpu0();
    let mut p = Programs::new(&scheduled(Scheduler::RoundRobin));
    let picks: Vec<Ipv4Addr> = (0..10)
        .map(|i| schedule_once(&mut p, &Frame::tcp(CLIENT, 48000 + i, "10.96.0.70", 80)))
        .collect();
    // Ten new flows over five backends: each twice, in the same order both rounds.
    assert_eq!(picks[..5], picks[5..], "{picks:?}");
    let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
    assert_eq!(distinct.len(), 5, "{picks:?}");
    // Established flows keep their backend whatever the counter says.
    let f = Frame::tcp(CLIENT, 48100, "10.96.0.70", 80);
    let first = assert_dnat_any(&mut p, &f);
    for _ in 0..3 {
        assert_eq!(assert_dnat_any(&mut p, &f), first);
    }
}

#[test]
fn round_robin_counts_for_the_highest_frontend_id_too() {
    use proxy_agent::{desired::MAX_FRONTEND_ID, frontend::Scheduler};
    pin_to_cpu0();
    // Its counter is the last slot of the round-robin array.
    let ids = ids_taken(&[("10.96.0.99", 80, MAX_FRONTEND_ID - 1)]);
    let mut p = Programs::with_ids(&scheduled(Scheduler::RoundRobin), ids);
    assert_eq!(p.frontend_id("10.96.0.70", 80), MAX_FRONTEND_ID);
    let picks: Vec<Ipv4Addr> = (0..10)
        .map(|i| schedule_once(&mut p, &Frame::tcp(CLIENT, 48200 + i, "10.96.0.70", 80)))
        .collect();
    assert_eq!(picks[..5], picks[5..], "{picks:?}");
    let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
    assert_eq!(distinct.len(), 5, "{picks:?}");
}

/// Sends `f` and returns the backend it was DNATed to, whichever.
fn assert_dnat_any(p: &mut Programs, f: &Frame) -> Ipv4Addr {
    let (verdict, out) = p.send_from_pod(f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    assert_eq!(out, f.with_dst(backend, 8080).bytes());
    backend
}

#[test]
fn an_expired_conntrack_entry_no_longer_pins_its_flow() {
    let mut p = Programs::new(&cluster());
    // A UDP flow (60 s lifetime) the hash sends to A, pinned (by hand) to B.
    let f = (49000..49200)
        .map(|port| Frame::udp(CLIENT, port, VIP, 53))
        .find(|f| p.hashed_backend(f).0 == ip(BACKEND_A))
        .unwrap();
    let id_of = |p: &Programs, addr: &str| {
        *p.state
            .backends
            .iter()
            .find(|(_, b)| b.addr_be == u32::from(ip(addr)).to_be() && b.port_be == 5353u16.to_be())
            .unwrap()
            .0
    };
    let key = forward_key(&f);
    let rev_nat_id = *p
        .state
        .revnat
        .iter()
        .find(|(_, r)| r.port_be == 53u16.to_be() && r.addr_be == u32::from(ip(VIP)).to_be())
        .unwrap()
        .0;
    let backend_b = id_of(&p, BACKEND_B);
    let pinned = |last_seen_ns| proxy_common::CtValue4 {
        backend_id: backend_b,
        rev_nat_id,
        last_seen_ns,
        ..Default::default()
    };
    let fresh = pinned(proxy_agent::kernel::monotonic_ns());
    p.dp.set_conntrack(key, fresh).unwrap();
    let (_, out) = p.send_from_pod(&f);
    assert_eq!(
        out,
        f.with_dst(ip(BACKEND_B), 5353).bytes(),
        "a live entry pins the flow"
    );
    let stale = pinned(proxy_agent::kernel::monotonic_ns().wrapping_sub(61 * 1_000_000_000));
    p.dp.set_conntrack(key, stale).unwrap();
    let (_, out) = p.send_from_pod(&f);
    assert_eq!(
        out,
        f.with_dst(ip(BACKEND_A), 5353).bytes(),
        "an expired one does not"
    );
}

/// The conntrack entries of `f`'s flow: (forward, reply), each if present.
fn flow_entries(
    p: &Programs,
    f: &Frame,
) -> (
    Option<proxy_common::CtValue4>,
    Option<proxy_common::CtValue4>,
) {
    let entries = p.dp.conntrack().unwrap();
    let client = (u32::from(f.saddr).to_be(), f.sport.to_be());
    let forward = entries
        .iter()
        .find(|(k, _)| k.dir == ct_dir::FORWARD && (k.saddr_be, k.sport_be) == client)
        .map(|(_, v)| *v);
    let reply = entries
        .iter()
        .find(|(k, _)| k.dir == ct_dir::REPLY && (k.daddr_be, k.dport_be) == client)
        .map(|(_, v)| *v);
    (forward, reply)
}

/// Leaves only `f`'s forward entry, as if the agent's expiry sweep had deleted
/// the reply direction just as the tuple was reused.
fn lose_reply_entry(p: &mut Programs, f: &Frame) -> proxy_common::CtValue4 {
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
