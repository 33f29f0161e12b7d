//! DNAT and reverse NAT, byte for byte: TCP and UDP, odd payloads, IP options,
//! Ethernet padding, hairpin, and frontend ids past 16 bits.

use super::*;

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
