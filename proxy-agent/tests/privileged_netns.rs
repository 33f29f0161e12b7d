//! Real traffic through a real agent: a client pod and two backend pods behind
//! one node namespace, all made (and removed) by the test.

mod support;

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use support::netns::{in_netns, run, Lab};

const CLIENT: &str = "10.244.1.2";
const BACKENDS: [(&str, &str); 2] = [("be1", "10.244.1.3"), ("be2", "10.244.1.4")];
const GATEWAY: &str = "10.244.1.1";
const VIP: &str = "10.96.0.10";
const EMPTY_VIP: &str = "10.96.0.11";
const TIMEOUT: Duration = Duration::from_secs(3);

/// A backend pod's servers: each answers with its name and the client address it saw.
fn serve(ns: &str, name: &'static str) {
    let (tcp, udp) = in_netns(ns, || {
        (
            TcpListener::bind("0.0.0.0:8080").unwrap(),
            UdpSocket::bind("0.0.0.0:5353").unwrap(),
        )
    });
    thread::spawn(move || {
        for stream in tcp.incoming() {
            let Ok(mut stream) = stream else { return };
            let peer = stream.peer_addr().unwrap();
            let _ = stream.write_all(format!("{name} {peer}\n").as_bytes());
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{name} {peer}\n").as_bytes(), peer);
        }
    });
}

fn services_file(dir: &std::path::Path) -> std::path::PathBuf {
    let endpoints = |port: u16| {
        BACKENDS
            .iter()
            .map(|(_, a)| format!(r#"{{"address": "{a}", "port": {port}}}"#))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let json = format!(
        r#"{{"services": [
            {{"name": "web", "address": "{VIP}", "port": 80, "protocol": "TCP", "endpoints": [{}]}},
            {{"name": "dns", "address": "{VIP}", "port": 53, "protocol": "UDP", "endpoints": [{}]}},
            {{"name": "empty", "address": "{EMPTY_VIP}", "port": 80, "protocol": "TCP", "endpoints": []}},
            {{"name": "empty-dns", "address": "{EMPTY_VIP}", "port": 53, "protocol": "UDP", "endpoints": []}}
        ]}}"#,
        endpoints(8080),
        endpoints(5353)
    );
    let path = dir.join("services.json");
    std::fs::write(&path, json).unwrap();
    path
}

