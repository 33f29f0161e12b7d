//! IPv4 fragments: a datagram larger than the path's MTU (an EDNS answer,
//! syslog, SNMP) reaches a Service in pieces, and only the first carries
//! the ports. Every fragment must be translated as the datagram is, both
//! ways, byte for byte; a later fragment whose first did not pass goes on
//! untouched, counted.

use super::*;

fn send_all(p: &mut Programs, program: &str, fragments: &[Vec<u8>]) -> Vec<(u32, Vec<u8>)> {
    fragments.iter().map(|f| p.run(program, f)).collect()
}

#[test]
fn a_fragmented_udp_datagram_and_its_fragmented_answer_are_translated_in_every_fragment() {
    let mut p = Programs::new(&cluster());
    let query = Frame::udp(CLIENT, 42000, VIP, 53).with_payload(3000);
    let backend = p.hashed_backend(&query);
    let sent = packet::fragments(&query, 1480);
    assert_eq!(sent.len(), 3);
    let expected = packet::fragments(&query.with_dst(backend.0, backend.1), 1480);
    for (i, (verdict, out)) in send_all(&mut p, FROM_POD, &sent).into_iter().enumerate() {
        assert_eq!(verdict, TC_ACT_UNSPEC, "fragment {i}");
        assert_eq!(out, expected[i], "fragment {i} to {backend:?}");
    }
    assert_eq!(p.stat("fwd_new"), 1, "the first fragment opens the flow");
    assert_eq!(p.stat("fwd_established"), 2, "the later ones follow it");

    // The backend's 6 KB answer, cut by its stack: from the frontend in
    // every fragment.
    let answer = query
        .with_dst(backend.0, backend.1)
        .reply()
        .with_payload(6000);
    let sent = packet::fragments(&answer, 1480);
    assert_eq!(sent.len(), 5);
    let expected = packet::fragments(&answer.with_src(ip(VIP), 53), 1480);
    for (i, (verdict, out)) in send_all(&mut p, TO_POD, &sent).into_iter().enumerate() {
        assert_eq!(verdict, TC_ACT_UNSPEC, "fragment {i}");
        assert_eq!(out, expected[i], "fragment {i} from the frontend");
    }
    assert_eq!(p.stat("rev_nat"), 5);
}

#[test]
fn a_fragmented_tcp_segment_is_translated_in_every_fragment() {
    let mut p = Programs::new(&cluster());
    let syn = Frame::tcp(CLIENT, 42001, VIP, 80);
    let backend = assert_dnat(&mut p, &syn);
    let segment = syn.segment(2000);
    let sent = packet::fragments(&segment, 1024);
    let expected = packet::fragments(&segment.with_dst(backend.0, backend.1), 1024);
    for (i, (verdict, out)) in send_all(&mut p, FROM_POD, &sent).into_iter().enumerate() {
        assert_eq!(verdict, TC_ACT_UNSPEC, "fragment {i}");
        assert_eq!(out, expected[i], "fragment {i}");
    }
}

#[test]
fn a_later_fragment_before_its_first_passes_untouched() {
    let mut p = Programs::new(&cluster());
    let query = Frame::udp(CLIENT, 42002, VIP, 53).with_payload(3000);
    let sent = packet::fragments(&query, 1480);
    assert_untouched(&mut p, FROM_POD, &sent[1], TC_ACT_UNSPEC);
    assert_eq!(p.stat("pass_fragment"), 1);
    assert_eq!(
        p.conntrack_len(),
        0,
        "no flow from a fragment without ports"
    );
    // Its first, then the last: translated; the datagram is short of the
    // piece that went on untouched, which its receiver drops in the end.
    let backend = p.hashed_backend(&query);
    let expected = packet::fragments(&query.with_dst(backend.0, backend.1), 1480);
    assert_eq!(p.run(FROM_POD, &sent[0]).1, expected[0]);
    assert_eq!(p.run(FROM_POD, &sent[2]).1, expected[2]);
}

#[test]
fn fragments_of_a_datagram_to_no_frontend_are_untouched() {
    let mut p = Programs::new(&cluster());
    let direct = Frame::udp(CLIENT, 42003, BACKEND_B, 5353).with_payload(3000);
    for fragment in packet::fragments(&direct, 1480) {
        assert_untouched(&mut p, FROM_POD, &fragment, TC_ACT_UNSPEC);
    }
    assert_eq!(p.stat("pass_not_service"), 3);
}

#[test]
fn the_rest_of_a_rejected_datagram_is_dropped() {
    let mut p = Programs::new(&cluster());
    let query = Frame::udp(CLIENT, 42004, EMPTY_VIP, 53).with_payload(3000);
    let sent = packet::fragments(&query, 1480);
    let (verdict, out) = p.run(FROM_POD, &sent[0]);
    assert_eq!(verdict, TC_ACT_REDIRECT, "the first: a port unreachable");
    assert_eq!(out[23], packet::ICMP);
    for fragment in &sent[1..] {
        assert_eq!(p.run(FROM_POD, fragment).0, TC_ACT_SHOT);
    }
    assert_eq!(p.stat("reject_no_backend"), 3);
}
