//! IPv4 fragments from outside: a fragmented datagram to a NodePort whose
//! backend is on another node is SNATed in every fragment, and the
//! backend's fragmented answer goes back to the client in every fragment.

use super::*;

#[test]
fn a_fragmented_datagram_to_a_nodeport_and_its_answer_are_translated_in_every_fragment() {
    with_programs(|p| {
        let query = from_outside(packet::UDP, 42100, NODE, 30053).with_payload(3000);
        let sent = packet::fragments(&query, 1480);
        let at_backend = snated(&query, REMOTE_POD, 5353);
        let expected = packet::fragments(&at_backend, 1480);
        for (i, fragment) in sent.iter().enumerate() {
            let (verdict, out) = p.xdp(fragment);
            assert_eq!(verdict, XDP_TX, "fragment {i}: {:?}", p.nonzero_stats());
            assert_eq!(out, expected[i], "fragment {i} SNATed towards node2");
        }
        let mut answer = at_backend.reply().with_payload(6000);
        (answer.src_mac, answer.dst_mac) = (NODE2_MAC, NODE_MAC);
        let mut back = answer.with_dst(ip(CLIENT), 42100).with_src(ip(NODE), 30053);
        (back.src_mac, back.dst_mac) = (NODE_MAC, CLIENT_MAC);
        let expected = packet::fragments(&back, 1480);
        for (i, fragment) in packet::fragments(&answer, 1480).iter().enumerate() {
            let (verdict, out) = p.tc(fragment);
            assert_eq!(
                verdict,
                TC_ACT_REDIRECT,
                "fragment {i}: {:?}",
                p.nonzero_stats()
            );
            assert_eq!(out, expected[i], "fragment {i} back to the client");
        }
        assert_eq!(p.stat("fwd_snat"), 3);
        assert_eq!(p.stat("rev_snat"), 5);
    });
}
