//! What `proxy-agent monitor` reads of the pod path: a report of each
//! reject while a monitor's lease lasts, with the packet as the verdict
//! left it, none of a forwarded packet, and none once the lease ran out;
//! with traces asked for, a report of each packet the programs translate.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use proxy_agent::cli::monitor::decode;
use proxy_common::{monitor::CAPTURE, stats::Stat};
use support::monitor::reports;

use super::*;

#[test]
fn a_reject_is_reported_with_its_error_while_a_monitor_reads_and_not_after() {
    let mut p = Programs::new(&cluster());
    // Verified first: on a slow kernel (the matrix's emulated VMs) that
    // takes longer than the lease the monitor takes now.
    p.dp.program(FROM_POD).unwrap();
    let mut monitor = p.dp.monitor(false).unwrap();
    let f = Frame::tcp(CLIENT, 40140, EMPTY_VIP, 80);
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let got = reports(&mut monitor, 2, Duration::from_secs(1));
    assert_eq!(got.len(), 1, "one report of the one reject");
    let report = decode(&got[0]).unwrap();
    assert_eq!(report.stat, Stat::RejectNoBackend);
    assert_eq!(report.program, "from_pod");
    assert_eq!(report.len as usize, out.len());
    let captured = out.len().min(CAPTURE as usize);
    let header = std::mem::size_of::<proxy_common::MonitorEvent>();
    assert_eq!(
        &got[0][header..header + captured],
        &out[..captured],
        "the packet's bytes as the verdict left it: the ICMP error"
    );
    let flow = report.flow.unwrap();
    assert_eq!(flow.client, format!("{CLIENT}:40140").parse().unwrap());
    assert_eq!(flow.server, format!("{EMPTY_VIP}:80").parse().unwrap());
    assert!(flow.quoted);

    let (verdict, _) = p.send_from_pod(&Frame::tcp(CLIENT, 40141, VIP, 80));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert!(
        reports(&mut monitor, 1, Duration::from_millis(200)).is_empty(),
        "a forwarded packet is not reported"
    );

    // A monitor that stopped reading: its lease (2 s) runs out, and the
    // programs stop reporting.
    std::thread::sleep(Duration::from_millis(2200));
    p.send_from_pod(&f);
    assert!(
        reports(&mut monitor, 1, Duration::from_millis(200)).is_empty(),
        "nothing reported once the lease ran out"
    );
    // Reading again renews it.
    p.send_from_pod(&f);
    assert_eq!(reports(&mut monitor, 1, Duration::from_secs(1)).len(), 1);
    assert_eq!(p.stat("reject_no_backend"), 3, "each reject counted");
}

#[test]
fn a_tracing_monitor_sees_each_translated_packet_as_it_left() {
    let mut p = Programs::new(&cluster());
    p.dp.program(FROM_POD).unwrap();
    p.dp.program(TO_POD).unwrap();
    let mut monitor = p.dp.monitor(true).unwrap();
    let f = Frame::tcp(CLIENT, 40150, VIP, 80);
    let backend = p.hashed_backend(&f);
    let (verdict, out) = p.send_from_pod(&f);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let header = std::mem::size_of::<proxy_common::MonitorEvent>();
    let got = reports(&mut monitor, 2, Duration::from_secs(1));
    assert_eq!(got.len(), 1, "one report of the one translated packet");
    let report = decode(&got[0]).unwrap();
    assert_eq!(report.stat, Stat::FwdNew);
    assert_eq!(report.program, "from_pod");
    assert_eq!(
        &got[0][header..header + out.len()],
        &out[..],
        "the packet as it left: DNATed to its backend"
    );
    let flow = report.flow.unwrap();
    assert_eq!(flow.client, format!("{CLIENT}:40150").parse().unwrap());
    assert_eq!(flow.server, SocketAddr::from(backend));

    // The backend's reply, reverse-NATed: from the frontend again.
    let reply = f.with_dst(IpAddr::from(backend.0), backend.1).reply();
    let (verdict, back) = p.send_to_pod(&reply);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let got = reports(&mut monitor, 2, Duration::from_secs(1));
    assert_eq!(got.len(), 1);
    let report = decode(&got[0]).unwrap();
    assert_eq!((report.stat, report.program), (Stat::RevNat, "to_pod"));
    assert_eq!(&got[0][header..header + back.len()], &back[..]);
    assert_eq!(
        report.flow.unwrap().client,
        format!("{VIP}:80").parse().unwrap()
    );

    // Packets the programs leave alone are not traced.
    let (verdict, _) = p.send_from_pod(&Frame::tcp(CLIENT, 40151, "10.244.9.9", 80));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert!(
        reports(&mut monitor, 1, Duration::from_millis(200)).is_empty(),
        "no report of a packet to no Service"
    );
    assert_eq!(p.stat("pass_not_service"), 1);
}
