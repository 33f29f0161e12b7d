//! The lab: a two-node cluster network on one machine, in network namespaces
//! named `<lab>-*` (default `ferry-*`), with a real API server and a Ferry agent
//! per node. Nothing outside those namespaces changes, except pinned maps under
//! `/sys/fs/bpf/<lab>/` and state under `/run/ferry-lab/<lab>/`, both removed by
//! `lab down`.
//!
//! ```text
//!              <lab>-fabric: bridge br0 10.250.0.1/24, etcd, kube-apiserver :6443,
//!                            kube-controller-manager (EndpointSlices)
//!        ┌───────────────┬────────┴───────┬──────────────────┐
//!  <lab>-node1 .11   <lab>-node2 .12   <lab>-ext .100 (external client)
//!  pods 10.244.1.0/24  pods 10.244.2.0/24
//!  agent on fp-* veths agent on fp-* veths
//! ```

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::kube;

/// Nodes of the lab, by name.
pub const NODES: [&str; 2] = ["node1", "node2"];
const FABRIC_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const EXTERNAL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 100);
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Where the lab's LoadBalancer IPs and externalIPs come from: routed to node1.
pub const VIRTUAL_IPS: &str = "192.0.2.0/24";
/// Interface names of pods' host-side veths (what the agents attach to).
pub const POD_IFACE_PATTERN: &str = "fp-*";
/// The capabilities deploy/daemonset.yaml gives the agent, as a setpriv bounding set.
const AGENT_CAPABILITIES: &str = "-all,+bpf,+perfmon,+net_admin,+sys_resource";
/// Ports every lab pod serves, TCP and UDP alike.
pub const POD_TCP_PORT: u16 = 8080;
pub const POD_UDP_PORT: u16 = 5353;

/// Index (1-based) of a node.
fn node_index(node: &str) -> Result<u8> {
    NODES
        .iter()
        .position(|n| *n == node)
        .map(|i| i as u8 + 1)
        .with_context(|| format!("no node {node}: the lab has {}", NODES.join(", ")))
}

/// A node's address on the fabric.
pub fn node_addr(node: &str) -> Result<Ipv4Addr> {
    Ok(Ipv4Addr::new(10, 250, 0, 10 + node_index(node)?))
}

fn pod_gateway(node: &str) -> Result<Ipv4Addr> {
    Ok(Ipv4Addr::new(10, 244, node_index(node)?, 1))
}

/// Runs a command quietly and returns its stdout; fails with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    output(Command::new("ip").args(args)).map(|_| ())
}

fn ethtool(ns: &str, args: &[&str]) -> Result<()> {
    output(
        Command::new("ip")
            .args(["netns", "exec", ns, "ethtool"])
            .args(args),
    )
    .map(|_| ())
}

/// Makes a veth send what a real wire carries: complete checksums. Otherwise
/// the sender's kernel leaves them to "hardware" (CHECKSUM_PARTIAL), which
/// veth passes on as is, and an XDP program on the far side, which cannot see
/// that state, would update a partial checksum as if it were complete.
fn like_a_wire(ns: &str, dev: &str) -> Result<()> {
    ethtool(ns, &["-K", dev, "tx", "off"])
}

