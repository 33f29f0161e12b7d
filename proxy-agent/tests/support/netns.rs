//! Network namespaces made by a test, named `ferry-t<pid>-<role>`, and removed
//! (with the agent and its pinned maps) when the value is dropped, even when the
//! test panics.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
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

/// Runs `f` on a thread that has entered network namespace `ns`. Sockets made
/// there stay in that namespace wherever they are used afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
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
        run("ip", &["netns", "add", &name]);
        self.namespaces.push(name.clone());
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// Connects a pod namespace to the node namespace with a veth pair: `eth0`
    /// in the pod with `addr`, `host_if` on the node, routed both ways with the
    /// node's gateway address `gw` on every pod link.
    pub fn plug_pod(&self, node: &str, pod: &str, host_if: &str, addr: &str, gw: &str) {
        run(
            "ip",
            &[
                "link", "add", "eth0", "netns", pod, "type", "veth", "peer", "name", host_if,
                "netns", node,
            ],
        );
        run(
            "ip",
            &[
                "-n",
                pod,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "eth0",
            ],
        );
        run("ip", &["-n", pod, "link", "set", "eth0", "up"]);
        run(
            "ip",
            &[
                "-n", pod, "route", "add", gw, "dev", "eth0", "scope", "link",
            ],
        );
        run(
            "ip",
            &[
                "-n", pod, "route", "add", "default", "via", gw, "dev", "eth0",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                node,
                "addr",
                "add",
                &format!("{gw}/32"),
                "dev",
                host_if,
            ],
        );
        run("ip", &["-n", node, "link", "set", host_if, "up"]);
        run(
            "ip",
            &[
                "-n",
                node,
                "route",
                "add",
                &format!("{addr}/32"),
                "dev",
                host_if,
            ],
        );
    }

    /// Starts `proxy-agent` in `node`'s network namespace (keeping the machine's
    /// mounts, so it pins on the real bpffs) and waits until it says it is ready.
    pub fn start_agent(&mut self, node: &str, args: &[&str]) {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .arg(env!("CARGO_BIN_EXE_proxy-agent"))
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
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
                if line.contains("ready") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("agent did not become ready in 20 s");
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
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
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
    }

    /// Asserts nothing the test made is left.
    pub fn assert_gone(&self) {
        let left = run("ip", &["netns", "list"]);
        assert!(!left.contains(&self.prefix), "namespaces left: {left}");
        assert!(
            !Path::new(&self.pin_dir).exists(),
            "{} left",
            self.pin_dir.display()
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}
