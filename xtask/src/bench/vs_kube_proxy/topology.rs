//! The benchmark's topology: a node namespace between a client pod and a
//! backend pod (with its server), Ferry's agent in the node when it is Ferry's
//! turn, and the load generator that runs in the client.

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ferry_netns as netns;

use super::super::file_agent::FileAgent;
use super::{
    backends, Connections, ServicePort, BACKEND_GATEWAY, BACKEND_PORT, CLIENT_ADDR, CLIENT_GATEWAY,
    PIN_DIR, PREFIX,
};

/// The node, client and backend namespaces, the backend's server and, for
/// Ferry, the agent. Dropping it removes all of them.
pub(super) struct Topology {
    /// node, client, backend.
    namespaces: [String; 3],
    /// Where the agent pins (one directory per topology: two agents run at once).
    pin_dir: PathBuf,
    /// For socket load balancing: the cgroup the agent's hooks attach to,
    /// which the load generator joins for its turn.
    cgroup: Option<PathBuf>,
    agent: Option<FileAgent>,
    stop: Arc<AtomicBool>,
    server: Option<thread::JoinHandle<std::io::Result<()>>>,
}

impl Topology {
    pub(super) fn node(&self) -> &str {
        &self.namespaces[0]
    }

    pub(super) fn client(&self) -> &str {
        &self.namespaces[1]
    }

    /// The namespaces `ferry-bench-<tag>-{node,client,backend}`, and with
    /// `socket_lb` the cgroup `ferry-bench-<tag>` in the v2 hierarchy.
    pub(super) fn new(tag: &str, socket_lb: bool) -> Result<Self> {
        let [node, client, backend] =
            ["node", "client", "backend"].map(|role| format!("{PREFIX}{tag}-{role}"));
        let cgroup = if socket_lb {
            let path = proxy_common::cgroup::v2_mount()?.join(format!("{PREFIX}{tag}"));
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
            Some(path)
        } else {
            None
        };
        let mut topo = Self {
            namespaces: [node.clone(), client.clone(), backend.clone()],
            pin_dir: Path::new(PIN_DIR).join(tag),
            cgroup,
            agent: None,
            stop: Arc::new(AtomicBool::new(false)),
            server: None,
        };
        for ns in [&node, &client, &backend] {
            netns::add(ns)?;
        }
        // The node forwards between its pods (a sysctl of this namespace only).
        netns::sysctl(&node, "net.ipv4.ip_forward=1")?;
        // Many short connections from one client: use the whole port range.
        netns::sysctl(&client, "net.ipv4.ip_local_port_range=1024 65000")?;
        let backend_addrs: Vec<Ipv4Addr> = backends().iter().map(|b| b.0).collect();
        for (pod_ns, host_if, addrs, gateway) in [
            (&client, "fp-client", &[CLIENT_ADDR][..], CLIENT_GATEWAY),
            (&backend, "fp-backend", &backend_addrs[..], BACKEND_GATEWAY),
        ] {
            netns::wire_pod(&netns::PodLink {
                pod_ns,
                node_ns: &node,
                host_if,
                addrs,
                gateway,
                addrs6: &[],
                gateway6: None,
                full_checksums: true,
            })?;
        }
        topo.server = Some(serve(&backend, topo.stop.clone())?);
        Ok(topo)
    }

