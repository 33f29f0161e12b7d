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
/// Services the full-map fault makes.
const FILL: usize = 30;
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

/// Which faults run, and how often.
pub struct Selection {
    /// Only the faults whose name holds one of these (all when empty).
    pub only: Vec<String>,
    /// How many times each runs.
    pub repeat: usize,
}

impl Selection {
    /// The committed table holds one run of every fault; anything else is
    /// written apart from it.
    fn complete(&self) -> bool {
        self.only.is_empty() && self.repeat == 1
    }
}

/// Runs the suite; `outage` is how long the API server stays down.
pub fn run(outage: Duration, selection: &Selection) -> Result<()> {
    setup::run()?;
    let lab = Lab::new(LAB)?;
    if lab.state_dir().exists() || ferry_netns::exists(&lab.ns("fabric")) {
        lab.down()?;
    }
    lab.up(&workspace_root().join("deploy"))?;
    let _down = Down(&lab);
    let world = World::prepare(Lab::new(LAB)?)?;
    let mut rows = Vec::new();
    let faults: [(&str, Fault); 15] = [
        (
            "agent killed (SIGKILL), restarted by the kubelet",
            World::kill_agent,
        ),
        (
            "agent killed (SIGKILL) while it programs 300 new Services",
            World::kill_mid_round,
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
        (
            "maps resized under load (a rolling update carries every flow into new maps), then back",
            World::resize_under_load,
        ),
        (
            "services map full: agents resized to 64 entries, then 30 Services more",
            World::full_map,
        ),
        (
            "NAT ports exhausted: node1's range narrowed to 64 ports, then widened again",
            World::nat_exhaustion,
        ),
        (
            "conntrack full: agents resized to 1024 entries, 100 idle connections held, 10,000 UDP flows",
            World::conntrack_pressure,
        ),
    ];
    let chosen: Vec<(String, Fault)> = faults
        .into_iter()
        .map(|(name, fault)| {
            let name = name.replace("the outage", &format!("{} s", outage.as_secs()));
            (name, fault)
        })
        .filter(|(name, _)| {
            selection.only.is_empty() || selection.only.iter().any(|o| name.contains(o.as_str()))
        })
        .collect();
    if chosen.is_empty() {
        bail!("no fault's name holds any of {:?}", selection.only);
    }
    let mut failed = Vec::new();
    let runs = chosen
        .iter()
        .flat_map(|f| std::iter::repeat_n(f, selection.repeat));
    for (name, fault) in runs {
        let name = name.clone();
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
        let path = write_results(&rows, outage, selection)?;
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
            "--metrics-bind-address",
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
        Ok(match map_entries(&map) {
            Ok(n) => format!(
                "{n} NAT entries on node1 at the end (flows still open or in their close time)"
            ),
            Err(e) => format!("NAT entries not counted: {e:#}"),
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

    /// Creates 300 Services in one request and kills node1's agent while its
    /// rounds write them (some of them in its maps, not all). The agent that
    /// the kubelet starts adopts the half-written maps and finishes: node1's
    /// maps end as node2's, whose agent was not killed.
    fn kill_mid_round(&self, _: Duration) -> Result<String> {
        const COUNT: usize = 300;
        let lab = &self.lab;
        let before = self.gauge("node1", "ferry_frontends")?;
        let pid = lab.agent_pid("node1").context("no agent on node1")?;
        let names: Vec<String> = (0..COUNT).map(|i| format!("burst-{i}")).collect();
        let creating = {
            let lab = Lab::new(LAB)?;
            let list = web_services(&names);
            thread::spawn(move || lab.kubectl_stdin(&["apply", "-f", "-"], &list))
        };
        let mut in_maps = 0.0;
        wait_for(Duration::from_secs(120), || {
            in_maps = self.gauge("node1", "ferry_frontends")? - before;
            Ok(in_maps >= 10.0)
        })?;
        signal(pid, libc::SIGKILL);
        let killed_at = in_maps;
        creating
            .join()
            .map_err(|_| anyhow::anyhow!("kubectl apply panicked"))??;
        wait_for(Duration::from_secs(90), || {
            Ok(lab.agent_pid("node1").is_some_and(|p| p != pid))
        })?;
        let wanted = before + COUNT as f64;
        let counts = |node: &str| -> Result<Vec<usize>> {
            [
                proxy_common::map_names::SERVICES_V4,
                proxy_common::map_names::BACKENDS_V4,
                proxy_common::map_names::REVNAT_V4,
            ]
            .iter()
            .map(|map| map_entries(&lab.pin_dir(node).join(map)))
            .collect()
        };
        // Every Service in both nodes' maps, with its endpoints (they come in
        // EndpointSlices after the Services): node2's agent was not killed.
        let mut seen = (Vec::new(), Vec::new());
        let converged = wait_for(Duration::from_secs(90), || {
            if self.gauge("node1", "ferry_frontends")? != wanted
                || self.gauge("node2", "ferry_frontends")? != wanted
            {
                return Ok(false);
            }
            seen = (counts("node1")?, counts("node2")?);
            Ok(seen.0 == seen.1)
        });
        let mut args = vec!["delete", "service"];
        args.extend(names.iter().map(String::as_str));
        lab.kubectl(&args)?;
        // The next fault starts from the Services before this one.
        wait_for(Duration::from_secs(60), || {
            Ok(self.gauge("node1", "ferry_frontends")? == before
                && self.gauge("node2", "ferry_frontends")? == before)
        })?;
        let (node1, node2) = seen;
        converged.with_context(|| {
            format!(
                "node1's maps (services, backends, reverse NAT: {node1:?} entries) \
                 never matched node2's ({node2:?})"
            )
        })?;
        Ok(format!(
            "killed with {killed_at} of the {COUNT} in node1's maps; then node1's maps held \
             {} services-map entries, {} backends and {} frontends, as node2's",
            node1[0], node1[1], node1[2]
        ))
    }

    /// Shrinks every agent's services map to 64 entries (a rolling update of
    /// the DaemonSet: each agent carries its entries into a map of the new
    /// size), then creates 30 Services more than fit. Those that do not fit
    /// are refused, named in /metrics and /statusz; what was served stays
    /// served. Deleting the ones that fit makes room: the refused ones are
    /// programmed and answer. The agents go back to the default size.
    fn full_map(&self, _: Duration) -> Result<String> {
        let result = self.fill_services_map();
        // Whatever happened, the next fault starts from the default size and
        // without the fill Services.
        let names: Vec<String> = (0..FILL).map(|i| format!("fill-{i:02}")).collect();
        let mut args = vec!["delete", "service", "--ignore-not-found"];
        args.extend(names.iter().map(String::as_str));
        self.lab.kubectl(&args)?;
        self.lab.set_agent_args(&[])?;
        result
    }

    fn fill_services_map(&self) -> Result<String> {
        const COUNT: usize = FILL;
        let lab = &self.lab;
        lab.set_agent_args(&["--map-services".into(), "64".into()])?;
        let names: Vec<String> = (0..COUNT).map(|i| format!("fill-{i:02}")).collect();
        lab.kubectl_stdin(&["apply", "-f", "-"], &web_services(&names))?;
        let (mut refused, mut counted) = (Vec::new(), 0.0);
        wait_for(Duration::from_secs(60), || {
            refused = self.refused("node1")?;
            counted = self.gauge("node1", "ferry_frontends_refused_map_full")?;
            Ok(!refused.is_empty() && counted == refused.len() as f64)
        })
        .with_context(|| {
            format!(
                "node1 refused {refused:?} for a full map (/statusz), \
                 ferry_frontends_refused_map_full {counted}"
            )
        })?;
        let log = fs::read_to_string(lab.agent_log("node1")?)?;
        let first = &refused[0];
        let named = log.lines().any(|l| {
            l.contains("service not programmed") && l.contains(&format!("default/{first}"))
        });
        if !named {
            bail!("node1's log does not name the refused Service {first}");
        }
        // Room: every Service that fit goes.
        let fitted: Vec<String> = names
            .into_iter()
            .filter(|name| !refused.contains(name))
            .collect();
        let mut args = vec!["delete", "service"];
        args.extend(fitted.iter().map(String::as_str));
        lab.kubectl(&args)?;
        wait_for(Duration::from_secs(60), || {
            Ok(self.gauge("node1", "ferry_frontends_refused_map_full")? == 0.0)
        })
        .with_context(|| {
            format!(
                "node1 still refuses {:?} after the deletion",
                self.refused("node1").unwrap_or_default()
            )
        })?;
        let addr = SocketAddr::from((cluster_ip(lab, first)?, 80));
        let answer = lab::tcp_ask(&self.client_ns, addr, Duration::from_secs(2))
            .with_context(|| format!("{first}, refused before, once there was room"))?;
        Ok(format!(
            "{} of the {COUNT} refused on node1 (ferry_frontends_refused_map_full, /statusz, \
             the log: new ones not programmed, and those whose endpoints came after the \
             Service served without them); once the {} that fit were deleted, {first} \
             answered ({})",
            refused.len(),
            fitted.len(),
            answer.trim()
        ))
    }

    /// Narrows every agent's NAT-port range to 64 ports while the NodePort
    /// load needs hundreds (a new connection every 20 ms, each port held
    /// through its close time): node1 drops the flows that find no port and
    /// counts them per backend. Widening the range again ends the drops.
    fn nat_exhaustion(&self, _: Duration) -> Result<String> {
        let lab = &self.lab;
        let drops = || -> Result<f64> {
            Ok(lab::metric_sum(
                &self.metrics("node1")?,
                "ferry_nat_port_exhaustion_drops_total",
            ))
        };
        lab.set_agent_args(&["--nat-ports".into(), "61000-61063".into()])?;
        let mut dropped = 0.0;
        wait_for(Duration::from_secs(60), || {
            dropped = drops()?;
            Ok(dropped > 0.0)
        })?;
        thread::sleep(Duration::from_secs(5));
        let widened = Instant::now();
        lab.set_agent_args(&[])?;
        Ok(format!(
            "node1 counted {dropped} drops in ferry_nat_port_exhaustion_drops_total within \
             the first 10 s; the failures are the NodePort target's; the agents were back on \
             the full range {:.1} s after the widening started",
            widened.elapsed().as_secs_f64()
        ))
    }

    /// Shrinks every agent's conntrack map to 1024 entries (512 flows) and
    /// holds 100 TCP connections to the ClusterIP from the client pod, idle
    /// between requests 2 s apart, while 10,000 UDP flows go through: the
    /// least recently used entries, the idle connections' among them, are
    /// evicted. A held connection's next packet finds no entry and is
    /// scheduled again (counted as `fwd_new_mid_flow`); the flow hash picks
    /// the backend it had, so the connection goes on. The agents go back to
    /// the default size.
    fn conntrack_pressure(&self, _: Duration) -> Result<String> {
        const HELD: usize = 100;
        const UDP_FLOWS: usize = 10_000;
        const ROUNDS: usize = 15;
        let lab = &self.lab;
        lab.set_agent_args(&["--map-conntrack".into(), "1024".into()])?;
        let mid_flow_before = self.stat("node1", "fwd_new_mid_flow")?;
        let insert_drops_before = self.stat("node1", "drop_ct_insert")?;
        let web = SocketAddr::from((cluster_ip(lab, "web")?, 80));
        let dns = SocketAddr::from((cluster_ip(lab, "web")?, 53));
        let burst = ferry_netns::spawn_in(&self.client_ns, move || {
            let mut answered = 0;
            for _ in 0..UDP_FLOWS {
                let asked = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    s.send_to(b"who?", dns)?;
                    s.recv(&mut [0u8; 256])
                });
                answered += usize::from(asked.is_ok());
                thread::sleep(Duration::from_millis(2));
            }
            answered
        })?;
        let held = ferry_netns::in_netns(&self.client_ns, move || hold(web, HELD, ROUNDS))??;
        let udp_answered = burst
            .join()
            .map_err(|_| anyhow::anyhow!("the UDP burst panicked"))??;
        let mid_flow = self.stat("node1", "fwd_new_mid_flow")? - mid_flow_before;
        let insert_drops = self.stat("node1", "drop_ct_insert")? - insert_drops_before;
        lab.set_agent_args(&[])?;
        if mid_flow == 0 {
            bail!("no held connection's entries were evicted: the map was not under pressure");
        }
        Ok(format!(
            "{} of {HELD} held connections answered all {ROUNDS} rounds from their first pod, \
             {} answered from another pod, {} failed; node1 counted {mid_flow} packets in \
             fwd_new_mid_flow (their entries evicted, the flow scheduled again) and \
             {insert_drops} in drop_ct_insert (the LRU had no entry to give); \
             {udp_answered} of {UDP_FLOWS} UDP flows answered",
            held.kept,
            held.moved,
            HELD - held.kept - held.moved,
        ))
    }

    /// The conntrack, NAT and affinity maps change size while the load runs:
    /// each agent is replaced and the new one carries the old maps' entries
    /// over (`kernel::migrate`) while the old programs still run, as in an
    /// upgrade that changes a map's layout. Then back to the default sizes.
    fn resize_under_load(&self, _: Duration) -> Result<String> {
        let lab = &self.lab;
        let sizes = [
            "--map-conntrack",
            "131072",
            "--map-nat",
            "65536",
            "--map-affinity",
            "32768",
        ];
        let started = Instant::now();
        lab.set_agent_args(&sizes.map(String::from))?;
        let resized = started.elapsed();
        let entries = map_entries(
            &lab.pin_dir("node1")
                .join(proxy_common::map_names::CONNTRACK_V4),
        )?;
        lab.set_agent_args(&[])?;
        Ok(format!(
            "{} then back to the defaults by two rolling updates ({:.1} s and {:.1} s); \
             node1's conntrack map held {entries} entries at the new size",
            sizes.join(" "),
            resized.as_secs_f64(),
            (started.elapsed() - resized).as_secs_f64(),
        ))
    }

    /// A datapath counter of `node` (`proxy-agent inspect stats`).
    fn stat(&self, node: &str, name: &str) -> Result<u64> {
        let out = run_out(
            Command::new(image::agent_binary()?)
                .args(["inspect", "stats", "--pin-dir"])
                .arg(self.lab.pin_dir(node)),
        )?;
        out.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
            })
            .with_context(|| format!("no counter {name} in {node}'s stats:\n{out}"))
    }

    /// node1's or node2's /metrics, read from the fabric.
    fn metrics(&self, node: &str) -> Result<String> {
        let addr = SocketAddr::from((lab::node_addr(node)?, 10249));
        ferry_netns::in_netns(&self.lab.ns("fabric"), move || {
            lab::agent_get(addr, "/metrics")
        })?
    }

    fn gauge(&self, node: &str, name: &str) -> Result<f64> {
        lab::metric(&self.metrics(node)?, name)
            .with_context(|| format!("no {name} in {node}'s /metrics"))
    }

    /// The Services the agent of `node` refused for a full map (/statusz):
    /// new ones not programmed, and ones whose change (their endpoints,
    /// which come after the Service) did not fit, served as they were.
    fn refused(&self, node: &str) -> Result<Vec<String>> {
        let addr = SocketAddr::from((lab::node_addr(node)?, 10249));
        let status = ferry_netns::in_netns(&self.lab.ns("fabric"), move || {
            lab::agent_get(addr, "/statusz")
        })??;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        let mut names: Vec<String> = status["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let p = p.as_str()?;
                (p.contains("map is full") || p.contains("does not fit the")).then(|| {
                    p.split(':')
                        .next()?
                        .strip_prefix("default/")
                        .map(String::from)
                })?
            })
            .collect();
        names.sort();
        Ok(names)
    }
}

