//! Ferry against kube-proxy's dataplanes on the same traffic, in one run.
//!
//! A node namespace routes between a client pod and a backend pod (ten
//! addresses, one server). For each number of Services, kube-proxy's rule set
//! (iptables mode through both iptables backends, and nftables mode) is loaded
//! into a fresh node namespace, or Ferry's agent serves the same Services from a
//! file; the same load generator then opens TCP connections from the client to
//! the first, the middle and the last Service, one at a time, and records how
//! long `connect` took (the SYN's trip through the node's NAT, the SYN-ACK back)
//! and how many whole connections (connect, a reply, close) a second it makes.
//! Separately, the time `iptables-restore` and `nft -f` take to load each full
//! rule set and to apply a one-Service change.
//!
//! Everything happens in namespaces named `ferry-bench-*`, which are removed
//! afterwards, also when the run fails.

use std::{
    fmt::Write as _,
    fs,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ferry_netns as netns;

mod topology;

use topology::{connections, Topology};

use super::kube_proxy_rules::{self as rules, ServicePort};

const PREFIX: &str = "ferry-bench-";
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const CLIENT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const BACKEND_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
const BACKEND_PORT: u16 = 8080;
const BACKENDS: u8 = 10;
const PIN_DIR: &str = "/sys/fs/bpf/ferry-bench";

/// The dataplanes compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ferry,
    /// Ferry with `--socket-lb all`: the client's connect() is translated
    /// by the cgroup hook, and its packets pass the tc program untranslated.
    FerrySocket,
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl Mode {
    const ALL: [Self; 5] = [
        Self::Ferry,
        Self::FerrySocket,
        Self::IptablesLegacy,
        Self::IptablesNft,
        Self::Nftables,
    ];

    /// Short name in the namespaces of this mode's topology.
    fn tag(self) -> &'static str {
        match self {
            Self::Ferry => "ferry",
            Self::FerrySocket => "ferrysock",
            Self::IptablesLegacy => "ipt",
            Self::IptablesNft => "iptnft",
            Self::Nftables => "nft",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Ferry => "Ferry",
            Self::FerrySocket => "Ferry, socket-lb=all",
            Self::IptablesLegacy => "kube-proxy iptables (legacy)",
            Self::IptablesNft => "kube-proxy iptables (nft backend)",
            Self::Nftables => "kube-proxy nftables",
        }
    }

    /// The command that loads a rule file given on stdin, and its arguments for
    /// a full load and for a partial one.
    fn loader(
        self,
    ) -> Option<(
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    )> {
        match self {
            Self::Ferry | Self::FerrySocket => None,
            Self::IptablesLegacy => Some(("iptables-legacy-restore", &[], &["--noflush"])),
            Self::IptablesNft => Some(("iptables-nft-restore", &[], &["--noflush"])),
            Self::Nftables => Some(("nft", &["-f", "-"], &["-f", "-"])),
        }
    }
}

/// Where in the list of Services the dialled one sits (kube-proxy's iptables
/// mode walks KUBE-SERVICES in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    First,
    Middle,
    Last,
}

impl Position {
    const ALL: [Self; 3] = [Self::First, Self::Middle, Self::Last];

    fn index(self, count: u32) -> u32 {
        match self {
            Self::First => 0,
            Self::Middle => count / 2,
            Self::Last => count - 1,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Middle => "middle",
            Self::Last => "last",
        }
    }
}

/// What the load generator saw for one Service.
#[derive(Clone, Debug)]
pub struct Connections {
    /// `connect` times, sorted, in microseconds.
    pub connect_us: Vec<f64>,
    /// Whole connections (connect, reply, close), sorted, in microseconds.
    pub whole_us: Vec<f64>,
    pub failures: u32,
    /// Seconds the measured connections took, one after another.
    pub elapsed: f64,
}

impl Connections {
    /// Whole connections a second at the median connection time: what one
    /// client gets, without the stalls that other work on a shared machine
    /// puts into some connections.
    pub fn rate(&self) -> f64 {
        1e6 / percentile(&self.whole_us, 0.5)
    }

    /// Whole connections a second over the run, stalls included.
    pub fn throughput(&self) -> f64 {
        self.connect_us.len() as f64 / self.elapsed
    }

    fn percentile(&self, p: f64) -> f64 {
        percentile(&self.connect_us, p)
    }
}

