//! The per-(frontend, backend) traffic counters on the pod path: each
//! translated packet counted once, under its pair and its way, with its
//! length as it arrived; a packet to no frontend not at all.

use proxy_common::{Traffic, TrafficKey};

use super::*;

#[test]
fn translated_packets_are_counted_by_frontend_backend_and_way() {
    let mut p = Programs::new(&cluster());
    let mut f = Frame::tcp(CLIENT, 40100, VIP, 80);
    f.payload = vec![b'x'; 100];
    let backend = assert_dnat(&mut p, &f);
    f.tcp_flags = 0x10;
    assert_dnat(&mut p, &f);
    let mut reply = f.with_dst(IpAddr::from(backend.0), backend.1).reply();
    reply.payload = vec![b'y'; 1000];
    let (verdict, _) = p.send_to_pod(&reply);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    // Not a frontend: not counted.
    p.send_from_pod(&Frame::tcp(CLIENT, 40101, BACKEND_B, 8080));

    let backend_id = *p
        .programmed
        .applied()
        .backends
        .iter()
        .find(|(_, b)| b.addr == IpAddr::from(backend.0) && b.port == backend.1)
        .unwrap()
        .0;
    let sent = f.bytes().len() as u64;
    assert_eq!(
        p.dp.traffic().unwrap(),
        vec![(
            TrafficKey {
                rev_nat_id: p.frontend_id(VIP, 80),
                backend_id,
            },
            Traffic {
                to_backend_packets: 2,
                to_backend_bytes: 2 * sent,
                to_client_packets: 1,
                to_client_bytes: reply.bytes().len() as u64,
            }
        )]
    );
}

/// `--traffic-counters false`: the agent loads the programs with the switch
/// off, and the verifier leaves the counting out.
#[test]
fn counting_switched_off_at_load_counts_nothing() {
    support::require_root();
    let lab = support::netns::Lab::new("trafficoff");
    let dp = proxy_agent::kernel::Dataplane::load_pinned(
        &lab.pin_dir,
        &Default::default(),
        false,
        proxy_agent::kernel::diag::LogLevel::ALL,
    )
    .expect("load the programs");
    let mut p = Programs(harness::Programs::with(dp).unwrap());
    p.serve(&cluster());
    let f = Frame::tcp(CLIENT, 40200, VIP, 80);
    let backend = assert_dnat(&mut p, &f);
    assert_reverse_nat(&mut p, &f, backend);
    assert_eq!(p.stat("fwd_new"), 1);
    assert_eq!(p.dp.traffic().unwrap(), vec![]);
}
