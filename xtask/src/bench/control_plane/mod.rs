//! Part 3 of `cargo xtask bench`: the control plane through a real API server.
//!
//! A lab of its own (`ferrycp`: kube-apiserver v1.20, a release build of the
//! agent) holds thousands of Services without selectors, each with one
//! EndpointSlice of 10 endpoints that the benchmark writes itself (with a
//! managed-by label of its own, so the controller manager leaves them alone).
//! Only node1's agent runs: node2's would compete for the same cores. At each
//! scale this measures
//! - the first full sync: node1's agent started on empty maps, until it logs
//!   that its maps are in sync (timestamps from its own log); beside it, the
//!   API server's part: the same two lists, fetched and not parsed;
//! - programming latency: one endpoint address of one slice changed at a time,
//!   from the API server's response to the new address being in a slot of that
//!   Service in node1's pinned maps, polled every 0.5 ms;
//! - the agent's own `kubeproxy_network_programming_duration_seconds` over the
//!   same changes (from the trigger-time annotation the benchmark sets);
//! - the agent's resident memory and the maps' (memory.rs).
//!
//! Nothing here asserts a timing: it reports them.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use ::kube::{
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client,
};
use anyhow::{bail, ensure, Context, Result};
use aya::maps::{Array, HashMap, MapData};
use futures::{stream, StreamExt};
use proxy_common::{
    pinned::{self, Pinned},
    proto, Backend4, ServiceKey4, ServiceValue,
};
use serde_json::json;

use super::memory;

mod report;
use crate::{
    lab::{self, Lab},
    sys::workspace_root,
};

const LAB: &str = "ferrycp";
const NAMESPACE: &str = "default";
const NODE: &str = "node1";
const ENDPOINTS_PER_SERVICE: usize = 10;
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// Endpoint addresses: every Service's own ten from here on...
const ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
/// ...and each probe's new address from here, never used before.
const PROBE_BASE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
/// Requests in flight during bulk creation. Measured on 2 cores: 8 gives about
/// half the rate, and beyond 32 the API server (and etcd) is the limit.
const CONCURRENCY: usize = 32;
const POLL: Duration = Duration::from_micros(500);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(600);
/// The annotation kube-proxy (and the agent) measure programming latency from.
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The agent's histograms: trigger time -> programmed, and one programming round.
const PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";
const SYNC_ROUND: &str = "kubeproxy_sync_proxy_rules_duration_seconds";

/// The agent's memory limit in the benchmark's lab (see `measure`).
const MEMORY_LIMIT: &str = "2Gi";

/// What one run measures.
struct Plan {
    scales: &'static [usize],
    changes: usize,
    first_syncs: usize,
}

const FULL: Plan = Plan {
    scales: &[1_000, 10_000, 100_000],
    changes: 200,
    first_syncs: 5,
};
const QUICK: Plan = Plan {
    scales: &[1_000],
    changes: 50,
    first_syncs: 2,
};

/// One first full sync (s).
#[derive(Debug)]
struct FirstSync {
    /// The agent's start (its first log line) -> maps in sync.
    sync: f64,
    /// Of which loading the programs and the first programming round.
    load: f64,
    round: f64,
    /// The pod's start: the agent let back onto its node -> its first log
    /// line (the DaemonSet controller, the scheduler and the kubelet).
    pod_start: f64,
}

/// The results at one scale.
struct Scale {
    services: usize,
    /// Objects created to reach this scale, and how long that took.
    created: usize,
    create_seconds: f64,
    first_syncs: Vec<FirstSync>,
    /// The agent's two first lists, fetched at once by this client without
    /// parsing them (s): what the API server takes to send them.
    lists: Vec<f64>,
    /// Per change, ms: API response -> maps, and request sent -> maps.
    from_response: Vec<f64>,
    from_request: Vec<f64>,
    /// Changes not seen in the maps within CHANGE_TIMEOUT.
    missed: usize,
    /// The agent's histograms over the same changes.
    agent: AgentHistogram,
    rounds: AgentHistogram,
    /// /proc/loadavg's 1-minute figure after the changes: the machine is shared.
    load: f64,
    memory: memory::Sample,
}

