//! The lab's node agents: the DaemonSet of deploy/, installed with kustomize
//! as an operator installs it (the image and the API server's address set in
//! an overlay), run by the nodes' kubelets; stopped and started per node.
//!
//! The overlay adds only what several nodes on one machine need: each node's maps
//! in a directory of its own, generic XDP on the lab's veths, and a node
//! label that keeps the DaemonSet off a node (how `agent stop` stops one
//! agent without touching the other).

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{Lab, ALL_NODES, FABRIC_GATEWAY};

const NAMESPACE: &str = "kube-system";
const DAEMONSET: &str = "ferry";
const SELECTOR: &str = "app.kubernetes.io/name=ferry";
/// A node labelled `ferry-lab/agent=stopped` runs no agent.
const STOP_LABEL: &str = "ferry-lab/agent";
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The capabilities deploy/daemonset.yaml adds, with their numbers
/// (linux/capability.h). SYS_RESOURCE (memlock limits for maps, kernels
/// before 5.11) is one the sandboxes of these machines withhold from every
/// process; the lab's kernels account maps to memory cgroups instead.
const DEPLOY_CAPABILITIES: [(&str, u32); 4] = [
    ("BPF", 39),
    ("PERFMON", 38),
    ("NET_ADMIN", 12),
    ("SYS_RESOURCE", 24),
];

impl Lab {
    fn overlay_dir(&self) -> PathBuf {
        self.state_dir().join("deploy")
    }

    /// Installs the agents: `kubectl apply -k` of the lab's overlay over
    /// `deploy_dir`, then waits until every node's agent is Ready.
    pub(super) fn install_agents(&self, deploy_dir: &Path, nodes: &[&str]) -> Result<()> {
        let overlay = self.overlay_dir();
        fs::create_dir_all(&overlay)?;
        fs::write(
            overlay.join("kustomization.yaml"),
            serde_json::to_string_pretty(&self.overlay(deploy_dir)?)?,
        )?;
        fs::write(
            overlay.join("lab-node.yaml"),
            serde_json::to_string_pretty(&self.daemonset_patch()?)?,
        )?;
        self.kubectl(&["apply", "-k", &overlay.to_string_lossy()])?;
        for node in nodes {
            self.wait_agent_ready(node)?;
        }
        Ok(())
    }

