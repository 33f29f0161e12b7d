//! The lab's pods: real Pods that the node's kubelet runs from the lab's pod
//! image (a server answering TCP and UDP with the pod's name and the client it
//! saw), with their network namespaces named as the lab names its own; and a
//! client for their answers.

use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ferry_netns as netns;
use serde_json::json;

use super::{node_index, Lab, POD_TCP_PORT, POD_UDP_PORT};
use crate::image;

/// How long a new pod may take to run and pass its readiness probe.
const POD_READY_TIMEOUT: Duration = Duration::from_secs(60);

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

    /// Creates a pod on `node` and waits until its kubelet reports it Ready.
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
        node_index(node)?;
        self.create_pod(name, node, labels)?;
        let addr = self.wait_pod_ready(name)?;
        fs::create_dir_all(self.pods_dir())?;
        fs::write(
            self.pods_dir().join(format!("{name}.pod")),
            format!("{node} {addr}\n"),
        )?;
        // The pod's network namespace under the lab's name for it, so that
        // tests and `lab exec` enter it as any other lab namespace.
        let sandbox = self.sandbox_pid(node, name)?;
        netns::attach(&self.pod_ns(name), sandbox)?;
        Ok(Pod {
            name: name.into(),
            node: node.into(),
            addr,
        })
    }

    /// The Pod object: the lab's pod image on `node` (there is no scheduler
    /// for plain pods here), Ready once it accepts TCP on its port.
    fn create_pod(&self, name: &str, node: &str, labels: &[(String, String)]) -> Result<()> {
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
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "containers": [{
                    "name": "server",
                    "image": image::lab_pod_image(),
                    "imagePullPolicy": "Never",
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "ports": [
                        {"name": "tcp", "containerPort": POD_TCP_PORT, "protocol": "TCP"},
                        {"name": "udp", "containerPort": POD_UDP_PORT, "protocol": "UDP"},
                    ],
                    "readinessProbe": {
                        "tcpSocket": {"port": POD_TCP_PORT},
                        "periodSeconds": 1,
                    },
                }],
            },
        }))
    }

    /// Waits until the kubelet reports the pod Ready and returns its address.
    fn wait_pod_ready(&self, name: &str) -> Result<Ipv4Addr> {
        let deadline = Instant::now() + POD_READY_TIMEOUT;
        loop {
            let out = self
                .kubectl(&[
                    "get",
                    "pod",
                    name,
                    "-o",
                    "jsonpath={.status.podIP} {.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .unwrap_or_default();
            let mut fields = out.split_whitespace();
            if let (Some(addr), Some("True")) = (fields.next(), fields.next()) {
                return Ok(addr.parse()?);
            }
            if Instant::now() > deadline {
                bail!(
                    "pod {name} not Ready after {} s: {}",
                    POD_READY_TIMEOUT.as_secs(),
                    self.kubectl(&["get", "pod", name, "-o", "jsonpath={.status}"])
                        .unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process id of the pod's sandbox (whose network namespace its
    /// containers share), from the node's containerd.
    fn sandbox_pid(&self, node: &str, pod: &str) -> Result<i32> {
        let filter = format!(
            "labels.\"io.kubernetes.pod.name\"=={pod},labels.\"io.kubernetes.pod.namespace\"==default,labels.\"io.cri-containerd.kind\"==sandbox"
        );
        let ids = self.ctr(node, &["containers", "list", "--quiet", &filter])?;
        let id = ids
            .lines()
            .next()
            .with_context(|| format!("no sandbox of pod {pod} in {node}'s containerd"))?;
        let tasks = self.ctr(node, &["tasks", "list"])?;
        tasks
            .lines()
            .find_map(|line| {
                let mut f = line.split_whitespace();
                (f.next() == Some(id)).then(|| f.next()?.parse().ok())?
            })
            .with_context(|| format!("the sandbox of pod {pod} runs no task"))
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

    /// Kills the processes of a pod's containers with SIGKILL, as a crash
    /// would; the kubelet then restarts them.
    pub fn pod_kill(&self, name: &str, node: &str) -> Result<()> {
        // Its containers, not the sandbox (whose loss would give the pod a
        // new sandbox and address).
        let filter = format!(
            "labels.\"io.kubernetes.pod.name\"=={name},labels.\"io.cri-containerd.kind\"==container"
        );
        let ids = self.ctr(node, &["containers", "list", "--quiet", &filter])?;
        for id in ids.lines().filter(|l| !l.trim().is_empty()) {
            // A task already gone is fine.
            let _ = self.ctr(node, &["tasks", "kill", "--signal", "SIGKILL", id.trim()]);
        }
        Ok(())
    }

    /// Deletes a pod at once (grace period 0): the kubelet stops its
    /// containers and CNI removes its veth.
    pub fn pod_del(&self, name: &str) -> Result<()> {
        if !self.pods()?.contains_key(name) {
            bail!("no pod {name}");
        }
        self.kubectl(&[
            "delete",
            "pod",
            name,
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
            "--wait=false",
        ])?;
        // Only the lab's name for the namespace: the kubelet removes the pod
        // and CNI its veth and route.
        let _ = netns::delete(&self.pod_ns(name));
        let _ = fs::remove_file(self.pods_dir().join(format!("{name}.pod")));
        Ok(())
    }
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
