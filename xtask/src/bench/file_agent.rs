//! The agent as the benches run it beside kube-proxy's rule sets: in a
//! namespace of theirs, serving a services file instead of an API server.

use std::{
    ffi::OsString,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
};

use anyhow::{Context, Result};
use ferry_netns as netns;

use super::kube_proxy_rules::ServicePort;

/// A running agent. Dropping it stops it (SIGTERM) and removes its pinned
/// maps and hooks, which an agent otherwise leaves for its successor.
pub struct FileAgent {
    child: Child,
    log: PathBuf,
    pin_dir: PathBuf,
}

impl FileAgent {
    /// Starts `agent_bin` in namespace `ns` (network namespace only, so that it
    /// pins on the machine's bpffs) serving `file`, pinning in `pin_dir`,
    /// with `args` besides and no health or metrics server. Its log goes
    /// beside the file (`.log`).
    pub fn start(
        ns: &str,
        agent_bin: &Path,
        file: &Path,
        pin_dir: &Path,
        args: &[OsString],
    ) -> Result<Self> {
        let log = file.with_extension("log");
        let child = netns::enter(ns, agent_bin)
            .args([
                "run",
                "--healthz-bind-address",
                "off",
                "--metrics-bind-address",
                "off",
            ])
            .arg("--pin-dir")
            .arg(pin_dir)
            .arg("--services-file")
            .arg(file)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting the agent")?;
        Ok(Self {
            child,
            log,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Once the agent has exited: its status and its log.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        Some(format!("the agent exited ({status}): {log}"))
    }
}

impl Drop for FileAgent {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

/// The services file of `services`: each one's ClusterIP and, for a NodePort,
/// a frontend on each of `node_addresses`, which are also the file's node
/// addresses (SNAT to remote endpoints). `local`: the endpoints run on the
/// agent's node.
pub fn services_file(
    services: &[ServicePort],
    node_addresses: &[Ipv4Addr],
    local: bool,
) -> serde_json::Value {
    let frontends: Vec<serde_json::Value> = services
        .iter()
        .flat_map(|s| {
            let endpoints: Vec<serde_json::Value> = s
                .endpoints
                .iter()
                .map(|(a, p)| {
                    serde_json::json!({"address": a.to_string(), "port": p, "local": local})
                })
                .collect();
            let frontend = |address: Ipv4Addr, port: u16| {
                serde_json::json!({
                    "name": s.name,
                    "address": address.to_string(),
                    "port": port,
                    "protocol": s.protocol.name().to_uppercase(),
                    "endpoints": endpoints,
                })
            };
            let node_ports = s
                .node_port
                .map(|port| node_addresses.iter().map(move |&a| (a, port)))
                .into_iter()
                .flatten();
            std::iter::once(frontend(s.vip, s.port))
                .chain(node_ports.map(|(a, port)| frontend(a, port)))
                .collect::<Vec<_>>()
        })
        .collect();
    serde_json::json!({
        "services": frontends,
        "node_addresses": node_addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::kube_proxy_rules::{self as rules, Protocol};

    #[test]
    fn a_node_port_is_served_on_each_node_address_beside_its_cluster_ip() {
        let mut services = rules::services(1, &[(Ipv4Addr::new(10, 244, 2, 10), 8080)]);
        services.push(ServicePort {
            name: "bench/np:dns".into(),
            vip: Ipv4Addr::new(10, 96, 0, 9),
            port: 53,
            protocol: Protocol::Udp,
            node_port: Some(30053),
            endpoints: vec![(Ipv4Addr::new(10, 244, 2, 11), 53)],
        });
        let nodes = [Ipv4Addr::new(172, 30, 1, 1), Ipv4Addr::new(172, 30, 2, 1)];
        let file = services_file(&services, &nodes, false);
        let frontends: Vec<(String, u64, String)> = file["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["address"].as_str().unwrap().to_string(),
                    f["port"].as_u64().unwrap(),
                    f["protocol"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let expected = [
            ("10.96.0.1", 80, "TCP"),
            ("10.96.0.9", 53, "UDP"),
            ("172.30.1.1", 30053, "UDP"),
            ("172.30.2.1", 30053, "UDP"),
        ];
        assert_eq!(
            frontends,
            expected.map(|(a, p, proto)| (a.to_string(), p, proto.to_string()))
        );
        assert_eq!(file["services"][3]["endpoints"][0]["local"], false);
        assert_eq!(file["node_addresses"][1], "172.30.2.1");
    }
}
