//! `cargo xtask faults`: the fault suite. Brings up a lab of its own (the
//! DaemonSet under real kubelets), runs the load ([`load`]) through a
//! ClusterIP (TCP and UDP), a NodePort SNATed to a backend on the other node
//! and a ClientIP-affinity Service, and during each fault counts the requests
//! sent, failed and reset and the time to recover; writes the table to
//! `bench/results/faults.md` and takes the lab down, also on failure.

mod load;

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{
    demo::{cluster_ip, wait_for_endpoints},
    image,
    lab::{self, Lab},
    setup,
    sys::workspace_root,
};
use load::{Kind, Tally, Target};

const LAB: &str = "ferry-faults";
const NODE_PORT: u16 = 30091;
/// Load before each fault, and after it once it is over.
const BASELINE: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(5);

/// What one fault did to the load.
struct Row {
    fault: String,
    tally: Tally,
    note: String,
}

/// The lab and the load's targets.
struct World {
    lab: Lab,
    targets: Vec<Target>,
    client_ns: String,
    client_addr: Ipv4Addr,
}

/// Takes the lab down when dropped: also when a fault step fails.
struct Down<'a>(&'a Lab);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        if std::env::var_os("FERRY_LAB_KEEP_ON_FAILURE").is_some() && std::thread::panicking() {
            return;
        }
        if let Err(e) = self.0.down() {
            eprintln!("faults: taking the lab down: {e:#}");
        }
    }
}

/// Runs the suite; `outage` is how long the API server stays down.
pub fn run(outage: Duration) -> Result<()> {
    setup::run()?;
    let lab = Lab::new(LAB)?;
    if lab.state_dir().exists() || ferry_netns::exists(&lab.ns("fabric")) {
        lab.down()?;
    }
    lab.up(&workspace_root().join("deploy"))?;
    let _down = Down(&lab);
    let world = World::prepare(Lab::new(LAB)?)?;
    let mut rows = Vec::new();
    let faults: [(&str, Fault); 10] = [
        (
            "agent killed (SIGKILL), restarted by the kubelet",
            World::kill_agent,
        ),
        (
            "agent stopped while Services and endpoints change, then started",
            World::agent_down_during_changes,
        ),
        (
            "API server stopped for the outage, then started",
            World::api_outage,
        ),
        ("etcd stopped for 10 s, then started", World::etcd_restart),
        (
            "API server down while the agent starts",
            World::api_down_at_start,
        ),
        (
            "rolling replacement of every backend",
            World::rolling_replacement,
        ),
        ("a backend killed (SIGKILL)", World::kill_backend),
        (
            "Ferry's tc filters removed from the client pod's interface",
            World::remove_filters,
        ),
        ("a second agent started on node1", World::second_agent),
        (
            "NodePort connections to a remote backend for 200 s (about twice the NAT port range)",
            World::nat_port_stream,
        ),
    ];
    let mut failed = Vec::new();
    for (name, fault) in faults {
        let name = name.replace("the outage", &format!("{} s", outage.as_secs()));
        // A fault that could not be carried out is a row saying so; the
        // others still run. The table is written after each.
        let row = world
            .measure(&name, |w| fault(w, outage))
            .unwrap_or_else(|e| {
                failed.push(name.clone());
                Row {
                    fault: name.clone(),
                    tally: Tally::default(),
                    note: format!("NOT CARRIED OUT: {e:#}"),
                }
            });
        rows.push(row);
        let path = write_results(&rows, outage)?;
        eprintln!("faults: {}", path.display());
    }
    if !failed.is_empty() {
        bail!("faults not carried out: {}", failed.join("; "));
    }
    Ok(())
}

type Fault = fn(&World, Duration) -> Result<String>;

