//! The lab: a cluster of two worker nodes and a control-plane node on one
//! machine, in network namespaces named `<lab>-*` (default `ferry-*`), with a
//! real API server, a real kubelet with containerd per node, and Ferry
//! installed from deploy/ as a DaemonSet.
//! Nothing outside those namespaces changes, except pinned maps under
//! `/sys/fs/bpf/<lab>/`, cgroups under `/<lab>/` and state under
//! `/run/ferry-lab/<lab>/`, all removed by `lab down`.
//!
//! ```text
//!              <lab>-fabric: node control-plane (tainted NoSchedule): bridge
//!                            br0 10.250.0.1/24, etcd, kube-apiserver :6443,
//!                            kube-controller-manager, kube-scheduler, kubelet,
//!                            containerd, agent pod (host net)
//!        ┌───────────────┬────────┴───────┬──────────────────┐
//!  <lab>-node1 .11   <lab>-node2 .12   <lab>-ext .100 (external client)
//!  kubelet, containerd kubelet, containerd
//!  pods 10.244.1.0/24  pods 10.244.2.0/24
//!  agent pod (host net) agent pod (host net)
//! ```
//!
//! The control-plane node is the API server's own namespace and cgroup, as on
//! a real control-plane node: its agent serves the API server's connections to
//! Services (admission webhooks through their ClusterIPs) at connect time.
//!
//! This file owns the lab's shape (addresses, namespaces, bringing it up and
//! down, status); `api` talks to its API server, `node` runs each node's
//! containerd and kubelet, `agents` installs and controls the DaemonSet,
//! `pods` the lab's pods.

mod agents;
mod api;
mod node;
mod pods;

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use ferry_netns as netns;

pub use agents::{agent_get, metric, metric_sum};
pub use pods::tcp_ask;

use crate::{image, kube};

/// The lab's worker nodes, by name: its pods run there.
pub const NODES: [&str; 2] = ["node1", "node2"];
/// The node of the API server's namespace, tainted so that only DaemonSets
/// (the agent's) run there.
pub const CONTROL_PLANE: &str = "control-plane";
/// Every node with a kubelet and an agent.
pub const ALL_NODES: [&str; 3] = ["node1", "node2", CONTROL_PLANE];
const FABRIC_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const EXTERNAL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 100);
/// A /15: 131070 ClusterIPs, room for the control-plane bench's 100k Services
/// (a /16 holds 65534).
const SERVICE_CIDR: &str = "10.96.0.0/15";
/// The lab is dual stack: every node, pod and the external client has an
/// address of each family, and Services may ask for a ClusterIP of each.
const SERVICE_CIDR6: &str = "fd00:10:96::/112";
const FABRIC_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x250, 0, 0, 0, 0, 1);
const EXTERNAL_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x250, 0, 0, 0, 0, 0x100);
/// Where the lab's LoadBalancer IPs and externalIPs come from: routed to node1.
pub const VIRTUAL_IPS: &str = "192.0.2.0/24";
/// Ports every lab pod serves, TCP and UDP alike.
pub const POD_TCP_PORT: u16 = 8080;
pub const POD_UDP_PORT: u16 = 5353;

/// Index (1-based) of a node: its pod CIDR is `10.244.<index>.0/24`.
fn node_index(node: &str) -> Result<u8> {
    ALL_NODES
        .iter()
        .position(|n| *n == node)
        .map(|i| i as u8 + 1)
        .with_context(|| format!("no node {node}: the lab has {}", ALL_NODES.join(", ")))
}

/// A node's address on the fabric: the control-plane node's is the bridge's.
pub fn node_addr(node: &str) -> Result<Ipv4Addr> {
    if node == CONTROL_PLANE {
        return Ok(FABRIC_GATEWAY);
    }
    Ok(Ipv4Addr::new(10, 250, 0, 10 + node_index(node)?))
}

/// A node's IPv6 address on the fabric.
pub fn node_addr6(node: &str) -> Result<Ipv6Addr> {
    if node == CONTROL_PLANE {
        return Ok(FABRIC_GATEWAY6);
    }
    let host = 0x10 + u16::from(node_index(node)?);
    Ok(Ipv6Addr::new(0xfd00, 0x10, 0x250, 0, 0, 0, 0, host))
}

/// A node's pod CIDRs: `10.244.<index>.0/24` and `fd00:10:244:<index>::/64`.
fn pod_cidrs(node: &str) -> Result<[String; 2]> {
    let index = node_index(node)?;
    Ok([
        format!("10.244.{index}.0/24"),
        format!("fd00:10:244:{index}::/64"),
    ])
}

