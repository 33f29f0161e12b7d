//! Helpers for the lab tests: a lab of the test's own (`ferry-t<pid>`), removed
//! when dropped, and clients that run inside the lab's namespaces.
#![allow(dead_code, reason = "each test binary uses its own subset")]

pub mod sctp;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::json;

pub const TIMEOUT: Duration = Duration::from_secs(3);

pub struct Lab {
    pub name: String,
}

impl Lab {
    pub fn up() -> Self {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "lab tests need root (as `cargo xtask test` and CI run them)"
        );
        let lab = Self {
            name: format!("ferry-t{}", std::process::id()),
        };
        lab.xtask(&["up"]);
        lab
    }

    pub fn xtask(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["lab", "--lab", &self.name])
            .args(args)
            .output()
            .expect("run xtask");
        assert!(
            out.status.success(),
            "xtask lab {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// kubectl, whose failure is an answer: what it printed, either way.
    pub fn try_kubectl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["lab", "--lab", &self.name, "kubectl"])
            .args(args)
            .output()
            .expect("run xtask");
        let printed = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        if out.status.success() {
            Ok(printed(&out.stdout))
        } else {
            Err(printed(&out.stderr) + &printed(&out.stdout))
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["kubectl"];
        all.extend_from_slice(args);
        self.xtask(&all)
    }

    pub fn apply(&self, manifest: &serde_json::Value) {
        let path = std::env::temp_dir().join(format!("{}-manifest.json", self.name));
        std::fs::write(&path, manifest.to_string()).unwrap();
        self.kubectl(&["apply", "-f", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(path);
    }

    /// Applies Service `name` in the default namespace with `spec`.
    pub fn apply_service(&self, name: &str, spec: serde_json::Value) {
        self.apply(&json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }));
    }

    pub fn pod_add(&self, name: &str, node: &str, app: &str) -> Ipv4Addr {
        let out = self.xtask(&[
            "pod",
            "add",
            name,
            "--node",
            node,
            "--label",
            &format!("app={app}"),
        ]);
        out.split_whitespace().last().unwrap().parse().unwrap()
    }

    /// Makes this test process one of `node`'s own processes, as far as
    /// the node's socket hooks see it (its host cgroup) until the value is
    /// dropped; its sockets in the node's network namespace (`node_ns`) are
    /// then the node's.
    pub fn join_node(&self, node: &str) -> proxy_common::cgroup::Joined {
        let mount = proxy_common::cgroup::v2_mount().unwrap();
        let host = mount.join(&self.name).join(node).join("host");
        proxy_common::cgroup::join(&host).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Stops `node`'s agent and removes its pinned programs, maps and
    /// socket hooks with `proxy-agent cleanup`, as a reboot would leave it.
    pub fn reboot_state(&self, node: &str) {
        self.xtask(&["agent", "stop", node]);
        let agent = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/x86_64-unknown-linux-gnu/release/proxy-agent");
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_ns(node)))
            .arg(&agent)
            .args([
                "cleanup",
                "--pin-dir",
                &format!("/sys/fs/bpf/{}/{node}", self.name),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cleanup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The network namespace of `node` (its host network; the
    /// control-plane node's is the fabric's).
    pub fn node_ns(&self, node: &str) -> String {
        let ns = if node == "control-plane" {
            "fabric"
        } else {
            node
        };
        format!("{}-{ns}", self.name)
    }

    pub fn pod_ns(&self, pod: &str) -> String {
        format!("{}-pod-{pod}", self.name)
    }

    pub fn service(&self, name: &str, app: &str) -> Ipv4Addr {
        self.apply_service(
            name,
            json!({
                "selector": {"app": app},
                "ports": [
                    http(),
                    {"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"},
                ],
            }),
        );
        self.kubectl(&["get", "service", name, "-o", "jsonpath={.spec.clusterIP}"])
            .trim()
            .parse()
            .unwrap()
    }

    /// NodePort Service `name` for the pods `app=<app>`: port 80 to their
    /// TCP port, on `node_port`.
    pub fn node_port_service(&self, name: &str, app: &str, node_port: u16) {
        self.apply_service(
            name,
            json!({
                "type": "NodePort",
                "selector": {"app": app},
                "ports": [{"port": 80, "targetPort": 8080, "nodePort": node_port, "protocol": "TCP"}],
            }),
        );
    }

    /// Every endpoint in the Service's EndpointSlices, as the API returns it.
    pub fn slice_endpoints(&self, service: &str) -> Vec<serde_json::Value> {
        let json = self.kubectl(&[
            "get",
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={service}"),
            "-o",
            "json",
        ]);
        let list: serde_json::Value = serde_json::from_str(&json).unwrap();
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|slice| slice["endpoints"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits until the service's slices list `addr` as serving and terminating.
    pub fn wait_terminating(&self, service: &str, addr: Ipv4Addr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let endpoints = self.slice_endpoints(service);
            let found = endpoints.iter().any(|ep| {
                ep["addresses"][0].as_str() == Some(addr.to_string().as_str())
                    && ep["conditions"]["serving"] == serde_json::Value::Bool(true)
                    && ep["conditions"]["terminating"] == serde_json::Value::Bool(true)
                    && ep["conditions"]["ready"] != serde_json::Value::Bool(true)
            });
            if found {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{service}: {addr} never turned serving+terminating: {endpoints:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn cluster_ip(&self, service: &str) -> Ipv4Addr {
        self.kubectl(&[
            "get",
            "service",
            service,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .trim()
        .parse()
        .unwrap()
    }

    /// One of a node agent's counters (`proxy_common::stats`), summed over CPUs,
    /// read with bpftool from the maps the agent pinned for that node.
    pub fn agent_counter(&self, node: &str, counter: u32) -> u64 {
        let map = format!(
            "/sys/fs/bpf/{}/{node}/{}",
            self.name,
            proxy_common::map_names::STATS
        );
        let key = counter.to_le_bytes().map(|b| b.to_string());
        let out = Command::new("bpftool")
            .args(["-j", "map", "lookup", "pinned", &map, "key"])
            .args(key)
            .output()
            .expect("run bpftool");
        assert!(
            out.status.success(),
            "bpftool map lookup {map}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let entry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let per_cpu = entry["formatted"]["values"]
            .as_array()
            .unwrap_or_else(|| panic!("{map}: no BTF-formatted values in {entry}"));
        per_cpu
            .iter()
            .map(|cpu| cpu["value"]["packets"].as_u64().unwrap())
            .sum()
    }

    /// Every entry of one of a node agent's pinned maps, as bpftool prints it
    /// with BTF (`formatted` keys and values).
    pub fn pinned_entries(&self, node: &str, map: &str) -> Vec<serde_json::Value> {
        let path = format!("/sys/fs/bpf/{}/{node}/{map}", self.name);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned", &path])
            .output()
            .expect("run bpftool");
        assert!(
            out.status.success(),
            "bpftool map dump {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        entries.as_array().cloned().unwrap_or_default()
    }

    /// Waits until the service's slices list exactly `addrs` as ready; returns when it saw that.
    pub fn wait_endpoints(&self, service: &str, addrs: &[Ipv4Addr]) -> Instant {
        let addrs: Vec<IpAddr> = addrs.iter().map(|a| IpAddr::V4(*a)).collect();
        self.wait_endpoints_ip(service, &addrs)
    }

    /// [`Lab::wait_endpoints`] over the slices of both families.
    pub fn wait_endpoints_ip(&self, service: &str, addrs: &[IpAddr]) -> Instant {
        let mut want = addrs.to_vec();
        want.sort();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut have: Vec<IpAddr> = Vec::new();
            for ep in self.slice_endpoints(service) {
                if ep["conditions"]["ready"] == serde_json::Value::Bool(true) {
                    have.push(ep["addresses"][0].as_str().unwrap().parse().unwrap());
                }
            }
            have.sort();
            if have == want {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{service}: slices list {have:?}, want {want:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A pod's addresses (`status.podIPs`): one of each family in this lab.
    pub fn pod_ips(&self, pod: &str) -> Vec<IpAddr> {
        let ips = self.kubectl(&["get", "pod", pod, "-o", "jsonpath={.status.podIPs[*].ip}"]);
        ips.split_whitespace().map(|a| a.parse().unwrap()).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["lab", "--lab", &self.name, "down"])
            .status();
    }
}

/// Runs `f` on a thread inside network namespace `ns` (the shared
/// [`ferry_netns::in_netns`]; a panic in `f` fails the test with its message).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    ferry_netns::in_netns(ns, f).unwrap_or_else(|e| panic!("{e}"))
}

/// The port most lab Services have: `http`, 80 to the pods' TCP port.
pub fn http() -> serde_json::Value {
    json!({"name": "http", "port": 80, "targetPort": "tcp", "protocol": "TCP"})
}

/// An HTTP GET of `path` from inside `ns`: the whole answer, headers included.
pub fn http_get(ns: &str, target: SocketAddr, path: &'static str) -> String {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&target, TIMEOUT).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    })
}

/// One datagram from an unconnected socket in `ns` to `target`: where the
/// reply came from, and what it said (a pod's answer).
pub fn udp_ask(ns: &str, target: SocketAddr) -> (SocketAddr, String) {
    in_netns(ns, move || {
        let any = if target.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let sock = std::net::UdpSocket::bind(any).unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.send_to(b"who?", target).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = sock.recv_from(&mut buf).expect("UDP reply");
        (from, String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// Reads one line (a pod's answer: `<pod name> <client address>`).
pub fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `n` TCP connections from `ns` to `target`: the pod name that answered each.
pub fn connect_many(ns: &str, target: SocketAddr, n: usize) -> Vec<std::io::Result<String>> {
    in_netns(ns, move || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&target, TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                read_line(&mut s)
            })
            .collect()
    })
}

pub fn pod_of(answer: &str) -> &str {
    answer.split_whitespace().next().unwrap_or("")
}

pub fn count(answers: &[std::io::Result<String>]) -> BTreeMap<String, usize> {
    let mut by_pod = BTreeMap::new();
    for (i, a) in answers.iter().enumerate() {
        let a = a
            .as_ref()
            .unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        *by_pod.entry(pod_of(a).to_string()).or_insert(0) += 1;
    }
    by_pod
}

/// The address `lab status` lists for a pod.
pub fn lab_pod_addr(status: &str, pod: &str) -> Ipv4Addr {
    let line = status
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("pod {pod} ")))
        .unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}
