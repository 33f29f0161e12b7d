//! The lab's pods: a network namespace wired to its node, a server answering
//! TCP and UDP with the pod's name and the client it saw, and the Pod object
//! with the status a kubelet would give it; and a client for their answers.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ferry_netns as netns;
use serde_json::json;

use super::{api::now, node_addr, node_index, pod_gateway, Lab, POD_TCP_PORT, POD_UDP_PORT};
use crate::sys::{spawn_detached, stop_pid_file};

/// A pod the lab made.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub addr: Ipv4Addr,
}

impl Lab {
    pub(super) fn pods_dir(&self) -> PathBuf {
        self.state_dir().join("pods")
    }

    /// The pods the lab made, by name.
    pub fn pods(&self) -> Result<BTreeMap<String, Pod>> {
        let mut pods = BTreeMap::new();
        let Ok(entries) = fs::read_dir(self.pods_dir()) else {
            return Ok(pods);
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "pod") {
                let text = fs::read_to_string(&path)?;
                let mut parts = text.split_whitespace();
                let (Some(node), Some(addr)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                pods.insert(
                    name.clone(),
                    Pod {
                        name,
                        node: node.into(),
                        addr: addr.parse()?,
                    },
                );
            }
        }
        Ok(pods)
    }

    pub fn pod_ns(&self, pod: &str) -> String {
        self.ns(&format!("pod-{pod}"))
    }

    /// Creates a pod on `node`: a namespace behind a veth, a server answering
    /// TCP and UDP with the pod's name and the client address it saw, and the Pod
    /// object with a Ready status (the lab plays kubelet).
    pub fn pod_add(&self, name: &str, node: &str, labels: &[(String, String)]) -> Result<Pod> {
        if name.is_empty()
            || name.len() > 12
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            bail!("pod names are 1-12 lowercase letters, digits or dashes");
        }
        if !self.is_up() {
            bail!("lab {} is not up", self.name);
        }
        let pods = self.pods()?;
        if pods.contains_key(name) {
            bail!("pod {name} exists");
        }
        let index = node_index(node)?;
        let used: Vec<Ipv4Addr> = pods.values().map(|p| p.addr).collect();
        let addr = (2..=254)
            .map(|host| Ipv4Addr::new(10, 244, index, host))
            .find(|a| !used.contains(a))
            .context("the node's pod CIDR is full")?;
        let gateway = pod_gateway(node)?;
        let (pod_ns, node_ns) = (self.pod_ns(name), self.ns(node));
        fs::create_dir_all(self.pods_dir())?;
        netns::add(&pod_ns)?;
        netns::wire_pod(&netns::PodLink {
            pod_ns: &pod_ns,
            node_ns: &node_ns,
            host_if: &format!("fp-{name}"),
            addrs: &[addr],
            gateway,
            full_checksums: true,
        })?;
        fs::write(
            self.pods_dir().join(format!("{name}.pod")),
            format!("{node} {addr}\n"),
        )?;

        let mut server = netns::exec(&pod_ns, std::env::current_exe()?);
        server.args(["lab", "--lab", &self.name, "pod-server", "--name", name]);
        spawn_detached(
            &mut server,
            &self.pods_dir().join(format!("{name}.log")),
            &self.pods_dir().join(format!("{name}.pid")),
        )?;
        self.register_pod(name, node, addr, labels)?;
        Ok(Pod {
            name: name.into(),
            node: node.into(),
            addr,
        })
    }

    /// The lab plays kubelet: the Pod object, then a Running and Ready status.
    fn register_pod(
        &self,
        name: &str,
        node: &str,
        addr: Ipv4Addr,
        labels: &[(String, String)],
    ) -> Result<()> {
        let mut all_labels = serde_json::Map::new();
        all_labels.insert("ferry-lab/pod".into(), name.into());
        for (k, v) in labels {
            all_labels.insert(k.clone(), v.as_str().into());
        }
        self.apply(&json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": all_labels},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 0,
                "containers": [{
                    "name": "server",
                    "image": "ferry-lab/pod-server",
                    "ports": [
                        {"name": "tcp", "containerPort": POD_TCP_PORT, "protocol": "TCP"},
                        {"name": "udp", "containerPort": POD_UDP_PORT, "protocol": "UDP"},
                    ],
                }],
            },
        }))?;
        let now = now();
        let addr = addr.to_string();
        self.patch_status(
            &format!("/api/v1/namespaces/default/pods/{name}/status"),
            &json!({"status": {
                "phase": "Running",
                "podIP": addr,
                "podIPs": [{"ip": addr}],
                "hostIP": node_addr(node)?.to_string(),
                "startTime": now,
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                ],
            }}),
        )
    }

    /// Starts a pod's graceful deletion and leaves it running, as a kubelet would
    /// during the grace period: the pod turns Terminating (its endpoint
    /// `serving`, not `ready`) until `pod del` removes it.
    pub fn pod_terminate(&self, name: &str) -> Result<()> {
        if !self.pods()?.contains_key(name) {
            bail!("no pod {name}");
        }
        self.kubectl(&["delete", "pod", name, "--grace-period=3600", "--wait=false"])
            .map(|_| ())
    }

    /// Deletes a pod: its object first (so its endpoint leaves the slices), then
    /// its server and namespace.
    pub fn pod_del(&self, name: &str) -> Result<()> {
        let pod = self
            .pods()?
            .remove(name)
            .with_context(|| format!("no pod {name}"))?;
        self.kubectl(&[
            "delete",
            "pod",
            name,
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
            "--wait=false",
        ])?;
        stop_pid_file(&self.pods_dir().join(format!("{name}.pid")));
        let _ = netns::delete(&self.pod_ns(name));
        let _ = netns::ip(&[
            "-n",
            &self.ns(&pod.node),
            "route",
            "del",
            &format!("{}/32", pod.addr),
        ]);
        let _ = fs::remove_file(self.pods_dir().join(format!("{name}.pod")));
        let _ = fs::remove_file(self.pods_dir().join(format!("{name}.log")));
        Ok(())
    }
}

/// The lab pods' server: answers every TCP connection and UDP datagram on the
/// pod ports with `<pod name> <client address:port>\n`.
pub fn pod_server(name: &str) -> Result<()> {
    let tcp = TcpListener::bind(("0.0.0.0", POD_TCP_PORT))?;
    let udp = UdpSocket::bind(("0.0.0.0", POD_UDP_PORT))?;
    let udp_name = name.to_string();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{udp_name} {peer}\n").as_bytes(), peer);
        }
    });
    for stream in tcp.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.to_string();
        thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let _ = stream.write_all(format!("{name} {peer}\n").as_bytes());
            // Keep the connection while the client keeps it, answering each line,
            // so a test can hold an established connection open.
            let mut buf = [0u8; 512];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0
                    || stream
                        .write_all(format!("{name} {peer}\n").as_bytes())
                        .is_err()
                {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// One TCP exchange from inside `ns`: connect, read the greeting line.
pub fn tcp_ask(ns: &str, target: SocketAddr, timeout: Duration) -> Result<String> {
    netns::in_netns(ns, move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&target, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    })?
}