fn pod_gateway(node: &str) -> Result<Ipv4Addr> {
    Ok(Ipv4Addr::new(10, 244, node_index(node)?, 1))
}

fn ip(args: &[&str]) -> Result<()> {
    netns::ip(args)?;
    Ok(())
}

/// An IPv6 address on `dev` in `ns`, usable at once (no duplicate detection:
/// the lab hands out every address itself).
fn add_addr6(ns: &str, addr: Ipv6Addr, prefix: u8, dev: &str) -> Result<()> {
    let addr = format!("{addr}/{prefix}");
    ip(&["-n", ns, "-6", "addr", "add", &addr, "dev", dev, "nodad"])
}

/// One lab, by name: the prefix of all it creates.
pub struct Lab {
    pub name: String,
}

impl Lab {
    pub fn new(name: &str) -> Result<Self> {
        if !name.starts_with(netns::PREFIX)
            || name.len() > 20
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("a lab name starts with `ferry` and has at most 20 letters, digits or dashes");
        }
        Ok(Self {
            name: name.to_string(),
        })
    }

    /// A node's network namespace: the control-plane node's is the fabric's.
    pub fn node_ns(&self, node: &str) -> String {
        self.ns(if node == CONTROL_PLANE {
            "fabric"
        } else {
            node
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

    fn is_up(&self) -> bool {
        netns::exists(&self.ns("fabric"))
    }

    /// Builds the network, starts the control plane and each node's kubelet,
    /// and installs the agents from deploy/.
    pub fn up(&self, deploy_dir: &Path) -> Result<()> {
        if self.is_up() {
            bail!(
                "lab {} is already up (`cargo xtask lab down` first)",
                self.name
            );
        }
        let bins = kube::ensure_built()?;
        let result = self.up_inner(&bins, deploy_dir);
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

    fn up_inner(&self, bins: &kube::Binaries, deploy_dir: &Path) -> Result<()> {
        fs::create_dir_all(self.state_dir())?;
        fs::write(
            self.state_dir().join("kubectl"),
            bins.kubectl.to_string_lossy().as_bytes(),
        )?;
        // First: a build that fails should fail before anything is up.
        eprintln!("lab {}: images", self.name);
        let images: Vec<PathBuf> = image::build()?.into_iter().map(|b| b.archive).collect();
        eprintln!("lab {}: network", self.name);
        self.network()?;
        eprintln!("lab {}: control plane", self.name);
        // Its processes are the control-plane node's own, in its host cgroup.
        self.make_cgroups(CONTROL_PLANE)?;
        let control_plane = kube::start(
            bins,
            &kube::ControlPlaneConfig {
                netns: self.ns("fabric"),
                cgroup: Some(self.host_cgroup(CONTROL_PLANE)?),
                listen_addr: FABRIC_GATEWAY,
                state_dir: self.control_plane_dir(),
                service_cidr: SERVICE_CIDR.into(),
                service_cidr6: Some(SERVICE_CIDR6.into()),
                nodes: ALL_NODES.iter().map(|n| n.to_string()).collect(),
            },
        )?;
        fs::write(
            self.state_dir().join("admin.token"),
            &control_plane.admin_token,
        )?;
        for node in ALL_NODES {
            eprintln!("lab {}: {node}: containerd and kubelet", self.name);
            self.start_node(bins, node, &images)?;
        }
        self.wait_nodes_ready(&ALL_NODES)?;
        for node in ALL_NODES {
            self.set_pod_cidr(node)?;
        }
        eprintln!("lab {}: agents (kubectl apply -k)", self.name);
        self.install_agents(deploy_dir, &ALL_NODES)?;
        eprintln!("lab {}: up; `cargo xtask lab status` shows it", self.name);
        Ok(())
    }

    /// The namespaces, the fabric bridge, each node's and the external
    /// client's uplink, and the routes between nodes.
    fn network(&self) -> Result<()> {
        let fabric = self.ns("fabric");
        for role in ["fabric", "node1", "node2", "ext"] {
            netns::add(&self.ns(role))?;
        }
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        let gateway = format!("{FABRIC_GATEWAY}/24");
        ip(&["-n", &fabric, "addr", "add", &gateway, "dev", "br0"])?;
        add_addr6(&fabric, FABRIC_GATEWAY6, 64, "br0")?;
        ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        let mut uplinks: Vec<(String, Ipv4Addr, Ipv6Addr)> = NODES
            .iter()
            .map(|n| Ok((self.ns(n), node_addr(n)?, node_addr6(n)?)))
            .collect::<Result<_>>()?;
        uplinks.push((self.ns("ext"), EXTERNAL_ADDR, EXTERNAL_ADDR6));
        for (i, (ns, addr, addr6)) in uplinks.iter().enumerate() {
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
            add_addr6(ns, *addr6, 64, "eth0")?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            // A veth receives XDP_TX frames from its peer only with NAPI, which GRO turns on.
            netns::ethtool(&fabric, &["-K", &port, "gro", "on"])?;
            netns::like_a_wire(ns, "eth0")?;
        }
        // The external client reaches LoadBalancer IPs and externalIPs through node1.
        let node1 = node_addr("node1")?.to_string();
        ip(&[
            "-n",
            &self.ns("ext"),
            "route",
            "add",
            VIRTUAL_IPS,
            "via",
            &node1,
        ])?;
        for node in NODES {
            let ns = self.ns(node);
            // Only inside the node's own namespace: it routes for its pods.
            netns::sysctl(&ns, "net.ipv4.ip_forward=1")?;
            netns::sysctl(&ns, "net.ipv6.conf.all.forwarding=1")?;
        }
        // Each node reaches the others' pods (the control plane's, too: the
        // API server calls webhooks in pods), over either family.
        for node in ALL_NODES {
            for other in NODES.iter().filter(|o| **o != node) {
                let [cidr, cidr6] = pod_cidrs(other)?;
                let (via, via6) = (
                    node_addr(other)?.to_string(),
                    node_addr6(other)?.to_string(),
                );
                for (family, cidr, via) in [("-4", &cidr, &via), ("-6", &cidr6, &via6)] {
                    ip(&[
                        "-n",
                        &self.node_ns(node),
                        family,
                        "route",
                        "add",
                        cidr,
                        "via",
                        via,
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Stops one control-plane process (`kube-apiserver`, `etcd`) for a
    /// fault test; the value starts it again.
    pub fn halt(&self, process: &str) -> Result<kube::Halted> {
        kube::halt(
            &self.control_plane_dir(),
            process,
            &self.ns("fabric"),
            Some(&self.host_cgroup(CONTROL_PLANE)?),
        )
    }

    /// Stops `process` of the control plane until [`Lab::resume_saved`]
    /// (another command): `lab control-plane stop kube-apiserver`.
    pub fn halt_saved(&self, process: &str) -> Result<()> {
        self.halt(process)?.save()
    }

    pub fn resume_saved(&self, process: &str) -> Result<()> {
        kube::Halted::load(&self.control_plane_dir(), process)?.resume()
    }

    /// Removes everything the lab made. Safe to run on a lab that is half up or gone.
    pub fn down(&self) -> Result<()> {
        for node in NODES {
            self.stop_node(node);
        }
        kube::stop(&self.control_plane_dir())?;
        // After the control plane, whose processes are in its cgroup.
        self.stop_node(CONTROL_PLANE);
        // Deleting a namespace removes its interfaces and their tc filters.
        netns::delete_all(&format!("{}-", self.name))?;
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

    /// Runs a command inside a pod's network namespace, with the terminal.
    /// Runs `command` in pod `target`'s network namespace, or on node
    /// `target` as one of its own processes (its namespaces and host cgroup,
    /// where its agent's socket hooks serve Services).
    pub fn exec(&self, target: &str, command: &[String]) -> Result<()> {
        let (program, args) = command.split_first().context("no command")?;
        let mut cmd = if ALL_NODES.contains(&target) {
            self.in_node(target, program)?
        } else {
            netns::exec(&self.pod_ns(target), program)
        };
        let status = cmd.args(args).status()?;
        if !status.success() {
            bail!("{}: {status}", command.join(" "));
        }
        Ok(())
    }

    pub fn status(&self) -> Result<()> {
        if !self.is_up() {
            println!("lab {}: down", self.name);
            return Ok(());
        }
        println!("lab {}: up", self.name);
        println!(
            "  api server    https://{FABRIC_GATEWAY}:6443 in {}",
            self.ns("fabric")
        );
        for node in ALL_NODES {
            let state = if self.agent_pod(node).ok().flatten().is_some() {
                "running"
            } else {
                "stopped"
            };
            println!(
                "  {node:<13} {} (pods 10.244.{}.0/24), agent {state}, maps in {}",
                node_addr(node)?,
                node_index(node)?,
                self.pin_dir(node).display()
            );
        }
        println!("  external      {EXTERNAL_ADDR} in {}", self.ns("ext"));
        for pod in self.pods()?.values() {
            println!("  pod {:<12} {:<12} on {}", pod.name, pod.addr, pod.node);
        }
        print!(
            "{}",
            self.kubectl(&[
                "get",
                "nodes,pods,services,endpointslices",
                "-A",
                "-o",
                "wide"
            ])?
        );
        Ok(())
    }
}
