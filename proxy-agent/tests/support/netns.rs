//! Network namespaces made by a test, named `ferry-t<pid>-<role>`, and removed
//! (with the agent and its pinned maps) when the value is dropped, even when the
//! test panics. Creating, entering and wiring namespaces is the shared
//! `ferry-netns` crate's (the lab and the benches use it too); this adds what
//! the tests own: the agent they start and its pin directory.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

/// Runs a command and panics with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread that has entered network namespace `ns` (the shared
/// [`ferry_netns::in_netns`]; a panic in `f` fails the test with its message).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    ferry_netns::in_netns(ns, f).unwrap_or_else(|e| panic!("{e}"))
}

/// A set of namespaces, an agent, and a pin directory owned by one test.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
    agents: Vec<Child>,
    pub pin_dir: PathBuf,
}

impl Lab {
    pub fn new(tag: &str) -> Self {
        super::require_root();
        // Unique per lab, also when a test binary runs several at once.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("ferry-t{}-{tag}{n}", std::process::id());
        Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{prefix}")),
            prefix,
            namespaces: Vec::new(),
            agents: Vec::new(),
        }
    }

    /// Creates namespace `<prefix>-<role>` with loopback up and returns its name.
    pub fn netns(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        ferry_netns::add(&name).unwrap_or_else(|e| panic!("{e}"));
        self.namespaces.push(name.clone());
        name
    }

    /// The test's own directory (`<tmp>/<prefix>`), for the files it hands
    /// the agent: made on first use, removed with the rest.
    pub fn dir(&self) -> PathBuf {
        let dir = std::env::temp_dir().join(&self.prefix);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        dir
    }

    /// Connects a pod namespace to the node namespace with a veth pair: `eth0`
    /// in the pod with `addr`, `host_if` on the node, routed both ways with the
    /// node's gateway address `gw` on every pod link.
    pub fn plug_pod(&self, node: &str, pod: &str, host_if: &str, addr: &str, gw: &str) {
        self.plug_dual_stack_pod(node, pod, host_if, (addr, gw), None);
    }

    /// [`Lab::plug_pod`] with an IPv6 address and gateway too (`v6`).
    pub fn plug_dual_stack_pod(
        &self,
        node: &str,
        pod: &str,
        host_if: &str,
        (addr, gw): (&str, &str),
        v6: Option<(&str, &str)>,
    ) {
        let parse = |a: &str| a.parse().unwrap_or_else(|e| panic!("{a}: {e}"));
        let parse6 = |a: &str| a.parse().unwrap_or_else(|e| panic!("{a}: {e}"));
        let addrs6: Vec<std::net::Ipv6Addr> = v6.iter().map(|(a, _)| parse6(a)).collect();
        ferry_netns::wire_pod(&ferry_netns::PodLink {
            pod_ns: pod,
            node_ns: node,
            host_if,
            addrs: &[parse(addr)],
            gateway: parse(gw),
            addrs6: &addrs6,
            gateway6: v6.map(|(_, gw)| parse6(gw)),
            // These tests have always kept the veth's checksum offload.
            full_checksums: false,
        })
        .unwrap_or_else(|e| panic!("wiring pod {pod} to {node}: {e}"));
    }

    /// Starts `proxy-agent` in `node`'s network namespace (keeping the machine's
    /// mounts, so it pins on the real bpffs) and waits until it says it is ready.
    pub fn start_agent(&mut self, node: &str, args: &[&str]) {
        self.start_agent_until(node, args, "ready");
    }

    /// [`Lab::start_agent`], waiting for a log line holding `marker` instead.
    pub fn start_agent_until(&mut self, node: &str, args: &[&str], marker: &'static str) {
        let mut child = ferry_netns::enter(node, env!("CARGO_BIN_EXE_proxy-agent"))
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            // Never the machine's cgroup root (the default): these tests
            // are about packets; privileged_sock tests the socket hooks.
            .env("FERRY_SOCKET_LB", "off")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start proxy-agent");
        let stderr = child.stderr.take().unwrap();
        self.agents.push(child);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                if line.contains(marker) {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("the agent did not log {marker:?} in 20 s"));
    }

    /// Whether every agent started is still running.
    pub fn agents_running(&mut self) -> bool {
        self.agents
            .iter_mut()
            .all(|a| matches!(a.try_wait(), Ok(None)))
    }

    /// Runs `proxy-agent cleanup` in `node`.
    pub fn cleanup_agent_state(&self, node: &str) {
        run(
            "nsenter",
            &[
                &format!("--net=/run/netns/{node}"),
                env!("CARGO_BIN_EXE_proxy-agent"),
                "cleanup",
                "--pin-dir",
                self.pin_dir.to_str().unwrap(),
            ],
        );
    }

    /// Stops the agents (SIGTERM) and leaves everything else.
    pub fn teardown_agents_only(&mut self) {
        for mut agent in self.agents.drain(..) {
            unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
            let _ = agent.wait();
        }
    }

    /// Removes everything the test made; also what `Drop` does.
    pub fn teardown(&mut self) {
        self.teardown_agents_only();
        for ns in self.namespaces.drain(..) {
            let _ = ferry_netns::delete(&ns);
        }
        if self.pin_dir.exists() {
            for entry in std::fs::read_dir(&self.pin_dir)
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = std::fs::remove_file(entry.path());
            }
            let _ = std::fs::remove_dir(&self.pin_dir);
        }
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&self.prefix));
    }

    /// Asserts nothing the test made is left.
    pub fn assert_gone(&self) {
        let left = run("ip", &["netns", "list"]);
        assert!(!left.contains(&self.prefix), "namespaces left: {left}");
        for dir in [
            self.pin_dir.clone(),
            std::env::temp_dir().join(&self.prefix),
        ] {
            assert!(!dir.exists(), "{} left", dir.display());
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}