    /// The lab's kustomization: deploy/ with the lab's image and API address.
    fn overlay(&self, deploy_dir: &Path) -> Result<Value> {
        Ok(json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            // kubectl 1.20's kustomize takes only a relative path here.
            "bases": [relative(&self.overlay_dir(), &deploy_dir.canonicalize()?).to_string_lossy()],
            // deploy/ names the image `cargo xtask image` builds and the lab
            // loads into each node's containerd: no `images:` needed.
            "patchesStrategicMerge": ["lab-node.yaml"],
            "configMapGenerator": [{
                "name": "ferry-config",
                "namespace": NAMESPACE,
                "behavior": "merge",
                "literals": [
                    format!("k8sServiceHost={FABRIC_GATEWAY}"),
                    "k8sServicePort=6443".to_string(),
                    // New connections to unallocated ClusterIPs are refused.
                    format!("serviceCIDR={},{}", super::SERVICE_CIDR, super::SERVICE_CIDR6),
                ],
            }],
        }))
    }

    /// What the lab changes in the DaemonSet (a strategic merge patch).
    fn daemonset_patch(&self) -> Result<Value> {
        // deploy/'s capabilities, less those this machine cannot give any
        // process (runc fails to start a container asking for one).
        let capabilities: Vec<&str> = DEPLOY_CAPABILITIES
            .iter()
            .copied()
            .filter(|(_, bit)| machine_has_capability(*bit))
            .map(|(name, _)| name)
            .collect();
        // The node's cgroup, as `cgroup_v2` names it with NODE_NAME in place.
        let cgroup_root = self
            .cgroup_v2("$(NODE_NAME)")?
            .to_string_lossy()
            .into_owned();
        Ok(json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": DAEMONSET, "namespace": NAMESPACE},
            "spec": {"template": {"spec": {
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": STOP_LABEL, "operator": "NotIn", "values": ["stopped"]},
                    ]}],
                }}},
                "containers": [{
                    "name": "agent",
                    // The image is loaded into each node's containerd.
                    "imagePullPolicy": "Never",
                    "securityContext": {"capabilities": {"add": capabilities}},
                    "env": [
                        // Repeated first: `$(NODE_NAME)` below expands only
                        // from a variable listed before it, and the merge puts
                        // the patch's variables ahead of deploy/'s.
                        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        // The nodes share the machine's bpffs.
                        {"name": "FERRY_PIN_DIR", "value": format!("/sys/fs/bpf/{}/$(NODE_NAME)", self.name)},
                        // Native XDP on a veth sends XDP_TX frames to its peer,
                        // where (on a bridge port without an XDP program of its
                        // own) they get lost; generic XDP runs the same program.
                        {"name": "FERRY_UPLINK_MODE", "value": "generic"},
                        // The nodes share the machine's cgroup tree: each
                        // agent's socket hooks serve its own node's processes.
                        {"name": "FERRY_CGROUP_ROOT", "value": cgroup_root},
                    ],
                }],
            }}},
        }))
    }

    /// Starts the agent of `node` (after `stop_agent`) and waits until it is
    /// Ready. `extra` are agent flags: they go into the DaemonSet's arguments,
    /// so every node's agent restarts with them.
    pub fn start_agent(&self, node: &str, extra: &[String]) -> Result<()> {
        if !extra.is_empty() {
            self.patch_agent_args(extra)?;
        }
        self.kubectl(&["label", "node", node, &format!("{STOP_LABEL}-")])?;
        self.wait_agent_ready(node)
    }

    /// Gives every node's agent the flags `extra` (none: the defaults) through
    /// the DaemonSet, as an operator would, and waits until each node runs a
    /// Ready agent of the new template (a rolling update, node by node).
    pub fn set_agent_args(&self, extra: &[String]) -> Result<()> {
        self.patch_agent_args(extra)?;
        for node in ALL_NODES {
            self.wait_agent_ready(node)?;
        }
        Ok(())
    }

    /// Sets the agent container's memory limit (a Kubernetes quantity, e.g.
    /// `2Gi`) in the DaemonSet, as an operator sizing it for a large cluster
    /// would: the agents restart with it (`set_agent_args` waits for them).
    pub fn set_agent_memory_limit(&self, limit: &str) -> Result<()> {
        self.replace_in_agent_container("resources/limits/memory", json!(limit))
    }

    fn patch_agent_args(&self, extra: &[String]) -> Result<()> {
        let mut args = vec!["run".to_string()];
        args.extend_from_slice(extra);
        self.replace_in_agent_container("args", json!(args))
    }

    /// Replaces `field` (a JSON pointer below the agent's container) in the
    /// DaemonSet's pod template.
    fn replace_in_agent_container(&self, field: &str, value: serde_json::Value) -> Result<()> {
        let patch = json!([{
            "op": "replace",
            "path": format!("/spec/template/spec/containers/0/{field}"),
            "value": value,
        }]);
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "patch",
            "daemonset",
            DAEMONSET,
            "--type=json",
            "-p",
            &patch.to_string(),
        ])?;
        Ok(())
    }

    /// Stops the agent of `node` (its programs and maps stay) and waits until
    /// its pod is gone.
    pub fn stop_agent(&self, node: &str) -> Result<()> {
        self.kubectl(&[
            "label",
            "node",
            node,
            &format!("{STOP_LABEL}=stopped"),
            "--overwrite",
        ])?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.agent_pods(node)?.is_empty() {
            if Instant::now() > deadline {
                bail!("the agent pod of {node} is still there");
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// The agent pods on `node`, as the API has them.
    fn agent_pods(&self, node: &str) -> Result<Vec<Value>> {
        let out = self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            SELECTOR,
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "json",
        ])?;
        let list: Value = serde_json::from_str(&out)?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// The agent pod of `node` that runs the DaemonSet's current template and
    /// is Ready, if there is one.
    pub fn agent_pod(&self, node: &str) -> Result<Option<String>> {
        let generation = self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "daemonset",
            DAEMONSET,
            "-o",
            "jsonpath={.metadata.generation}",
        ])?;
        Ok(self.agent_pods(node)?.into_iter().find_map(|pod| {
            let current = pod["metadata"]["labels"]["pod-template-generation"].as_str()
                == Some(generation.trim());
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
            (current && ready && !deleting)
                .then(|| pod["metadata"]["name"].as_str().map(String::from))?
        }))
    }

    fn wait_agent_ready(&self, node: &str) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.agent_pod(node)?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent of {node} did not get Ready in {} s:\n{}",
                    READY_TIMEOUT.as_secs(),
                    serde_json::to_string_pretty(&self.agent_pods(node)?)?
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The process id of the agent of `node` (its container's first process),
    /// while it runs.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        let pod = self.agent_pod(node).ok()??;
        let filter = format!(
            "labels.\"io.kubernetes.pod.name\"=={pod},labels.\"io.kubernetes.container.name\"==agent"
        );
        let ids = self
            .ctr(node, &["containers", "list", "--quiet", &filter])
            .ok()?;
        let tasks = self.ctr(node, &["tasks", "list"]).ok()?;
        ids.lines().find_map(|id| {
            tasks.lines().find_map(|line| {
                let mut f = line.split_whitespace();
                (f.next() == Some(id) && line.contains("RUNNING"))
                    .then(|| f.next()?.parse().ok())?
            })
        })
    }

    /// The log of the running agent of `node` (the kubelet's file of its
    /// container, one line per line the agent wrote, after the runtime's
    /// timestamp and stream).
    pub fn agent_log(&self, node: &str) -> Result<PathBuf> {
        let pod = self
            .agent_pod(node)?
            .with_context(|| format!("no running agent on {node}"))?;
        let pods = self.node_dir(node).join("log/pods");
        let dir = fs::read_dir(&pods)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy()
                        .starts_with(&format!("{NAMESPACE}_{pod}_"))
                })
            })
            .with_context(|| format!("no log directory of {pod} in {}", pods.display()))?
            .join("agent");
        fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
            .with_context(|| format!("no log in {}", dir.display()))
    }
}

/// Whether this machine's bounding set holds capability `bit` (runc can give
/// a container only what it holds).
fn machine_has_capability(bit: u32) -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|set| set & (1 << bit) != 0)
}

/// `to` as a path relative to the directory `from` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to[common..] {
        path.push(part);
    }
    path
}

/// The body of `GET path` from an agent's health server at `addr`
/// (/metrics, /statusz, /healthz), from the calling thread's namespace.
pub fn agent_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to the agent at {addr}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// The value of the unlabelled metric `name` in a /metrics text.
pub fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The sum of every sample of `name` (labelled or not) in a /metrics text.
pub fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative(
                Path::new("/run/ferry-lab/x/deploy"),
                Path::new("/work/main/deploy")
            ),
            PathBuf::from("../../../../work/main/deploy")
        );
        assert_eq!(
            relative(Path::new("/a/b"), Path::new("/a/b/c")),
            PathBuf::from("c")
        );
    }
}
