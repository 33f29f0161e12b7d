//! Network namespaces for Ferry's lab (`cargo xtask lab`), its benches and the
//! agent's privileged tests: the one place that creates and deletes them (only
//! with the project's prefix), enters them from a thread, and wires a pod to a
//! node with a veth pair.
//!
//! Everything here acts inside namespaces named `ferry*`; nothing touches the
//! machine's own namespace, routes, firewall or sysctls.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::Command,
    thread,
};

/// What every namespace made here starts with (`ferry-<lab>-...`,
/// `ferry-t<pid>-...`, `ferry-bench-...`).
pub const PREFIX: &str = "ferry";

/// Runs `ip` with `args`; returns its stdout, fails with its stderr.
pub fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program` to run inside namespace `ns` (`ip netns exec`, which execs it: the
/// child's pid is the program's own).
pub fn exec(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// `program` run with only its network namespace switched to `ns`
/// (`nsenter --net`): unlike [`exec`], it keeps the machine's mounts, so an
/// agent started this way pins its maps on the machine's bpffs.
pub fn enter(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
    cmd
}

fn check_prefix(name: &str) -> io::Result<()> {
    if name.starts_with(PREFIX) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "namespace {name}: only namespaces named {PREFIX}* are made or removed here"
        )))
    }
}

/// Names the network namespace of process `pid` `name` (which must start with
/// [`PREFIX`]), as `ip netns attach` does: a namespace made by someone else
/// (a container runtime) becomes reachable as any other here.
pub fn attach(name: &str, pid: i32) -> io::Result<()> {
    check_prefix(name)?;
    ip(&["netns", "attach", name, &pid.to_string()])?;
    Ok(())
}

/// Creates namespace `name` (which must start with [`PREFIX`]) with loopback up.
pub fn add(name: &str) -> io::Result<()> {
    check_prefix(name)?;
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"]).map(drop)
}

/// Deletes namespace `name` (which must start with [`PREFIX`]), and with it its
/// interfaces and their tc filters.
pub fn delete(name: &str) -> io::Result<()> {
    check_prefix(name)?;
    ip(&["netns", "del", name]).map(drop)
}

/// The namespaces whose names start with `prefix` (itself starting with [`PREFIX`]).
pub fn list(prefix: &str) -> io::Result<Vec<String>> {
    check_prefix(prefix)?;
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(prefix))
        .map(String::from)
        .collect())
}

/// Deletes every namespace whose name starts with `prefix`.
pub fn delete_all(prefix: &str) -> io::Result<()> {
    for ns in list(prefix)? {
        delete(&ns)?;
    }
    Ok(())
}

/// Whether namespace `name` exists.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Starts a thread that enters network namespace `ns` (only the network
/// namespace: the machine's mounts stay visible) and then runs `f`. Sockets
/// made there stay in that namespace wherever they are used afterwards. The
/// thread ends with an error, without running `f`, if it cannot enter.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<thread::JoinHandle<io::Result<T>>> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    Ok(thread::spawn(move || {
        // SAFETY: setns on this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("setns {path}: {err}")));
        }
        Ok(f())
    }))
}

/// Runs `f` on a thread inside network namespace `ns` (see [`spawn_in`]) and
/// waits for it. A panic in `f` continues on the caller's thread, with its
/// message.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    match spawn_in(ns, f)?.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// How a pod is connected to its node: a veth with `eth0` in `pod_ns` and
/// `host_if` in `node_ns`; the pod holds `addrs` as /32s and reaches
/// everything through `gateway`, which the node's side answers as. A
/// dual-stack pod also holds `addrs6` as /128s, reached through `gateway6`.
pub struct PodLink<'a> {
    pub pod_ns: &'a str,
    pub node_ns: &'a str,
    pub host_if: &'a str,
    pub addrs: &'a [Ipv4Addr],
    pub gateway: Ipv4Addr,
    pub addrs6: &'a [Ipv6Addr],
    pub gateway6: Option<Ipv6Addr>,
    /// Whether the pod's `eth0` sends complete checksums, as a real wire
    /// carries them (see [`like_a_wire`]); the lab and the benches want that,
    /// the agent's privileged tests keep the veth's default.
    pub full_checksums: bool,
}

/// Connects a pod to its node as a node connects a pod: the veth, the pod's
/// addresses, the gateway on the node's side, routes both ways.
pub fn wire_pod(link: &PodLink) -> io::Result<()> {
    let PodLink {
        pod_ns,
        node_ns,
        host_if,
        ..
    } = *link;
    ip(&[
        "link", "add", "eth0", "netns", pod_ns, "type", "veth", "peer", "name", host_if, "netns",
        node_ns,
    ])?;
    for addr in link.addrs {
        let addr = format!("{addr}/32");
        ip(&["-n", pod_ns, "addr", "add", &addr, "dev", "eth0"])?;
    }
    ip(&["-n", pod_ns, "link", "set", "eth0", "up"])?;
    if link.full_checksums {
        like_a_wire(pod_ns, "eth0")?;
    }
    let gw = link.gateway.to_string();
    ip(&[
        "-n", pod_ns, "route", "add", &gw, "dev", "eth0", "scope", "link",
    ])?;
    ip(&[
        "-n", pod_ns, "route", "add", "default", "via", &gw, "dev", "eth0",
    ])?;
    let gw32 = format!("{gw}/32");
    ip(&["-n", node_ns, "addr", "add", &gw32, "dev", host_if])?;
    ip(&["-n", node_ns, "link", "set", host_if, "up"])?;
    for addr in link.addrs {
        let addr = format!("{addr}/32");
        ip(&["-n", node_ns, "route", "add", &addr, "dev", host_if])?;
    }
    if let Some(gw6) = link.gateway6 {
        wire_pod6(link, &gw6.to_string())?;
    }
    Ok(())
}

/// The IPv6 half of [`wire_pod`]: addresses without duplicate detection (a
/// tentative address cannot be used yet), the gateway on every pod link as
/// for IPv4.
fn wire_pod6(link: &PodLink, gw: &str) -> io::Result<()> {
    let (pod_ns, node_ns, host_if) = (link.pod_ns, link.node_ns, link.host_if);
    for addr in link.addrs6 {
        let addr = format!("{addr}/128");
        ip(&[
            "-n", pod_ns, "-6", "addr", "add", &addr, "dev", "eth0", "nodad",
        ])?;
    }
    ip(&[
        "-n", pod_ns, "-6", "route", "add", gw, "dev", "eth0", "scope", "link",
    ])?;
    ip(&[
        "-n", pod_ns, "-6", "route", "add", "default", "via", gw, "dev", "eth0",
    ])?;
    let gw128 = format!("{gw}/128");
    ip(&[
        "-n", node_ns, "-6", "addr", "add", &gw128, "dev", host_if, "nodad",
    ])?;
    for addr in link.addrs6 {
        let addr = format!("{addr}/128");
        ip(&["-n", node_ns, "-6", "route", "add", &addr, "dev", host_if])?;
    }
    Ok(())
}

/// Runs `ethtool` with `args` inside `ns`.
pub fn ethtool(ns: &str, args: &[&str]) -> io::Result<()> {
    let out = exec(ns, "ethtool").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ethtool {} in {ns} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Makes a veth send what a real wire carries: complete checksums. Otherwise
/// the sender's kernel leaves them to "hardware" (CHECKSUM_PARTIAL), which
/// veth passes on as is, and an XDP program on the far side, which cannot see
/// that state, would update a partial checksum as if it were complete.
pub fn like_a_wire(ns: &str, dev: &str) -> io::Result<()> {
    ethtool(ns, &["-K", dev, "tx", "off"])
}

/// Sets a sysctl inside namespace `ns` only (`sysctl -qw key=value` there).
pub fn sysctl(ns: &str, setting: &str) -> io::Result<()> {
    let out = exec(ns, "sysctl").args(["-qw", setting]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "sysctl {setting} in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
