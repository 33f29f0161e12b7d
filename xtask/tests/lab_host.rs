//! Services from the node itself: this test process joins node1 (its host
//! cgroup, where node1's agent's socket hooks apply) and dials from node1's
//! network namespace, as a host process or the kubelet would; a hostNetwork
//! pod does the same from its container. No packet hook is on these paths:
//! what reaches a backend was translated at connect().

mod support;

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use proxy_common::stats::Stat;
use serde_json::json;
use support::*;

const NODE1: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
const NODE_PORT: u16 = 30082;

#[test]
fn the_node_s_own_connections_reach_services() {
    let lab = Lab::up();
    let web = [
        lab.pod_add("web-1", "node1", "web"),
        lab.pod_add("web-2", "node2", "web"),
    ];
    let vip = lab.service("web", "web");
    lab.node_port_service("np", "web", NODE_PORT);
    lab.apply_service(
        "sticky",
        json!({"selector": {"app": "web"}, "sessionAffinity": "ClientIP", "ports": [http()]}),
    );
    lab.apply_service(
        "empty",
        json!({"selector": {"app": "nobody"}, "ports": [http()]}),
    );
    for service in ["web", "np", "sticky"] {
        lab.wait_endpoints(service, &web);
    }
    let sticky = lab.cluster_ip("sticky");
    let empty = lab.cluster_ip("empty");
    let node1 = lab.node_ns("node1");
    lab.xtask(&["pod", "add", "client", "--node", "node1"]);
    let client = lab.pod_ns("client");
    let _joined = lab.join_node("node1");

    eprintln!("== 100 TCP connections from node1's host namespace to a ClusterIP");
    let answers = connect_many(&node1, (vip, 80).into(), 100);
    let by_pod = count(&answers);
    eprintln!("   {by_pod:?}");
    assert_eq!(
        by_pod.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "backends on both nodes"
    );
    let peer = in_netns(&node1, move || {
        TcpStream::connect_timeout(&(vip, 80).into(), TIMEOUT)
            .and_then(|s| s.peer_addr())
            .expect("connect")
    });
    assert_eq!(
        peer,
        SocketAddr::from((vip, 80)),
        "getpeername: the ClusterIP"
    );

    eprintln!("== UDP from an unconnected socket: the reply comes from the ClusterIP");
    let (from, answer) = udp_ask(&node1, (vip, 53).into());
    assert_eq!(from, SocketAddr::from((vip, 53)));
    assert!(["web-1", "web-2"].contains(&pod_of(&answer)), "{answer}");

    eprintln!("== NodePort on the node's own address");
    let answers = connect_many(&node1, (NODE1, NODE_PORT).into(), 10);
    assert_eq!(count(&answers).values().sum::<usize>(), 10);

    eprintln!("== a Service without endpoints refuses at connect()");
    let refused = in_netns(&node1, move || {
        TcpStream::connect_timeout(&(empty, 80).into(), TIMEOUT).expect_err("no endpoints")
    });
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");

    eprintln!("== sessionAffinity holds for the node's connections");
    let answers = connect_many(&node1, (sticky, 80).into(), 20);
    assert_eq!(count(&answers).len(), 1, "one backend: {answers:?}");

    eprintln!("== a hostNetwork pod on node1 reaches the ClusterIP");
    assert_eq!(dial_pod(&lab, "host-client", true, vip), "Succeeded");

    eprintln!("== pods: per-packet NAT with --socket-lb host, at connect() with all");
    let new_flows = || lab.agent_counter("node1", Stat::FwdNew.index());
    let before = new_flows();
    assert_eq!(
        count(&connect_many(&client, (vip, 80).into(), 20))
            .values()
            .sum::<usize>(),
        20
    );
    assert!(
        new_flows() - before >= 20,
        "host mode: the pod's flows went through tc"
    );
    lab.xtask(&["agent", "stop", "node1"]);
    lab.xtask(&["agent", "start", "node1", "--", "--socket-lb", "all"]);
    let before = new_flows();
    let answers = connect_many(&client, (vip, 80).into(), 20);
    assert_eq!(count(&answers).values().sum::<usize>(), 20, "{answers:?}");
    assert_eq!(
        new_flows(),
        before,
        "all: no pod flow needed the tc program's NAT"
    );
    assert_eq!(dial_pod(&lab, "pod-client", false, vip), "Succeeded");

    eprintln!("== /statusz names the hooks' mode and node1's cgroup");
    let ext = format!("{}-ext", lab.name);
    let status = http_get(&ext, (NODE1, 10256).into(), "/statusz");
    let body: serde_json::Value =
        serde_json::from_str(status.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["socketLb"]["mode"], "all", "{body:#}");
    assert!(
        body["socketLb"]["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with(&format!("/{}/node1", lab.name))),
        "{body:#}"
    );
}

/// Runs a pod on node1 (on the host network or its own) whose one container
/// dials `vip`:80 and exits 0 once answered; returns its final phase.
fn dial_pod(lab: &Lab, name: &str, host_network: bool, vip: Ipv4Addr) -> String {
    lab.apply(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "hostNetwork": host_network,
            "nodeName": "node1",
            "restartPolicy": "Never",
            "containers": [{
                "name": "dial",
                "image": format!("ferry.local/lab-pod:{}", env!("CARGO_PKG_VERSION")),
                "imagePullPolicy": "Never",
                "command": ["/ferry-lab-pod", "dial", format!("{vip}:80")],
            }],
        },
    }));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let phase = lab.kubectl(&["get", "pod", name, "-o", "jsonpath={.status.phase}"]);
        if matches!(phase.trim(), "Succeeded" | "Failed") || Instant::now() > deadline {
            return phase.trim().to_string();
        }
        thread::sleep(Duration::from_millis(500));
    }
}
