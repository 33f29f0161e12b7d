//! The agents as the kubelets run them (deploy/'s DaemonSet): a rolling
//! update from the previous release's agent (whose NAT map has the older
//! layout) and a rolling restart each keep every held connection on its
//! backend (ClusterIP, a NodePort SNATed to a backend on the other node, an
//! affinity Service) with no request failed and affinity kept; a node that
//! lost its pins and its agent (a reboot's state) serves every Service again
//! once the new agent pod, which reaches the API server through the address
//! deploy/'s ConfigMap gives, starts.

mod support;

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::json;
use support::*;

const NODE1: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
const NODE_PORT: u16 = 30081;
const HELD_PER_TARGET: usize = 4;

/// A path through Ferry: from a namespace to an address.
#[derive(Clone)]
struct Target {
    what: &'static str,
    ns: String,
    addr: SocketAddr,
    /// Every connection must reach this pod (affinity), if set.
    affine: Option<String>,
}

/// A connection held open, and the pod that answered it first.
struct Held {
    target: usize,
    stream: TcpStream,
    pod: String,
}

/// A connection to `target` from `port` (0: one the kernel picks), and the
/// pod that answered.
fn connect_from(target: &Target, port: u16) -> std::io::Result<(TcpStream, String)> {
    let addr = target.addr;
    in_netns(&target.ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.connect_timeout(&addr.into(), TIMEOUT)?;
        let mut s = TcpStream::from(s);
        s.set_read_timeout(Some(TIMEOUT))?;
        let pod = pod_of(&read_line(&mut s)?).to_string();
        Ok((s, pod))
    })
}

fn connect(target: &Target) -> std::io::Result<(TcpStream, String)> {
    connect_from(target, 0)
}

/// The client port of the first held connection; the others follow. Below
/// the kernel's ephemeral range (32768-60999), so that no new connection of
/// the load takes a held one's port: the previous release predates 6899793
/// and, while its programs still serve during the upgrade, a new connection
/// to the other ClusterIP of the same pods from a held connection's port
/// that lands on the same backend takes that connection's reply entry, and
/// the client resets it (seen in CI: two held ClientIP-affinity connections
/// reset). This release gives such a flow a second port; the lab test
/// `lab_service_semantics` shows that with two sockets on one port.
const HELD_PORTS: u16 = 21_000;