impl World {
    /// Pods, Services and the load's targets; checks every target answers.
    fn prepare(lab: Lab) -> Result<Self> {
        let web = [("app".to_string(), "web".to_string())];
        let client = lab.pod_add("client", "node1", &[])?;
        for pod in ["web-1", "web-2"] {
            lab.pod_add(pod, "node2", &web)?;
        }
        let port = |name: &str, port: u16, target: &str, protocol: &str| json!({"name": name, "port": port, "targetPort": target, "protocol": protocol});
        for (name, spec) in [
            (
                "web",
                json!({"selector": {"app": "web"}, "ports": [
                    port("http", 80, "tcp", "TCP"), port("dns", 53, "udp", "UDP")]}),
            ),
            (
                "sticky",
                json!({"selector": {"app": "web"}, "sessionAffinity": "ClientIP",
                       "ports": [port("http", 80, "tcp", "TCP")]}),
            ),
            (
                "np",
                json!({"type": "NodePort", "selector": {"app": "web"},
                       "ports": [{"name": "http", "port": 80, "targetPort": "tcp",
                                  "nodePort": NODE_PORT, "protocol": "TCP"}]}),
            ),
        ] {
            apply_service(&lab, name, spec)?;
            wait_for_endpoints(&lab, name, 2)?;
        }
        let client_ns = lab.pod_ns("client");
        let node1 = lab::node_addr("node1")?;
        let target = |name, ns: &str, addr: Ipv4Addr, port, kind, affine| Target {
            name,
            ns: ns.to_string(),
            addr: SocketAddr::from((addr, port)),
            kind,
            affine,
        };
        let targets = vec![
            target(
                "ClusterIP tcp",
                &client_ns,
                cluster_ip(&lab, "web")?,
                80,
                Kind::Tcp,
                false,
            ),
            target(
                "ClusterIP udp",
                &client_ns,
                cluster_ip(&lab, "web")?,
                53,
                Kind::Udp,
                false,
            ),
            target(
                "affinity",
                &client_ns,
                cluster_ip(&lab, "sticky")?,
                80,
                Kind::Tcp,
                true,
            ),
            target(
                "NodePort to node2 (SNAT)",
                &lab.ns("ext"),
                node1,
                NODE_PORT,
                Kind::Tcp,
                false,
            ),
        ];
        let world = Self {
            lab,
            targets,
            client_ns,
            client_addr: client.addr,
        };
        let row = world.measure("baseline", |_| Ok(String::new()))?;
        if row.tally.failed > 0 || row.tally.sent == 0 {
            bail!("the load fails without a fault: {:?}", row.tally);
        }
        Ok(world)
    }

    /// Runs the load, then `fault`, then the load a while longer; tallies
    /// what happened from the fault's start.
    fn measure(&self, name: &str, fault: impl FnOnce(&World) -> Result<String>) -> Result<Row> {
        eprintln!("faults: {name}");
        let running = load::start(&self.targets);
        thread::sleep(BASELINE);
        let start = Instant::now();
        let note = fault(self);
        thread::sleep(SETTLE);
        let samples = running.stop();
        let tally = load::tally(&samples, start);
        let note = note.with_context(|| {
            format!(
                "fault {name:?} ({} requests, {} failed meanwhile)",
                tally.sent, tally.failed
            )
        })?;
        eprintln!(
            "faults: {name}: {} requests, {} failed, {} reset, recovered in {:?}{}",
            tally.sent,
            tally.failed,
            tally.reset,
            tally.recovered_in,
            if note.is_empty() {
                String::new()
            } else {
                format!("; {note}")
            }
        );
        for failure in &tally.first_failures {
            eprintln!("faults:   first failure {failure}");
        }
        Ok(Row {
            fault: name.to_string(),
            tally,
            note,
        })
    }

    fn kill_agent(&self, _: Duration) -> Result<String> {
        let pid = self.lab.agent_pid("node1").context("no agent on node1")?;
        let killed = Instant::now();
        signal(pid, libc::SIGKILL);
        let back = wait_for(Duration::from_secs(90), || {
            Ok(self.lab.agent_pid("node1").is_some_and(|p| p != pid))
        })?;
        Ok(format!(
            "the kubelet restarted it; Ready again {:.1} s after the kill",
            (back - killed).as_secs_f64()
        ))
    }

