//! The node agent's loop: services from the API server (or a file) into the
//! maps, pod interfaces into attachments, and a periodic resync that repairs
//! drift. Only this module ties the pure parts to the kernel and the network.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use futures::{stream, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service as K8sService};
use kube::{
    api::DynamicObject,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
    Client,
};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn};

use crate::{
    cluster::NodeInfo,
    cluster::{self, Slice},
    dataplane::{Dataplane, UplinkMode},
    health::{self, HealthChecks, Shared},
    ifaces::{self, LinkEvent},
    latency::{self, Triggers},
    model::{Frontend, Scheduler, Service, ServiceFile},
    state::{self, Ids, MapState},
    watch::{self, Store},
};

/// Where the agent learns the services it serves.
#[derive(Debug, Clone)]
pub enum Source {
    /// The Kubernetes API: kubeconfig file, or in-cluster / `KUBECONFIG` when `None`.
    Api {
        kubeconfig: Option<PathBuf>,
        node_name: String,
    },
    /// A JSON file of services (`model::ServiceFile`), re-read at every resync.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub pin_dir: PathBuf,
    /// Globs of host-side pod interface names to attach to.
    pub pod_iface_patterns: Vec<String>,
    pub healthz_addr: Option<SocketAddr>,
    /// The node's uplinks: XDP (or tc) for traffic from outside.
    pub uplinks: Vec<String>,
    /// Force an uplink attach mode; by default native XDP, else generic, else tc.
    pub uplink_mode: Option<UplinkMode>,
    /// Node ports SNATed flows get (keep them out of the node's ephemeral range).
    pub nat_ports: (u16, u16),
    /// The scheduler of Services without a `ferry.dev/scheduler` annotation.
    pub scheduler: Scheduler,
    pub resync_period: Duration,
    /// How long to gather changes before programming them.
    pub sync_delay: Duration,
    /// How often ended conntrack and NAT entries are removed (their NAT ports
    /// freed), and with which lifetimes.
    pub gc_period: Duration,
    pub lifetimes: crate::gc::Lifetimes,
}

type Events<K> = Pin<Box<dyn Stream<Item = watcher::Result<watcher::Event<K>>> + Send>>;

/// The API objects the desired state is computed from.
#[derive(Default)]
struct Stores {
    services: Store<Arc<K8sService>>,
    slices: Store<Slice>,
    node: Store<Arc<Node>>,
}

impl Stores {
    fn ready(&self) -> bool {
        self.services.ready() && self.slices.ready() && self.node.ready()
    }

    fn node(&self, name: &str) -> NodeInfo {
        NodeInfo::from_node(name, self.node.values().next().map(AsRef::as_ref))
    }
}

/// The desired state per Service (`namespace/name`), recomputed only for the
/// Services whose object or slices changed since the last round, so that a
/// round's cost follows what changed rather than the size of the cluster.
#[derive(Default)]
struct DesiredCache {
    per_service: HashMap<String, cluster::Desired>,
    /// Services to recompute at the next round.
    dirty: HashSet<String>,
    /// What the cache was computed for; another node view recomputes everything.
    node: Option<NodeInfo>,
    /// Recompute everything (a relist replaced a store).
    all: bool,
    /// Which Service serves each frontend, to find a change that claims a
    /// frontend another Service has ...
    owners: HashMap<Frontend, String>,
    /// ... in which case (a misconfiguration) only full rounds, which decide
    /// between the claimants, are right, until none is left.
    contested: bool,
}

/// What changed in a [`DesiredCache::refresh`].
enum Changed {
    Everything,
    /// These Services (their frontends now), and frontends no longer served.
    Services(Vec<String>, Vec<Frontend>),
}

impl DesiredCache {
    fn touch(&mut self, service: impl Into<String>) {
        self.dirty.insert(service.into());
    }