/// What held connections saw.
struct Held {
    /// Connections answered every round by the pod that greeted them.
    kept: usize,
    /// Answers from another pod than the greeting's.
    moved: usize,
}

/// Opens `count` TCP connections to `target`, then for `rounds` rounds two
/// seconds apart asks on each and checks the pod that answers is the one
/// that greeted it.
fn hold(target: SocketAddr, count: usize, rounds: usize) -> Result<Held> {
    use std::io::{BufRead, BufReader, Write as _};
    let pod = |line: &str| line.split_whitespace().next().unwrap_or("").to_string();
    let mut conns = Vec::new();
    for _ in 0..count {
        let stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        conns.push((stream, reader, pod(&greeting), true));
    }
    let mut moved = 0;
    for _ in 0..rounds {
        thread::sleep(Duration::from_secs(2));
        for (stream, reader, first, ok) in conns.iter_mut().filter(|c| c.3) {
            let mut line = String::new();
            let asked = stream
                .write_all(b"again\n")
                .and_then(|()| reader.read_line(&mut line));
            match asked {
                Ok(n) if n > 0 && pod(&line) == *first => {}
                Ok(n) if n > 0 => {
                    moved += 1;
                    *ok = false;
                }
                _ => *ok = false,
            }
        }
    }
    Ok(Held {
        kept: conns.iter().filter(|c| c.3).count(),
        moved,
    })
}

