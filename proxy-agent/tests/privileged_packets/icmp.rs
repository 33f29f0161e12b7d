//! ICMP errors about translated flows: the client must get them about the
//! packet it sent, from the frontend it dialled. Each test builds the error
//! as the backend, a router or a node's stack sends it (quoting the DNATed
//! packet), and expects exactly the error the client would have had from
//! the frontend itself (quoting its own packet), checksums computed in full.

use packet::IcmpError;
use proxy_common::remap_ports;

use super::*;

/// A router between the node and a remote backend.
const ROUTER: &str = "10.244.2.1";
/// As much of a packet as an IPv4 error quotes in 576 bytes (RFC 1812).
const QUOTE_576: usize = 576 - 20 - 8;

pub(crate) fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Opens `f`'s flow from the client pod; returns `f` as its backend got it.
pub(crate) fn open(p: &mut Programs, f: &Frame) -> Frame {
    let backend = assert_dnat_ip(p, f);
    f.with_dst(backend.0, backend.1)
}

/// Opens `sent`'s flow from the client pod; then `from` (the backend when
/// None) sends the client `error` about it as the backend got it, quoting
/// `quote` bytes. Asserts that the client pod gets the error from the
/// frontend, about the packet it sent, checksums in full, counted once.
/// Either family.
pub(crate) fn assert_error_translated(
    p: &mut Programs,
    sent: &Frame,
    error: IcmpError,
    from: Option<&str>,
    quote: usize,
) {
    let at_backend = open(p, sent);
    let from = from.map_or(at_backend.daddr, addr);
    let arrived = packet::icmp_error(error, from, sent.saddr, &at_backend, quote);
    // From the frontend, as netfilter sends it, about the client's own
    // packet: its L4 checksum, where quoted, is the client's again.
    let expected = packet::icmp_error(error, sent.daddr, sent.saddr, sent, quote);
    let before = p.stat("rev_nat_icmp");
    let (verdict, out) = p.run(TO_POD, &arrived);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, expected, "the {error:?} as the client must see it");
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("rev_nat_icmp"), before + 1);
}

#[test]
fn frag_needed_from_a_router_on_the_way_to_the_backend_reaches_the_client_about_the_frontend() {
    let mut p = Programs::new(&cluster());
    let syn = Frame::tcp(CLIENT, 40900, VIP, 80);
    open(&mut p, &syn);
    let data = syn.segment(1400);
    assert_error_translated(
        &mut p,
        &data,
        IcmpError::TooBig(1300),
        Some(ROUTER),
        QUOTE_576,
    );
}

#[test]
fn port_unreachable_from_a_udp_backend_reaches_the_client_about_the_frontend() {
    let mut p = Programs::new(&cluster());
    let query = Frame::udp(CLIENT, 41900, VIP, 53);
    assert_error_translated(&mut p, &query, IcmpError::PortUnreachable, None, QUOTE_576);
}

#[test]
fn time_exceeded_quoting_only_eight_bytes_of_tcp_translates_the_ports() {
    // RFC 792's minimum quote: the IP header and 8 bytes, the ports but not
    // the TCP checksum, which stays as it was.
    let mut p = Programs::new(&cluster());
    let syn = Frame::tcp(CLIENT, 40901, VIP, 80);
    assert_error_translated(&mut p, &syn, IcmpError::TimeExceeded, Some(ROUTER), 20 + 8);
}

#[test]
fn an_error_about_a_udp_datagram_without_checksum_keeps_it_zero() {
    let mut p = Programs::new(&cluster());
    let mut query = Frame::udp(CLIENT, 41901, VIP, 53);
    query.udp_no_csum = true;
    assert_error_translated(&mut p, &query, IcmpError::PortUnreachable, None, QUOTE_576);
}

#[test]
fn an_error_quoting_ip_options_is_translated() {
    let mut p = Programs::new(&cluster());
    let mut query = Frame::udp(CLIENT, 41902, VIP, 53);
    query.options = vec![0x01, 0x01, 0x01, 0x00]; // NOPs, end of options
    assert_error_translated(&mut p, &query, IcmpError::PortUnreachable, None, QUOTE_576);
}