/// Connects pod namespace `pod_ns` to `node_ns` as a node connects a pod: a
/// veth (`eth0` in the pod, `host_if` on the node) carrying the pod's
/// `addrs` as /32s, the node's side answering as `gateway`, routes both ways.
pub fn wire_pod(
    pod_ns: &str,
    node_ns: &str,
    host_if: &str,
    addrs: &[Ipv4Addr],
    gateway: Ipv4Addr,
) -> Result<()> {
    ip(&[
        "link", "add", "eth0", "netns", pod_ns, "type", "veth", "peer", "name", host_if, "netns",
        node_ns,
    ])?;
    for addr in addrs {
        ip(&[
            "-n",
            pod_ns,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "eth0",
        ])?;
    }
    ip(&["-n", pod_ns, "link", "set", "eth0", "up"])?;
    like_a_wire(pod_ns, "eth0")?;
    let gw = gateway.to_string();
    ip(&[
        "-n", pod_ns, "route", "add", &gw, "dev", "eth0", "scope", "link",
    ])?;
    ip(&[
        "-n", pod_ns, "route", "add", "default", "via", &gw, "dev", "eth0",
    ])?;
    ip(&[
        "-n",
        node_ns,
        "addr",
        "add",
        &format!("{gw}/32"),
        "dev",
        host_if,
    ])?;
    ip(&["-n", node_ns, "link", "set", host_if, "up"])?;
    for addr in addrs {
        ip(&[
            "-n",
            node_ns,
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            host_if,
        ])?;
    }
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns` (sockets made there stay there).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = fs::File::open(&path).with_context(|| format!("no namespace {ns}"))?;
    thread::spawn(move || {
        // SAFETY: setns on this thread only.
        let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))
}

/// Starts a long-lived process detached from this one (own session, output to
/// `log`), records its pid in `pid_file`.
fn spawn_detached(cmd: &mut Command, log: &Path, pid_file: &Path) -> Result<u32> {
    let log_file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    fs::write(pid_file, child.id().to_string())?;
    Ok(child.id())
}

/// Stops the process whose pid `pid_file` holds (SIGTERM, then SIGKILL after
/// 5 s) and removes the file. A missing file or a dead process is fine.
fn stop_pid_file(pid_file: &Path) {
    let Ok(text) = fs::read_to_string(pid_file) else {
        return;
    };
    if let Ok(pid) = text.trim().parse::<i32>() {
        // SAFETY: signals to a pid we started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && unsafe { libc::kill(pid, 0) } == 0 {
            // Reap it if it is our child; otherwise just wait for it to go.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            thread::sleep(Duration::from_millis(20));
        }
        if unsafe { libc::kill(pid, 0) } == 0 {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = fs::remove_file(pid_file);
}

fn alive(pid_file: &Path) -> bool {
    fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0)
}

/// A pod the lab made.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub addr: Ipv4Addr,
}

/// One lab, by name: the prefix of all it creates.
pub struct Lab {
    pub name: String,
}

impl Lab {
    pub fn new(name: &str) -> Result<Self> {
        if !name.starts_with("ferry")
            || name.len() > 20
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("a lab name starts with `ferry` and has at most 20 letters, digits or dashes");
        }
        Ok(Self {
            name: name.to_string(),
        })
    }

    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.name)
    }

    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from("/run/ferry-lab").join(&self.name)
    }

    fn control_plane_dir(&self) -> PathBuf {
        self.state_dir().join("control-plane")
    }

    pub fn pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.name).join(node)
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.control_plane_dir().join("admin.kubeconfig")
    }

    fn agent_kubeconfig(&self) -> PathBuf {
        self.control_plane_dir().join("agent.kubeconfig")
    }

    fn kubectl_path(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(
            fs::read_to_string(self.state_dir().join("kubectl"))?.trim(),
        ))
    }

    fn is_up(&self) -> bool {
        Path::new(&format!("/run/netns/{}", self.ns("fabric"))).exists()
    }

    /// Builds the network, starts the control plane, registers the nodes, applies
    /// the agents' RBAC from deploy/, and starts one agent per node.
    pub fn up(&self, agent_bin: &Path, deploy_dir: &Path) -> Result<()> {
        if self.is_up() {
            bail!(
                "lab {} is already up (`cargo xtask lab down` first)",
                self.name
            );
        }
        let bins = kube::ensure_built()?;
        let result = self.up_inner(&bins, agent_bin, deploy_dir);
        if result.is_err() {
            if std::env::var_os("FERRY_LAB_KEEP_ON_FAILURE").is_some() {
                eprintln!("lab: bringing the lab up failed; kept for inspection (`cargo xtask lab down` removes it)");
            } else {
                eprintln!("lab: bringing the lab up failed; removing what was made");
                let _ = self.down();
            }
        }
        result
    }

    fn up_inner(&self, bins: &kube::Binaries, agent_bin: &Path, deploy_dir: &Path) -> Result<()> {
        fs::create_dir_all(self.state_dir())?;
        fs::write(
            self.state_dir().join("kubectl"),
            bins.kubectl.to_string_lossy().as_bytes(),
        )?;
        eprintln!("lab {}: network", self.name);
        self.network()?;
        eprintln!("lab {}: control plane", self.name);
        let control_plane = kube::start(
            bins,
            &kube::ControlPlaneConfig {
                netns: Some(self.ns("fabric")),
                listen_addr: FABRIC_GATEWAY,
                state_dir: self.control_plane_dir(),
                service_cidr: SERVICE_CIDR.into(),
            },
        )?;
        fs::write(
            self.state_dir().join("admin.token"),
            &control_plane.admin_token,
        )?;
        for node in NODES {
            self.register_node(node)?;
        }
        self.kubectl(&[
            "apply",
            "-f",
            &deploy_dir.join("rbac.yaml").to_string_lossy(),
        ])?;
        for node in NODES {
            self.start_agent(agent_bin, node, &[])?;
        }
        eprintln!("lab {}: up; `cargo xtask lab status` shows it", self.name);
        Ok(())
    }

    fn network(&self) -> Result<()> {
        let fabric = self.ns("fabric");
        for role in ["fabric", "node1", "node2", "ext"] {
            let ns = self.ns(role);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &fabric,
            "addr",
            "add",
            &format!("{FABRIC_GATEWAY}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        let mut uplinks: Vec<(String, Ipv4Addr)> = NODES
            .iter()
            .map(|n| Ok((self.ns(n), node_addr(n)?)))
            .collect::<Result<_>>()?;
        uplinks.push((self.ns("ext"), EXTERNAL_ADDR));
        for (i, (ns, addr)) in uplinks.iter().enumerate() {
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                &fabric,
            ])?;
            ip(&["-n", &fabric, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            // A veth receives XDP_TX frames from its peer only with NAPI, which GRO turns on.
            ethtool(&fabric, &["-K", &port, "gro", "on"])?;
            like_a_wire(ns, "eth0")?;
        }
        // The external client reaches LoadBalancer IPs and externalIPs through node1.
        ip(&[
            "-n",
            &self.ns("ext"),
            "route",
            "add",
            VIRTUAL_IPS,
            "via",
            &node_addr("node1")?.to_string(),
        ])?;
        for node in NODES {
            let ns = self.ns(node);
            // Only inside the node's own namespace: it routes for its pods.
            output(Command::new("ip").args([
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]))?;
            for other in NODES.iter().filter(|o| **o != node) {
                let cidr = format!("10.244.{}.0/24", node_index(other)?);
                ip(&[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &cidr,
                    "via",
                    &node_addr(other)?.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// The lab plays kubelet: a Node object with its address and pod CIDR, Ready.
    fn register_node(&self, node: &str) -> Result<()> {
        let index = node_index(node)?;
        let manifest = format!(
            r#"{{"apiVersion": "v1", "kind": "Node", "metadata": {{"name": "{node}", "labels": {{
                "kubernetes.io/hostname": "{node}", "kubernetes.io/os": "linux",
                "topology.kubernetes.io/zone": "zone-{index}"}}}},
              "spec": {{"podCIDR": "10.244.{index}.0/24", "podCIDRs": ["10.244.{index}.0/24"]}}}}"#
        );
        self.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
        let now = jiff_now();
        self.patch_status(
            &format!("/api/v1/nodes/{node}/status"),
            &format!(
                r#"{{"status": {{"addresses": [{{"type": "InternalIP", "address": "{}"}}, {{"type": "Hostname", "address": "{node}"}}],
                   "conditions": [{{"type": "Ready", "status": "True", "reason": "FerryLab", "lastHeartbeatTime": "{now}", "lastTransitionTime": "{now}"}}]}}}}"#,
                node_addr(node)?
            ),
        )
    }

    /// A JSON merge patch on a status subresource, as the kubelet would send it.
    fn patch_status(&self, path: &str, body: &str) -> Result<()> {
        let token = fs::read_to_string(self.state_dir().join("admin.token"))
            .context("reading the lab's admin token")?;
        output(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.ns("fabric"),
                    "curl",
                    "-sSf",
                    "-k",
                    "--http1.1",
                    "-X",
                    "PATCH",
                ])
                .args([
                    "-H",
                    &format!("Authorization: Bearer {}", token.trim()),
                    "-H",
                    "Content-Type: application/merge-patch+json",
                    "--data",
                    body,
                    &format!("https://{FABRIC_GATEWAY}:6443{path}"),
                ]),
        )
        .map(|_| ())
    }

    /// kubectl against the lab's API server (run from the fabric namespace).
    fn kubectl_cmd(&self) -> Result<Command> {
        if !self.is_up() {
            bail!("lab {} is not up (`cargo xtask lab up`)", self.name);
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns("fabric")])
            .arg(self.kubectl_path()?)
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig());
        Ok(cmd)
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        output(self.kubectl_cmd()?.args(args))
    }

    /// kubectl with the terminal: what `cargo xtask lab kubectl` runs.
    pub fn kubectl_interactive(&self, args: &[String]) -> Result<()> {
        let status = self.kubectl_cmd()?.args(args).status()?;
        if !status.success() {
            bail!("kubectl: {status}");
        }
        Ok(())
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        let mut child = self
            .kubectl_cmd()?
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn agent_pid_file(&self, node: &str) -> PathBuf {
        self.state_dir().join(format!("agent-{node}.pid"))
    }

    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.state_dir().join(format!("agent-{node}.log"))
    }

    /// Starts the agent of `node` as the DaemonSet pod would run it: in the
    /// node's network namespace (hostNetwork), with the DaemonSet's capabilities
    /// and the ServiceAccount's credentials, and waits until it has programmed
    /// its maps. `extra` are more agent flags (e.g. a narrow `--nat-ports`).
    pub fn start_agent(&self, agent_bin: &Path, node: &str, extra: &[String]) -> Result<()> {
        let pid_file = self.agent_pid_file(node);
        if alive(&pid_file) {
            bail!("the agent of {node} is already running");
        }
        let log = self.agent_log(node);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns(node)))
            // Only the capabilities deploy/daemonset.yaml grants.
            .args(["setpriv", "--bounding-set", AGENT_CAPABILITIES, "--"])
            .arg(agent_bin)
            .arg("run")
            .args([
                "--node-name",
                node,
                "--pod-iface-pattern",
                POD_IFACE_PATTERN,
                "--uplink-iface",
                "eth0",
                // Native XDP on a veth sends XDP_TX frames to its peer, where (on a
                // bridge port without an XDP program of its own) they get lost;
                // generic XDP runs the same program and works on any device.
                "--uplink-mode",
                "generic",
            ])
            .arg("--kubeconfig")
            .arg(self.agent_kubeconfig())
            .arg("--pin-dir")
            .arg(self.pin_dir(node))
            .args(extra)
            .env("RUST_LOG", "info");
        spawn_detached(&mut cmd, &log, &pid_file)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("ready: maps in sync") {
                return Ok(());
            }
            if !alive(&pid_file) || Instant::now() > deadline {
                bail!("the agent of {node} did not get ready; its log:\n{text}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of the agent of `node`, while it runs.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        let pid_file = self.agent_pid_file(node);
        alive(&pid_file)
            .then(|| fs::read_to_string(&pid_file).ok()?.trim().parse().ok())
            .flatten()
    }

    /// Stops the agent of `node`; its programs and maps stay.
    pub fn stop_agent(&self, node: &str) {
        stop_pid_file(&self.agent_pid_file(node));
    }

    fn pods_dir(&self) -> PathBuf {
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
        let host_if = format!("fp-{name}");
        fs::create_dir_all(self.pods_dir())?;
        ip(&["netns", "add", &pod_ns])?;
        ip(&["-n", &pod_ns, "link", "set", "lo", "up"])?;
        wire_pod(&pod_ns, &node_ns, &host_if, &[addr], gateway)?;
        fs::write(
            self.pods_dir().join(format!("{name}.pod")),
            format!("{node} {addr}\n"),
        )?;

        let mut server = Command::new("ip");
        server
            .args(["netns", "exec", &pod_ns])
            .arg(std::env::current_exe()?)
            .args(["lab", "--lab", &self.name, "pod-server", "--name", name]);
        spawn_detached(
            &mut server,
            &self.pods_dir().join(format!("{name}.log")),
            &self.pods_dir().join(format!("{name}.pid")),
        )?;

        let labels: String = labels
            .iter()
            .map(|(k, v)| format!(r#", "{k}": "{v}""#))
            .collect();
        let manifest = format!(
            r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}", "namespace": "default",
                 "labels": {{"ferry-lab/pod": "{name}"{labels}}}}},
               "spec": {{"nodeName": "{node}", "terminationGracePeriodSeconds": 0, "containers": [{{"name": "server", "image": "ferry-lab/pod-server",
                 "ports": [{{"name": "tcp", "containerPort": {POD_TCP_PORT}, "protocol": "TCP"}},
                           {{"name": "udp", "containerPort": {POD_UDP_PORT}, "protocol": "UDP"}}]}}]}}}}"#
        );
        self.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
        let now = jiff_now();
        self.patch_status(
            &format!("/api/v1/namespaces/default/pods/{name}/status"),
            &format!(
                r#"{{"status": {{"phase": "Running", "podIP": "{addr}", "podIPs": [{{"ip": "{addr}"}}], "hostIP": "{}", "startTime": "{now}",
                   "conditions": [{{"type": "Ready", "status": "True", "lastTransitionTime": "{now}"}},
                                  {{"type": "ContainersReady", "status": "True", "lastTransitionTime": "{now}"}}]}}}}"#,
                node_addr(node)?
            ),
        )?;
        Ok(Pod {
            name: name.into(),
            node: node.into(),
            addr,
        })
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
        let _ = ip(&["netns", "del", &self.pod_ns(name)]);
        let _ = ip(&[
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

    /// Removes everything the lab made. Safe to run on a lab that is half up or gone.
    pub fn down(&self) -> Result<()> {
        for node in NODES {
            self.stop_agent(node);
        }
        if let Ok(pods) = self.pods() {
            for name in pods.keys() {
                stop_pid_file(&self.pods_dir().join(format!("{name}.pid")));
            }
        }
        kube::stop(&self.control_plane_dir())?;
        // Deleting a namespace removes its interfaces and their tc filters.
        let prefix = format!("{}-", self.name);
        let list = output(Command::new("ip").args(["netns", "list"]))?;
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&prefix) {
                ip(&["netns", "del", ns])?;
            }
        }
        let pins = PathBuf::from("/sys/fs/bpf").join(&self.name);
        if pins.exists() {
            for node in fs::read_dir(&pins)? {
                let node = node?.path();
                for map in fs::read_dir(&node)? {
                    fs::remove_file(map?.path())?;
                }
                fs::remove_dir(&node)?;
            }
            fs::remove_dir(&pins)?;
        }
        if self.state_dir().exists() {
            fs::remove_dir_all(self.state_dir())?;
        }
        eprintln!("lab {}: down", self.name);
        Ok(())
    }

    /// Gives a LoadBalancer Service an ingress IP through the status subresource,
    /// as a cloud's load-balancer controller would.
    pub fn set_load_balancer_ip(&self, service: &str, addr: Ipv4Addr) -> Result<()> {
        self.patch_status(
            &format!("/api/v1/namespaces/default/services/{service}/status"),
            &format!(r#"{{"status": {{"loadBalancer": {{"ingress": [{{"ip": "{addr}"}}]}}}}}}"#),
        )
    }

    /// Addresses of the ready endpoints in a Service's EndpointSlices.
    pub fn ready_endpoints(&self, service: &str) -> Result<Vec<Ipv4Addr>> {
        let json = self.kubectl(&[
            "get",
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={service}"),
            "-o",
            "json",
        ])?;
        let list: serde_json::Value = serde_json::from_str(&json)?;
        let mut addrs = Vec::new();
        for slice in list["items"].as_array().into_iter().flatten() {
            for ep in slice["endpoints"].as_array().into_iter().flatten() {
                if ep["conditions"]["ready"] == serde_json::Value::Bool(true) {
                    if let Some(addr) = ep["addresses"][0].as_str() {
                        addrs.push(addr.parse()?);
                    }
                }
            }
        }
        addrs.sort();
        Ok(addrs)
    }

    pub fn status(&self) -> Result<()> {
        if !self.is_up() {
            println!("lab {}: down", self.name);
            return Ok(());
        }
        println!("lab {}: up", self.name);
        println!(
            "  api server  https://{FABRIC_GATEWAY}:6443 in {}",
            self.ns("fabric")
        );
        for node in NODES {
            let state = if alive(&self.agent_pid_file(node)) {
                "running"
            } else {
                "stopped"
            };
            println!(
                "  {node}       {} (pods 10.244.{}.0/24), agent {state}, maps in {}",
                node_addr(node)?,
                node_index(node)?,
                self.pin_dir(node).display()
            );
        }
        println!("  external    {EXTERNAL_ADDR} in {}", self.ns("ext"));
        for pod in self.pods()?.values() {
            let state = if alive(&self.pods_dir().join(format!("{}.pid", pod.name))) {
                "serving"
            } else {
                "stopped"
            };
            println!(
                "  pod {:<12} {:<12} on {} ({state})",
                pod.name, pod.addr, pod.node
            );
        }
        print!(
            "{}",
            self.kubectl(&["get", "services,endpointslices", "-A", "-o", "wide"])?
        );
        Ok(())
    }
}

fn jiff_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // RFC 3339 in UTC from the Unix time, without a date library.
    let days = secs / 86_400;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let (y, mo, d) = civil_from_days(days as i64);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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
    in_netns(ns, move || -> Result<String> {
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
