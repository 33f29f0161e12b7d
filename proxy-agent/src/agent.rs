//! The node agent's loop: services from the API server (or a file) into the
//! maps, pod interfaces into attachments, and a periodic resync that repairs
//! drift. Only this module ties the pure parts to the kernel and the network.

use std::{
    collections::HashMap, net::SocketAddr, path::PathBuf, pin::Pin, sync::Arc, time::Duration,
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
    model::{Scheduler, Service, ServiceFile},
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

    fn desired(&self, node: &NodeInfo) -> cluster::Desired {
        let k8s: Vec<&K8sService> = self.services.values().map(AsRef::as_ref).collect();
        let slices: Vec<&Slice> = self.slices.values().collect();
        cluster::desired(&k8s, &slices, node)
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
                Ok(event) => if stores.services.apply(event, watch::keep) { changed(&status, &mut sync_at) },
                Err(e) => watch_error(&status, "services", &e),
            },
            Some(event) = slices.next() => match event {
                Ok(event) => {
                    let version = slice_version.expect("slices come from the API");
                    if on_slice(&mut stores.slices, &mut triggers, event, version) { changed(&status, &mut sync_at) }
                }
                Err(e) => watch_error(&status, "endpointslices", &e),
            },
            Some(event) = nodes.next() => match event {
                Ok(event) => if stores.node.apply(event, watch::keep) { changed(&status, &mut sync_at) },
                Err(e) => watch_error(&status, "node", &e),
            },
            Some(event) = links.recv() => on_link(&mut dataplane, &mut attached, &config, &status, event),
            _ = resync.tick() => {
                // Whatever the maps hold now is the truth to diff against: this
                // repairs entries changed or lost behind the agent's back.
                match dataplane.read_state() {
                    Ok(actual) => applied = actual,
                    Err(e) => error!(error = %e, "reading the maps for resync"),
                }
                match dataplane.gc(crate::dataplane::monotonic_ns()) {
                    Ok((0, 0)) => {}
                    Ok((ct, nat)) => debug!(ct, nat, "expired conntrack and NAT entries removed"),
                    Err(e) => warn!(error = format!("{e:#}"), "conntrack garbage collection"),
                }
                sync_at = Some(Instant::now());
            }
            _ = sleep_until(sync_at.unwrap_or_else(Instant::now)), if sync_at.is_some() => {
                sync_at = None;
                let mut services = match &config.source {
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
                        let desired = stores.desired(&node);
                        status.lock().unwrap().metrics.services_skipped = desired.skipped.len() as u64;
                        for skip in &desired.skipped {
                            debug!(%skip, "not proxied");
                        }
                        for (port, e) in health_checks.update(&desired.health_checks).await {
                            warn!(port, error = %e, "cannot serve a healthCheckNodePort");
                        }
                        desired.services
                    }
                    Source::File(path) => match read_file(path) {
                        Ok(services) => services,
                        Err(e) => {
                            error!(error = format!("{e:#}"), "reading services");
                            continue;
                        }
                    },
                };
                for service in &mut services {
                    service.scheduler.get_or_insert(config.scheduler);
                }
                let result = sync(&mut dataplane, &services, &mut ids, &mut applied, &status);
                if result.is_ok() {
                    // Every slice change seen so far is in the maps now.
                    let latencies = triggers.programmed(jiff::Timestamp::now());
                    let histogram = &mut status.lock().unwrap().metrics.network_programming;
                    latencies.into_iter().for_each(|l| histogram.observe(l));
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

fn watch_error(status: &Shared, kind: &str, e: &watcher::Error) {
    status.lock().unwrap().metrics.watch_errors += 1;
    warn!(kind, error = %e, "watch failed; retrying with backoff");
}

/// Programs the maps for `services`: desired state, diff against what is
/// applied, ordered writes.
fn sync(
    dataplane: &mut Dataplane,
    services: &[Service],
    ids: &mut Ids,
    applied: &mut MapState,
    status: &Shared,
) -> Result<()> {
    let (desired, problems) = state::desired(services, ids);
    for problem in &problems {
        warn!(%problem, "service not programmed");
    }
    let ops = state::diff(&desired, applied);
    let result = dataplane.apply(&ops);
    let mut status = status.lock().unwrap();
    status.metrics.syncs += 1;
    status.metrics.service_problems = problems.len() as u64;
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
            frontends = desired.revnat.len(),
            backends = desired.backends.len(),
            "maps programmed"
        );
    }
    status.metrics.frontends = desired.revnat.len() as u64;
    status.metrics.backends = desired.backends.len() as u64;
    *applied = desired;
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