#[test]
fn errors_about_flows_conntrack_does_not_know_are_untouched() {
    let mut p = Programs::new(&cluster());
    // A flow that never went through a frontend.
    let direct = Frame::udp(CLIENT, 41903, BACKEND_B, 5353);
    let error = packet::icmp_error(
        IcmpError::PortUnreachable,
        addr(BACKEND_B),
        addr(CLIENT),
        &direct,
        QUOTE_576,
    );
    assert_untouched(&mut p, TO_POD, &error, TC_ACT_UNSPEC);
    assert_untouched(&mut p, FROM_POD, &error, TC_ACT_UNSPEC);
    // A known flow's tuple, quoted in an ICMP message that is not an error
    // (an echo reply carrying the same bytes).
    let query = Frame::udp(CLIENT, 41904, VIP, 53);
    let at_backend = open(&mut p, &query);
    let mut echo = packet::icmp_error(
        IcmpError::PortUnreachable,
        at_backend.daddr,
        addr(CLIENT),
        &at_backend,
        QUOTE_576,
    );
    echo[34..38].copy_from_slice(&[0, 0, 0, 0]); // an echo reply
    let sum = packet::checksum(&echo[34..]);
    echo[36..38].copy_from_slice(&sum.to_be_bytes());
    packet::assert_checksums_valid(&echo);
    assert_untouched(&mut p, TO_POD, &echo, TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_not_tcp_udp"), 3);
    assert_eq!(p.stat("rev_nat_icmp"), 0);
}

/// The pod reaches itself through a UDP frontend; its own stack answers
/// the hairpinned datagram with a port unreachable.
#[test]
fn port_unreachable_from_a_pod_that_reached_itself_goes_back_into_it_from_the_frontend() {
    let mut services = cluster();
    services.push(service(
        "self",
        "10.96.0.50",
        53,
        Protocol::Udp,
        &[(CLIENT, 5353)],
    ));
    let mut p = Programs::new(&services);
    let hairpin = Ipv4Addr::from(proxy_common::HAIRPIN_ADDR);
    let query = Frame::udp(CLIENT, 41905, "10.96.0.50", 53);
    let (verdict, out) = p.send_from_pod(&query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut to_itself = query.with_dst(ip(CLIENT), 5353).with_src(hairpin, 41905);
    (to_itself.src_mac, to_itself.dst_mac) = (query.dst_mac, query.src_mac);
    assert_eq!(out, to_itself.bytes());

    // The pod's stack sends the error back the way the datagram came.
    let error = packet::icmp_error(
        IcmpError::PortUnreachable,
        addr(CLIENT),
        hairpin.into(),
        &to_itself,
        QUOTE_576,
    );
    let (verdict, out) = p.run(FROM_POD, &error);
    assert_eq!(verdict, TC_ACT_REDIRECT, "straight back into the pod");
    // Back the way the pod sent it: to the pod's MAC, from the node's.
    let expected = packet::icmp_error(
        IcmpError::PortUnreachable,
        addr("10.96.0.50"),
        addr(CLIENT),
        &query,
        QUOTE_576,
    );
    assert_eq!(out, expected);
    packet::assert_checksums_valid(&out);
    assert_eq!(p.stat("rev_nat_icmp"), 1);
}

/// One client port to two frontends of one backend: the second flow reaches
/// the backend from another port, and an error about it names the
/// client's own port again.
#[test]
fn an_error_about_a_remapped_flow_names_the_clients_own_port() {
    let mut services = cluster();
    for (name, vip) in [("self-a", "10.96.0.51"), ("self-b", "10.96.0.52")] {
        services.push(service(name, vip, 53, Protocol::Udp, &[(CLIENT, 5353)]));
    }
    let mut p = Programs::new(&services);
    let hairpin = Ipv4Addr::from(proxy_common::HAIRPIN_ADDR);
    let first = Frame::udp(CLIENT, 41906, "10.96.0.51", 53);
    assert_eq!(p.send_from_pod(&first).0, TC_ACT_REDIRECT);
    let second = Frame::udp(CLIENT, 41906, "10.96.0.52", 53);
    let port = remap_ports::nth(second.flow_hash(), 0);
    let (verdict, out) = p.send_from_pod(&second);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut remapped = second.with_dst(ip(CLIENT), 5353).with_src(hairpin, port);
    (remapped.src_mac, remapped.dst_mac) = (second.dst_mac, second.src_mac);
    assert_eq!(out, remapped.bytes(), "from hairpin port {port}");

    let error = packet::icmp_error(
        IcmpError::PortUnreachable,
        addr(CLIENT),
        hairpin.into(),
        &remapped,
        QUOTE_576,
    );
    let (verdict, out) = p.run(FROM_POD, &error);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let expected = packet::icmp_error(
        IcmpError::PortUnreachable,
        addr("10.96.0.52"),
        addr(CLIENT),
        &second,
        QUOTE_576,
    );
    assert_eq!(out, expected, "about port 41906 to the second frontend");
    packet::assert_checksums_valid(&out);
}