    fn refresh(&mut self, stores: &Stores, node: &NodeInfo, scheduler: Scheduler) -> Changed {
        let compute = |svc: &K8sService, slices: &[&Slice]| {
            let mut out = cluster::Desired::default();
            cluster::desired_service(svc, slices, node, &mut out);
            for service in &mut out.services {
                service.scheduler.get_or_insert(scheduler);
            }
            out
        };
        if self.all || self.contested || self.node.as_ref() != Some(node) {
            let mut by_service: HashMap<&str, Vec<&Slice>> = HashMap::new();
            for slice in stores.slices.values().filter(|s| s.address_type == "IPv4") {
                by_service.entry(&slice.service).or_default().push(slice);
            }
            self.per_service = stores
                .services
                .values()
                .map(|svc| {
                    let key = cluster::service_key(svc);
                    let slices = by_service.get(key.as_str()).map_or(&[][..], Vec::as_slice);
                    let desired = compute(svc, slices);
                    (key, desired)
                })
                .collect();
            self.node = Some(node.clone());
            self.all = false;
            self.dirty.clear();
            self.owners.clear();
            self.contested = false;
            for (key, desired) in &self.per_service {
                for service in &desired.services {
                    let owner = self
                        .owners
                        .entry(service.frontend)
                        .or_insert_with(|| key.clone());
                    self.contested |= owner != key;
                }
            }
            return Changed::Everything;
        }
        let keys: Vec<String> = self.dirty.drain().collect();
        let mut gone = Vec::new();
        for key in &keys {
            let old = match stores.services.get(key) {
                Some(svc) => {
                    // A scan, not an index: a few microseconds per thousand slices,
                    // and nothing to keep consistent across relists.
                    let slices: Vec<&Slice> = stores
                        .slices
                        .values()
                        .filter(|s| &s.service == key && s.address_type == "IPv4")
                        .collect();
                    self.per_service.insert(key.clone(), compute(svc, &slices))
                }
                None => self.per_service.remove(key),
            };
            for service in old.iter().flat_map(|d| &d.services) {
                if self.owners.get(&service.frontend) == Some(key) {
                    self.owners.remove(&service.frontend);
                    gone.push(service.frontend);
                }
            }
        }
        for key in &keys {
            for service in self.per_service.get(key).iter().flat_map(|d| &d.services) {
                let owner = self
                    .owners
                    .entry(service.frontend)
                    .or_insert_with(|| key.clone());
                self.contested |= owner != key;
            }
        }
        if self.contested {
            return Changed::Everything;
        }
        gone.retain(|f| !self.owners.contains_key(f));
        Changed::Services(keys, gone)
    }

    /// The frontends of some Services.
    fn services_of(&self, keys: &[String]) -> Vec<&Service> {
        keys.iter()
            .filter_map(|k| self.per_service.get(k))
            .flat_map(|d| &d.services)
            .collect()
    }

    fn services(&self) -> impl Iterator<Item = &Service> {
        self.per_service.values().flat_map(|d| &d.services)
    }

    fn skipped(&self) -> impl Iterator<Item = &cluster::Skip> {
        self.per_service.values().flat_map(|d| &d.skipped)
    }

    fn health_checks(&self) -> Vec<cluster::HealthCheck> {
        self.per_service
            .values()
            .flat_map(|d| d.health_checks.iter().cloned())
            .collect()
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and none found")?,
    };
    Ok(Client::try_from(config)?)
}

