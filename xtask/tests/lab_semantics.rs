//! Lab tests of Service semantics: session affinity, terminating endpoints, and
//! UDP clients moving on when their backend goes.

mod support;

use std::{net::UdpSocket, time::Duration};

use support::*;

#[test]
fn lab_service_semantics() {
    let lab = Lab::up();
    lab.xtask(&["pod", "add", "client", "--node", "node1"]);
    let client = lab.pod_ns("client");
    let pods = [
        lab.pod_add("web-1", "node1", "web"),
        lab.pod_add("web-2", "node2", "web"),
        lab.pod_add("web-3", "node2", "web"),
    ];

    eprintln!("== sessionAffinity ClientIP keeps 50 connections from one client on one backend");
    lab.apply(
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sticky", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "sessionAffinity": "ClientIP", "ports": [
              {"name": "http", "port": 80, "targetPort": "tcp", "protocol": "TCP"}]}}"#,
    );
    lab.wait_endpoints("sticky", &pods);
    let vip = lab.cluster_ip("sticky");
    let by_pod = count(&connect_many(&client, (vip, 80).into(), 50));
    eprintln!("   {by_pod:?}");
    assert_eq!(by_pod.len(), 1, "{by_pod:?}");
    assert_eq!(by_pod.values().sum::<usize>(), 50);
    // The same backends without affinity spread (the control).
    lab.apply(
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "spread", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [
              {"name": "http", "port": 80, "targetPort": "tcp", "protocol": "TCP"}]}}"#,
    );
    lab.wait_endpoints("spread", &pods);
    let by_pod = count(&connect_many(
        &client,
        (lab.cluster_ip("spread"), 80).into(),
        50,
    ));
    assert!(by_pod.len() > 1, "{by_pod:?}");

    // internalTrafficPolicy needs an API server of 1.21 or later (the lab's is
    // 1.20.2, the newest Debian ships): its selection is unit-tested in cluster.rs
    // and topology.rs, and the drop it leads to in the packet tests.

    eprintln!("== a Service whose only endpoint is terminating still answers");
    let term = lab.pod_add("term-1", "node2", "term");
    lab.apply(
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "term", "namespace": "default"},
            "spec": {"selector": {"app": "term"}, "ports": [
              {"name": "http", "port": 80, "targetPort": "tcp", "protocol": "TCP"}]}}"#,
    );
    lab.wait_endpoints("term", &[term]);
    lab.xtask(&["pod", "terminate", "term-1"]);
    lab.wait_terminating("term", term);
    let term_vip = lab.cluster_ip("term");
    std::thread::sleep(Duration::from_millis(100));
    let by_pod = count(&connect_many(&client, (term_vip, 80).into(), 10));
    assert_eq!(by_pod.keys().collect::<Vec<_>>(), ["term-1"], "{by_pod:?}");

    eprintln!(
        "== a DNS-like UDP client moves to another backend within 1 s of its backend's removal"
    );
    let dns = [
        lab.pod_add("dns-1", "node2", "dns"),
        lab.pod_add("dns-2", "node2", "dns"),
    ];
    lab.apply(
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns", "namespace": "default"},
            "spec": {"selector": {"app": "dns"}, "ports": [
              {"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"}]}}"#,
    );
    lab.wait_endpoints("dns", &dns);
    let dns_vip = lab.cluster_ip("dns");
    // One socket, one source port: a resolver's flow.
    let sock = in_netns(&client, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect((dns_vip, 53)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        sock
    });
    let ask = |sock: &UdpSocket| -> Option<String> {
        sock.send(b"query").ok()?;
        let mut buf = [0u8; 128];
        let n = sock.recv(&mut buf).ok()?;
        Some(pod_of(&String::from_utf8_lossy(&buf[..n])).to_string())
    };
    let first = ask(&sock).expect("a DNS answer");
    for _ in 0..5 {
        assert_eq!(
            ask(&sock).as_deref(),
            Some(first.as_str()),
            "a flow keeps its backend"
        );
    }
    let (gone, other) = if first == "dns-1" {
        ("dns-1", dns[1])
    } else {
        ("dns-2", dns[0])
    };
    lab.xtask(&["pod", "del", gone]);
    let removed = lab.wait_endpoints("dns", &[other]);
    let moved = loop {
        if let Some(answer) = ask(&sock) {
            assert_ne!(answer, gone);
            break removed.elapsed();
        }
        assert!(
            removed.elapsed() < Duration::from_secs(3),
            "the client never moved on"
        );
    };
    eprintln!("   answered by the other backend {moved:?} after the slice dropped {gone}");
    assert!(moved < Duration::from_secs(1), "{moved:?}");
}
