//! Lab tests of Service semantics: session affinity, internalTrafficPolicy,
//! terminating endpoints, UDP clients moving on when their backend goes,
//! one client port dialling two Services that one backend serves, and
//! connections refused at once where no Service is in the service CIDR.

mod support;

use std::{
    io::{ErrorKind, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use proxy_common::stats::Stat;

use serde_json::json;
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
    lab.apply_service(
        "sticky",
        json!({
            "selector": {"app": "web"},
            "sessionAffinity": "ClientIP",
            "ports": [http()],
        }),
    );
    lab.wait_endpoints("sticky", &pods);
    let vip = lab.cluster_ip("sticky");
    let by_pod = count(&connect_many(&client, (vip, 80).into(), 50));
    eprintln!("   {by_pod:?}");
    assert_eq!(by_pod.len(), 1, "{by_pod:?}");
    assert_eq!(by_pod.values().sum::<usize>(), 50);
    // The same backends without affinity spread (the control).
    lab.apply_service(
        "spread",
        json!({"selector": {"app": "web"}, "ports": [http()]}),
    );
    lab.wait_endpoints("spread", &pods);
    let by_pod = count(&connect_many(
        &client,
        (lab.cluster_ip("spread"), 80).into(),
        50,
    ));
    assert!(by_pod.len() > 1, "{by_pod:?}");

    eprintln!("== internalTrafficPolicy: Local, endpoints only on node2: node2's client is served there, node1's dropped");
    lab.xtask(&["pod", "add", "client-2", "--node", "node2"]);
    let client2 = lab.pod_ns("client-2");
    let itp = [
        lab.pod_add("itp-1", "node2", "itp"),
        lab.pod_add("itp-2", "node2", "itp"),
    ];
    lab.apply_service(
        "itp-local",
        json!({
            "selector": {"app": "itp"},
            "internalTrafficPolicy": "Local",
            "ports": [http()],
        }),
    );
    // The same pods behind a Service without the policy: the control.
    lab.apply_service(
        "itp-cluster",
        json!({"selector": {"app": "itp"}, "ports": [http()]}),
    );
    // The lab's v1.20 server knows the field only through the backport in
    // xtask/patches; a plain v1.20 drops it, and everything below would mean nothing.
    assert_eq!(
        lab.kubectl(&[
            "get",
            "service",
            "itp-local",
            "-o",
            "jsonpath={.spec.internalTrafficPolicy}"
        ]),
        "Local",
        "the API server dropped spec.internalTrafficPolicy"
    );
    lab.wait_endpoints("itp-local", &itp);
    lab.wait_endpoints("itp-cluster", &itp);
    let local_vip = lab.cluster_ip("itp-local");
    let by_pod = count(&connect_many(&client2, (local_vip, 80).into(), 20));
    eprintln!("   from node2: {by_pod:?}");
    assert_eq!(by_pod.values().sum::<usize>(), 20);
    assert!(
        by_pod.keys().all(|pod| pod.starts_with("itp-")),
        "{by_pod:?}"
    );
    let by_pod = count(&connect_many(
        &client,
        (lab.cluster_ip("itp-cluster"), 80).into(),
        20,
    ));
    eprintln!("   from node1 without the policy: {by_pod:?}");
    assert_eq!(by_pod.values().sum::<usize>(), 20);
    assert!(
        by_pod.keys().all(|pod| pod.starts_with("itp-")),
        "{by_pod:?}"
    );
    let dropped = node1_drops_without_answer(&lab, &client, (local_vip, 80).into());
    eprintln!("   from node1: no answer; node1's agent counted {dropped} drop(s) for want of a local endpoint");

    eprintln!("== a Service whose only endpoint is terminating still answers");
    let term = lab.pod_add("term-1", "node2", "term");
    lab.apply_service(
        "term",
        json!({"selector": {"app": "term"}, "ports": [http()]}),
    );
    lab.wait_endpoints("term", &[term]);
    lab.xtask(&["pod", "terminate", "term-1"]);
    lab.wait_terminating("term", term);
    let term_vip = lab.cluster_ip("term");
    thread::sleep(Duration::from_millis(100));
    let by_pod = count(&connect_many(&client, (term_vip, 80).into(), 10));
    assert_eq!(by_pod.keys().collect::<Vec<_>>(), ["term-1"], "{by_pod:?}");

    eprintln!(
        "== a DNS-like UDP client moves to another backend within 1 s of its backend's removal"
    );
    let dns = [
        lab.pod_add("dns-1", "node2", "dns"),
        lab.pod_add("dns-2", "node2", "dns"),
    ];
    lab.apply_service(
        "dns",
        json!({
            "selector": {"app": "dns"},
            "ports": [{"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"}],
        }),
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

    eprintln!("== one client port dials two Services of one backend: both connections live");
    let one = lab.pod_add("one-1", "node2", "one");
    for name in ["one-a", "one-b"] {
        lab.apply_service(name, json!({"selector": {"app": "one"}, "ports": [http()]}));
        lab.wait_endpoints(name, &[one]);
    }
    let (a, b) = (lab.cluster_ip("one-a"), lab.cluster_ip("one-b"));
    let peers = in_netns(&client, move || two_services_from_one_port(a, b));
    eprintln!("   the backend saw {peers:?}");
    let [first, second] = peers.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.port(), CLIENT_PORT, "the first flow keeps its port");
    assert!(
        second.port() >= 61_000,
        "the second flow reaches the backend from another port: {second}"
    );

    eprintln!(
        "== a deleted Service's ClusterIP, and a port a live one does not serve, refuse at once"
    );
    let gone = lab.cluster_ip("spread");
    lab.kubectl(&["delete", "service", "spread"]);
    let dial = |target: SocketAddr| {
        let started = Instant::now();
        let result = in_netns(&client, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5)).map(drop)
        });
        (result.map_err(|e| e.kind()), started.elapsed())
    };
    // The agent sees the deletion within moments; until then the
    // ClusterIP still answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (refused, took) = loop {
        let (result, took) = dial((gone, 80).into());
        if result.is_err() || Instant::now() > deadline {
            break (result, took);
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(refused, Err(ErrorKind::ConnectionRefused), "{gone}:80");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    let (refused, took) = dial((lab.cluster_ip("sticky"), 81).into());
    assert_eq!(refused, Err(ErrorKind::ConnectionRefused), "sticky:81");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    assert!(lab.agent_counter("node1", Stat::RejectNoService.index()) >= 2);
}