pub fn run(quick: bool, results: &Path, command: &str) -> Result<()> {
    let plan = if quick { QUICK } else { FULL };
    let agent = super::release_agent()?;
    let lab = Lab::new(LAB)?;
    // What an interrupted earlier run may have left.
    lab.down()?;
    let measured = lab.up(&workspace_root().join("deploy")).and_then(|()| {
        // The client must reach the API server, which listens in the fabric
        // namespace; everything else it does names its namespace itself.
        ferry_netns::in_netns(&lab.ns("fabric"), move || measure(&plan, &agent))?
    });
    let down = lab.down();
    let scales = measured?;
    down?;
    let header = super::header(command)?;
    report::report(results, &header, &scales)?;
    let samples: Vec<memory::Sample> = scales.iter().map(|s| s.memory.clone()).collect();
    memory::report(results, &header, &samples)?;
    eprintln!(
        "bench: {} and {}",
        results.join("control_plane.md").display(),
        results.join("memory.md").display()
    );
    Ok(())
}

/// The agent's map sizes for the plan's largest scale, as an operator of
/// such a cluster would set them (the defaults hold about 6,000 Services of
/// 10 endpoints): each Service's frontend and endpoints, with room for the
/// cluster's own Services.
fn map_flags(plan: &Plan) -> Vec<String> {
    let services = plan.scales.iter().copied().max().unwrap_or(0) + 1024;
    let flag = |name: &str, entries: usize, default: u32| {
        let entries = u32::try_from(entries).unwrap_or(u32::MAX).max(default);
        [format!("--map-{name}"), entries.to_string()]
    };
    [
        flag(
            "services",
            services * (1 + ENDPOINTS_PER_SERVICE),
            proxy_common::capacity::SERVICES,
        ),
        flag(
            "backends",
            services * ENDPOINTS_PER_SERVICE,
            proxy_common::capacity::BACKENDS,
        ),
        flag("frontends", services, proxy_common::capacity::REVNAT),
    ]
    .concat()
}

fn measure(plan: &Plan, agent: &Path) -> Result<Vec<Scale>> {
    let lab = Lab::new(LAB)?;
    // The DaemonSet's limit (512Mi) is sized for the default maps and a
    // cluster of up to about 10k Services: the pinned maps are charged to
    // the agent's memory cgroup, and at the largest scale they and the agent
    // together pass it (the agent was OOM-killed at 100k Services). An
    // operator of such a cluster raises it, as the map flags, from the
    // figures of memory.md.
    lab.set_agent_memory_limit(MEMORY_LIMIT)?;
    lab.set_agent_args(&map_flags(plan))?;
    lab.stop_agent("node2")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(client(&lab.admin_kubeconfig()))?;
    let services = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Service")),
    );
    let slices = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
            "endpointslices",
        ),
    );
    let metrics = SocketAddr::from((lab::node_addr(NODE)?, 10249));
    let mut frontends: Vec<Ipv4Addr> = Vec::new();
    let mut probes = 0u32;
    let mut out = Vec::new();
    for &n in plan.scales {
        let started = Instant::now();
        let before = frontends.len();
        let created = rt.block_on(create_services(&services, before..n))?;
        frontends.extend(created);
        rt.block_on(create_slices(&slices, before..n))?;
        let create_seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "bench: {} Services and slices created in {create_seconds:.1} s",
            n - before
        );
        wait_programmed(metrics, n)?;

        let mut first_syncs = Vec::new();
        for _ in 0..plan.first_syncs {
            first_syncs.push(first_sync(&lab, agent, metrics)?);
            wait_programmed(metrics, n)?;
        }
        eprintln!("bench: first full syncs at {n} Services: {first_syncs:?}");
        let lists = (0..3)
            .map(|_| rt.block_on(time_lists(&client)))
            .collect::<Result<Vec<f64>>>()?;
        eprintln!("bench: the lists alone at {n} Services: {lists:?}");

        let maps = Maps::open(&lab.pin_dir(NODE))?;
        let scraped_before = lab::agent_get(metrics, "/metrics")?;
        let changes = Changes {
            rt: &rt,
            slices: &slices,
            maps: &maps,
            frontends: &frontends,
        };
        let (from_response, from_request, missed) = changes.run(n, plan.changes, &mut probes)?;
        let scraped_after = lab::agent_get(metrics, "/metrics")?;
        let load = load_average()?;
        let (rss_kib, hwm_kib) = agent_memory(&lab)?;
        out.push(Scale {
            services: n,
            created: 2 * (n - before),
            create_seconds,
            first_syncs,
            lists,
            from_response,
            from_request,
            missed,
            agent: AgentHistogram::parse(&scraped_after, PROGRAMMING)
                .since(&AgentHistogram::parse(&scraped_before, PROGRAMMING)),
            rounds: AgentHistogram::parse(&scraped_after, SYNC_ROUND)
                .since(&AgentHistogram::parse(&scraped_before, SYNC_ROUND)),
            load,
            memory: memory::Sample {
                services: n,
                backends: n * ENDPOINTS_PER_SERVICE,
                maps: memory::snapshot(&lab.pin_dir(NODE))?,
                rss_kib,
                hwm_kib,
            },
        });
    }
    Ok(out)
}