#[test]
fn clusterip_traffic_through_a_real_agent() {
    let mut lab = Lab::new("cip");
    let node = lab.netns("node");
    let client = lab.netns("client");
    lab.plug_pod(&node, &client, "vc", CLIENT, GATEWAY);
    let mut ifaces = vec!["vc".to_string()];
    // An interface the pattern does not match keeps no program.
    run(
        "ip",
        &[
            "-n", &node, "link", "add", "other0", "type", "veth", "peer", "name", "other1",
        ],
    );
    for (i, (name, addr)) in BACKENDS.iter().enumerate() {
        let ns = lab.netns(name);
        let host_if = format!("vb{i}");
        lab.plug_pod(&node, &ns, &host_if, addr, GATEWAY);
        serve(&ns, name);
        ifaces.push(host_if);
    }
    run(
        "ip",
        &[
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    );

    let dir = std::env::temp_dir().join(&lab.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let services = services_file(&dir);
    lab.start_agent(
        &node,
        &[
            "run",
            "--services-file",
            services.to_str().unwrap(),
            "--pod-iface-pattern",
            "vc,vb*",
        ],
    );
    // Health as kube-proxy reports it, on the node's port 10256.
    let healthz = in_netns(&node, || {
        let mut s = TcpStream::connect("127.0.0.1:10256").unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    });
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    assert!(healthz.contains(r#""nodeEligible": true"#), "{healthz}");

    // 100 TCP connections to the ClusterIP: all answered, by both backends, and
    // each backend saw the client's own address.
    let answers: Vec<String> = in_netns(&client, || {
        (0..100)
            .map(|i| {
                let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
                let mut s = TcpStream::connect_timeout(&vip, TIMEOUT)
                    .unwrap_or_else(|e| panic!("connection {i} to {vip}: {e}"));
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                assert_eq!(s.peer_addr().unwrap(), vip);
                let mut answer = String::new();
                s.read_to_string(&mut answer)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                answer
            })
            .collect()
    });
    let mut by_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for answer in &answers {
        let (name, peer) = answer.trim().split_once(' ').expect("name and peer");
        assert!(
            peer.starts_with(&format!("{CLIENT}:")),
            "backend saw {peer}"
        );
        let name = BACKENDS
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a known backend")
            .0;
        *by_backend.entry(name).or_default() += 1;
    }
    eprintln!("connections per backend: {by_backend:?}");
    assert_eq!(by_backend.values().sum::<usize>(), 100);
    assert_eq!(by_backend.len(), 2, "both backends reached: {by_backend:?}");

    // UDP: the reply comes from the ClusterIP the client sent to.
    let (from, answer) = in_netns(&client, || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.send_to(b"who?", format!("{VIP}:53")).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = sock.recv_from(&mut buf).expect("UDP reply");
        (from, String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    assert_eq!(from, format!("{VIP}:53").parse::<SocketAddr>().unwrap());
    assert!(
        BACKENDS.iter().any(|(n, _)| answer.starts_with(n)),
        "answer {answer}"
    );

    // A frontend without backends refuses at once (ICMP port unreachable).
    let refused = in_netns(&client, || {
        TcpStream::connect_timeout(&format!("{EMPTY_VIP}:80").parse().unwrap(), TIMEOUT)
            .unwrap_err()
    });
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    let refused = in_netns(&client, || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect(format!("{EMPTY_VIP}:53")).unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.send(b"anyone?").unwrap();
        sock.recv(&mut [0u8; 64]).unwrap_err()
    });
    assert_eq!(
        refused.kind(),
        ErrorKind::ConnectionRefused,
        "UDP: {refused}"
    );

    // `inspect` reads the pinned maps into tables.
    let inspect = |what: &str| {
        run(
            env!("CARGO_BIN_EXE_proxy-agent"),
            &["inspect", what, "--pin-dir", lab.pin_dir.to_str().unwrap()],
        )
    };
    let services = inspect("services");
    for line in [
        format!("{VIP}:80/TCP"),
        format!("{VIP}:53/UDP"),
        format!("{EMPTY_VIP}:80/TCP"),
    ] {
        assert!(services.contains(&line), "{line} missing from:\n{services}");
    }
    for (_, backend) in BACKENDS {
        assert!(
            services.contains(&format!("{backend}:8080 (id")),
            "{backend} missing from:\n{services}"
        );
    }
    assert!(
        services.contains("0 backends"),
        "the empty frontend:\n{services}"
    );
    let conntrack = inspect("conntrack");
    assert!(
        conntrack.contains(&format!("{CLIENT}:")) && conntrack.contains("forward"),
        "{conntrack}"
    );
    let stats = inspect("stats");
    let fwd_new = stats.lines().find(|l| l.starts_with("fwd_new")).unwrap();
    let count: u64 = fwd_new.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        count >= 101,
        "100 TCP connections and a UDP exchange were new flows: {fwd_new}"
    );

    // The pinned maps carry BTF: bpftool prints their fields by name.
    let dump = run(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            &format!(
                "{}/{}",
                lab.pin_dir.display(),
                proxy_common::map_names::SERVICES_V4
            ),
        ],
    );
    for field in [
        "\"addr_be\"",
        "\"port_be\"",
        "\"slot\"",
        "\"backend_id\"",
        "\"count\"",
        "\"rev_nat_id\"",
    ] {
        assert!(
            dump.contains(field),
            "{field} missing from the services map dump:\n{dump}"
        );
    }

    // The agent leaves its programs and maps in place when it stops; cleanup
    // removes every filter and pinned map.
    let other = run(
        "ip",
        &[
            "netns", "exec", &node, "tc", "filter", "show", "dev", "other0", "ingress",
        ],
    );
    assert!(other.trim().is_empty(), "other0 has filters: {other}");
    lab.teardown_agents_only();
    let filters = run(
        "ip",
        &[
            "netns", "exec", &node, "tc", "filter", "show", "dev", "vc", "ingress",
        ],
    );
    assert!(
        filters.contains("from_pod"),
        "filter kept after the agent stopped: {filters}"
    );
    lab.cleanup_agent_state(&node);
    for dev in &ifaces {
        for hook in ["ingress", "egress"] {
            let left = run(
                "ip",
                &[
                    "netns", "exec", &node, "tc", "filter", "show", "dev", dev, hook,
                ],
            );
            assert!(left.trim().is_empty(), "{dev} {hook} still has: {left}");
        }
    }
    assert!(!lab.pin_dir.exists());
    let _ = std::fs::remove_dir_all(&dir);
    lab.teardown();
    lab.assert_gone();
}
