//! Lab tests of traffic from outside the cluster: NodePort on both nodes,
//! externalTrafficPolicy=Local with its health check, externalIPs, LoadBalancer
//! IPs with source ranges, the agent's /healthz following its Node's
//! eligibility, through real agents and a real API server.

mod support;

use std::{
    io::{ErrorKind, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::Duration,
};

use serde_json::json;
use support::*;

const EXT: &str = "10.250.0.100";
const NODE1: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
const NODE2: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 12);
const EXT6: &str = "fd00:10:250::100";
const NODE1_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x250, 0, 0, 0, 0, 0x11);
const NODE2_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x250, 0, 0, 0, 0, 0x12);

/// Waits until `target` answers from `ns` (the agents programmed it).
fn wait_served(ns: &str, target: SocketAddr) {
    let wait = std::time::Instant::now();
    while connect_many(ns, target, 1).pop().unwrap().is_err() {
        assert!(
            wait.elapsed() < Duration::from_secs(10),
            "{target} was never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn refused_or_dropped(ns: &str, target: SocketAddr) -> bool {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_err()
    })
}

#[test]
fn lab_traffic_from_outside_the_cluster() {
    let lab = Lab::up();
    let ext = format!("{}-ext", lab.name);
    let web1 = lab.pod_add("web-1", "node1", "web");
    let web2 = lab.pod_add("web-2", "node2", "web");
    lab.apply_service(
        "web",
        json!({
            "type": "NodePort",
            "selector": {"app": "web"},
            "externalIPs": ["192.0.2.20"],
            "ports": [
                {
                    "name": "http",
                    "port": 80,
                    "targetPort": "tcp",
                    "nodePort": 30080,
                    "protocol": "TCP",
                },
                {
                    "name": "dns",
                    "port": 53,
                    "targetPort": "udp",
                    "nodePort": 30053,
                    "protocol": "UDP",
                },
            ],
        }),
    );
    lab.wait_endpoints("web", &[web1, web2]);

    for node in [NODE1, NODE2] {
        eprintln!(
            "== 200 TCP connections from outside to {node}:30080 reach backends on both nodes"
        );
        let by_pod = count(&connect_many(&ext, (node, 30080).into(), 200));
        eprintln!("   {by_pod:?}");
        assert_eq!(by_pod.values().sum::<usize>(), 200);
        assert_eq!(by_pod.keys().collect::<Vec<_>>(), ["web-1", "web-2"]);
    }

    eprintln!("== UDP through either node answers from the NodePort");
    for node in [NODE1, NODE2] {
        let (from, answer) = udp_ask(&ext, (node, 30053).into());
        assert_eq!(from, SocketAddr::from((node, 30053)));
        assert!(["web-1", "web-2"].contains(&pod_of(&answer)), "{answer}");
    }

    eprintln!("== externalIP 192.0.2.20:80");
    let by_pod = count(&connect_many(
        &ext,
        (Ipv4Addr::new(192, 0, 2, 20), 80).into(),
        50,
    ));
    assert_eq!(
        by_pod.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{by_pod:?}"
    );

    eprintln!("== a pod reaches a NodePort on its own node's address");
    lab.xtask(&["pod", "add", "client", "--node", "node1"]);
    let by_pod = count(&connect_many(
        &lab.pod_ns("client"),
        (NODE1, 30080).into(),
        20,
    ));
    assert_eq!(by_pod.values().sum::<usize>(), 20);

    eprintln!(
        "== externalTrafficPolicy=Local: client address kept, only the node with a backend answers"
    );
    let loc = lab.pod_add("loc-1", "node1", "loc");
    lab.apply_service(
        "loc",
        json!({
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 30100,
            "selector": {"app": "loc"},
            "ports": [
                {
                    "name": "http",
                    "port": 80,
                    "targetPort": "tcp",
                    "nodePort": 30090,
                    "protocol": "TCP",
                },
            ],
        }),
    );
    lab.wait_endpoints("loc", &[loc]);
    lab.xtask(&["lb-ip", "loc", "192.0.2.10"]);
    let answers = connect_many(&ext, (NODE1, 30090).into(), 20);
    for answer in &answers {
        let answer = answer.as_ref().expect("node1 answers");
        assert_eq!(pod_of(answer), "loc-1");
        assert!(
            answer.contains(&format!(" {EXT}:")),
            "the backend saw {answer}, not the external client"
        );
    }
    assert!(
        refused_or_dropped(&ext, (NODE2, 30090).into()),
        "node2 has no local endpoint and must not answer"
    );
    eprintln!("== ...but a pod on node2 dialling its own node's NodePort is served by the cluster's endpoints");
    lab.xtask(&["pod", "add", "client2", "--node", "node2"]);
    for answer in connect_many(&lab.pod_ns("client2"), (NODE2, 30090).into(), 10) {
        assert_eq!(
            pod_of(&answer.expect("a pod is served past the policy")),
            "loc-1"
        );
    }

    eprintln!("== healthCheckNodePort: 200 where an endpoint is local, 503 elsewhere");
    let healthy = http_get(&ext, (NODE1, 30100).into(), "/healthz");
    assert!(healthy.starts_with("HTTP/1.1 200"), "{healthy}");
    assert!(healthy.contains(r#""localEndpoints": 1"#), "{healthy}");
    let unhealthy = http_get(&ext, (NODE2, 30100).into(), "/healthz");
    assert!(unhealthy.starts_with("HTTP/1.1 503"), "{unhealthy}");
    assert!(unhealthy.contains(r#""localEndpoints": 0"#), "{unhealthy}");

    eprintln!("== node2 marked for removal by the cluster autoscaler: its /healthz says 503 until the taint goes");
    let taint = "ToBeDeletedByClusterAutoscaler=1764700000:NoSchedule";
    lab.kubectl(&["taint", "nodes", "node2", taint]);
    let healthz = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let answer = http_get(&ext, (NODE2, 10256).into(), "/healthz");
            if answer.starts_with(want) {
                break answer;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node2's /healthz is not {want}: {answer}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let leaving = healthz("HTTP/1.1 503");
    assert!(leaving.contains(r#""nodeEligible": false"#), "{leaving}");
    let live = http_get(&ext, (NODE2, 10256).into(), "/livez");
    assert!(
        live.starts_with("HTTP/1.1 200"),
        "a leaving node's agent is alive: {live}"
    );
    lab.kubectl(&["taint", "nodes", "node2", "ToBeDeletedByClusterAutoscaler-"]);
    let back = healthz("HTTP/1.1 200");
    assert!(back.contains(r#""nodeEligible": true"#), "{back}");

    eprintln!("== LoadBalancer ingress IP set through the status subresource");
    let wait = std::time::Instant::now();
    let answer = loop {
        if let Ok(Ok(answer)) = std::panic::catch_unwind(|| {
            connect_many(&ext, (Ipv4Addr::new(192, 0, 2, 10), 80).into(), 1)
                .pop()
                .unwrap()
        }) {
            break answer;
        }
        assert!(
            wait.elapsed() < Duration::from_secs(5),
            "the LB IP was never served"
        );
    };
    assert_eq!(pod_of(&answer), "loc-1");
    assert!(answer.contains(&format!(" {EXT}:")), "{answer}");

    eprintln!("== loadBalancerSourceRanges: clients outside the ranges are dropped");
    lab.apply_service(
        "fw",
        json!({
            "type": "LoadBalancer",
            "loadBalancerSourceRanges": ["10.250.0.128/25"],
            "selector": {"app": "web"},
            "ports": [http()],
        }),
    );
    lab.wait_endpoints("fw", &[web1, web2]);
    lab.xtask(&["lb-ip", "fw", "192.0.2.30"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        refused_or_dropped(&ext, (Ipv4Addr::new(192, 0, 2, 30), 80).into()),
        "a client outside the ranges got through"
    );
    lab.kubectl(&[
        "patch",
        "service",
        "fw",
        "-p",
        r#"{"spec": {"loadBalancerSourceRanges": ["10.250.0.96/28"]}}"#,
    ]);
    let wait = std::time::Instant::now();
    loop {
        let ok = in_netns(&ext, || {
            TcpStream::connect_timeout(
                &(Ipv4Addr::new(192, 0, 2, 30), 80).into(),
                Duration::from_millis(300),
            )
            .is_ok()
        });
        if ok {
            break;
        }
        assert!(
            wait.elapsed() < Duration::from_secs(5),
            "a client inside the ranges was never let through"
        );
    }

    eprintln!("== hairpin: a pod reaches itself through its Service, by ClusterIP and by NodePort");
    lab.pod_add("solo", "node1", "solo");
    lab.apply_service(
        "solo",
        json!({
            "type": "NodePort",
            "selector": {"app": "solo"},
            "ports": [
                {
                    "name": "http",
                    "port": 80,
                    "targetPort": "tcp",
                    "nodePort": 30110,
                    "protocol": "TCP",
                },
            ],
        }),
    );
    let solo_addr = lab_pod_addr(&lab.xtask(&["status"]), "solo");
    lab.wait_endpoints("solo", &[solo_addr]);
    let vip: Ipv4Addr = lab
        .kubectl(&["get", "service", "solo", "-o", "jsonpath={.spec.clusterIP}"])
        .trim()
        .parse()
        .unwrap();
    for target in [
        SocketAddr::from((vip, 80)),
        SocketAddr::from((NODE1, 30110)),
    ] {
        let answers = connect_many(&lab.pod_ns("solo"), target, 10);
        for answer in &answers {
            let answer = answer.as_ref().unwrap_or_else(|e| panic!("{target}: {e}"));
            assert!(
                answer.starts_with("solo 169.254.42.1:"),
                "{target}: {answer}"
            );
        }
    }

    eprintln!("== IPv6 NodePort from outside: backends on both nodes, the remote one by IPv6 SNAT");
    let dual = |name: &str, app: &str, node_port: u16, local: bool| {
        let mut spec = json!({
            "type": "NodePort",
            "ipFamilyPolicy": "RequireDualStack",
            "ipFamilies": ["IPv4", "IPv6"],
            "selector": {"app": app},
            "ports": [
                {
                    "name": "http",
                    "port": 80,
                    "targetPort": "tcp",
                    "nodePort": node_port,
                    "protocol": "TCP",
                },
            ],
        });
        if local {
            spec["externalTrafficPolicy"] = json!("Local");
        }
        lab.apply_service(name, spec);
    };
    dual("web6", "web", 30085, false);
    let web_ips: Vec<IpAddr> = ["web-1", "web-2"]
        .iter()
        .flat_map(|pod| lab.pod_ips(pod))
        .collect();
    lab.wait_endpoints_ip("web6", &web_ips);
    for node in [NODE1_6, NODE2_6] {
        let target = SocketAddr::from((node, 30085));
        wait_served(&ext, target);
        let by_pod = count(&connect_many(&ext, target, 100));
        eprintln!("   {target}: {by_pod:?}");
        assert_eq!(by_pod.values().sum::<usize>(), 100);
        assert_eq!(by_pod.keys().collect::<Vec<_>>(), ["web-1", "web-2"]);
    }

    eprintln!("== externalTrafficPolicy=Local over IPv6: client address kept, node2 silent");
    dual("loc6", "loc", 30095, true);
    lab.wait_endpoints_ip("loc6", &lab.pod_ips("loc-1"));
    let target = SocketAddr::from((NODE1_6, 30095));
    wait_served(&ext, target);
    for answer in connect_many(&ext, target, 20) {
        let answer = answer.expect("node1 answers over IPv6");
        assert_eq!(pod_of(&answer), "loc-1");
        assert!(
            answer.contains(&format!(" [{EXT6}]:")),
            "the backend saw {answer}, not the external client"
        );
    }
    assert!(
        refused_or_dropped(&ext, (NODE2_6, 30095).into()),
        "node2 has no local endpoint and must not answer over IPv6"
    );

    host_network_backend(&lab, &ext);

    eprintln!("== the agents report their uplink attach mode");
    let status = http_get(&ext, (NODE1, 10249).into(), "/statusz");
    assert!(
        status.contains(r#""interface": "eth0", "mode": "generic""#),
        "{status}"
    );
}

/// A hostNetwork backend's port on node1 (a process of the node itself).
const HOST_PORT: u16 = 9100;
const HOST_NODE_PORT: u16 = 30091;

/// Answers every connection to `NODE1:HOST_PORT` in node1's own namespace
/// with `host-node1 <client>` until `stop` is set.
fn host_server(ns: String, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
    let (listening, ready) = mpsc::channel();
    let server = thread::spawn(move || {
        in_netns(&ns, move || {
            let listener = TcpListener::bind((NODE1, HOST_PORT)).unwrap();
            listener.set_nonblocking(true).unwrap();
            listening.send(()).unwrap();
            let mut served = 0;
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = writeln!(conn, "host-node1 {peer}");
                        served += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("host server: {e}"),
                }
            }
            served
        })
    });
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("the host server listens");
    server
}

/// A NodePort whose backend is node1 itself (a hostNetwork pod's
/// endpoint): its answers leave through node1's uplink, not a pod's veth,
/// and must still come from the NodePort.
fn host_network_backend(lab: &Lab, ext: &str) {
    eprintln!("== a hostNetwork backend on node1 behind NodePort {HOST_NODE_PORT}, from outside through both nodes");
    let stop = Arc::new(AtomicBool::new(false));
    let server = host_server(lab.node_ns("node1"), stop.clone());
    lab.apply_service(
        "hostnet",
        json!({
            "type": "NodePort",
            "ports": [{"name": "http", "port": 80, "targetPort": HOST_PORT, "nodePort": HOST_NODE_PORT, "protocol": "TCP"}],
        }),
    );
    // No selector: the slice a hostNetwork pod's would be, by hand (the
    // lab's API server serves slices as v1beta1, the node in `topology`).
    lab.apply(&json!({
        "apiVersion": "discovery.k8s.io/v1beta1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "hostnet-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "hostnet"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": HOST_PORT, "protocol": "TCP"}],
        "endpoints": [{
            "addresses": [NODE1.to_string()],
            "topology": {"kubernetes.io/hostname": "node1"},
            "conditions": {"ready": true},
        }],
    }));
    lab.wait_endpoints("hostnet", &[NODE1]);
    for node in [NODE2, NODE1] {
        wait_served(ext, (node, HOST_NODE_PORT).into());
        let answers = connect_many(ext, (node, HOST_NODE_PORT).into(), 20);
        let by_pod = count(&answers);
        eprintln!("   through {node}: {by_pod:?}");
        assert_eq!(
            by_pod.get("host-node1"),
            Some(&20),
            "through {node}: {answers:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    lab.kubectl(&["delete", "service", "hostnet"]);
}
