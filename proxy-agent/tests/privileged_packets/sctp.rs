//! SCTP Services, byte for byte: DNAT and reverse NAT with and without a
//! port change (SCTP's CRC32c does not cover addresses; a port change moves
//! it, and the programs must move it exactly), a zero CRC left for the
//! device, conntrack by chunk type, IPv6, ICMP errors about an SCTP flow,
//! and fragments (passed untouched). Expected frames carry CRCs computed
//! over the whole packet by the builder, never incrementally.

use packet::{chunk, IcmpError};
use proxy_common::{ct_dir, ct_flags, proto};

use super::*;

/// Diameter's port, served on another port by the backends: every DNAT and
/// reverse NAT changes a port.
const DIAMETER: u16 = 3868;
const DIAMETER_TARGET: u16 = 13868;
/// M3UA's port, served on the same port: addresses change, ports do not.
const M3UA: u16 = 2905;

fn sctp_cluster() -> Vec<FrontendSpec> {
    vec![
        service(
            "diameter",
            VIP,
            DIAMETER,
            Protocol::Sctp,
            &[(BACKEND_A, DIAMETER_TARGET), (BACKEND_B, DIAMETER_TARGET)],
        ),
        service(
            "m3ua",
            VIP,
            M3UA,
            Protocol::Sctp,
            &[(BACKEND_A, M3UA), (BACKEND_B, M3UA)],
        ),
    ]
}

/// The SCTP conntrack entries of the flow from `f`'s client port.
fn entries(p: &Programs, f: &Frame) -> (proxy_common::CtValue, proxy_common::CtValue) {
    let all = p.dp.conntrack().unwrap();
    let client = (proxy_common::Ip4::new(f.saddr4()), f.sport.to_be());
    let find = |dir: u8| {
        all.iter()
            .find(|(k, _)| {
                k.proto == proto::SCTP
                    && k.dir == dir
                    && if dir == ct_dir::FORWARD {
                        (k.saddr, k.sport_be) == client
                    } else {
                        (k.daddr, k.dport_be) == client
                    }
            })
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no entry in direction {dir}"))
    };
    (find(ct_dir::FORWARD), find(ct_dir::REPLY))
}

#[test]
fn an_init_is_dnated_with_its_port_and_its_crc_changed_and_the_answer_reverse_nated() {
    let mut p = Programs::new(&sctp_cluster());
    let init = Frame::sctp(CLIENT, 40000, VIP, DIAMETER);
    let backend = assert_dnat(&mut p, &init);
    assert_eq!(backend.1, DIAMETER_TARGET);
    assert_eq!(p.stat("fwd_new"), 1);
    assert_eq!(p.conntrack_len(), 2, "forward and reply entries");
    // The INIT ACK, from the backend's port: from the frontend's again.
    assert_reverse_nat(&mut p, &init, backend);
    // Data on the association, both ways, larger and of an odd length.
    let mut data = init.clone();
    data.chunk = chunk::DATA;
    data.payload = (0..1001).map(|i| (i * 13) as u8).collect();
    assert_eq!(assert_dnat(&mut p, &data), backend);
    assert_reverse_nat(&mut p, &data, backend);
    assert_eq!(p.stat("fwd_established"), 1);
    assert_eq!(p.stat("rev_nat"), 2);
}

#[test]
fn without_a_port_change_the_crc_is_left_as_it_is() {
    let mut p = Programs::new(&sctp_cluster());
    let init = Frame::sctp(CLIENT, 40001, VIP, M3UA);
    let sent = init.bytes();
    let backend = assert_dnat(&mut p, &init);
    let (_, out) = p.send_from_pod(&init);
    let crc = 14 + 20 + 8..14 + 20 + 12;
    assert_eq!(out[crc.clone()], sent[crc], "the CRC covers no address");
    assert_reverse_nat(&mut p, &init, backend);
}

#[test]
fn a_zero_crc_left_for_the_device_stays_zero_through_a_port_change() {
    let mut p = Programs::new(&sctp_cluster());
    let mut init = Frame::sctp(CLIENT, 40002, VIP, DIAMETER);
    init.udp_no_csum = true;
    let backend = assert_dnat(&mut p, &init);
    let (_, out) = p.send_from_pod(&init);
    assert_eq!(out[14 + 20 + 8..14 + 20 + 12], [0; 4]);
    assert_reverse_nat(&mut p, &init, backend);
}

#[test]
fn an_ip_option_and_ethernet_padding_keep_the_crc_over_the_sctp_packet_only() {
    let mut p = Programs::new(&sctp_cluster());
    let mut init = Frame::sctp(CLIENT, 40003, VIP, DIAMETER);
    init.options = vec![1, 1, 1, 0];
    init.trailer = vec![0xee; 6];
    assert_dnat(&mut p, &init);
}

