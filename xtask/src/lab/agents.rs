//! The lab's node agents, run as the DaemonSet runs them: in the node's network
//! namespace, with the DaemonSet's capabilities and the ServiceAccount's
//! credentials; started, waited for, stopped.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{Lab, POD_IFACE_PATTERN};
use crate::sys::{live_pid, spawn_detached, stop_pid_file};

/// The capabilities deploy/daemonset.yaml gives the agent, as a setpriv bounding set.
const AGENT_CAPABILITIES: &str = "-all,+bpf,+perfmon,+net_admin,+sys_resource";

impl Lab {
    pub(super) fn agent_pid_file(&self, node: &str) -> PathBuf {
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
        if live_pid(&pid_file).is_some() {
            bail!("the agent of {node} is already running");
        }
        let log = self.agent_log(node);
        // Only the capabilities deploy/daemonset.yaml grants.
        let mut cmd = ferry_netns::enter(&self.ns(node), "setpriv");
        cmd.args(["--bounding-set", AGENT_CAPABILITIES, "--"])
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
            if live_pid(&pid_file).is_none() || Instant::now() > deadline {
                bail!("the agent of {node} did not get ready; its log:\n{text}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of the agent of `node`, while it runs.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        live_pid(&self.agent_pid_file(node)).and_then(|pid| u32::try_from(pid).ok())
    }

    /// Stops the agent of `node`; its programs and maps stay.
    pub fn stop_agent(&self, node: &str) {
        stop_pid_file(&self.agent_pid_file(node));
    }
}