/// The value below which `p` (0..=1) of the sorted `values` lie (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub struct Settings {
    pub scales: Vec<u32>,
    /// Rounds over every dataplane and Service, so that whatever else the
    /// machine does falls on all of them alike.
    pub rounds: u32,
    /// Connections per dataplane and Service in each round, after `warmup`.
    pub batch: u32,
    pub warmup: u32,
    pub load_repeats: u32,
    pub change_repeats: u32,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                scales: vec![100, 1_000],
                rounds: 4,
                batch: 100,
                warmup: 10,
                load_repeats: 2,
                change_repeats: 3,
            }
        } else {
            Self {
                scales: vec![100, 1_000, 10_000],
                rounds: 10,
                batch: 300,
                warmup: 10,
                // nft takes over a minute for 10k Services' rules here.
                load_repeats: 3,
                change_repeats: 10,
            }
        }
    }
}

fn backends() -> Vec<(Ipv4Addr, u16)> {
    (0..BACKENDS)
        .map(|i| (Ipv4Addr::new(10, 244, 2, 10 + i), BACKEND_PORT))
        .collect()
}

fn in_ns(ns: &str, program: &str) -> Command {
    netns::exec(ns, program)
}

/// Runs `cmd` with `input` on stdin; fails with its stderr.
pub(super) fn run_with_input(cmd: &mut Command, input: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// Removes every namespace and pin a run of this benchmark may have left (tc
/// filters go with their namespaces).
pub fn clean_leftovers() {
    let _ = fs::remove_dir_all(PIN_DIR);
    topology::remove_cgroups();
    for ns in netns::list(PREFIX).unwrap_or_default() {
        let _ = netns::delete(&ns);
    }
}

/// One row of the traffic table.
pub struct TrafficRow {
    pub services: u32,
    pub mode: Mode,
    pub position: Position,
    pub result: Connections,
}

/// One row of the rule-loading table (seconds, sorted).
pub struct LoadRow {
    pub services: u32,
    pub mode: Mode,
    pub full: Vec<f64>,
    pub change: Vec<f64>,
    pub rules: usize,
}

/// Measures every mode at every scale on the same traffic. At each scale the
/// four dataplanes stand side by side, each in its own namespaces, and the
/// load generator visits them in turn, round after round.
pub fn traffic(settings: &Settings, agent_bin: &Path, scratch: &Path) -> Result<Vec<TrafficRow>> {
    let mut rows = Vec::new();
    for &count in &settings.scales {
        let services = rules::services(count, &backends());
        let mut topologies = Vec::new();
        for mode in Mode::ALL {
            eprintln!("bench: {count} Services, {}", mode.label());
            let mut topo = Topology::new(mode.tag(), mode == Mode::FerrySocket)?;
            match mode.loader() {
                None => topo.start_agent(
                    agent_bin,
                    &services,
                    &scratch.join(format!("services-{}.json", mode.tag())),
                )?,
                Some((program, full_args, _)) => {
                    let text = match mode {
                        Mode::Nftables => rules::nft_full(&services, &[]),
                        _ => rules::iptables_full(&services),
                    };
                    run_with_input(in_ns(topo.node(), program).args(full_args), &text)?;
                }
            }
            topologies.push((mode, topo));
        }
        let mut results: Vec<(Mode, Position, Connections)> = Vec::new();
        for round in 0..settings.rounds {
            eprintln!(
                "bench: {count} Services, round {}/{}",
                round + 1,
                settings.rounds
            );
            for (mode, topo) in &topologies {
                for position in Position::ALL {
                    let svc = &services[position.index(count) as usize];
                    let target = SocketAddr::from((svc.vip, svc.port));
                    let batch = {
                        let _joined = topo.join()?;
                        connections(topo.client(), target, settings.warmup, settings.batch)?
                    };
                    match results
                        .iter_mut()
                        .find(|(m, p, _)| m == mode && *p == position)
                    {
                        Some((_, _, all)) => {
                            all.connect_us.extend(batch.connect_us);
                            all.whole_us.extend(batch.whole_us);
                            all.failures += batch.failures;
                            all.elapsed += batch.elapsed;
                        }
                        None => results.push((*mode, position, batch)),
                    }
                }
            }
        }
        drop(topologies);
        for (mode, position, mut result) in results {
            if result.connect_us.is_empty() {
                bail!(
                    "{}: no connection to the {} Service succeeded",
                    mode.label(),
                    position.label()
                );
            }
            result.connect_us.sort_by(f64::total_cmp);
            result.whole_us.sort_by(f64::total_cmp);
            rows.push(TrafficRow {
                services: count,
                mode,
                position,
                result,
            });
        }
    }
    Ok(rows)
}

/// Times loading kube-proxy's full rule sets into an empty namespace, and a
/// one-Service change (one endpoint of the middle Service replaced) on top.
pub fn rule_loading(settings: &Settings) -> Result<Vec<LoadRow>> {
    let ns = format!("{PREFIX}rules");
    let mut rows = Vec::new();
    for &count in &settings.scales {
        let services = rules::services(count, &backends());
        let before = &services[count as usize / 2];
        let mut after = before.clone();
        after.endpoints[0] = (Ipv4Addr::new(10, 244, 3, 10), BACKEND_PORT);
        for mode in Mode::ALL {
            let Some((program, full_args, change_args)) = mode.loader() else {
                continue;
            };
            let (full_text, forward, backward) = match mode {
                Mode::Nftables => (
                    rules::nft_full(&services, &[]),
                    rules::nft_one_service_change(before, &after),
                    rules::nft_one_service_change(&after, before),
                ),
                _ => (
                    rules::iptables_full(&services),
                    rules::iptables_one_service_change(&services, before, &after),
                    rules::iptables_one_service_change(&services, &after, before),
                ),
            };
            eprintln!("bench: loading {} Services' rules with {program}", count);
            let mut full = Vec::new();
            let mut change = Vec::new();
            for _ in 0..settings.load_repeats {
                let _ = netns::delete(&ns);
                netns::add(&ns)?;
                full.push(
                    run_with_input(in_ns(&ns, program).args(full_args), &full_text)?.as_secs_f64(),
                );
            }
            for i in 0..settings.change_repeats {
                let text = if i % 2 == 0 { &forward } else { &backward };
                change.push(
                    run_with_input(in_ns(&ns, program).args(change_args), text)?.as_secs_f64(),
                );
            }
            let _ = netns::delete(&ns);
            full.sort_by(f64::total_cmp);
            change.sort_by(f64::total_cmp);
            rows.push(LoadRow {
                services: count,
                mode,
                full,
                change,
                rules: count_rules(mode, &full_text),
            });
        }
    }
    Ok(rows)
}

/// Rules in a rule file: `-A` lines for iptables, `add rule` lines and map
/// elements for nftables.
fn count_rules(mode: Mode, text: &str) -> usize {
    text.lines()
        .filter(|l| match mode {
            Mode::Nftables => l.starts_with("add rule") || l.starts_with("add element"),
            _ => l.starts_with("-A "),
        })
        .count()
}

/// The markdown tables of both parts.
pub fn render(traffic: &[TrafficRow], loads: &[LoadRow], settings: &Settings) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## New connections from a pod to a ClusterIP\n\n\
         One client, one connection at a time: {} rounds over every dataplane and Service,\n\
         {} connections each (after {} to warm up), so {} per row:\n\
         `connect` time is the SYN's trip through the node (kube-proxy: conntrack and the\n\
         nat table, where iptables walks KUBE-SERVICES to the Service's rule; Ferry: its tc\n\
         program on the pod's interface; Ferry with socket-lb=all: the cgroup hook at\n\
         connect(), then the tc program, which finds no frontend) and the SYN-ACK's way back. A whole connection is\n\
         connect, one line of reply, close; the rate is one over its median time, and the\n\
         ratio is Ferry's rate over the other's, measured in the same run. Throughput counts\n\
         every connection over the run's wall time, so it also carries every stall, and a\n\
         failed connection (1 s timeout) weighs on it heavily.\n",
        settings.rounds,
        settings.batch,
        settings.warmup,
        settings.rounds * settings.batch
    );
    md.push_str("| Services | dataplane | Service dialled | connect p50 (µs) | connect p99 (µs) | connection p50 (µs) | connections/s | Ferry's rate / this | throughput (conn/s) | failed |\n");
    md.push_str("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in traffic {
        let ferry = traffic
            .iter()
            .find(|r| {
                r.services == row.services && r.position == row.position && r.mode == Mode::Ferry
            })
            .map_or(f64::NAN, |r| r.result.rate());
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} | {:.0} | {} |",
            row.services,
            row.mode.label(),
            row.position.label(),
            row.result.percentile(0.5),
            row.result.percentile(0.99),
            percentile(&row.result.whole_us, 0.5),
            row.result.rate(),
            ferry / row.result.rate(),
            row.result.throughput(),
            row.result.failures,
        );
    }
    let _ = writeln!(
        md,
        "\n## Loading kube-proxy's rules\n\n\
         Wall time of the command kube-proxy runs, median (min..max) of {} full loads into\n\
         an empty namespace and {} one-Service changes (one endpoint of the middle Service\n\
         replaced, as kube-proxy's partial sync writes it: iptables rewrites KUBE-SERVICES\n\
         and the Service's chains with `--noflush`; nftables sends a transaction of the\n\
         changed chains). Ferry's equivalent is its map programming, measured through the\n\
         API server in the control-plane results.\n",
        settings.load_repeats, settings.change_repeats
    );
    md.push_str("| Services | tool | rules | full load (s) | one-Service change (ms) |\n");
    md.push_str("|---:|---|---:|---:|---:|\n");
    for row in loads {
        let (program, _, _) = row.mode.loader().expect("only kube-proxy modes load rules");
        let _ = writeln!(
            md,
            "| {} | `{program}` | {} | {:.3} ({:.3}..{:.3}) | {:.1} ({:.1}..{:.1}) |",
            row.services,
            row.rules,
            percentile(&row.full, 0.5),
            row.full[0],
            row.full[row.full.len() - 1],
            percentile(&row.change, 0.5) * 1e3,
            row.change[0] * 1e3,
            row.change[row.change.len() - 1] * 1e3,
        );
    }
    md.push_str(
        "\nWhy `nft` grows faster than linearly: each Service's `numgen ... vmap { ... }` is an\n\
         anonymous set, and the kernel binds each one by walking the whole transaction\n\
         (`perf record -a -g` over `nft -c -f` of 2 500 Services' rules: `__nft_set_trans_bind`\n\
         is the top symbol), so one transaction of N Services costs about N squared. That is\n\
         the shape kube-proxy's nftables mode writes, so its full syncs pay it too.\n",
    );
    md
}