#[test]
fn abort_and_shutdown_complete_close_the_association_and_an_init_opens_it_again() {
    let mut p = Programs::new(&sctp_cluster());
    let init = Frame::sctp(CLIENT, 40004, VIP, DIAMETER);
    let backend = assert_dnat(&mut p, &init);
    let (forward, reply) = entries(&p, &init);
    assert_eq!(
        (
            forward.flags & ct_flags::CLOSING,
            reply.flags & ct_flags::CLOSING
        ),
        (0, 0)
    );

    let mut abort = init.clone();
    abort.chunk = chunk::ABORT;
    abort.payload.clear();
    assert_eq!(assert_dnat(&mut p, &abort), backend);
    let (forward, reply) = entries(&p, &init);
    assert_ne!(forward.flags & ct_flags::CLOSING, 0, "ABORT closes");
    assert_ne!(reply.flags & ct_flags::CLOSING, 0);

    // The client's port again: a new INIT opens the association again.
    assert_eq!(assert_dnat(&mut p, &init), backend);
    let (forward, reply) = entries(&p, &init);
    assert_eq!(
        (
            forward.flags & ct_flags::CLOSING,
            reply.flags & ct_flags::CLOSING
        ),
        (0, 0)
    );

    let mut complete = init.clone();
    complete.chunk = chunk::SHUTDOWN_COMPLETE;
    complete.payload.clear();
    assert_eq!(assert_dnat(&mut p, &complete), backend);
    let (forward, _) = entries(&p, &init);
    assert_ne!(
        forward.flags & ct_flags::CLOSING,
        0,
        "SHUTDOWN COMPLETE closes"
    );
}

#[test]
fn an_init_to_an_sctp_frontend_without_endpoints_is_rejected() {
    let mut services = sctp_cluster();
    services.push(service("none", EMPTY_VIP, DIAMETER, Protocol::Sctp, &[]));
    let mut p = Programs::new(&services);
    let init = Frame::sctp(CLIENT, 40005, EMPTY_VIP, DIAMETER);
    let (verdict, out) = p.send_from_pod(&init);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "sent back out of the pod's interface"
    );
    assert_eq!(out, packet::port_unreachable(&init));
    assert_eq!(p.stat("reject_no_backend"), 1);
}

#[test]
fn a_port_unreachable_about_an_sctp_flow_reaches_the_client_about_the_frontend() {
    let mut p = Programs::new(&sctp_cluster());
    let init = Frame::sctp(CLIENT, 40006, VIP, DIAMETER);
    let backend = assert_dnat(&mut p, &init);
    let at_backend = init.with_dst(backend.0, backend.1);
    // The IP header and the SCTP common header with its first chunk's.
    let quote = 36;
    let arrived = packet::icmp_error(
        IcmpError::PortUnreachable,
        at_backend.daddr,
        init.saddr,
        &at_backend,
        quote,
    );
    // From the frontend, about the client's packet: addresses and ports
    // translated back; the quoted CRC stays the backend's, as netfilter
    // leaves it (and the ICMP checksum covers it as it is).
    let mut expected = packet::icmp_error(
        IcmpError::PortUnreachable,
        init.daddr,
        init.saddr,
        &init,
        quote,
    );
    let crc = 14 + 20 + 8 + 20 + 8;
    expected[crc..crc + 4].copy_from_slice(&arrived[crc..crc + 4]);
    expected[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&[0, 0]);
    let sum = packet::checksum(&expected[14 + 20..]);
    expected[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&sum.to_be_bytes());
    let (verdict, out) = p.run(TO_POD, &arrived);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, expected);
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("rev_nat_icmp"), 1);
}

#[test]
fn a_fragmented_sctp_packet_passes_untouched() {
    let mut p = Programs::new(&sctp_cluster());
    let mut data = Frame::sctp(CLIENT, 40007, VIP, DIAMETER).with_payload(2000);
    data.chunk = chunk::DATA;
    for fragment in packet::fragments(&data, 1480) {
        assert_untouched(&mut p, FROM_POD, &fragment, TC_ACT_UNSPEC);
    }
    assert_eq!(p.stat("pass_fragment"), 2);
    assert_eq!(p.conntrack_len(), 0);
}

#[test]
fn sctp_over_ipv6_is_dnated_and_reverse_nated_with_its_crc_changed() {
    let (client, vip) = ("fd00:10:244:1::2", "fd00:10:96::10");
    let backends = [
        ("fd00:10:244:1::3", DIAMETER_TARGET),
        ("fd00:10:244:2::3", DIAMETER_TARGET),
    ];
    let mut p = Programs::new(&[service(
        "diameter6",
        vip,
        DIAMETER,
        Protocol::Sctp,
        &backends,
    )]);
    let init = Frame::sctp(client, 40008, vip, DIAMETER);
    let backend = assert_dnat_ip(&mut p, &init);
    assert_eq!(backend.1, DIAMETER_TARGET);
    assert_reverse_nat_ip(&mut p, &init, backend);
}