    fn agent_down_during_changes(&self, _: Duration) -> Result<String> {
        let lab = &self.lab;
        lab.stop_agent("node1")?;
        // A new backend, one Terminating (it serves on through its grace
        // period), a new Service.
        lab.pod_add("web-3", "node2", &[("app".into(), "web".into())])?;
        lab.pod_terminate("web-1")?;
        apply_service(
            lab,
            "late",
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "tcp"}]}),
        )?;
        wait_for_endpoints(lab, "late", 2)?;
        thread::sleep(Duration::from_secs(5));
        lab.start_agent("node1", &[])?;
        let late = SocketAddr::from((cluster_ip(lab, "late")?, 80));
        let answer = lab::tcp_ask(&self.client_ns, late, Duration::from_secs(3))?;
        lab.pod_del("web-1")?;
        wait_for_endpoints(lab, "web", 2)?;
        Ok(format!(
            "down 5 s while web-3 came, web-1 went Terminating and Service late was made; \
             late answered once the agent was back ({})",
            answer.trim()
        ))
    }

    fn api_outage(&self, outage: Duration) -> Result<String> {
        let halted = self.lab.halt("kube-apiserver")?;
        thread::sleep(outage);
        halted.resume()?;
        let back = self.wait_api()?;
        Ok(format!(
            "the API server answered {:.1} s after its start",
            back.as_secs_f64()
        ))
    }

    fn etcd_restart(&self, _: Duration) -> Result<String> {
        let halted = self.lab.halt("etcd")?;
        thread::sleep(Duration::from_secs(10));
        halted.resume()?;
        let back = self.wait_api()?;
        Ok(format!(
            "the API server answered {:.1} s after etcd's start",
            back.as_secs_f64()
        ))
    }

    fn api_down_at_start(&self, _: Duration) -> Result<String> {
        let pid = self.lab.agent_pid("node1").context("no agent on node1")?;
        let halted = self.lab.halt("kube-apiserver")?;
        signal(pid, libc::SIGKILL);
        // The kubelet restarts the container without the API server.
        thread::sleep(Duration::from_secs(20));
        halted.resume()?;
        self.wait_api()?;
        let answered = Instant::now();
        // Ready needs the API server (the kubelet reports it there).
        let ready = wait_for(Duration::from_secs(90), || {
            Ok(self.lab.agent_pid("node1").is_some_and(|p| p != pid))
        })?;
        Ok(format!(
            "the agent was killed as the API server stopped, 20 s before it came back; \
             Ready {:.1} s after the API server answered",
            (ready - answered).as_secs_f64()
        ))
    }

    fn rolling_replacement(&self, _: Duration) -> Result<String> {
        let lab = &self.lab;
        let old: Vec<String> = lab
            .pods()?
            .into_keys()
            .filter(|p| p.starts_with("web-"))
            .collect();
        let web = [("app".to_string(), "web".to_string())];
        let new = ["web-4", "web-5"];
        for pod in new {
            lab.pod_add(pod, "node2", &web)?;
        }
        wait_for_endpoints(lab, "web", old.len() + new.len())?;
        for pod in &old {
            lab.pod_terminate(pod)?;
        }
        wait_for_endpoints(lab, "web", new.len())?;
        thread::sleep(Duration::from_secs(2));
        for pod in &old {
            lab.pod_del(pod)?;
        }
        Ok(format!(
            "{} added and Ready, then {} Terminating, then deleted",
            new.join(", "),
            old.join(", ")
        ))
    }

    fn kill_backend(&self, _: Duration) -> Result<String> {
        self.lab.pod_kill("web-4", "node2")?;
        let killed = Instant::now();
        let out = wait_for(Duration::from_secs(60), || {
            Ok(self.lab.ready_endpoints("web")?.len() < 2)
        });
        let note = match out {
            Ok(at) => format!(
                "its endpoint was not ready {:.1} s after the kill (the kubelet restarts it)",
                (at - killed).as_secs_f64()
            ),
            Err(_) => "its endpoint stayed ready (the container restarted at once)".to_string(),
        };
        wait_for_endpoints(&self.lab, "web", 2)?;
        Ok(note)
    }

    fn remove_filters(&self, _: Duration) -> Result<String> {
        let node = self.lab.node_ns("node1");
        let route = run_out(Command::new("ip").args([
            "-n",
            &node,
            "route",
            "get",
            &self.client_addr.to_string(),
        ]))?;
        let dev = route
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .context("no route to the client pod")?
            .to_string();
        let tc = |args: &[&str]| {
            run_out(
                Command::new("ip")
                    .args(["netns", "exec", &node, "tc", "filter"])
                    .args(args),
            )
        };
        for hook in ["ingress", "egress"] {
            tc(&["del", "dev", &dev, hook])?;
        }
        let removed = Instant::now();
        let back = wait_for(Duration::from_secs(60), || {
            Ok(tc(&["show", "dev", &dev, "ingress"])?.contains("from_pod"))
        })?;
        Ok(format!(
            "put back by the agent's resync {:.1} s after their removal",
            (back - removed).as_secs_f64()
        ))
    }

    fn second_agent(&self, _: Duration) -> Result<String> {
        let binary = image::agent_binary()?;
        let empty = std::env::temp_dir().join(format!("{LAB}-services.json"));
        fs::write(&empty, r#"{"services": []}"#)?;
        // In node1's network namespace with the machine's mounts (its
        // bpffs), as a second agent pod would run: `ip netns exec` would
        // give it a /sys without the bpffs, and pins of its own.
        let mut cmd = ferry_netns::enter(&self.lab.node_ns("node1"), &binary);
        cmd.args([
            "run",
            "--uplink-iface",
            "none",
            "--healthz-bind-address",
            "off",
        ])
        .arg("--services-file")
        .arg(&empty)
        .arg("--pin-dir")
        .arg(self.lab.pin_dir("node1"))
        .env("FERRY_SOCKET_LB", "off");
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting a second agent")?;
        // It must give up after its 5 s wait for the lock; one that runs is
        // stopped (SIGTERM: its exit leaves the maps and programs alone).
        let exited = wait_for(Duration::from_secs(20), || Ok(child.try_wait()?.is_some()));
        if exited.is_err() {
            signal(child.id(), libc::SIGTERM);
        }
        let out = child.wait_with_output()?;
        let _ = fs::remove_file(&empty);
        let said = String::from_utf8_lossy(&out.stderr);
        let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
        let refusal = said
            .lines()
            .find(|l| l.contains("another agent") || l.contains("Error"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if exited.is_err() {
            bail!(
                "the second agent ran (it was stopped after 20 s); /proc/locks:\n{locks}\n{said}"
            );
        }
        Ok(format!("it exited ({}): {refusal}", out.status))
    }

    /// No fault: the load goes on long enough that the NodePort target's
    /// connections (one every 20 ms, each SNATed to node2 on a NAT port of
    /// node1's 61000-65535) need every NAT port about twice over.
    fn nat_port_stream(&self, _: Duration) -> Result<String> {
        thread::sleep(Duration::from_secs(200));
        let map = self
            .lab
            .pin_dir("node1")
            .join(proxy_common::map_names::NAT_V4);
        let dump = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&map)
            .output()?;
        let entries = serde_json::from_slice::<serde_json::Value>(&dump.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len));
        Ok(match entries {
            Some(n) => format!(
                "{n} NAT entries on node1 at the end (flows still open or in their close time)"
            ),
            None => format!(
                "NAT entries not counted: bpftool said {}",
                String::from_utf8_lossy(&dump.stdout).trim()
            ),
        })
    }

    /// Waits until the API server answers; returns how long that took.
    fn wait_api(&self) -> Result<Duration> {
        let start = Instant::now();
        wait_for(Duration::from_secs(120), || {
            Ok(self.lab.kubectl(&["get", "--raw", "/readyz"]).is_ok())
        })?;
        Ok(start.elapsed())
    }
}