/// Series for the plots: per mode, (Services, value) for the last Service.
pub fn series(
    traffic: &[TrafficRow],
    value: impl Fn(&Connections) -> f64,
) -> Vec<(String, Vec<(f64, f64)>)> {
    Mode::ALL
        .iter()
        .map(|&mode| {
            let points = traffic
                .iter()
                .filter(|r| r.mode == mode && r.position == Position::Last)
                .map(|r| (f64::from(r.services), value(&r.result)))
                .collect();
            (mode.label().to_string(), points)
        })
        .collect()
}

/// Series of rule-loading times: per tool, the median of `times` (seconds)
/// against Services.
pub fn load_series(
    loads: &[LoadRow],
    times: impl Fn(&LoadRow) -> Vec<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    Mode::ALL
        .iter()
        .filter(|m| m.loader().is_some())
        .map(|&mode| {
            let points = loads
                .iter()
                .filter(|r| r.mode == mode)
                .map(|r| (f64::from(r.services), percentile(&times(r), 0.5)))
                .collect();
            (mode.label().to_string(), points)
        })
        .collect()
}

/// Connect-time p50 at the last Service.
pub fn p50(c: &Connections) -> f64 {
    c.percentile(0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn positions_span_the_list() {
        assert_eq!(Position::First.index(10_000), 0);
        assert_eq!(Position::Middle.index(10_000), 5_000);
        assert_eq!(Position::Last.index(10_000), 9_999);
    }

    #[test]
    fn rules_are_counted_per_tool() {
        let services = rules::services(2, &backends());
        // Per Service: a jump, a masquerade rule, 10 endpoint picks, 2 per endpoint.
        let ipt = count_rules(Mode::IptablesLegacy, &rules::iptables_full(&services));
        let base = count_rules(Mode::IptablesLegacy, &rules::iptables_full(&[]));
        assert_eq!(ipt - base, 2 * (1 + 1 + 10 + 20));
        let nft = count_rules(Mode::Nftables, &rules::nft_full(&services, &[]));
        let nft_base = count_rules(Mode::Nftables, &rules::nft_full(&[], &[]));
        // Per Service: 2 service rules, 2 per endpoint, 2 map elements.
        assert_eq!(nft - nft_base, 2 * (2 + 20 + 2));
    }
}
