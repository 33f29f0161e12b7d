//! Services from the node itself: this test process joins node1 (its host
//! cgroup, where node1's agent's socket hooks apply) and dials from node1's
//! network namespace, as a host process or the kubelet would; a hostNetwork
//! pod does the same from its container; and the API server, on the
//! control-plane node, calls an admission webhook through its ClusterIP.
//! No packet hook is on these paths: what reaches a backend was translated
//! at connect().

mod support;

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::Command,
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

    eprintln!("== the API server reaches an admission webhook through its ClusterIP");
    webhook_through_the_control_plane_node(&lab);

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
    let status = http_get(&ext, (NODE1, 10249).into(), "/statusz");
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

/// The webhook's name as the API server asks for it (its Service's DNS name).
const WEBHOOK_HOST: &str = "webhook.default.svc";

/// A webhook pod on node2 behind Service `webhook` (443 -> 8443), and a
/// ValidatingWebhookConfiguration naming that Service, for labelled
/// ConfigMaps: the API server, whose only way to the ClusterIP is the
/// control-plane node's socket hooks, must ask it. Shown three ways: a
/// denied name is denied with the webhook's message, an allowed one is
/// created, and with the control-plane node's hooks removed (agent stopped,
/// its pins cleaned up) the call fails, until the agent is back.
fn webhook_through_the_control_plane_node(lab: &Lab) {
    let dir = std::env::temp_dir().join(format!("{}-webhook", lab.name));
    let (ca, cert, key) = webhook_pki(&dir);
    lab.apply(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "webhook", "namespace": "default", "labels": {"app": "webhook"}},
        "spec": {
            "nodeName": "node2",
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "webhook",
                "image": format!("ferry.local/lab-pod:{}", env!("CARGO_PKG_VERSION")),
                "imagePullPolicy": "Never",
                "command": ["/ferry-lab-pod", "webhook"],
                "env": [
                    {"name": "WEBHOOK_CERT", "value": cert},
                    {"name": "WEBHOOK_KEY", "value": key},
                ],
                "readinessProbe": {"tcpSocket": {"port": 8443}, "periodSeconds": 1},
            }],
        },
    }));
    lab.apply_service(
        "webhook",
        json!({
            "selector": {"app": "webhook"},
            "ports": [{"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}],
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let pod_ip = loop {
        let out = lab.kubectl(&[
            "get",
            "pod",
            "webhook",
            "-o",
            "jsonpath={.status.podIP} {.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        if let [addr, "True"] = out.split_whitespace().collect::<Vec<_>>()[..] {
            break addr.parse::<Ipv4Addr>().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the webhook pod is not Ready: {out}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    lab.wait_endpoints("webhook", &[pod_ip]);
    lab.apply(&json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "ferry-lab"},
        "webhooks": [{
            "name": "names.ferry-lab.test",
            "clientConfig": {
                "service": {"namespace": "default", "name": "webhook", "path": "/validate", "port": 443},
                "caBundle": ca,
            },
            "rules": [{
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["configmaps"],
                "scope": "Namespaced",
            }],
            "objectSelector": {"matchLabels": {"ferry-lab/webhook": "on"}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
        }],
    }));

    // The configuration takes effect once the API server has read it.
    let denied = first_refusal(lab, "denied-", 60);
    eprintln!("   denied: {}", denied.trim());
    assert!(
        denied.contains("the ferry-lab webhook denies denied-"),
        "denied by the webhook itself, not for want of it: {denied}"
    );
    create_config_map(lab, "allowed").expect("an allowed name is created");

    // Without the control-plane node's hooks the API server cannot reach it
    // (they go once the RCU grace period after their unpinning ends).
    lab.reboot_state("control-plane");
    let unreachable = first_refusal(lab, "allowed-", 20);
    eprintln!("   without the hooks: {}", unreachable.trim());
    assert!(
        unreachable.contains("failed calling webhook"),
        "{unreachable}"
    );
    lab.xtask(&["agent", "start", "control-plane"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = create_config_map(lab, "allowed-again") {
        assert!(
            Instant::now() < deadline,
            "the webhook is not reached again: {e}"
        );
        thread::sleep(Duration::from_millis(500));
    }
    lab.kubectl(&["delete", "validatingwebhookconfiguration", "ferry-lab"]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Creates ConfigMap `name`, labelled for the webhook.
fn create_config_map(lab: &Lab, name: &str) -> Result<String, String> {
    let path = std::env::temp_dir().join(format!("{}-{name}.json", lab.name));
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default", "labels": {"ferry-lab/webhook": "on"}},
    });
    std::fs::write(&path, manifest.to_string()).unwrap();
    let created = lab.try_kubectl(&["create", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(path);
    created
}

/// Creates labelled ConfigMaps `<prefix>1`, `<prefix>2`, ... (deleting
/// each that is created) until one is refused, at most `tries` times, half a
/// second apart; returns what kubectl said of the refusal.
fn first_refusal(lab: &Lab, prefix: &str, tries: u32) -> String {
    for n in 1..=tries {
        let name = format!("{prefix}{n}");
        match create_config_map(lab, &name) {
            Err(refusal) => return refusal,
            Ok(_) => lab.kubectl(&["delete", "configmap", &name]),
        };
        thread::sleep(Duration::from_millis(500));
    }
    panic!("{tries} ConfigMaps named {prefix}N were all created");
}

/// A CA and a serving certificate for [`WEBHOOK_HOST`], made with openssl in
/// `dir`: the CA as the webhook configuration's caBundle (base64), the
/// certificate and key in PEM.
fn webhook_pki(dir: &Path) -> (String, String, String) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    std::fs::write(
        dir.join("san.cnf"),
        format!("subjectAltName=DNS:{WEBHOOK_HOST}\n"),
    )
    .unwrap();
    for step in [
        format!("req -x509 {ec} -keyout ca.key -out ca.crt -days 1 -subj /CN=ferry-lab-webhook-ca"),
        format!("req {ec} -keyout tls.key -out tls.csr -subj /CN={WEBHOOK_HOST}"),
        "x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile san.cnf -out tls.crt".to_string(),
        "base64 -A -in ca.crt -out ca.b64".to_string(),
    ] {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(step.split_whitespace())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
    (read("ca.b64"), read("tls.crt"), read("tls.key"))
}