/// Runs until SIGTERM or SIGINT. Programs and maps stay in place afterwards.
pub async fn run(config: Config) -> Result<()> {
    let mut dataplane = Dataplane::load_pinned(&config.pin_dir)?;
    // Maps an earlier agent left are adopted: their ids stay, connections go on.
    let mut applied = dataplane.read_state()?;
    let mut ids = Ids::from_state(&applied);
    info!(
        frontends = applied.revnat.len(),
        backends = applied.backends.len(),
        "adopted pinned maps"
    );

    let status: Shared = Arc::default();
    if let Some(addr) = config.healthz_addr {
        health::serve(addr, status.clone()).await?;
        info!(%addr, "serving /healthz, /livez and /metrics");
    }

    for iface in &config.uplinks {
        let mode = dataplane.attach_uplink(iface, config.uplink_mode)?;
        status
            .lock()
            .unwrap()
            .uplinks
            .push((iface.clone(), mode.name()));
    }
    let mut health_checks = HealthChecks::default();
    let mut node_config = proxy_common::Config::default();

    let mut links = ifaces::subscribe()?;
    let mut attached: HashMap<String, u32> = HashMap::new();
    for (index, name) in ifaces::current()? {
        on_link(
            &mut dataplane,
            &mut attached,
            &config,
            &status,
            LinkEvent::Up { index, name },
        );
    }

    let mut stores = Stores::default();
    let mut cache = DesiredCache::default();
    // The first round diffs everything against the maps an earlier agent left.
    let mut full_next = true;
    let mut triggers = Triggers::new(jiff::Timestamp::now());
    let (mut services, mut slices, mut nodes, slice_version): (
        Events<K8sService>,
        Events<DynamicObject>,
        Events<Node>,
        _,
    ) = match &config.source {
        Source::Api {
            kubeconfig,
            node_name,
        } => {
            let client = client(kubeconfig.as_ref()).await?;
            let version = discover(&client).await;
            (
                watch::services(&client).boxed(),
                watch::slices(&client, version).boxed(),
                watch::node(&client, node_name).boxed(),
                Some(version),
            )
        }
        Source::File(_) => (
            stream::pending().boxed(),
            stream::pending().boxed(),
            stream::pending().boxed(),
            None,
        ),
    };

    let mut resync = tokio::time::interval(config.resync_period);
    let mut gc = tokio::time::interval(config.gc_period);
    let mut sync_at: Option<Instant> = None;
    let mut ready = false;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let changed = |status: &Shared, sync_at: &mut Option<Instant>| {
        status.lock().unwrap().health.pending();
        sync_at.get_or_insert_with(|| Instant::now() + config.sync_delay);
    };
    loop {
        tokio::select! {
            Some(event) = services.next() => match event {
                Ok(event) => {
                    match &event {
                        watcher::Event::Apply(svc) | watcher::Event::InitApply(svc) | watcher::Event::Delete(svc) => {
                            cache.touch(watch::key_of(svc));
                        }
                        watcher::Event::Init | watcher::Event::InitDone => cache.all = true,
                    }
                    if stores.services.apply(event, watch::keep) { changed(&status, &mut sync_at) }
                }
                Err(e) => watch_error(&status, "services", &e),
            },
            Some(event) = slices.next() => match event {
                Ok(event) => {
                    let version = slice_version.expect("slices come from the API");
                    if on_slice(&mut stores.slices, &mut triggers, &mut cache, event, version) { changed(&status, &mut sync_at) }
                }
                Err(e) => watch_error(&status, "endpointslices", &e),
            },
            Some(event) = nodes.next() => match event {
                Ok(event) => if stores.node.apply(event, watch::keep) { changed(&status, &mut sync_at) },
                Err(e) => watch_error(&status, "node", &e),
            },
            Some(event) = links.recv() => on_link(&mut dataplane, &mut attached, &config, &status, event),
            _ = gc.tick() => collect_garbage(&mut dataplane, &config, &status),
            _ = resync.tick() => {
                // Whatever the maps hold now is the truth to diff against: this
                // repairs entries changed or lost behind the agent's back.
                match dataplane.read_state() {
                    // Only drift needs a full round: at 10k Services one costs
                    // hundreds of milliseconds, and changes wait behind it.
                    Ok(actual) if actual != applied => {
                        warn!("the maps differ from what the agent wrote; repairing");
                        applied = actual;
                        full_next = true;
                    }
                    Ok(_) => {}
                    Err(e) => error!(error = %e, "reading the maps for resync"),
                }
                sync_at = Some(Instant::now());
            }
            _ = sleep_until(sync_at.unwrap_or_else(Instant::now)), if sync_at.is_some() => {
                sync_at = None;
                let round = Instant::now();
                let file_services: Vec<Service>;
                let work = match &config.source {
                    Source::Api { .. } if !stores.ready() => {
                        debug!("waiting for the first full list of every watched kind");
                        continue;
                    }
                    Source::Api { node_name, .. } => {
                        let node = stores.node(node_name);
                        let wanted = proxy_common::Config {
                            snat_addr_be: node.snat_address().map_or(0, |a| u32::from(a).to_be()),
                            nat_port_min: config.nat_ports.0,
                            nat_port_max: config.nat_ports.1,
                        };
                        if wanted != node_config {
                            match dataplane.set_config(wanted) {
                                Ok(()) => {
                                    node_config = wanted;
                                    info!(snat = ?node.snat_address(), addresses = ?node.addresses, "node settings programmed");
                                }
                                Err(e) => error!(error = format!("{e:#}"), "writing the node settings"),
                            }
                        }
                        let changed = cache.refresh(&stores, &node, config.scheduler);
                        status.lock().unwrap().metrics.services_skipped = cache.skipped().count() as u64;
                        for skip in cache.skipped() {
                            debug!(%skip, "not proxied");
                        }
                        for (port, e) in health_checks.update(&cache.health_checks()).await {
                            warn!(port, error = %e, "cannot serve a healthCheckNodePort");
                        }
                        match changed {
                            Changed::Services(keys, gone) if !full_next => Round::Partial {
                                services: cache.services_of(&keys),
                                gone,
                            },
                            _ => Round::Full(cache.services().collect()),
                        }
                    }
                    Source::File(path) => match read_file(path) {
                        Ok(mut services) => {
                            for service in &mut services {
                                service.scheduler.get_or_insert(config.scheduler);
                            }
                            file_services = services;
                            Round::Full(file_services.iter().collect())
                        }
                        Err(e) => {
                            error!(error = format!("{e:#}"), "reading services");
                            continue;
                        }
                    },
                };
                let result = sync(&mut dataplane, work, &mut ids, &mut applied, &status);
                // After a failure the maps were read back: the next round must
                // look at every frontend.
                full_next = result.is_err();
                if result.is_ok() {
                    // Every slice change seen so far is in the maps now.
                    let latencies = triggers.programmed(jiff::Timestamp::now());
                    let metrics = &mut status.lock().unwrap().metrics;
                    metrics.sync_duration.observe(round.elapsed().as_secs_f64());
                    latencies.into_iter().for_each(|l| metrics.network_programming.observe(l));
                }
                match result {
                    Ok(()) if !ready => {
                        ready = true;
                        info!(frontends = applied.revnat.len(), "ready: maps in sync");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        error!(error = format!("{e:#}"), "programming the maps failed; retrying in 1 s");
                        sync_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("stopping; programs and maps stay in place");
    Ok(())
}

/// Applies one EndpointSlice event to the store and notes its trigger time
/// for the network programming latency. Returns whether the store changed.
fn on_slice(
    store: &mut Store<Slice>,
    triggers: &mut Triggers,
    cache: &mut DesiredCache,
    event: watcher::Event<DynamicObject>,
    version: cluster::SliceVersion,
) -> bool {
    let (key, trigger, deleted) = match &event {
        watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => (
            watch::key_of(obj),
            latency::trigger_time(obj.metadata.annotations.as_ref()),
            false,
        ),
        watcher::Event::Delete(obj) => (watch::key_of(obj), None, true),
        watcher::Event::Init | watcher::Event::InitDone => {
            cache.all = true;
            return store.apply(event, watch::convert_slice(version));
        }
    };
    // During a relist the store still serves the previous list: compare with that.
    let before = store.get(&key).cloned();
    let mut after = None;
    let convert = watch::convert_slice(version);
    let changed = store.apply(event, |obj| {
        after = convert(obj);
        after.clone()
    });
    // A slice can move from one Service to another: both change.
    for slice in [&before, &after].into_iter().flatten() {
        cache.touch(slice.service.as_str());
    }
    if let Some(service) = after.as_ref().or(before.as_ref()).map(|s| &s.service) {
        if deleted {
            triggers.deleted(service);
        } else {
            triggers.updated(service, trigger, before != after);
        }
    }
    changed
}

fn read_file(path: &PathBuf) -> Result<Vec<Service>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: ServiceFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(file.services)
}

/// Finds the EndpointSlice version, retrying while the API server is unreachable.
async fn discover(client: &Client) -> cluster::SliceVersion {
    let mut delay = Duration::from_millis(200);
    loop {
        match watch::slice_version(client).await {
            Ok(version) => return version,
            Err(e) => {
                warn!(error = format!("{e:#}"), retry_in = ?delay, "API server discovery failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Removes the conntrack and NAT entries of ended flows (freeing their NAT
/// ports), and says which backends ran out of NAT ports since the last time.
fn collect_garbage(dataplane: &mut Dataplane, config: &Config, status: &Shared) {
    let report = match dataplane.gc(crate::dataplane::monotonic_ns(), &config.lifetimes) {
        Ok(report) => report,
        Err(e) => {
            warn!(error = format!("{e:#}"), "conntrack garbage collection");
            return;
        }
    };
    if report.conntrack_removed + report.nat_removed > 0 {
        debug!(
            conntrack = report.conntrack_removed,
            nat = report.nat_removed,
            "ended conntrack and NAT entries removed"
        );
    }
    let (min, max) = config.nat_ports;
    for (backend, dropped) in &report.exhausted {
        warn!(
            %backend,
            dropped,
            held = report.held.get(backend).copied().unwrap_or(0),
            range = format!("{min}-{max}"),
            "NAT ports exhausted: new flows to this backend were dropped (widen --nat-ports, or wait for flows to end)"
        );
    }
    let mut status = status.lock().unwrap();
    let metrics = &mut status.metrics;
    metrics.conntrack_entries = report.conntrack_entries as u64;
    metrics.nat_entries = report.nat_entries as u64;
    for (backend, dropped) in report.exhausted {
        *metrics
            .nat_port_exhaustion
            .entry(backend.to_string())
            .or_default() += dropped;
    }
}

fn watch_error(status: &Shared, kind: &str, e: &watcher::Error) {
    status.lock().unwrap().metrics.watch_errors += 1;
    warn!(kind, error = %e, "watch failed; retrying with backoff");
}

/// What a programming round covers.
enum Round<'a> {
    /// Every frontend, diffed against everything the maps hold.
    Full(Vec<&'a Service>),
    /// Only the frontends of these services changed, and `gone` are no longer
    /// served: the round's cost follows the change.
    Partial {
        services: Vec<&'a Service>,
        gone: Vec<Frontend>,
    },
}

/// Programs the maps: desired state, diff against what is applied, ordered
/// writes.
fn sync(
    dataplane: &mut Dataplane,
    round: Round<'_>,
    ids: &mut Ids,
    applied: &mut MapState,
    status: &Shared,
) -> Result<()> {
    let full = matches!(round, Round::Full(_));
    // `applied` becomes what the writes make of the maps; if they fail, it is
    // read back from the maps below.
    let (ops, problems) = match round {
        Round::Full(services) => {
            let (desired, problems) = state::desired(&services, ids);
            let ops = state::diff(&desired, applied);
            *applied = desired;
            (ops, problems)
        }
        Round::Partial { services, gone } => state::update(&services, &gone, applied, ids),
    };
    for problem in &problems {
        warn!(%problem, "service not programmed");
    }
    let result = dataplane.apply(&ops);
    let mut status = status.lock().unwrap();
    status.metrics.syncs += 1;
    if full {
        // A partial round sees only its own Services' problems.
        status.metrics.service_problems = problems.len() as u64;
    }
    if let Err(e) = result {
        status.metrics.sync_errors += 1;
        // Some writes may have landed: start again from what the maps hold.
        *applied = dataplane.read_state()?;
        *ids = Ids::from_state(applied);
        return Err(e);
    }
    if !ops.is_empty() {
        info!(
            writes = ops.len(),
            frontends = applied.revnat.len(),
            backends = applied.backends.len(),
            "maps programmed"
        );
    }
    status.metrics.frontends = applied.revnat.len() as u64;
    status.metrics.backends = applied.backends.len() as u64;
    status.health.synced();
    match dataplane.prune_affinity(applied) {
        Ok(0) => {}
        Ok(n) => debug!(entries = n, "affinity to departed backends dropped"),
        Err(e) => warn!(error = format!("{e:#}"), "pruning affinity"),
    }
    Ok(())
}

fn on_link(
    dataplane: &mut Dataplane,
    attached: &mut HashMap<String, u32>,
    config: &Config,
    status: &Shared,
    event: LinkEvent,
) {
    match event {
        LinkEvent::Up { index, name } => {
            if !ifaces::matches_any(&config.pod_iface_patterns, &name)
                || attached.get(&name) == Some(&index)
            {
                return;
            }
            match dataplane.attach_pod_interface(&name) {
                Ok(()) => {
                    attached.insert(name, index);
                }
                Err(e) => {
                    status.lock().unwrap().metrics.attach_errors += 1;
                    warn!(iface = name, error = format!("{e:#}"), "attaching failed");
                }
            }
        }
        LinkEvent::Gone { name, .. } => {
            if attached.remove(&name).is_some() {
                info!(iface = name, "pod interface gone");
            }
        }
    }
    status.lock().unwrap().metrics.pod_interfaces = attached.len() as u64;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(name: &str, ip: &str) -> K8sService {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]}
        }))
        .unwrap()
    }

    fn stores(services: &[K8sService]) -> Stores {
        let mut stores = Stores::default();
        stores.services.apply(watcher::Event::Init, watch::keep);
        for svc in services {
            stores
                .services
                .apply(watcher::Event::InitApply(svc.clone()), watch::keep);
        }
        stores.services.apply(watcher::Event::InitDone, watch::keep);
        stores
    }

    fn frontend(ip: &str) -> Frontend {
        Frontend {
            address: ip.parse().unwrap(),
            port: 80,
            protocol: crate::model::Protocol::Tcp,
        }
    }

    #[test]
    fn cache_recomputes_only_touched_services_and_names_what_went() {
        let node = NodeInfo::default();
        let mut cache = DesiredCache::default();
        let mut s = stores(&[service("a", "10.96.0.1"), service("b", "10.96.0.2")]);
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Everything
        ));
        assert_eq!(cache.services().count(), 2);

        // b moves to another cluster IP; a is untouched.
        s.services.apply(
            watcher::Event::Apply(service("b", "10.96.0.3")),
            watch::keep,
        );
        cache.touch("default/b");
        let Changed::Services(keys, gone) = cache.refresh(&s, &node, Scheduler::FlowHash) else {
            panic!("a partial change");
        };
        assert_eq!(keys, vec!["default/b".to_string()]);
        assert_eq!(gone, vec![frontend("10.96.0.2")]);
        assert_eq!(cache.services_of(&keys)[0].frontend, frontend("10.96.0.3"));

        // A Service going takes its frontends with it.
        s.services.apply(
            watcher::Event::Delete(service("a", "10.96.0.1")),
            watch::keep,
        );
        cache.touch("default/a");
        let Changed::Services(_, gone) = cache.refresh(&s, &node, Scheduler::FlowHash) else {
            panic!("a partial change");
        };
        assert_eq!(gone, vec![frontend("10.96.0.1")]);
        assert_eq!(cache.services().count(), 1);
    }

    #[test]
    fn a_frontend_claimed_twice_needs_full_rounds() {
        let node = NodeInfo::default();
        let mut cache = DesiredCache::default();
        let mut s = stores(&[service("a", "10.96.0.1"), service("b", "10.96.0.2")]);
        cache.refresh(&s, &node, Scheduler::FlowHash);
        s.services.apply(
            watcher::Event::Apply(service("b", "10.96.0.1")),
            watch::keep,
        );
        cache.touch("default/b");
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Everything
        ));
        // Resolved: one more full round finds no claimant left, then partial again.
        s.services.apply(
            watcher::Event::Apply(service("b", "10.96.0.2")),
            watch::keep,
        );
        cache.touch("default/b");
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Everything
        ));
        cache.touch("default/b");
        assert!(matches!(
            cache.refresh(&s, &node, Scheduler::FlowHash),
            Changed::Services(..)
        ));
    }
}