/// What one scale's programming-latency changes need.
struct Changes<'a> {
    rt: &'a tokio::runtime::Runtime,
    slices: &'a Api<DynamicObject>,
    maps: &'a Maps,
    /// Each Service's address, by index.
    frontends: &'a [Ipv4Addr],
}

impl Changes<'_> {
    /// `count` changes over the first `services` Services, each a new endpoint
    /// address (`probes` counts the addresses used so far): the milliseconds
    /// from the API server's response and from the request to the maps, and
    /// how many were not seen in time.
    fn run(
        &self,
        services: usize,
        count: usize,
        probes: &mut u32,
    ) -> Result<(Vec<f64>, Vec<f64>, usize)> {
        let (mut from_response, mut from_request, mut missed) = (Vec::new(), Vec::new(), 0);
        for k in 0..count {
            // Spread over the Services (7919 is prime, so no two probes of one run
            // at these scales change the same slice).
            let index = (k * 7919 + 13) % services;
            let address = Ipv4Addr::from(u32::from(PROBE_BASE) + *probes);
            *probes += 1;
            let patch = json!({
                "metadata": {"annotations": {TRIGGER_TIME: jiff::Timestamp::now().to_string()}},
                "endpoints": endpoints(index, Some(address)),
            });
            let sent = Instant::now();
            self.rt
                .block_on(self.slices.patch(
                    &name(index),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                ))
                .with_context(|| format!("changing the slice of {}", name(index)))?;
            let answered = Instant::now();
            loop {
                if self.maps.serves(self.frontends[index], address)? {
                    let seen = Instant::now();
                    from_response.push(ms(seen - answered));
                    from_request.push(ms(seen - sent));
                    break;
                }
                if answered.elapsed() > CHANGE_TIMEOUT {
                    missed += 1;
                    break;
                }
                thread::sleep(POLL);
            }
            // Apart, so that each change is programmed on its own.
            thread::sleep(Duration::from_millis(20 + (k as u64 * 37) % 30));
        }
        Ok((from_response, from_request, missed))
    }
}

/// /proc/loadavg's 1-minute figure: the machine is shared.
fn load_average() -> Result<f64> {
    Ok(fs::read_to_string("/proc/loadavg")?
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(f64::NAN))
}

