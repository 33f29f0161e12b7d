//! `cargo xtask demo`: from a fresh machine to Ferry serving a Service from pods
//! on two nodes, with every step shown.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    lab::{self, Lab},
    setup,
    sys::workspace_root,
};

/// The Service the demo serves: TCP 80 and UDP 53 on the pods' ports.
fn service() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "tcp", "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"},
            ],
        },
    })
}

/// Waits until the Service's slices list `want` ready endpoints.
pub fn wait_for_endpoints(lab: &Lab, service: &str, want: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = lab.ready_endpoints(service)?;
        if ready.len() == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{service} has endpoints {ready:?}, expected {want}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

pub fn cluster_ip(lab: &Lab, service: &str) -> Result<Ipv4Addr> {
    let ip = lab.kubectl(&[
        "get",
        "service",
        service,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    ip.trim()
        .parse()
        .with_context(|| format!("cluster IP of {service}: {ip:?}"))
}

pub fn run() -> Result<()> {
    eprintln!("demo: 1/5 setup (installs and builds what is missing; the first run builds kube-apiserver, minutes)");
    setup::run()?;
    let lab = Lab::new("ferry")?;
    if lab.state_dir().exists() || ferry_netns::exists(&lab.ns("fabric")) {
        eprintln!("demo: a lab is up already; starting it afresh");
        lab.down()?;
    }
    eprintln!("demo: 2/5 images (the agent, the lab's pods) and the lab: node1 and node2, the control-plane node (the fabric: API server), each with its kubelet, Ferry's DaemonSet");
    lab.up(&workspace_root().join("deploy"))?;
    eprintln!(
        "demo: 3/5 pods web-1 (node1), web-2 and web-3 (node2), a client on node1, Service web"
    );
    let web = [("web-1", "node1"), ("web-2", "node2"), ("web-3", "node2")];
    let mut nodes = BTreeMap::new();
    for (name, node) in web {
        let pod = lab.pod_add(name, node, &[("app".into(), "web".into())])?;
        nodes.insert(name.to_string(), (node, pod.addr));
    }
    lab.pod_add("client", "node1", &[])?;
    lab.kubectl_stdin(&["apply", "-f", "-"], &service().to_string())?;
    wait_for_endpoints(&lab, "web", web.len())?;
    let vip = cluster_ip(&lab, "web")?;

    eprintln!("demo: 4/5 30 TCP requests from the client pod to web's ClusterIP {vip}:80");
    let client_ns = lab.pod_ns("client");
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=30 {
        let answer = lab::tcp_ask(
            &client_ns,
            SocketAddr::from((vip, 80)),
            Duration::from_secs(3),
        )
        .with_context(|| format!("request {i} got no answer"))?;
        let (backend, seen) = answer.split_once(' ').unwrap_or((&answer, ""));
        let (node, addr) = nodes
            .get(backend)
            .with_context(|| format!("unexpected answer {answer:?}"))?;
        println!("request {i:>2} -> {backend} ({addr} on {node}), which saw the client as {seen}");
        *answered.entry(backend.to_string()).or_default() += 1;
    }
    println!();
    println!("distribution over 30 requests:");
    for (backend, n) in &answered {
        println!(
            "  {backend:<6} on {}  {n:>2} {}",
            nodes[backend].0,
            "#".repeat(*n)
        );
    }
    let nodes_seen: std::collections::BTreeSet<_> = answered.keys().map(|b| nodes[b].0).collect();
    if answered.len() < 2 || nodes_seen.len() < 2 {
        bail!("expected answers from backends on both nodes, got {answered:?}");
    }
    let udp = ferry_netns::in_netns(&client_ns, move || -> Result<(SocketAddr, String)> {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        sock.send_to(b"hello", (vip, 53))?;
        let mut buf = [0u8; 256];
        let (n, from) = sock.recv_from(&mut buf)?;
        Ok((from, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
    })??;
    println!("UDP to {vip}:53 answered by {} from {}", udp.1, udp.0);

    let map = lab.pin_dir("node1").join("svc4_v2");
    eprintln!(
        "demo: 5/5 the services map of node1: bpftool map dump pinned {}",
        map.display()
    );
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&map)
        .output()?;
    print!("{}", String::from_utf8_lossy(&dump.stdout));
    println!();
    println!("The lab stays up. Try:");
    println!("  cargo xtask lab status");
    println!("  cargo xtask lab kubectl get endpointslices -o wide");
    println!("  cargo xtask lab exec client bash -c 'head -1 < /dev/tcp/{vip}/80'");
    println!("  cargo xtask lab exec node1 bash -c 'head -1 < /dev/tcp/{vip}/80'   # from the node itself");
    println!("  cargo xtask lab pod add web-4 --node node1 --label app=web");
    println!("Tear it down with:");
    println!("  cargo xtask lab down");
    Ok(())
}