const CLIENT_PORT: u16 = 40_999;

/// Two connections from port `CLIENT_PORT`, to `a` and to `b`, each asked
/// twice (the second connection opened between the first's questions):
/// the client addresses the backend saw, or the first failure.
fn two_services_from_one_port(a: Ipv4Addr, b: Ipv4Addr) -> std::io::Result<[SocketAddr; 2]> {
    let dial = |vip: Ipv4Addr| -> std::io::Result<TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], CLIENT_PORT)).into())?;
        s.connect_timeout(&SocketAddr::from((vip, 80)).into(), TIMEOUT)?;
        let s = TcpStream::from(s);
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(s)
    };
    let ask = |s: &mut TcpStream| -> std::io::Result<SocketAddr> {
        s.write_all(b"again\n")?;
        peer_of(&read_line(s)?)
    };
    let mut first = dial(a)?;
    let seen_first = peer_of(&read_line(&mut first)?)?;
    let mut second = dial(b)?;
    let seen_second = peer_of(&read_line(&mut second)?)?;
    for _ in 0..3 {
        assert_eq!(ask(&mut first)?, seen_first, "the first connection");
        assert_eq!(ask(&mut second)?, seen_second, "the second connection");
    }
    Ok([seen_first, seen_second])
}

/// The client address in a pod's answer (`<pod name> <client address>`).
fn peer_of(answer: &str) -> std::io::Result<SocketAddr> {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no client address in {answer:?}")))
}

/// A client pod on node1 connects to a Service with internalTrafficPolicy: Local
/// whose endpoints are all on node2. kube-proxy drops such traffic, so the
/// connection must time out (not be refused), and node1's agent must count the
/// dropped SYNs as "no local backend". Until node1's agent has seen the
/// Service's slices it rejects, as for any Service without endpoints: a refusal
/// is retried for a while. An answer fails at once: the policy was ignored.
/// Returns how many packets node1's agent dropped.
fn node1_drops_without_answer(lab: &Lab, client: &str, target: SocketAddr) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = lab.agent_counter("node1", Stat::DropNoLocalBackend.index());
        let connected = in_netns(client, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(1)).map(|mut s| {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                read_line(&mut s)
            })
        });
        match connected {
            Ok(answer) => panic!(
                "node1's client reached {target} ({answer:?}) although every endpoint is on node2"
            ),
            Err(err) if err.kind() == ErrorKind::TimedOut => {
                let dropped = lab.agent_counter("node1", Stat::DropNoLocalBackend.index()) - before;
                assert!(
                    dropped > 0,
                    "no answer, but node1's agent dropped nothing as having no local endpoint"
                );
                return dropped;
            }
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "connecting from node1 to {target}: {err} (a drop times out)"
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