async fn client(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = ::kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn name(index: usize) -> String {
    format!("bench-{index:05}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A Service's endpoints: its own ten addresses, the first replaced by `probe`.
fn endpoints(index: usize, probe: Option<Ipv4Addr>) -> serde_json::Value {
    let base = u32::from(ENDPOINT_BASE) + (index * ENDPOINTS_PER_SERVICE) as u32;
    let list: Vec<serde_json::Value> = (0..ENDPOINTS_PER_SERVICE)
        .map(|j| {
            let address = match (j, probe) {
                (0, Some(probe)) => probe,
                _ => Ipv4Addr::from(base + j as u32),
            };
            json!({"addresses": [address.to_string()], "conditions": {"ready": true},
                   "topology": {"kubernetes.io/hostname": "node2"}})
        })
        .collect();
    list.into()
}

/// Creates objects `CONCURRENCY` at a time; returns them by index.
async fn create_all(
    api: &Api<DynamicObject>,
    objects: Vec<(usize, serde_json::Value)>,
) -> Result<Vec<(usize, DynamicObject)>> {
    let mut created: Vec<(usize, DynamicObject)> = stream::iter(objects)
        .map(|(index, object)| async move {
            let object: DynamicObject = serde_json::from_value(object)?;
            let created = api
                .create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("creating {}", name(index)))?;
            anyhow::Ok((index, created))
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    created.sort_by_key(|(index, _)| *index);
    Ok(created)
}

/// Services without a selector; returns their cluster IPs.
async fn create_services(
    api: &Api<DynamicObject>,
    range: std::ops::Range<usize>,
) -> Result<Vec<Ipv4Addr>> {
    let objects = range
        .map(|i| {
            let object = json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name(i), "namespace": NAMESPACE},
                "spec": {"ports": [{"port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}]},
            });
            (i, object)
        })
        .collect();
    create_all(api, objects)
        .await?
        .into_iter()
        .map(|(i, svc)| {
            svc.data["spec"]["clusterIP"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
                .with_context(|| format!("{} has no IPv4 cluster IP", name(i)))
        })
        .collect()
}

/// One v1beta1 EndpointSlice per Service, as its controller would write it,
/// but managed by the benchmark.
async fn create_slices(api: &Api<DynamicObject>, range: std::ops::Range<usize>) -> Result<()> {
    let objects = range
        .map(|i| {
            let object = json!({
                "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {
                    "name": name(i), "namespace": NAMESPACE,
                    "labels": {"kubernetes.io/service-name": name(i),
                               "endpointslice.kubernetes.io/managed-by": "bench.ferry.dev"},
                    "annotations": {TRIGGER_TIME: jiff::Timestamp::now().to_string()},
                },
                "addressType": "IPv4",
                "ports": [{"port": TARGET_PORT, "protocol": "TCP"}],
                "endpoints": endpoints(i, None),
            });
            (i, object)
        })
        .collect();
    create_all(api, objects).await.map(drop)
}

/// Waits until the agent serves every Service created so far with all its backends.
fn wait_programmed(metrics: SocketAddr, services: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        let text = lab::agent_get(metrics, "/metrics").unwrap_or_default();
        let frontends = lab::metric(&text, "ferry_frontends").unwrap_or(0.0);
        let backends = lab::metric(&text, "ferry_backends").unwrap_or(0.0);
        if frontends >= services as f64 && backends >= (services * ENDPOINTS_PER_SERVICE) as f64 {
            eprintln!(
                "bench: the agent serves {frontends} frontends, {backends} backends ({:.1} s after creation)",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > PROGRAMMED_TIMEOUT {
            bail!("the agent serves {frontends} frontends and {backends} backends after {PROGRAMMED_TIMEOUT:?}; wanted {services} Services");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Restarts node1's agent on empty maps: (start -> maps in sync, start ->
/// programs loaded, the first programming round), seconds, from the agent's
/// own log timestamps and its round histogram.
fn first_sync(lab: &Lab, agent: &Path, metrics: SocketAddr) -> Result<FirstSync> {
    lab.stop_agent(NODE)?;
    let out = ferry_netns::enter(&lab.ns(NODE), agent)
        .arg("cleanup")
        .arg("--pin-dir")
        .arg(lab.pin_dir(NODE))
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        out.status.success(),
        "proxy-agent cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = jiff::Timestamp::now();
    lab.start_agent(NODE, &[])?;
    let log = fs::read_to_string(lab.agent_log(NODE)?)?;
    let at = |message: &str| -> Result<f64> {
        let line = log
            .lines()
            .find(|l| l.contains(message))
            .with_context(|| format!("no {message:?} in the agent's log"))?;
        let stamp: jiff::Timestamp = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("no timestamp in {line:?}"))?;
        Ok(stamp.duration_since(started).as_secs_f64())
    };
    let rounds = AgentHistogram::parse(&lab::agent_get(metrics, "/metrics")?, SYNC_ROUND);
    // The agent's first line: the API server it found, right after start.
    let pod_start = at("INFO proxy_agent::k8s::client: API server")?;
    Ok(FirstSync {
        sync: at("ready: maps in sync")? - pod_start,
        load: at("adopted pinned maps")? - pod_start,
        round: rounds.sum,
        pod_start,
    })
}

/// Fetches every Service and EndpointSlice at once, as the agent's first
/// lists ask for them (resourceVersion 0, no limit: from the API server's
/// cache, in one response each), reading the bodies without parsing them.
/// Seconds.
async fn time_lists(client: &Client) -> Result<f64> {
    let params = ListParams::default().match_any();
    let list = |path: &str| -> Result<_> {
        let request = ::kube::core::Request::new(path).list(&params)?;
        Ok(client.request_text(request))
    };
    let started = Instant::now();
    let services = list("/api/v1/services")?;
    let slices = list("/apis/discovery.k8s.io/v1beta1/endpointslices")?;
    let (services, slices) = futures::join!(services, slices);
    let took = started.elapsed().as_secs_f64();
    for (what, body) in [("Services", services?), ("EndpointSlices", slices?)] {
        // One page, as the agent gets it: a paged list would time only
        // its first page.
        let paged = body.contains(r#""continue":""#) && !body.contains(r#""continue":"""#);
        ensure!(!paged, "the API server paged the list of {what}");
    }
    Ok(took)
}

/// node1's agent's VmRSS and VmHWM, KiB.
fn agent_memory(lab: &Lab) -> Result<(u64, u64)> {
    let pid = lab
        .agent_pid(NODE)
        .context("node1's agent is not running")?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// node1's pinned service and backend maps, read as a packet would.
struct Maps {
    services: HashMap<MapData, ServiceKey4, ServiceValue>,
    backends: Array<MapData, Backend4>,
}

impl Maps {
    fn open(pin_dir: &Path) -> Result<Self> {
        let pinned = Pinned::new(pin_dir);
        Ok(Self {
            services: pinned.services_map()?,
            backends: pinned.backends_map()?,
        })
    }

    /// Whether a slot of `frontend` names a backend at `address`.
    fn serves(&self, frontend: Ipv4Addr, address: Ipv4Addr) -> Result<bool> {
        let key = |slot: u16| ServiceKey4::new(frontend, SERVICE_PORT, proto::TCP, slot);
        let Ok(head) = self.services.get(&key(0), 0) else {
            return Ok(false);
        };
        for slot in 1..=head.count {
            let Ok(value) = self.services.get(&key(slot), 0) else {
                continue;
            };
            if pinned::backend(&self.backends, value.backend_id)
                .is_some_and(|b| b.addr() == address)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The agent's network programming histogram: cumulative counts by bucket.
#[derive(Debug, Default)]
struct AgentHistogram {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl AgentHistogram {
    fn parse(text: &str, metric: &str) -> Self {
        let mut h = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&format!("{metric}_bucket{{le=\"")) {
                let Some((le, count)) = rest.split_once("\"} ") else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                h.buckets.push((le, count.trim().parse().unwrap_or(0)));
            } else if let Some(v) = line.strip_prefix(&format!("{metric}_sum ")) {
                h.sum = v.trim().parse().unwrap_or(0.0);
            } else if let Some(v) = line.strip_prefix(&format!("{metric}_count ")) {
                h.count = v.trim().parse().unwrap_or(0);
            }
        }
        h
    }

    /// What was observed after `earlier` (same agent, same buckets).
    fn since(&self, earlier: &Self) -> Self {
        let before = |i: usize| earlier.buckets.get(i).map_or(0, |b| b.1);
        Self {
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, (le, c))| (*le, c.saturating_sub(before(i))))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// The upper bound (seconds) of the bucket holding quantile `q`.
    fn quantile_bound(&self, q: f64) -> Option<f64> {
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= rank)
            .map(|(le, _)| *le)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_histogram_quantiles_come_from_the_changes_in_between() {
        let text = |a: u64, b: u64, inf: u64| {
            format!(
                "{PROGRAMMING}_bucket{{le=\"0.01\"}} {a}\n{PROGRAMMING}_bucket{{le=\"0.1\"}} {b}\n\
                 {PROGRAMMING}_bucket{{le=\"+Inf\"}} {inf}\n{PROGRAMMING}_sum 1.5\n{PROGRAMMING}_count {inf}\n"
            )
        };
        let before = AgentHistogram::parse(&text(0, 100, 100), PROGRAMMING);
        let after = AgentHistogram::parse(&text(98, 199, 200), PROGRAMMING);
        let delta = after.since(&before);
        assert_eq!(delta.count, 100);
        assert_eq!(delta.quantile_bound(0.5), Some(0.01));
        assert_eq!(delta.quantile_bound(0.99), Some(0.1));
    }
}
