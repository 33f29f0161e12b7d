//! A lab node's own kubelet: Debian's containerd, runc and CNI plugins and the
//! kubelet that setup builds, all inside the node's network namespace and a
//! mount namespace of the node's own.
//!
//! The nodes share one machine, so each node's processes get a mount namespace
//! (held open by a `sleep` process, the node's "holder") in which the paths a
//! kubelet or containerd cannot be told to move are bind mounts of the node's
//! own directories: `/var/log` (pod logs), `/var/lib/cni` (CNI results).
//! Everything else (containerd's root and state, the kubelet's root, the pods'
//! network namespaces, cgroups under `/<lab>/<node>`) is configured into the
//! node's state directory, so `lab down` removes it all.
//!
//! The kubelet sets a few kernel sysctls of the whole machine at start
//! (`vm.overcommit_memory=1`, `kernel.panic=10`, `kernel.panic_on_oops=1`; see
//! `setupKernelTunables` in its container manager). The lab must not change the
//! machine, so the node's mount namespace shows the kubelet files with the
//! values it wants over those `/proc/sys` entries that differ, and the kubelet
//! runs with `protectKernelDefaults`: it checks them and never writes. Containers
//! get their own `/proc` and see the machine's real values.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{node_addr, node_index, pod_cidrs, pod_gateway, Lab};
use crate::{
    image, kube,
    sys::{join_cgroup_on_exec, live_pid, output, quiet, spawn_detached, stop_pid_file},
};

/// The sysctls the kubelet wants (its `setupKernelTunables`), as /proc/sys paths.
const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];
/// Where Debian's containernetworking-plugins are.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const READY_TIMEOUT: Duration = Duration::from_secs(120);

impl Lab {
    pub(super) fn node_dir(&self, node: &str) -> PathBuf {
        self.state_dir().join("nodes").join(node)
    }

    fn holder_pid_file(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("holder.pid")
    }