    /// Starts Ferry's agent in the node namespace serving `services`, and waits
    /// until the first Service answers through it.
    pub(super) fn start_agent(
        &mut self,
        agent_bin: &Path,
        services: &[ServicePort],
        file: &Path,
    ) -> Result<()> {
        let json = super::super::file_agent::services_file(services, &[], true);
        fs::write(file, serde_json::to_vec(&json)?)?;
        let mut args: Vec<std::ffi::OsString> = vec!["--pod-iface-pattern".into(), "fp-*".into()];
        args.extend(self.socket_lb_args());
        self.agent = Some(FileAgent::start(
            self.node(),
            agent_bin,
            file,
            &self.pin_dir,
            &args,
        )?);
        let target = SocketAddr::from((services[0].vip, services[0].port));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let served = {
                let _joined = self.join()?;
                probe(self.client(), target)
            };
            if served {
                return Ok(());
            }
            if let Some(exit) = self.agent.as_mut().and_then(FileAgent::exited) {
                bail!("{exit}");
            }
            if Instant::now() > deadline {
                bail!("Ferry did not serve {target} within 60 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Topology {
    /// The agent's socket hooks: on this topology's cgroup for every
    /// namespace, or off (never the machine's cgroup root).
    fn socket_lb_args(&self) -> Vec<std::ffi::OsString> {
        match &self.cgroup {
            Some(cgroup) => vec![
                "--socket-lb".into(),
                "all".into(),
                "--cgroup-root".into(),
                cgroup.into(),
            ],
            None => vec!["--socket-lb".into(), "off".into()],
        }
    }

    /// This process in the topology's cgroup (where the socket hooks apply)
    /// until the value is dropped; nothing for a topology without one.
    pub(super) fn join(&self) -> Result<Option<proxy_common::cgroup::Joined>> {
        self.cgroup
            .as_deref()
            .map(proxy_common::cgroup::join)
            .transpose()
    }
}

/// Removes the cgroups a run left (the bench's only: `ferry-bench-*`).
pub(super) fn remove_cgroups() {
    let Ok(mount) = proxy_common::cgroup::v2_mount() else {
        return;
    };
    for entry in fs::read_dir(mount).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(PREFIX) {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Stopped first, its pins removed.
        self.agent.take();
        if let Some(cgroup) = &self.cgroup {
            let _ = fs::remove_dir(cgroup);
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        for ns in &self.namespaces {
            let _ = netns::delete(ns);
        }
    }
}

/// Keeps the calling thread on one CPU (the client on the first, the server on
/// the last): fewer migrations, steadier numbers on a shared machine.
fn pin_to_cpu(last: bool) {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = if last { cpus - 1 } else { 0 };
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A thread inside namespace `ns` that answers every connection to port 8080
/// with a line and closes it (the server closes first, so TIME_WAIT stays on
/// its side and the client can reuse ports), until `stop` is set.
fn serve(ns: &str, stop: Arc<AtomicBool>) -> Result<thread::JoinHandle<std::io::Result<()>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = netns::spawn_in(ns, move || {
        let listener = match TcpListener::bind(("0.0.0.0", BACKEND_PORT)) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        pin_to_cpu(true);
        let mut poll = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: one valid pollfd; 100 ms so that `stop` is seen.
            if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
                continue;
            }
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.write_all(b"ok\n");
            }
        }
    })?;
    match ready_rx.recv() {
        Ok(ready) => ready.context("starting the backend server")?,
        // It could not enter the namespace: its result says why.
        Err(_) => match handle.join() {
            Ok(Err(err)) => return Err(err).context("starting the backend server"),
            _ => bail!("the backend server thread ended"),
        },
    }
    Ok(handle)
}

/// One connection from the client namespace: whether it was answered.
pub(super) fn probe(client_ns: &str, target: SocketAddr) -> bool {
    let ns = client_ns.to_string();
    netns::in_netns(&ns, move || one_connection(target).is_ok()).unwrap_or(false)
}

/// Connect, read the reply to its end, close; returns the time `connect` took
/// and the time of the whole connection.
fn one_connection(target: SocketAddr) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    let connected = start.elapsed();
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut reply = Vec::with_capacity(8);
    stream.read_to_end(&mut reply)?;
    if reply != b"ok\n" {
        bail!("unexpected reply {reply:?}");
    }
    drop(stream);
    Ok((connected, start.elapsed()))
}

/// The load generator: `warmup` then `count` connections, one after another, to
/// `target` from inside `client_ns`. Bounded by count and by a 1 s timeout each.
pub(super) fn connections(
    client_ns: &str,
    target: SocketAddr,
    warmup: u32,
    count: u32,
) -> Result<Connections> {
    Ok(netns::in_netns(client_ns, move || {
        pin_to_cpu(false);
        for _ in 0..warmup {
            let _ = one_connection(target);
        }
        let mut connect_us = Vec::with_capacity(count as usize);
        let mut whole_us = Vec::with_capacity(count as usize);
        let mut failures = 0;
        let start = Instant::now();
        for _ in 0..count {
            match one_connection(target) {
                Ok((connect, whole)) => {
                    connect_us.push(connect.as_secs_f64() * 1e6);
                    whole_us.push(whole.as_secs_f64() * 1e6);
                }
                Err(_) => failures += 1,
            }
        }
        Connections {
            elapsed: start.elapsed().as_secs_f64(),
            connect_us,
            whole_us,
            failures,
        }
    })?)
}
