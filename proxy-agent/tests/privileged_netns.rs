//! Real traffic through a real agent: a client pod and two backend pods behind
//! one node namespace, all made (and removed) by the test.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    thread,
    time::Duration,
};

use proxy_common::pinned::Pinned;
use proxy_common::{map_names, previous, CtKey4, RevNat4, ServiceKey4};
use support::{
    netns::{in_netns, run, Lab},
    pins,
};

const CLIENT: &str = "10.244.1.2";
const BACKENDS: [(&str, &str); 2] = [("be1", "10.244.1.3"), ("be2", "10.244.1.4")];
const GATEWAY: &str = "10.244.1.1";
const VIP: &str = "10.96.0.10";
const EMPTY_VIP: &str = "10.96.0.11";
const TIMEOUT: Duration = Duration::from_secs(3);

/// A backend pod's servers: each answers with its name and the client address it saw.
fn serve(ns: &str, name: &'static str) {
    serve_on(ns, name, "0.0.0.0");
}

/// [`serve`] on the address `any` (`0.0.0.0`, or `::` for IPv6 too).
fn serve_on(ns: &str, name: &'static str, any: &'static str) {
    let (tcp, udp) = in_netns(ns, move || {
        let at = |port: u16| SocketAddr::new(any.parse().unwrap(), port);
        (
            TcpListener::bind(at(8080)).unwrap(),
            UdpSocket::bind(at(5353)).unwrap(),
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

/// A backend pod's server for held connections, on port 8081: answers every
/// line with its name, for as long as the client keeps the connection.
fn echo(ns: &str, name: &'static str) {
    let tcp = in_netns(ns, || TcpListener::bind("0.0.0.0:8081").unwrap());
    thread::spawn(move || {
        for stream in tcp.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let lines = BufReader::new(stream.try_clone().unwrap()).lines();
                for _ in lines.map_while(Result::ok) {
                    if stream.write_all(format!("{name}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// `n` TCP connections from `client` to `target`, each checked to report
/// `target` as its peer: what each backend answered (name and the client
/// address it saw).
fn connect_n(client: &str, target: SocketAddr, n: usize) -> Vec<String> {
    in_netns(client, move || {
        (0..n)
            .map(|i| {
                let mut s = TcpStream::connect_timeout(&target, TIMEOUT)
                    .unwrap_or_else(|e| panic!("connection {i} to {target}: {e}"));
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                assert_eq!(s.peer_addr().unwrap(), target);
                let mut answer = String::new();
                s.read_to_string(&mut answer)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                answer
            })
            .collect()
    })
}

/// One UDP datagram from `client` to `target`: where the reply came from
/// and what it said.
fn udp_ask(client: &str, target: SocketAddr) -> (SocketAddr, String) {
    in_netns(client, move || {
        let any = if target.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let sock = UdpSocket::bind(any).unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.send_to(b"who?", target).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = sock.recv_from(&mut buf).expect("UDP reply");
        (from, String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// Sends a line on `conn` and returns the line that answers it.
fn ask(conn: &mut TcpStream) -> std::io::Result<String> {
    conn.write_all(b"who?\n")?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    Ok(line.trim().to_string())
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

    let dir = lab.dir();
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
    let answers = connect_n(&client, format!("{VIP}:80").parse().unwrap(), 100);
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
    let (from, answer) = udp_ask(&client, format!("{VIP}:53").parse().unwrap());
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
    // Every other table reads too, and each as JSON, with the frontend
    // ids written as the addresses they stand for.
    for what in proxy_agent::cli::inspect::KINDS {
        let json = run(
            env!("CARGO_BIN_EXE_proxy-agent"),
            &[
                "inspect",
                what,
                "--json",
                "--pin-dir",
                lab.pin_dir.to_str().unwrap(),
            ],
        );
        let rows: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{what}: {e}: {json}"));
        assert!(rows.is_array(), "{what}: {json}");
    }
    let frontends = inspect("frontends");
    assert!(frontends.contains(&format!("{VIP}:80")), "{frontends}");
    let conntrack = run(
        env!("CARGO_BIN_EXE_proxy-agent"),
        &[
            "inspect",
            "conntrack",
            "--json",
            "--pin-dir",
            lab.pin_dir.to_str().unwrap(),
        ],
    );
    let rows: serde_json::Value = serde_json::from_str(&conntrack).unwrap();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["frontend"] == format!("{VIP}:80") && r["dir"] == "forward"),
        "{conntrack}"
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
        "\"addr\"",
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
    // Addresses as their four bytes, not as one large number.
    let entries: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let vip: Vec<u8> = VIP.parse::<std::net::Ipv4Addr>().unwrap().octets().into();
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["key"]["addr"]["octets"] == serde_json::json!(vip)),
        "the frontend's address as its four bytes:\n{dump}"
    );

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
    lab.teardown();
    lab.assert_gone();
}

const CLIENT6: &str = "fd00:10:244:1::2";
const BACKENDS6: [(&str, &str, &str); 2] = [
    ("be1", "10.244.1.3", "fd00:10:244:1::3"),
    ("be2", "10.244.1.4", "fd00:10:244:1::4"),
];
const GATEWAY6: &str = "fd00:10:244:1::1";
const VIP6: &str = "fd00:10:96::10";
const EMPTY_VIP6: &str = "fd00:10:96::11";

/// A NodePort whose one endpoint is on another node, served from a services
/// file that names the node's address: the uplink (generic XDP, with tc
/// behind it) DNATs each flow to the endpoint, SNATs it to that address on a
/// NAT port, sends it back out, and translates the replies for the client.
///
/// ```text
/// client 172.30.2.5 ── router ── eth0 172.30.1.1 (node, the agent's uplink)
///                        └────── 10.244.2.10 (a pod of another node)
/// ```
#[test]
fn a_nodeport_to_a_remote_endpoint_is_snated_to_the_files_node_address() {
    const NODE: &str = "172.30.1.1";
    const CLIENT_OUTSIDE: &str = "172.30.2.5";
    const REMOTE: &str = "10.244.2.10";
    let mut lab = Lab::new("snat");
    let node = lab.netns("node");
    let router = lab.netns("router");
    let client = lab.netns("client");
    let remote = lab.netns("remote");
    lab.plug_pod(&router, &node, "rn", NODE, "172.30.1.2");
    lab.plug_pod(&router, &client, "rc", CLIENT_OUTSIDE, "172.30.2.1");
    lab.plug_pod(&router, &remote, "rr", REMOTE, "10.244.2.1");
    for ns in [&router, &node] {
        // The node's FIB lookups need forwarding on; the router forwards.
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
    }
    serve(&remote, "remote");

    let dir = lab.dir();
    let services = dir.join("services.json");
    let json = format!(
        r#"{{"services": [
            {{"name": "np", "address": "{NODE}", "port": 30080, "protocol": "TCP",
              "endpoints": [{{"address": "{REMOTE}", "port": 8080}}]}},
            {{"name": "np-dns", "address": "{NODE}", "port": 30053, "protocol": "UDP",
              "endpoints": [{{"address": "{REMOTE}", "port": 5353}}]}}
        ], "node_addresses": ["{NODE}"]}}"#
    );
    std::fs::write(&services, json).unwrap();
    lab.start_agent(
        &node,
        &[
            "run",
            "--services-file",
            services.to_str().unwrap(),
            "--uplink-iface",
            "eth0",
            "--uplink-mode",
            "generic",
            "--pod-iface-pattern",
            "vpod*",
            // A range the test fills, and a collection that frees it soon.
            "--nat-ports",
            "61000-61019",
            "--conntrack-gc-seconds",
            "1",
        ],
    );

    // Every connection reaches the remote endpoint, which sees the node's
    // address on a NAT port, never the client's. A closed flow keeps its
    // port until the agent collects it, so 20 connections take all 20.
    let target: SocketAddr = format!("{NODE}:30080").parse().unwrap();
    let nat_ports = |answers: &[String]| {
        let mut ports = std::collections::BTreeSet::new();
        for answer in answers {
            let (name, peer) = answer.trim().split_once(' ').expect("name and peer");
            assert_eq!(name, "remote");
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(peer.ip().to_string(), NODE, "the endpoint saw {peer}");
            assert!((61000..=61019).contains(&peer.port()), "NAT port {peer}");
            ports.insert(peer.port());
        }
        assert_eq!(ports.len(), answers.len(), "a NAT port per flow: {ports:?}");
    };
    nat_ports(&connect_n(&client, target, 20));
    // The range is full: a 21st flow gets no port, and its SYNs are dropped.
    let refused = in_netns(&client, move || {
        TcpStream::connect_timeout(&target, TIMEOUT).unwrap_err()
    });
    assert_eq!(refused.kind(), ErrorKind::TimedOut, "{refused}");
    // The closed flows end (10 s after their FINs) and the collection gives
    // their ports back: 20 more connections, through the same 20 ports.
    let freed = (0..40).any(|_| {
        thread::sleep(Duration::from_millis(500));
        in_netns(&client, move || {
            TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_ok()
        })
    });
    assert!(freed, "no NAT port came back in 20 s");
    // The others ended within a moment of the first: one more collection.
    thread::sleep(Duration::from_millis(2500));
    nat_ports(&connect_n(&client, target, 15));

    // UDP: the reply comes back from the NodePort the client sent to.
    let target: SocketAddr = format!("{NODE}:30053").parse().unwrap();
    let (from, answer) = udp_ask(&client, target);
    assert_eq!(from, target);
    assert!(
        answer.starts_with(&format!("remote {NODE}:")),
        "answer {answer}"
    );

    lab.teardown();
    lab.assert_gone();
}

/// Real TCP and UDP over IPv6 through a real agent: dual-stack pods, and a
/// Service with a ClusterIP of each family.
#[test]
fn a_dual_stack_service_through_a_real_agent() {
    let mut lab = Lab::new("ds");
    let node = lab.netns("node");
    let client = lab.netns("client");
    lab.plug_dual_stack_pod(
        &node,
        &client,
        "vc",
        (CLIENT, GATEWAY),
        Some((CLIENT6, GATEWAY6)),
    );
    for (i, (name, addr, addr6)) in BACKENDS6.iter().enumerate() {
        let ns = lab.netns(name);
        let host_if = format!("vb{i}");
        lab.plug_dual_stack_pod(
            &node,
            &ns,
            &host_if,
            (addr, GATEWAY),
            Some((addr6, GATEWAY6)),
        );
        serve_on(&ns, name, "::");
    }
    for forwarding in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        run("ip", &["netns", "exec", &node, "sysctl", "-qw", forwarding]);
    }
    let dir = lab.dir();
    let endpoints = |port: u16, v6: bool| {
        BACKENDS6
            .iter()
            .map(|(_, a, a6)| {
                let a = if v6 { a6 } else { a };
                format!(r#"{{"address": "{a}", "port": {port}}}"#)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let json = format!(
        r#"{{"services": [
            {{"name": "web", "address": "{VIP}", "port": 80, "protocol": "TCP", "endpoints": [{}]}},
            {{"name": "web6", "address": "{VIP6}", "port": 80, "protocol": "TCP", "endpoints": [{}]}},
            {{"name": "dns6", "address": "{VIP6}", "port": 53, "protocol": "UDP", "endpoints": [{}]}},
            {{"name": "empty6", "address": "{EMPTY_VIP6}", "port": 80, "protocol": "TCP", "endpoints": []}}
        ]}}"#,
        endpoints(8080, false),
        endpoints(8080, true),
        endpoints(5353, true),
    );
    let services = dir.join("services.json");
    std::fs::write(&services, json).unwrap();
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

    // 50 TCP connections to each ClusterIP: all answered, by both backends,
    // each of which saw the client's own address of that family.
    for (vip, client_addr) in [(VIP6, CLIENT6), (VIP, CLIENT)] {
        let target = SocketAddr::new(vip.parse().unwrap(), 80);
        let answers = connect_n(&client, target, 50);
        let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
        for answer in &answers {
            let (name, peer) = answer.trim().split_once(' ').expect("name and peer");
            let peer: SocketAddr = peer.parse().unwrap();
            let seen = match peer.ip() {
                std::net::IpAddr::V6(a) => a.to_ipv4_mapped().map_or(a.into(), Into::into),
                v4 => v4,
            };
            assert_eq!(seen.to_string(), client_addr, "the backend saw {peer}");
            *by_backend.entry(name.to_string()).or_default() += 1;
        }
        eprintln!("{vip}: connections per backend: {by_backend:?}");
        assert_eq!(by_backend.len(), 2, "both backends reached: {by_backend:?}");
    }

    // UDP over IPv6: the reply comes from the ClusterIP the client sent to.
    let (from, answer) = udp_ask(&client, format!("[{VIP6}]:53").parse().unwrap());
    assert_eq!(from, format!("[{VIP6}]:53").parse::<SocketAddr>().unwrap());
    assert!(
        answer.contains(&format!(" [{CLIENT6}]:")),
        "the backend saw the client: {answer}"
    );

    // A frontend without backends refuses at once (ICMPv6 port unreachable).
    let refused = in_netns(&client, || {
        TcpStream::connect_timeout(&format!("[{EMPTY_VIP6}]:80").parse().unwrap(), TIMEOUT)
            .unwrap_err()
    });
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");

    // `inspect` writes IPv6 addresses as people do.
    let inspect = |what: &str| {
        run(
            env!("CARGO_BIN_EXE_proxy-agent"),
            &["inspect", what, "--pin-dir", lab.pin_dir.to_str().unwrap()],
        )
    };
    let services = inspect("services");
    for line in [
        format!("[{VIP6}]:80/TCP"),
        format!("[{VIP6}]:53/UDP"),
        format!("[{EMPTY_VIP6}]:80/TCP"),
        format!("{VIP}:80/TCP"),
    ] {
        assert!(services.contains(&line), "{line} missing from:\n{services}");
    }
    let conntrack = inspect("conntrack");
    assert!(
        conntrack.contains(&format!("[{CLIENT6}]:")) && conntrack.contains("forward"),
        "{conntrack}"
    );

    lab.teardown_agents_only();
    lab.cleanup_agent_state(&node);
    lab.teardown();
    lab.assert_gone();
}

/// Turns the maps a stopped agent pinned into those the agent before it
/// left (`proxy_common::previous`): its frontends, backends, reverse NAT and
/// conntrack in the previous layouts, the other maps with a previous version unpinned
/// (empty here), and a `nat4_v1`, two versions old, that cannot be carried over.
fn downgrade(dir: &Path) {
    let pinned = Pinned::new(dir);
    let (services, backends, revnat, conntrack) = (
        pinned.services().unwrap(),
        pinned.backends().unwrap(),
        pinned.revnat().unwrap(),
        pinned.conntrack().unwrap(),
    );
    for (_, current) in previous::names::ALL {
        std::fs::remove_file(dir.join(current)).unwrap();
    }
    pins::create(dir, previous::names::SERVICES_V4, "hash", 12, 12, None);
    pins::create(dir, previous::names::REVNAT_V4, "hash", 2, 8, None);
    pins::create(dir, previous::names::CONNTRACK_V4, "lru_hash", 16, 24, None);
    pins::create(dir, "nat4_v1", "lru_hash", 16, 16, None);
    pins::previous_backends(dir, backends);
    let mut old =
        pins::hash::<ServiceKey4, previous::ServiceValue>(dir, previous::names::SERVICES_V4);
    for (k, v) in services {
        let value = previous::ServiceValue {
            backend_id: v.backend_id,
            count: v.count,
            rev_nat_id: u16::try_from(v.rev_nat_id).unwrap(),
            flags: v.flags,
            maglev_size: v.maglev_size,
        };
        old.insert(k, value, 0).unwrap();
    }
    let mut old = pins::hash::<u16, RevNat4>(dir, previous::names::REVNAT_V4);
    for (id, r) in revnat {
        old.insert(u16::try_from(id).unwrap(), r, 0).unwrap();
    }
    let mut old = pins::hash::<CtKey4, previous::CtValue4>(dir, previous::names::CONNTRACK_V4);
    for (k, v) in conntrack {
        let value = previous::CtValue4 {
            backend_id: v.backend_id,
            rev_nat_id: u16::try_from(v.rev_nat_id).unwrap(),
            flags: v.flags,
            nat_port_be: v.nat_port_be,
            _pad: [0; 3],
            last_seen_ns: v.last_seen_ns,
        };
        old.insert(k, value, 0).unwrap();
    }
}

/// An agent started over maps in the previous layouts (as after an upgrade
/// from the agent before) carries the flows over: connections held open
/// through a ClusterIP keep their backend. Round robin gives a new flow its
/// backend by a counter, so flows that lost their conntrack entries would
/// spread over both backends again (and be reset where they move).
#[test]
fn held_connections_keep_their_backend_across_an_upgrade() {
    let mut lab = Lab::new("upg");
    let node = lab.netns("node");
    let client = lab.netns("client");
    lab.plug_pod(&node, &client, "vc", CLIENT, GATEWAY);
    for (i, (name, addr)) in BACKENDS.iter().enumerate() {
        let ns = lab.netns(name);
        lab.plug_pod(&node, &ns, &format!("vb{i}"), addr, GATEWAY);
        echo(&ns, name);
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
    let dir = lab.dir();
    let endpoints: Vec<String> = BACKENDS
        .iter()
        .map(|(_, a)| format!(r#"{{"address": "{a}", "port": 8081}}"#))
        .collect();
    let services = dir.join("services.json");
    std::fs::write(
        &services,
        format!(
            r#"{{"services": [{{"name": "held", "address": "{VIP}", "port": 80, "protocol": "TCP", "endpoints": [{}]}}]}}"#,
            endpoints.join(", ")
        ),
    )
    .unwrap();
    let args = [
        "run",
        "--services-file",
        services.to_str().unwrap(),
        "--pod-iface-pattern",
        "vc,vb*",
        "--scheduler",
        "round-robin",
    ];
    lab.start_agent(&node, &args);
    let mut held: Vec<(TcpStream, String)> = in_netns(&client, || {
        (0..20)
            .map(|i| {
                let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
                let mut conn = TcpStream::connect_timeout(&vip, TIMEOUT)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                conn.set_read_timeout(Some(TIMEOUT)).unwrap();
                let backend = ask(&mut conn).unwrap();
                (conn, backend)
            })
            .collect()
    });
    let mut backends: Vec<&str> = held.iter().map(|(_, b)| b.as_str()).collect();
    backends.sort_unstable();
    backends.dedup();
    assert_eq!(backends, ["be1", "be2"], "round robin used both");
    // Only be1's are held: new flows from round robin's counters alternate
    // per CPU, so with more than two of them on a CPU, some would go to be2.
    held.retain(|(_, backend)| backend == "be1");
    assert!(held.len() >= 5, "{} connections to be1", held.len());

    lab.teardown_agents_only();
    downgrade(&lab.pin_dir);
    lab.start_agent(&node, &args);
    for (i, (conn, backend)) in held.iter_mut().enumerate() {
        let again = ask(conn).unwrap_or_else(|e| panic!("connection {i} after the upgrade: {e}"));
        assert_eq!(&again, backend, "connection {i} changed backend");
    }
    let metrics = in_netns(&node, || {
        let mut s = TcpStream::connect("127.0.0.1:10249").unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    });
    assert!(
        metrics.contains("\nferry_maps_not_carried_total{map=\"nat4_v1\"} 1\n"),
        "{metrics}"
    );
    for old in [
        previous::names::SERVICES_V4,
        previous::names::BACKENDS_V4,
        previous::names::REVNAT_V4,
        previous::names::CONNTRACK_V4,
        "nat4_v1",
    ] {
        assert!(!lab.pin_dir.join(old).exists(), "{old} still pinned");
    }
    assert!(lab.pin_dir.join(map_names::CONNTRACK_V4).exists());

    drop(held);
    lab.teardown_agents_only();
    lab.cleanup_agent_state(&node);
    lab.teardown();
    lab.assert_gone();
}