    /// The socket of the node's containerd.
    pub fn containerd_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("containerd/containerd.sock")
    }

    /// The node's cgroup parent in every hierarchy: `/<lab>/<node>`.
    fn cgroup_root(&self, node: &str) -> String {
        format!("/{}/{node}", self.name)
    }

    /// The node's cgroup in the v2 hierarchy, which the node's agent
    /// attaches its socket hooks to: every process of the node is under it
    /// (its kubelet and containerd in `host/`, its pods where runc puts them).
    pub fn cgroup_v2(&self, node: &str) -> Result<PathBuf> {
        Ok(proxy_common::cgroup::v2_mount()?.join(self.cgroup_root(node).trim_start_matches('/')))
    }

    /// Where the node's own processes (not its pods') live in the v2 hierarchy.
    pub fn host_cgroup(&self, node: &str) -> Result<PathBuf> {
        Ok(self.cgroup_v2(node)?.join("host"))
    }

    /// A command run inside the node: its network and mount namespaces, and
    /// its host cgroup (so the node's socket hooks see it).
    pub(super) fn in_node(
        &self,
        node: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let holder = live_pid(&self.holder_pid_file(node))
            .with_context(|| format!("node {node} is not running"))?;
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &holder.to_string(), "-m", "-n", "--"])
            .arg(program);
        join_cgroup_on_exec(&mut cmd, &self.host_cgroup(node)?)?;
        Ok(cmd)
    }

    /// `ctr` against the node's containerd, in the kubelet's namespace.
    pub(super) fn ctr(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.containerd_socket(node))
            .args(["--namespace", image::KUBERNETES_NAMESPACE])
            .args(args);
        output(&mut cmd)
    }

    /// Starts the node: its namespaces' holder, containerd with `images`
    /// imported, and the kubelet, which registers (or adopts) the Node.
    pub(super) fn start_node(
        &self,
        bins: &kube::Binaries,
        node: &str,
        images: &[PathBuf],
    ) -> Result<()> {
        let dir = self.node_dir(node);
        for sub in [
            "containerd",
            "kubelet",
            "cni/conf",
            "cni/lib",
            "netns",
            "log",
            "sysctl",
        ] {
            fs::create_dir_all(dir.join(sub))?;
        }
        // First: every process started in the node joins its host cgroup.
        self.make_cgroups(node)?;
        self.start_holder(node)?;
        self.start_containerd(node)?;
        for archive in images {
            image::load(
                &self.containerd_socket(node),
                image::KUBERNETES_NAMESPACE,
                archive,
            )?;
        }
        self.write_cni_config(node)?;
        self.start_kubelet(bins, node)
    }

    /// The node's holder: `sleep` in the node's network namespace and a new
    /// mount namespace (slave to the machine's, so bpffs and cgroup mounts show
    /// through), with the node's bind mounts made in it.
    fn start_holder(&self, node: &str) -> Result<()> {
        let dir = self.node_dir(node);
        let mut holder = ferry_netns::enter(&self.node_ns(node), "unshare");
        holder.args([
            "--mount",
            "--propagation",
            "slave",
            "--",
            "sleep",
            "infinity",
        ]);
        spawn_detached(
            &mut holder,
            &dir.join("holder.log"),
            &self.holder_pid_file(node),
        )?;
        // The holder execs through nsenter and unshare into sleep: wait until
        // it sits in its own mount namespace before entering it.
        let pid = live_pid(&self.holder_pid_file(node)).context("the node's holder died")?;
        let own = fs::read_link("/proc/self/ns/mnt")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_link(format!("/proc/{pid}/ns/mnt"))? == own
            || fs::read_to_string(format!("/proc/{pid}/comm"))?.trim() != "sleep"
        {
            if Instant::now() > deadline {
                bail!("node {node}: its holder did not enter a mount namespace of its own");
            }
            thread::sleep(Duration::from_millis(10));
        }

        let mut mounts: Vec<(PathBuf, PathBuf)> = vec![
            (dir.join("log"), "/var/log".into()),
            (dir.join("cni/lib"), "/var/lib/cni".into()),
        ];
        for (path, wanted) in KUBELET_SYSCTLS {
            let real = PathBuf::from("/proc/sys").join(path);
            if fs::read_to_string(&real)?.trim() != wanted {
                let view = dir.join("sysctl").join(path.replace('/', "."));
                fs::write(&view, format!("{wanted}\n"))?;
                mounts.push((view, real));
            }
        }
        for (from, to) in mounts {
            // A mount point must exist: /var/lib/cni may not on the machine, so
            // it is made in the node's view only (a tmpfs over its parent would
            // hide the rest of /var/lib), and only if missing.
            let mut cmd = self.in_node(node, "sh")?;
            cmd.args([
                "-c",
                "[ -e \"$2\" ] || mkdir -p \"$2\" && mount --bind \"$1\" \"$2\"",
                "sh",
            ])
            .arg(&from)
            .arg(&to);
            quiet(&mut cmd).with_context(|| format!("node {node}: mounting {}", to.display()))?;
        }
        // The agent's pod mounts bpffs with HostToContainer propagation, which
        // containerd accepts only from a shared or slave mount. On a machine
        // whose mounts are private (this one's are; systemd's are shared),
        // the node's copy becomes shared, in the node's namespace only: the
        // same bpffs, so pins stay where the machine sees them.
        let mut cmd = self.in_node(node, "mount")?;
        cmd.args(["--make-shared", "/sys/fs/bpf"]);
        quiet(&mut cmd).with_context(|| format!("node {node}: sharing /sys/fs/bpf"))?;
        Ok(())
    }

    /// `/<lab>/<node>` in every cgroup v1 hierarchy (or once in a v2 tree): the
    /// kubelet's `cgroupRoot`, which must exist before it starts; and the
    /// node's host cgroup in the v2 tree.
    pub(super) fn make_cgroups(&self, node: &str) -> Result<()> {
        for hierarchy in cgroup_hierarchies()? {
            let path = hierarchy.join(self.cgroup_root(node).trim_start_matches('/'));
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let host = self.host_cgroup(node)?;
        fs::create_dir_all(&host).with_context(|| format!("creating {}", host.display()))?;
        Ok(())
    }

    fn start_containerd(&self, node: &str) -> Result<()> {
        let dir = self.node_dir(node).canonicalize()?;
        let config = dir.join("containerd/config.toml");
        fs::write(&config, containerd_config(&dir))?;
        let mut containerd = self.in_node(node, "containerd")?;
        containerd.arg("--config").arg(&config);
        spawn_detached(
            &mut containerd,
            &dir.join("containerd.log"),
            &dir.join("containerd.pid"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctr(node, &["version"]).is_err() {
            if live_pid(&dir.join("containerd.pid")).is_none() || Instant::now() > deadline {
                bail!(
                    "node {node}: containerd did not start; its log:\n{}",
                    fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Debian's `ptp` plugin: a veth per pod with the host side in the node's
    /// namespace (as the lab's pods always had) and a route to each pod;
    /// `host-local` hands out an address of each of the node's pod CIDRs.
    fn write_cni_config(&self, node: &str) -> Result<()> {
        let [cidr, cidr6] = pod_cidrs(node)?;
        let conf = json!({
            "cniVersion": "0.4.0",
            "name": "ferry-lab",
            "plugins": [{
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [
                        [{"subnet": cidr, "gateway": pod_gateway(node)?.to_string()}],
                        [{"subnet": cidr6}],
                    ],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                },
            }],
        });
        fs::write(
            self.node_dir(node).join("cni/conf/10-ferry-lab.conflist"),
            serde_json::to_string_pretty(&conf)?,
        )?;
        Ok(())
    }

    fn start_kubelet(&self, bins: &kube::Binaries, node: &str) -> Result<()> {
        let dir = self.node_dir(node).canonicalize()?;
        let root = dir.join("kubelet");
        let config = dir.join("kubelet-config.json");
        fs::write(
            &config,
            serde_json::to_string_pretty(&kubelet_config(
                node_addr(node)?,
                &self.cgroup_root(node),
                &root,
            ))?,
        )?;
        let kubeconfig = self
            .control_plane_dir()
            .join(format!("kubelet-{node}.kubeconfig"));
        let mut kubelet = self.in_node(node, &bins.kubelet)?;
        kubelet
            .arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", root.display()))
            .arg(format!("--cert-dir={}", root.join("pki").display()))
            .args([
                "--container-runtime=remote",
                &format!(
                    "--container-runtime-endpoint=unix://{}",
                    self.containerd_socket(node).display()
                ),
                &format!("--hostname-override={node}"),
                // Both families: the Node's IPv6 InternalIP is where Ferry
                // serves IPv6 NodePorts and what IPv6 SNAT leaves with.
                &format!(
                    "--node-ip={},{}",
                    node_addr(node)?,
                    super::node_addr6(node)?
                ),
                // A label NodeRestriction lets a kubelet set on its own Node.
                &format!(
                    "--node-labels=topology.kubernetes.io/zone=zone-{}",
                    node_index(node)?
                ),
                "--v=1",
            ]);
        if node == super::CONTROL_PLANE {
            // As kubeadm taints a control-plane node: only what tolerates it
            // (the agent's DaemonSet) runs there.
            kubelet.arg("--register-with-taints=node-role.kubernetes.io/control-plane=:NoSchedule");
        }
        spawn_detached(
            &mut kubelet,
            &dir.join("kubelet.log"),
            &dir.join("kubelet.pid"),
        )?;
        Ok(())
    }

    /// Imports an image archive into every node's containerd.
    pub fn load_image(&self, archive: &Path) -> Result<()> {
        for node in super::ALL_NODES {
            image::load(
                &self.containerd_socket(node),
                image::KUBERNETES_NAMESPACE,
                archive,
            )?;
        }
        Ok(())
    }

    /// Waits until every node's kubelet reports its Node Ready.
    pub(super) fn wait_nodes_ready(&self, nodes: &[&str]) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for node in nodes {
            loop {
                let ready = self
                    .kubectl(&[
                        "get",
                        "node",
                        node,
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                    ])
                    .unwrap_or_default();
                if ready.trim() == "True" {
                    break;
                }
                let pid_file = self.node_dir(node).join("kubelet.pid");
                if live_pid(&pid_file).is_none() || Instant::now() > deadline {
                    bail!(
                        "node {node}: the kubelet did not report Ready; its log ends:\n{}",
                        log_tail(&self.node_dir(node).join("kubelet.log"), 30)
                    );
                }
                thread::sleep(Duration::from_millis(250));
            }
        }
        Ok(())
    }

    /// Stops the node: the kubelet, every pod's containers, containerd and its
    /// shims, the holder (its mounts go with its mount namespace), then the
    /// node's cgroups. Safe on a node that is half up or gone.
    pub(super) fn stop_node(&self, node: &str) {
        let dir = self.node_dir(node);
        stop_pid_file(&dir.join("kubelet.pid"));
        if live_pid(&dir.join("containerd.pid")).is_some() {
            if let Err(err) = self.remove_containers(node) {
                eprintln!("lab: node {node}: removing containers: {err:#}");
            }
        }
        stop_pid_file(&dir.join("containerd.pid"));
        // Shims outlive containerd by design; theirs name the node's socket.
        kill_matching(&self.containerd_socket(node).to_string_lossy());
        stop_pid_file(&self.holder_pid_file(node));
        if let Ok(hierarchies) = cgroup_hierarchies() {
            for hierarchy in hierarchies {
                remove_cgroup_tree(&hierarchy.join(self.cgroup_root(node).trim_start_matches('/')));
                let _ = fs::remove_dir(hierarchy.join(&self.name));
            }
        }
    }

    /// Kills and deletes every container of the node's containerd, sandboxes
    /// last, so that their network namespaces (and CNI veths) go too.
    fn remove_containers(&self, node: &str) -> Result<()> {
        for task in self.ctr(node, &["tasks", "list", "--quiet"])?.lines() {
            let _ = self.ctr(node, &["tasks", "kill", "--signal", "SIGKILL", task]);
        }
        thread::sleep(Duration::from_millis(200));
        for task in self.ctr(node, &["tasks", "list", "--quiet"])?.lines() {
            let _ = self.ctr(node, &["tasks", "delete", "--force", task]);
        }
        for container in self.ctr(node, &["containers", "list", "--quiet"])?.lines() {
            let _ = self.ctr(node, &["containers", "delete", container]);
        }
        Ok(())
    }
}

/// containerd for one node: its own root, state and socket, the CRI plugin with
/// the lab's sandbox image and CNI files, runc with cgroupfs (the kubelet's
/// driver), and nothing that listens outside the node.
fn containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{d}/containerd/containerd.sock"

[ttrpc]
  address = "{d}/containerd/containerd.sock.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  netns_mounts_under = "{d}/netns"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # This machine gives no process CAP_SYS_RESOURCE (its sandbox drops it), so
  # no process may lower its OOM score below containerd's; the kubelet asks
  # -998 for sandboxes and -997 for critical pods. Clamped to containerd's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni/conf"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"#,
        sandbox = image::pause_image(),
    )
}

/// The kubelet's configuration: cgroupfs under the node's own cgroup root,
/// kernel defaults checked and never written, no swap check (the machine's
/// business), no iptables chains of its own, the API server's calls to it
/// (logs, exec) accepted on the node's address only.
fn kubelet_config(addr: Ipv4Addr, cgroup_root: &str, root: &Path) -> serde_json::Value {
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": addr.to_string(),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 0,
        "authentication": {
            "anonymous": {"enabled": true},
            "webhook": {"enabled": false},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "cgroupsPerQOS": true,
        "enforceNodeAllocatable": ["pods"],
        "protectKernelDefaults": true,
        "failSwapOn": false,
        "makeIPTablesUtilChains": false,
        "resolvConf": "",
        "volumePluginDir": root.join("volume-plugins").to_string_lossy(),
        // The machine's disk is shared with everything else on it: no eviction
        // of the lab's pods for what others use.
        "evictionHard": {"memory.available": "0%", "nodefs.available": "0%", "imagefs.available": "0%"},
        "imageGCHighThresholdPercent": 100,
        "serializeImagePulls": false,
        "nodeStatusUpdateFrequency": "2s",
        "syncFrequency": "5s",
        // Both pod addresses in the Pod's status (podIPs): alpha in 1.20.
        "featureGates": {"IPv6DualStack": true},
    })
}

/// The mounted cgroup hierarchies: every v1 controller directory, or the v2 root.
fn cgroup_hierarchies() -> Result<Vec<PathBuf>> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    let hierarchies: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(path))
        })
        .collect();
    if hierarchies.is_empty() {
        bail!("no cgroup hierarchy is mounted");
    }
    Ok(hierarchies)
}

/// Removes a cgroup and every cgroup under it, deepest first (a cgroup
/// directory goes with `rmdir` once it has no children and no tasks).
fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(path);
}

/// SIGKILL to every process whose command line contains `needle`.
fn kill_matching(needle: &str) {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            // SAFETY: a signal to a process of the lab's own node.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