/// Until `stop`: every held connection asks and must get its pod's answer,
/// and a new connection to each target must be answered (by the affine pod
/// where there is one). Returns the failures, each said in words.
fn load(targets: &[Target], held: &mut [Held], stop: &AtomicBool) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut requests = 0;
    while !stop.load(Ordering::Relaxed) {
        for (i, h) in held.iter_mut().enumerate() {
            requests += 1;
            let answer = h
                .stream
                .write_all(b"again\n")
                .and_then(|()| read_line(&mut h.stream));
            match answer {
                Ok(a) if pod_of(&a) == h.pod => {}
                Ok(a) => failures.push(format!(
                    "held {i} ({}): answered by {a:?}, not {}",
                    targets[h.target].what, h.pod
                )),
                Err(e) => failures.push(format!("held {i} ({}): {e}", targets[h.target].what)),
            }
        }
        for t in targets {
            requests += 1;
            match connect(t) {
                Ok((_, pod)) if t.affine.as_ref().is_none_or(|a| *a == pod) => {}
                Ok((_, pod)) => failures.push(format!(
                    "new connection ({}): {pod}, not the affine {:?}",
                    t.what, t.affine
                )),
                Err(e) => failures.push(format!("new connection ({}): {e}", t.what)),
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    (requests, failures)
}

/// Runs `action` while the load runs, and fails on any failed request.
fn under_load(what: &str, targets: &[Target], held: &mut Vec<Held>, action: impl FnOnce()) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut mine = std::mem::take(held);
    let worker = {
        let (targets, stop) = (targets.to_vec(), stop.clone());
        thread::spawn(move || {
            let result = load(&targets, &mut mine, &stop);
            (result, mine)
        })
    };
    let started = Instant::now();
    action();
    // The new agents serve a while before the load stops.
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let ((requests, failures), mine) = worker.join().unwrap();
    *held = mine;
    eprintln!(
        "{what}: {requests} requests in {:.1} s, {} failed",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{what}: {failures:#?}");
}

#[test]
fn lab_daemonset_restarts_keep_connections_and_a_rebooted_node_comes_back() {
    let lab = Lab::up();
    let client_ns = lab.pod_ns("client");
    let ext = format!("{}-ext", lab.name);
    lab.pod_add("client", "node1", "client");
    let web = [
        lab.pod_add("web-1", "node2", "web"),
        lab.pod_add("web-2", "node2", "web"),
    ];
    let vip = lab.service("web", "web");
    lab.node_port_service("np", "web", NODE_PORT);
    lab.apply_service(
        "sticky",
        json!({
            "selector": {"app": "web"},
            "sessionAffinity": "ClientIP",
            "ports": [http()],
        }),
    );
    for service in ["web", "np", "sticky"] {
        lab.wait_endpoints(service, &web);
    }
    let sticky = lab.cluster_ip("sticky");

    // The previous release finds no uplink by itself and is told the
    // workers' (eth0); the control-plane node's is its bridge. What is
    // upgraded and restarted here is the workers' agents.
    lab.xtask(&["agent", "stop", "control-plane"]);

    eprintln!("== the previous release's agents serve (its NAT map is nat4_v2)");
    let built = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["image", "--previous"])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let line = String::from_utf8_lossy(&built.stdout).into_owned();
    let (previous, archive) = line.trim().split_once('\t').unwrap();
    lab.xtask(&["load-image", archive]);
    let current = set_agent_image(&lab, previous, "/healthz");
    let mut targets = vec![
        Target {
            what: "ClusterIP",
            ns: client_ns.clone(),
            addr: (vip, 80).into(),
            affine: None,
        },
        Target {
            what: "NodePort to node2 (SNAT)",
            ns: ext.clone(),
            addr: (NODE1, NODE_PORT).into(),
            affine: None,
        },
        Target {
            what: "ClientIP affinity",
            ns: client_ns.clone(),
            addr: (sticky, 80).into(),
            affine: None,
        },
    ];
    let (_, affine) = connect(&targets[2]).expect("connect to the affinity Service");
    targets[2].affine = Some(affine);
    let mut held = Vec::new();
    let mut port = HELD_PORTS;
    for (i, t) in targets.iter().enumerate() {
        for _ in 0..HELD_PER_TARGET {
            let (stream, pod) = connect_from(t, port).unwrap_or_else(|e| panic!("{}: {e}", t.what));
            port += 1;
            held.push(Held {
                target: i,
                stream,
                pod,
            });
        }
    }

    eprintln!("== a rolling update to this release, under load: the older NAT map is carried over");
    under_load("upgrade", &targets, &mut held, || {
        set_agent_image(&lab, &current, "/readyz");
    });

    eprintln!("== a rolling restart of the DaemonSet, under load");
    under_load("rollout restart", &targets, &mut held, || {
        lab.kubectl(&["-n", "kube-system", "rollout", "restart", "daemonset/ferry"]);
        lab.kubectl(&[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/ferry",
            "--timeout=180s",
        ]);
    });

    eprintln!("== node1 reboots: its agent and every pin gone; the new agent pod serves again");
    drop(held);
    lab.reboot_state("node1");
    // Nothing serves the Services on node1 now (there is no kube-proxy).
    for t in &targets {
        assert!(
            connect(t).is_err(),
            "{} still answers without an agent",
            t.what
        );
    }
    let started = Instant::now();
    lab.xtask(&["agent", "start", "node1"]);
    let pod_ready = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !targets.iter().all(|t| connect(t).is_ok()) {
        assert!(
            Instant::now() < deadline,
            "node1 does not serve every Service again"
        );
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "node1 after a reboot: agent pod Ready {:.1} s after it was let back, every Service served after {:.1} s",
        pod_ready.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let status = http_get(&ext, (NODE1, 10249).into(), "/statusz");
    let body: serde_json::Value =
        serde_json::from_str(status.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(
        body["apiServer"]["url"], "https://10.250.0.1:6443/",
        "the agent reached the API server through deploy/'s ConfigMap: {body:#}"
    );
}

/// Rolls the DaemonSet to `image`, its readiness probe on `ready` (the
/// previous release has no `/readyz`: its pods are ready on `/healthz`), and
/// waits until every node runs it; returns the image it ran before. The
/// previous release finds no uplink by itself, so the uplink is named (for
/// both).
fn set_agent_image(lab: &Lab, image: &str, ready: &str) -> String {
    let before = lab.kubectl(&[
        "-n",
        "kube-system",
        "get",
        "daemonset/ferry",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    let patch = json!({"spec": {"template": {"spec": {"containers": [{
        "name": "agent",
        "image": image,
        "env": [{"name": "FERRY_UPLINK_IFACE", "value": "eth0", "valueFrom": null}],
        "readinessProbe": {"httpGet": {"path": ready}},
    }]}}}});
    lab.kubectl(&[
        "-n",
        "kube-system",
        "patch",
        "daemonset/ferry",
        "-p",
        &patch.to_string(),
    ]);
    lab.kubectl(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/ferry",
        "--timeout=180s",
    ]);
    before.trim().to_string()
}