/// A List of Services named `names`, each port 80 of the web pods: one
/// `kubectl apply` makes them all.
fn web_services(names: &[String]) -> String {
    let items: Vec<_> = names
        .iter()
        .map(|name| {
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name},
                   "spec": {"selector": {"app": "web"}, "ports": [
                       {"name": "http", "port": 80, "targetPort": "tcp", "protocol": "TCP"}]}})
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// How many entries the pinned map at `path` holds.
fn map_entries(path: &std::path::Path) -> Result<usize> {
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()?;
    serde_json::from_slice::<serde_json::Value>(&dump.stdout)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .with_context(|| {
            format!(
                "bpftool map dump {}: {}",
                path.display(),
                String::from_utf8_lossy(&dump.stderr).trim()
            )
        })
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

fn write_results(rows: &[Row], outage: Duration, selection: &Selection) -> Result<PathBuf> {
    let mut md = String::from("# Faults under load\n\n");
    let mut command = format!("cargo xtask faults --outage-seconds {}", outage.as_secs());
    for only in &selection.only {
        let _ = write!(command, " --only '{only}'");
    }
    if selection.repeat != 1 {
        let _ = write!(command, " --repeat {}", selection.repeat);
    }
    md.push_str(&crate::bench::header(&command)?);
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
    let path = if selection.complete() {
        workspace_root().join("bench/results/faults.md")
    } else {
        workspace_root().join("target/faults-selected.md")
    };
    fs::write(&path, md)?;
    Ok(path)
}