fn apply_service(lab: &Lab, name: &str, spec: serde_json::Value) -> Result<()> {
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    });
    lab.kubectl_stdin(&["apply", "-f", "-"], &manifest.to_string())?;
    Ok(())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: a signal to a process of the lab's (an agent container's).
    unsafe { libc::kill(pid as i32, sig) };
}

/// Polls `done` until it holds (returns when) or `timeout` passes.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if done().unwrap_or(false) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("not done in {} s", timeout.as_secs());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn run_out(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_results(rows: &[Row], outage: Duration) -> Result<PathBuf> {
    let mut md = String::from("# Faults under load\n\n");
    md.push_str(&crate::bench::header(&format!(
        "cargo xtask faults --outage-seconds {}",
        outage.as_secs()
    ))?);
    md.push_str(
        "\nThe lab (two nodes and the control-plane node, the DaemonSet under real\n\
         kubelets) with a client pod on node1 and the backends on node2. Through each\n\
         fault a load runs from the client pod to a ClusterIP (a new TCP connection\n\
         every 20 ms, and a UDP datagram from a new socket every 20 ms) and to a\n\
         ClientIP-affinity Service, and from outside to a NodePort of node1 (SNATed\n\
         to node2): each request must be answered by a pod within 1 s. Counted from\n\
         the fault's start to 5 s after its end; `recovered in` is from the fault's\n\
         start to the first answer after the last failure. `failed` includes\n\
         `reset`; `affinity moved` counts affinity answers from another pod than the\n\
         one before (legitimate only when that pod went).\n\n\
         | fault | requests | failed | reset | affinity moved | recovered in | what happened |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for row in rows {
        let t = &row.tally;
        let recovered = t
            .recovered_in
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let mut note = row.note.clone();
        if !t.first_failures.is_empty() {
            let _ = write!(note, "; first failures: {}", t.first_failures.join(", "));
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {recovered} | {} |",
            row.fault,
            t.sent,
            t.failed,
            t.reset,
            t.moved,
            note.replace('|', "/")
        );
    }
    let path = workspace_root().join("bench/results/faults.md");
    fs::write(&path, md)?;
    Ok(path)
}
