//! The thin loop between the stages: watch events into `k8s/`'s stores and
//! change cache, each programming round through `desired/` into `kernel/`'s
//! maps (one `Agent::round`), pod interfaces into attachments, a periodic
//! resync that repairs drift, and the garbage collection of ended flows.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::{stream, stream::BoxStream, Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::{runtime::watcher, Client};
use tokio::{
    sync::mpsc::UnboundedReceiver,
    time::{sleep_until, Instant},
};
use tracing::{debug, error, info, warn};

use crate::{
    desired::{self, gc::Lifetimes, Ids, MapState, Programmed},
    frontend::{Frontend, FrontendSpec, Scheduler, ServiceFile},
    k8s::{
        cache::{Changed, FrontendCache, Stores},
        client,
        nodes::{NodeInfo, NodePortAddresses},
        services::ServiceInfo,
        slices::{Slice, SliceVersion},
        watch::{self, Change, Store},
    },
    kernel::{
        batch::Writing,
        diag,
        ifaces::{self, LinkEvent},
        lock::{self, PinDirLock},
        migrate::Migration,
        monotonic_ns, netinfo, rtnl, Dataplane, MapSizes, SocketLb, UplinkMode,
    },
    serve::{
        health::{self, HealthChecks, Shared, Status},
        latency::Triggers,
        metrics, traffic,
    },
    settings,
    uplink::{self, UplinkRequest},
};

/// Where the agent learns the services it serves.
#[derive(Debug, Clone)]
pub enum Source {
    /// The Kubernetes API: kubeconfig file, or in-cluster / `KUBECONFIG` when `None`.
    Api {
        kubeconfig: Option<PathBuf>,
        node_name: String,
    },
    /// A JSON file of services (`frontend::ServiceFile`), re-read at every resync.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub pin_dir: PathBuf,
    /// Globs of host-side pod interface names to attach to.
    pub pod_iface_patterns: Vec<String>,
    pub healthz_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// Per-backend traffic series beside the per-Service ones.
    pub metrics_per_backend: bool,
    /// The programs count packets and bytes per (frontend, backend) pair.
    pub traffic_counters: bool,
    /// The most detailed level the programs log at.
    pub bpf_log_level: diag::LogLevel,
    /// The node's uplinks (XDP, or tc, for traffic from outside): named, off,
    /// or found from the Node's InternalIP or the default route.
    pub uplink: UplinkRequest,
    /// Force an uplink attach mode; by default native XDP, else generic, else tc.
    pub uplink_mode: Option<UplinkMode>,
    /// Node ports SNATed flows get (keep them out of the node's ephemeral range).
    pub nat_ports: (u16, u16),
    /// New flows into these that no frontend serves are refused.
    pub service_cidrs: proxy_common::ServiceCidrs,
    /// The scheduler of Services without a `ferry.dev/scheduler` annotation.
    pub scheduler: Scheduler,
    pub resync_period: Duration,
    /// How long to gather changes before programming them.
    pub sync_delay: Duration,
    /// How often ended conntrack and NAT entries are removed (their NAT ports
    /// freed), and with which lifetimes.
    pub gc_period: Duration,
    pub lifetimes: Lifetimes,
    /// Which sockets the cgroup hooks translate.
    pub socket_lb: SocketLb,
    /// The cgroup v2 directory the socket hooks attach to (None: the
    /// hierarchy's root, every process of the node).
    pub cgroup_root: Option<PathBuf>,
    /// NodePorts answer on 127.0.0.1 too (through the socket hooks).
    pub node_port_loopback: bool,
    /// `--nodeport-addresses`: None answers on every Node address.
    pub node_port_addresses: Option<NodePortAddresses>,
    pub map_sizes: MapSizes,
}

/// A watch's events, each object read into what its store keeps.
type Events<T> = Pin<Box<dyn Stream<Item = watcher::Result<Change<T>>> + Send>>;

/// The API watches, or streams that never yield when services come from a file.
struct Watches {
    services: Events<Arc<ServiceInfo>>,
    slices: Events<Slice>,
    nodes: Events<Arc<Node>>,
}

/// Events a watch's task may have handed over before the loop takes them.
const EVENTS_IN_FLIGHT: usize = 1024;

/// Runs `stream` in a task of its own and hands its events over through a
/// channel. A watch polled by the loop would send its first list only once
/// the loop runs (after the programs load), and would parse it on the
/// loop's thread, one watch's list after the other's; in a task each watch
/// lists from the start, and parses on a worker of its own.
fn spawned<T: Send + 'static>(
    stream: impl Stream<Item = T> + Send + 'static,
) -> BoxStream<'static, T> {
    let (tx, rx) = tokio::sync::mpsc::channel(EVENTS_IN_FLIGHT);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if tx.send(event).await.is_err() {
                break;
            }
        }
    });
    stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (event, rx))
    })
    .boxed()
}

impl Watches {
    /// Makes the client and starts the watches without waiting for the API
    /// server: each reaches it (and retries with backoff) in a task of its
    /// own, so an API server down at start never stops the agent from
    /// serving.
    async fn start(source: &Source, status: &Shared) -> Result<Self> {
        Ok(match source {
            Source::Api {
                kubeconfig,
                node_name,
            } => {
                let (client, url, from) = client::connect(kubeconfig.as_ref()).await?;
                status.lock().unwrap().api_server = Some((url, from));
                let slices_client = client.clone();
                let slices = stream::once(discover(client.clone()))
                    .flat_map(move |version| watch::slices(&slices_client, version));
                Self {
                    services: spawned(watch::services(&client)),
                    slices: spawned(slices),
                    nodes: spawned(watch::node(&client, node_name)),
                }
            }
            Source::File(_) => Self {
                services: stream::pending().boxed(),
                slices: stream::pending().boxed(),
                nodes: stream::pending().boxed(),
            },
        })
    }
}

/// Runs until SIGTERM or SIGINT. Programs and maps stay in place afterwards.
pub async fn run(config: Config) -> Result<()> {
    // First what can be wrong with the configuration (a kubeconfig that
    // cannot be read, say): nothing of the node is touched before it is right.
    // kube-proxy's rule: twice the sync period.
    let health_timeout = 2 * config.resync_period;
    let status: Shared = Arc::new(Mutex::new(Status::new(
        Some(config.pin_dir.clone()),
        health_timeout,
    )));
    status
        .lock()
        .unwrap()
        .metrics
        .traffic
        .lock()
        .unwrap()
        .per_backend = config.metrics_per_backend;
    let mut watches = Watches::start(&config.source, &status).await?;
    let (mut agent, mut links) = Agent::start(config, status).await?;
    let mut resync = tokio::time::interval(agent.config.resync_period);
    let mut gc = tokio::time::interval(agent.config.gc_period);
    let mut heartbeat = tokio::time::interval(health::HEARTBEAT);
    let mut carry = tokio::time::interval(CARRY_PERIOD);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            event = watches.services.next() => agent.on_service(watched(event, "services")?),
            event = watches.slices.next() => agent.on_slice(watched(event, "endpointslices")?),
            event = watches.nodes.next() => agent.on_node(watched(event, "node")?),
            Some(event) = links.recv() => agent.on_link(event),
            _ = gc.tick() => collect_garbage(&mut agent.dataplane, &agent.config, agent.programmed.applied(), &agent.status),
            _ = resync.tick() => agent.resync(),
            _ = heartbeat.tick() => agent.status.lock().unwrap().health.beat(),
            _ = carry.tick(), if agent.migration.is_some() => agent.carry_flows(),
            _ = sleep_until(agent.sync_at.unwrap_or_else(Instant::now)), if agent.sync_at.is_some() => {
                agent.round().await;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("stopping; programs and maps stay in place");
    Ok(())
}

/// A watch's next event. A watch never ends by itself (it retries with
/// backoff); one that did had its task panic, reading an object, say. The
/// agent then stops with an error, for the kubelet to restart it, rather
/// than go on with a watch that no longer tells it anything.
fn watched<T>(event: Option<T>, kind: &str) -> Result<T> {
    event.with_context(|| format!("the {kind} watch stopped"))
}

/// What the loop keeps between events.
struct Agent {
    config: Config,
    dataplane: Dataplane,
    /// What the maps hold and the ids their entries were given.
    programmed: Programmed,
    /// How long until a round whose writes did not all land is tried again.
    retry: Duration,
    status: Shared,
    health_checks: HealthChecks,
    /// The node settings last written.
    node_config: settings::NodeConfig,
    /// Links, routes and the pod interfaces attached.
    ifaces: ifaces::Interfaces,
    /// Local endpoints last found behind an interface without the pod
    /// programs, with its name: each is warned about once.
    unattached: HashSet<(IpAddr, String)>,
    stores: Stores,
    cache: FrontendCache,
    /// The next round diffs every frontend against the maps (the first one
    /// diffs against the maps an earlier agent left).
    full_next: bool,
    triggers: Triggers,
    /// Services whose spec, or whose endpoints, changed since the last
    /// round (kube-proxy's pending-changes metrics).
    service_changes: HashSet<String>,
    endpoint_changes: HashSet<String>,
    /// When the next round runs, if a change waits.
    sync_at: Option<Instant>,
    ready: bool,
    /// The uplinks are still to be found: when the Node is first read.
    uplink_pending: bool,
    /// An older agent's maps carried over in a first pass, waiting for the
    /// second: once every interface runs the new programs (the uplinks last).
    migration: Option<Migration>,
    /// Held while the agent runs: one agent per pin directory.
    _pin_lock: PinDirLock,
}

impl Agent {
    /// Adopts the pinned maps (carrying older versions over), serves
    /// /healthz, attaches the uplinks (unless they wait for the Node) and the
    /// pod interfaces already there; returns the stream of link changes.
    async fn start(config: Config, status: Shared) -> Result<(Self, UnboundedReceiver<LinkEvent>)> {
        // First: an agent already on these maps must not be overwritten.
        Dataplane::make_pin_dir(&config.pin_dir)?;
        let pin_lock = PinDirLock::take(&config.pin_dir, lock::LOCK_WAIT)?;
        let mut dataplane = Dataplane::load_pinned(
            &config.pin_dir,
            &config.map_sizes,
            config.traffic_counters,
            config.bpf_log_level,
        )?;
        if let Some(logs) = dataplane.logs(Box::new(diag::ToTracing)) {
            logs.forward();
        }
        // Maps of an older layout: their entries go into the new maps before
        // the new programs replace the old ones (see `kernel::migrate`).
        let migration = Migration::begin(&mut dataplane, &config.pin_dir)?;
        // Maps an earlier agent left are adopted: their ids stay, connections
        // go on, and ids that live flows still name are not handed out again.
        let mut applied = dataplane.read_state()?;
        remove_holes(&mut dataplane, &mut applied, &status);
        let mut ids = Ids::from_state(&applied);
        let (live_backends, live_frontends) = dataplane.live_ids()?;
        ids.reserve(&live_backends, &live_frontends);
        info!(
            frontends = applied.revnat.len(),
            backends = applied.backends.len(),
            flows_naming = live_backends.len(),
            "adopted pinned maps"
        );
        let capacity = dataplane.capacity()?;
        note_capacity(&status, &capacity, &config.map_sizes);
        let programmed = Programmed::adopt(applied, ids, capacity);

        health::serve(config.healthz_addr, config.metrics_addr, status.clone()).await?;
        if let Some(addr) = config.healthz_addr {
            info!(%addr, "serving /healthz and /livez");
        }
        if let Some(addr) = config.metrics_addr {
            info!(%addr, "serving /metrics and /statusz");
        }

        // Found from the Node's InternalIP once the Node is read; otherwise now.
        let uplink_pending =
            config.uplink == UplinkRequest::Auto && matches!(config.source, Source::Api { .. });
        let links = ifaces::subscribe()?;
        let mut agent = Self {
            config,
            dataplane,
            programmed,
            retry: RETRY_MIN,
            status,
            health_checks: HealthChecks::default(),
            node_config: settings::NodeConfig::default(),
            ifaces: ifaces::Interfaces::default(),
            unattached: HashSet::new(),
            stores: Stores::default(),
            cache: FrontendCache::default(),
            full_next: true,
            triggers: Triggers::new(jiff::Timestamp::now()),
            service_changes: HashSet::new(),
            endpoint_changes: HashSet::new(),
            sync_at: None,
            ready: false,
            uplink_pending,
            migration: Some(migration),
            _pin_lock: pin_lock,
        };
        agent.ifaces.replace(rtnl::links()?, rtnl::routes()?);
        agent.attach_pod_interfaces();
        agent.attach_sockets();
        agent.carry_flows();
        if !uplink_pending {
            agent.attach_uplinks(&[])?;
        }
        Ok((agent, links))
    }

    /// Attaches the socket hooks as configured. Without them the node's own
    /// connections to Services go unserved, but every packet path still
    /// works: logged, counted, shown on /statusz, and the agent goes on.
    fn attach_sockets(&mut self) {
        let mode = self.config.socket_lb;
        let name = format!("{mode:?}").to_lowercase();
        let attached = if mode == SocketLb::Off {
            self.dataplane.detach_sockets().map(|()| {
                info!("socket load balancing off: the node's own connections to Services are not served");
                serde_json::json!({"mode": name})
            })
        } else {
            let cgroup = match &self.config.cgroup_root {
                Some(root) => Ok(root.clone()),
                None => proxy_common::cgroup::v2_mount(),
            };
            cgroup.and_then(|cgroup| {
                let loaded = self.dataplane.attach_sockets(&cgroup, mode)?;
                Ok(serde_json::json!({
                    "mode": name,
                    "cgroup": cgroup.display().to_string(),
                    "refusal": loaded.refusal(),
                }))
            })
        };
        let status = attached.unwrap_or_else(|e| {
            self.status.lock().unwrap().metrics.attach_errors.inc();
            error!(
                error = format!("{e:#}"),
                "the socket hooks are not attached: the node's own connections to Services are not served"
            );
            serde_json::json!({"mode": name, "error": format!("{e:#}")})
        });
        self.status.lock().unwrap().socket_lb = status;
    }

    /// Chooses the uplinks (`node_addresses`: the Node's InternalIPs) and
    /// attaches the uplink programs to them.
    fn attach_uplinks(&mut self, node_addresses: &[Ipv4Addr]) -> Result<()> {
        self.uplink_pending = false;
        let (interfaces, default_route) = if self.config.uplink == UplinkRequest::Auto {
            let read = netinfo::interfaces().and_then(|i| Ok((i, netinfo::default_route()?)));
            read.unwrap_or_else(|e| {
                warn!(
                    error = format!("{e:#}"),
                    "reading interfaces and routes for the uplink"
                );
                (Vec::new(), None)
            })
        } else {
            (Vec::new(), None)
        };
        let choice = uplink::choose(
            &self.config.uplink,
            node_addresses,
            &interfaces,
            default_route.as_deref(),
        );
        if choice.interfaces.is_empty() && choice.reason != uplink::Reason::Off {
            warn!(reason = %choice.reason, "no uplink");
        } else {
            info!(interfaces = ?choice.interfaces, reason = %choice.reason, "uplink chosen");
        }
        self.status.lock().unwrap().uplink_choice = Some(choice.clone());
        self.ifaces.uplinks = choice.interfaces.clone();
        // Flows the old programs started since the last pass must be in the
        // new maps before the new programs see their replies on the uplink:
        // a SNATed flow's reply that misses its NAT entry goes to the stack,
        // which resets the connection. The pass before the swap leaves only
        // the flows of the few milliseconds until `finish_migration`.
        self.carry_flows();
        for iface in &choice.interfaces {
            let mode = self
                .dataplane
                .attach_uplink(iface, self.config.uplink_mode)
                .with_context(|| format!("attaching the uplink program to {iface}"))?;
            let mut status = self.status.lock().unwrap();
            status.uplinks.push((iface.clone(), mode.name()));
            let labels = vec![("interface", iface.clone()), ("mode", mode.name().into())];
            status
                .metrics
                .uplink_attach_mode
                .get_or_create(&labels)
                .set(1);
        }
        self.finish_migration();
        Ok(())
    }

    /// Flows the old programs started since the migration's last pass go
    /// into the new maps (see [`Migration::carry_flows`]).
    fn carry_flows(&mut self) {
        if let Some(migration) = &mut self.migration {
            migration.carry_flows(&mut self.dataplane);
        }
    }

    /// The migration's second pass, once every interface runs the new
    /// programs (the uplinks are attached last): what the old programs wrote
    /// since the first pass is carried over too, and the old pins go.
    fn finish_migration(&mut self) {
        let Some(migration) = self.migration.take() else {
            return;
        };
        let report = migration.finish(&mut self.dataplane, &self.config.lifetimes);
        let status = self.status.lock().unwrap();
        for (map, _) in report.failed {
            status
                .metrics
                .maps_not_carried
                .get_or_create(&metrics::label("map", map))
                .inc();
        }
    }

    /// A change waits: programmed after `sync_delay`, with whatever else comes
    /// meanwhile.
    fn changed(&mut self) {
        let mut status = self.status.lock().unwrap();
        status.health.pending();
        status.metrics.queued();
        drop(status);
        let delay = self.config.sync_delay;
        self.sync_at.get_or_insert_with(|| Instant::now() + delay);
    }

    fn on_service(&mut self, event: watcher::Result<Change<Arc<ServiceInfo>>>) {
        let event = match event {
            Ok(event) => event,
            Err(e) => return watch_error(&self.status, "services", &e),
        };
        self.watch_answered("services");
        let key = match &event {
            watcher::Event::Apply(svc)
            | watcher::Event::InitApply(svc)
            | watcher::Event::Delete(svc) => {
                self.cache.touch(&svc.key);
                Some(svc.key.clone())
            }
            watcher::Event::Init | watcher::Event::InitDone => {
                self.cache.all = true;
                None
            }
        };
        let listed = self.stores.services.ready();
        let changed = self.stores.services.apply(event);
        first_list("services", listed, &self.stores.services);
        if changed {
            if let Some(key) = key {
                self.service_changes.insert(key);
                let metrics = &self.status.lock().unwrap().metrics;
                metrics.service_changes.inc();
                metrics
                    .service_changes_pending
                    .set(self.service_changes.len() as i64);
            }
            self.changed();
        }
    }

    fn on_slice(&mut self, event: watcher::Result<Change<Slice>>) {
        let event = match event {
            Ok(event) => event,
            Err(e) => return watch_error(&self.status, "endpointslices", &e),
        };
        self.watch_answered("endpointslices");
        let store = &mut self.stores.slices;
        let listed = store.ready();
        let (changed, service) = on_slice(store, &mut self.triggers, &mut self.cache, event);
        first_list("endpointslices", listed, store);
        if let Some(service) = service.filter(|_| changed) {
            self.endpoint_changes.insert(service);
            let metrics = &self.status.lock().unwrap().metrics;
            metrics.endpoint_changes.inc();
            metrics
                .endpoint_changes_pending
                .set(self.endpoint_changes.len() as i64);
        }
        if changed {
            self.changed();
        }
    }

    fn on_node(&mut self, event: watcher::Result<Change<Arc<Node>>>) {
        match event {
            Ok(event) => {
                self.watch_answered("node");
                let listed = self.stores.node.ready();
                let changed = self.stores.node.apply(event);
                first_list("node", listed, &self.stores.node);
                if changed {
                    self.changed();
                }
            }
            Err(e) => watch_error(&self.status, "node", &e),
        }
    }

    /// A watch delivered an event: if it had been failing, what it missed
    /// is programmed now, and `/healthz` says 200 again after that round.
    fn watch_answered(&mut self, kind: &'static str) {
        if self.status.lock().unwrap().health.watch_answered(kind) {
            info!(kind, "the watch answers again");
            self.changed();
        }
    }

    fn on_link(&mut self, event: LinkEvent) {
        if event == LinkEvent::Lost {
            warn!("link and route events were lost; reading them afresh");
            return self.reconcile_interfaces();
        }
        if let Some(name) = self.ifaces.apply(event) {
            info!(iface = name, "pod interface gone");
        }
        self.attach_pod_interfaces();
    }

    /// Attaches the pod programs to each pod interface that lacks them (see
    /// [`ifaces`]).
    fn attach_pod_interfaces(&mut self) {
        for (index, name, reason) in self.ifaces.to_attach(&self.config.pod_iface_patterns) {
            match self.dataplane.attach_pod_interface(&name) {
                Ok(_) => {
                    info!(iface = name, because = reason.name(), "attached");
                    self.ifaces.attached.insert(name, index);
                }
                Err(e) => {
                    self.ifaces.failed.insert(index);
                    self.status.lock().unwrap().metrics.attach_errors.inc();
                    warn!(iface = name, error = format!("{e:#}"), "attaching failed");
                }
            }
        }
        self.status
            .lock()
            .unwrap()
            .metrics
            .pod_interfaces
            .set(self.ifaces.attached.len() as i64);
    }

    /// Whatever the maps hold now is the truth to diff against: this repairs
    /// entries changed or lost behind the agent's back. So are the pod
    /// interfaces there now (see [`Agent::reconcile_interfaces`]).
    fn resync(&mut self) {
        self.reconcile_interfaces();
        self.check_local_endpoints();
        match self.dataplane.read_state() {
            // Only drift needs a full round: at 10k Services one costs
            // hundreds of milliseconds, and changes wait behind it.
            Ok(actual) if actual != *self.programmed.applied() => {
                warn!("the maps differ from what the agent wrote; repairing");
                self.programmed.replace_applied(actual);
                self.full_next = true;
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "reading the maps for resync"),
        }
        // What was read is gone again.
        release_free_memory();
        self.sync_at = Some(Instant::now());
    }

    /// Asks the kernel for the route to every endpoint on this node: the
    /// interfaces they lead through become pod interfaces (see [`ifaces`]).
    /// An endpoint still behind an interface without the pod programs (a
    /// bridge without ports, an uplink) is warned about once and counted:
    /// its pod's connections to Services go untranslated, which nothing
    /// else would show.
    fn check_local_endpoints(&mut self) {
        let mut local: Vec<IpAddr> = self
            .programmed
            .applied()
            .backends
            .values()
            .filter(|b| b.flags & proxy_common::backend_flags::LOCAL != 0)
            .map(|b| b.addr)
            .collect();
        local.sort_unstable();
        local.dedup();
        let found = (|| -> Result<Vec<(IpAddr, String)>> {
            if local.is_empty() {
                return Ok(Vec::new());
            }
            let mut socket = rtnl::Rtnl::open()?;
            let mut routes = Vec::with_capacity(local.len());
            for addr in local {
                routes.push((addr, rtnl::route_to(&mut socket, addr)?));
            }
            self.ifaces.endpoint_routes = routes
                .iter()
                .filter_map(|(_, r)| match r {
                    rtnl::RouteTo::Interface(oif) => Some(*oif),
                    _ => None,
                })
                .collect();
            self.attach_pod_interfaces();
            let links: Vec<rtnl::Link> = self.ifaces.links.values().cloned().collect();
            Ok(ifaces::unattached(&routes, &links, &self.ifaces.attached))
        })();
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                return warn!(
                    error = format!("{e:#}"),
                    "checking the local endpoints' routes"
                )
            }
        };
        for (addr, iface) in &found {
            if !self.unattached.contains(&(*addr, iface.clone())) {
                warn!(
                    endpoint = %addr,
                    iface,
                    patterns = self.config.pod_iface_patterns.join(","),
                    "an endpoint on this node is routed through an interface without the pod programs: \
                     its pod's connections to Services are not translated; add the interface's name \
                     to --pod-iface-pattern"
                );
            }
        }
        self.status
            .lock()
            .unwrap()
            .metrics
            .local_endpoints_unattached
            .set(found.len() as i64);
        self.unattached = found.into_iter().collect();
    }

    /// Puts Ferry's filters back on every pod interface there now: where
    /// another tool removed them (or the clsact qdisc), where an attach failed
    /// half way, and on interfaces whose link event was missed.
    fn reconcile_interfaces(&mut self) {
        match rtnl::links().and_then(|links| Ok((links, rtnl::routes()?))) {
            Ok((links, routes)) => self.ifaces.replace(links, routes),
            Err(e) => return warn!(error = format!("{e:#}"), "reading links and routes"),
        }
        let attached: Vec<(String, u32)> = self
            .ifaces
            .attached
            .iter()
            .map(|(name, index)| (name.clone(), *index))
            .collect();
        for (name, index) in attached {
            match self.dataplane.attach_pod_interface(&name) {
                Ok(false) => {}
                Ok(true) => {
                    self.status.lock().unwrap().metrics.filters_restored.inc();
                    warn!(iface = name, "Ferry's tc filters were gone; put back");
                }
                Err(e) => {
                    self.ifaces.attached.remove(&name);
                    self.ifaces.failed.insert(index);
                    self.status.lock().unwrap().metrics.attach_errors.inc();
                    warn!(iface = name, error = format!("{e:#}"), "attaching failed");
                }
            }
        }
        // Interfaces whose events were missed, and those whose attach
        // failed before.
        self.attach_pod_interfaces();
    }

    /// One programming round: the frontends that changed (or all of them)
    /// into the maps, then the metrics and readiness that follow from it.
    async fn round(&mut self) {
        self.sync_at = None;
        let started = Instant::now();
        // The first round with the Node in its store finds the uplinks.
        if self.uplink_pending && self.stores.ready() {
            let node_addresses = self.stores.internal_ips();
            if let Err(e) = self.attach_uplinks(&node_addresses) {
                self.status.lock().unwrap().metrics.attach_errors.inc();
                error!(
                    error = format!("{e:#}"),
                    "no traffic from outside is served"
                );
            }
        }
        let work = match &self.config.source {
            Source::Api { .. } if !self.stores.ready() => {
                debug!("waiting for the first full list of every watched kind");
                return;
            }
            Source::Api { node_name, .. } => {
                let leaving = self.stores.node_leaving();
                if self.status.lock().unwrap().health.set_node_leaving(leaving) {
                    match leaving {
                        Some(why) => warn!(why, "/healthz says 503 (nodeEligible: false)"),
                        None => info!("/healthz says 200 again (nodeEligible: true)"),
                    }
                }
                let mut node = self.stores.node(node_name);
                if node.pod_cidrs != self.ifaces.pod_cidrs {
                    self.ifaces.pod_cidrs = node.pod_cidrs.clone();
                    self.attach_pod_interfaces();
                }
                node.node_port_loopback = self.config.node_port_loopback;
                node.node_port_only = self
                    .config
                    .node_port_addresses
                    .as_ref()
                    .map(|chosen| chosen.choose(&node, &node_addresses(chosen)));
                program_node(
                    &mut self.dataplane,
                    &mut self.node_config,
                    &node,
                    &self.config,
                );
                // A full round programs every Service as the stores have
                // it now: the cache keeps no frontends between rounds.
                if self.full_next {
                    self.cache.all = true;
                }
                let changed = self
                    .cache
                    .refresh(&self.stores, &node, self.config.scheduler);
                report_skipped(&self.cache, &self.status);
                for (port, e) in self.health_checks.update(&self.cache.health_checks()).await {
                    warn!(port, error = %e, "cannot serve a healthCheckNodePort");
                }
                match changed {
                    Changed::Services(frontends, gone) => Round::Partial { frontends, gone },
                    Changed::Everything(frontends) => Round::Full(frontends),
                }
            }
            Source::File(path) => match read_file(path, self.config.scheduler) {
                Ok(file) => {
                    let node = NodeInfo {
                        addresses: file.node_addresses.iter().filter_map(v4).collect(),
                        addresses6: file.node_addresses.iter().filter_map(v6).collect(),
                        ..NodeInfo::default()
                    };
                    program_node(
                        &mut self.dataplane,
                        &mut self.node_config,
                        &node,
                        &self.config,
                    );
                    Round::Full(file.services)
                }
                Err(e) => {
                    error!(error = format!("{e:#}"), "reading services");
                    return;
                }
            },
        };
        let full = matches!(work, Round::Full(_));
        let result = sync(
            &mut self.dataplane,
            work,
            &mut self.programmed,
            &self.status,
        );
        // After a failure, and while frontends wait for room in a full map
        // (a removal anywhere may make it), every frontend is looked at.
        self.full_next =
            result.is_err() || self.status.lock().unwrap().metrics.frontends_refused.get() > 0;
        if result.is_ok() {
            // Every slice change seen so far is in the maps now.
            let latencies = self.triggers.programmed(jiff::Timestamp::now());
            self.service_changes.clear();
            self.endpoint_changes.clear();
            let metrics = &self.status.lock().unwrap().metrics;
            metrics.synced(full, started.elapsed());
            latencies
                .into_iter()
                .for_each(|l| metrics.network_programming.observe(l));
            let no_local = self.cache.no_local_endpoints();
            for (policy, count) in [
                ("internal", no_local.internal),
                ("external", no_local.external),
            ] {
                metrics
                    .no_local_endpoints
                    .get_or_create(&metrics::label("traffic_policy", policy))
                    .set(count as i64);
            }
        }
        match result {
            Ok(()) if !self.ready => {
                self.ready = true;
                self.retry = RETRY_MIN;
                info!(
                    frontends = self.programmed.applied().revnat.len(),
                    "ready: maps in sync"
                );
            }
            Ok(()) => self.retry = RETRY_MIN,
            Err(e) => {
                error!(
                    error = format!("{e:#}"),
                    retry_in = ?self.retry,
                    "programming the maps failed"
                );
                self.sync_at = Some(Instant::now() + self.retry);
                self.retry = (self.retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Takes out of the maps every adopted frontend with a hole (a slot, backend
/// or table entry missing), which no round of this agent leaves: only a map
/// resized below what it held, whose entries did not all fit, or a write by
/// another hand does. Such a frontend would drop some of its packets and,
/// counted as served, keep its broken room; removed, the first round programs
/// it whole where there is room, or refuses it by name.
fn remove_holes(dataplane: &mut Dataplane, applied: &mut MapState, status: &Shared) {
    let mut write = |op: desired::MapOp, applied: &mut MapState| match dataplane.write(&op) {
        Ok(()) => applied.apply(&op),
        Err(e) => {
            status.lock().unwrap().metrics.map_write_failures.inc();
            warn!(error = format!("{e:#}"), ?op, "removing it");
        }
    };
    for (head, hole) in desired::apply::holes(applied) {
        warn!(
            frontend = %std::net::SocketAddr::new(head.addr, head.port),
            hole,
            "an adopted frontend is not whole; removed until it is programmed again"
        );
        for op in desired::apply::removal(applied, &head) {
            write(op, applied);
        }
    }
    let orphans = desired::apply::orphan_slots(applied);
    if !orphans.is_empty() {
        warn!(
            slots = orphans.len(),
            "adopted service slots no frontend reaches are removed"
        );
    }
    for slot in orphans {
        write(desired::MapOp::DelService(slot), applied);
    }
}

/// Writes the node settings (from `node`'s addresses and the flags) when
/// they differ from what was last written.
fn program_node(
    dataplane: &mut Dataplane,
    written: &mut settings::NodeConfig,
    node: &NodeInfo,
    config: &Config,
) {
    let wanted = settings::node_config(
        node.snat_address(),
        node.snat_address6(),
        config.nat_ports,
        config.service_cidrs,
    );
    if wanted == *written {
        return;
    }
    match dataplane.set_config(&wanted) {
        Ok(()) => {
            *written = wanted;
            info!(
                snat = ?node.snat_address(),
                snat6 = ?node.snat_address6(),
                addresses = ?node.addresses,
                addresses6 = ?node.addresses6,
                "node settings programmed"
            );
        }
        Err(e) => error!(error = format!("{e:#}"), "writing the node settings"),
    }
}

/// The addresses of the node's interfaces, where `--nodeport-addresses`
/// names ranges of them (read each round: an address added later is
/// picked up); none for `primary`, which reads the Node alone. Unreadable:
/// logged, and no NodePort answers until a round reads them.
fn node_addresses(chosen: &NodePortAddresses) -> Vec<IpAddr> {
    if *chosen == NodePortAddresses::Primary {
        return Vec::new();
    }
    crate::kernel::netinfo::addresses().unwrap_or_else(|e| {
        warn!(
            error = format!("{e:#}"),
            "reading the node's addresses for --nodeport-addresses"
        );
        Vec::new()
    })
}

/// Each map's size, for the metrics.
fn note_capacity(status: &Shared, capacity: &desired::Capacity, sizes: &MapSizes) {
    let metrics = &status.lock().unwrap().metrics;
    for (map, size) in [
        ("services", capacity.services),
        ("backends", capacity.backends),
        ("revnat", capacity.revnat),
        ("maglev", capacity.maglev),
        ("source_ranges", capacity.source_ranges),
        ("conntrack", sizes.conntrack as usize),
        ("nat", sizes.nat as usize),
        ("affinity", sizes.affinity as usize),
    ] {
        metrics
            .map_capacity
            .get_or_create(&metrics::label("map", map))
            .set(size as i64);
    }
}

fn report_skipped(cache: &FrontendCache, status: &Shared) {
    status
        .lock()
        .unwrap()
        .metrics
        .services_skipped
        .set(cache.skipped().count() as i64);
    for skip in cache.skipped() {
        debug!(%skip, "not proxied");
    }
}

/// Logs the end of a watch's first list (the agent's start, phase by phase).
fn first_list<T: watch::Grouped>(kind: &'static str, listed: bool, store: &Store<T>) {
    if !listed && store.ready() {
        info!(kind, objects = store.len(), "first list read");
    }
}

/// Applies one EndpointSlice event to the store and notes its trigger time
/// for the network programming latency. Returns whether the store changed,
/// and the Service of the slice.
fn on_slice(
    store: &mut Store<Slice>,
    triggers: &mut Triggers,
    cache: &mut FrontendCache,
    event: Change<Slice>,
) -> (bool, Option<String>) {
    let (read, deleted) = match &event {
        watcher::Event::Apply(read) | watcher::Event::InitApply(read) => (read, false),
        watcher::Event::Delete(read) => (read, true),
        watcher::Event::Init | watcher::Event::InitDone => {
            cache.all = true;
            return (store.apply(event), None);
        }
    };
    // During a relist the store still serves the previous list: compare with
    // that.
    let before = store.get(&read.key);
    let differs = before != read.value.as_ref();
    let trigger = read.trigger;
    let service_before = before.map(|s| s.service.clone());
    let service_after = read.value.as_ref().map(|s| s.service.clone());
    let changed = store.apply(event);
    // A slice can move from one Service to another: both change.
    for service in [&service_before, &service_after].into_iter().flatten() {
        cache.touch(&**service);
    }
    let service = service_after.or(service_before).map(|s| s.to_string());
    if let Some(service) = &service {
        if deleted {
            triggers.deleted(service);
        } else {
            triggers.updated(service, trigger, differs);
        }
    }
    (changed, service)
}

/// A services file, with the default scheduler filled in.
fn read_file(path: &PathBuf, scheduler: Scheduler) -> Result<ServiceFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut file: ServiceFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    settings::fill_defaults(&mut file.services, scheduler);
    Ok(file)
}

fn v4(address: &IpAddr) -> Option<Ipv4Addr> {
    match address {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    }
}

fn v6(address: &IpAddr) -> Option<Ipv6Addr> {
    match address {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    }
}

/// Finds the EndpointSlice version, retrying while the API server is unreachable.
async fn discover(client: Client) -> SliceVersion {
    let mut delay = Duration::from_millis(200);
    loop {
        match watch::slice_version(&client).await {
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
fn collect_garbage(
    dataplane: &mut Dataplane,
    config: &Config,
    applied: &MapState,
    status: &Shared,
) {
    prune_traffic(dataplane, applied, status);
    let report = match dataplane.gc(monotonic_ns(), &config.lifetimes) {
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
    metrics
        .conntrack_entries
        .set(report.conntrack_entries as i64);
    metrics.nat_entries.set(report.nat_entries as i64);
    for (map, family, entries) in &report.entries {
        let labels = vec![("map", map.to_string()), ("family", family.to_string())];
        metrics
            .map_entries
            .get_or_create(&labels)
            .set(*entries as i64);
    }
    metrics.conntrack_flows.clear();
    for (state, flows) in &report.flows {
        let labels = vec![
            ("protocol", state.protocol().to_string()),
            ("state", state.state().to_string()),
        ];
        metrics
            .conntrack_flows
            .get_or_create(&labels)
            .set(*flows as i64);
    }
    metrics
        .nat_ports_in_use
        .set(report.held.values().map(|&n| i64::from(n)).sum());
    metrics.nat_ports_in_use_max.set(
        report
            .held
            .values()
            .map(|&n| i64::from(n))
            .max()
            .unwrap_or(0),
    );
    metrics
        .nat_ports_per_backend
        .set(i64::from(max) - i64::from(min) + 1);
    for (backend, dropped) in report.exhausted {
        metrics
            .nat_port_exhaustion
            .get_or_create(&metrics::label("backend", backend))
            .inc_by(dropped);
    }
}

/// Names the traffic counters' frontend ids (and backend ids, when
/// per-backend series are served) after a round.
fn name_traffic(frontends: &[FrontendSpec], programmed: &Programmed, status: &Shared) {
    let book = status.lock().unwrap().metrics.traffic.clone();
    let mut book = book.lock().unwrap();
    for spec in frontends {
        if let Some(id) = programmed.ids.frontend_id(&spec.frontend) {
            book.name_frontend(id, traffic::service_of(&spec.name));
        }
    }
    if book.per_backend {
        for (id, b) in &programmed.applied().backends {
            let protocol = match b.proto {
                proxy_common::proto::UDP => "UDP",
                proxy_common::proto::SCTP => "SCTP",
                _ => "TCP",
            };
            let at = std::net::SocketAddr::new(b.addr, b.port);
            book.name_backend(*id, &format!("{at}/{protocol}"));
        }
    }
}

/// Removes the traffic counters of pairs gone from the maps, keeping
/// their counts in the totals.
fn prune_traffic(dataplane: &mut Dataplane, applied: &MapState, status: &Shared) {
    match dataplane.prune_traffic(applied) {
        Ok(gone) => {
            let book = status.lock().unwrap().metrics.traffic.clone();
            book.lock().unwrap().retire(
                &gone,
                |id| applied.revnat.contains_key(&id),
                |id| applied.backends.contains_key(&id),
            );
        }
        Err(e) => warn!(error = format!("{e:#}"), "pruning the traffic counters"),
    }
}

fn watch_error(status: &Shared, kind: &'static str, e: &watcher::Error) {
    let mut status = status.lock().unwrap();
    status.metrics.watch_errors.inc();
    status.health.watch_failed(kind);
    warn!(kind, error = %e, "watch failed; retrying with backoff");
}

/// What a programming round covers.
enum Round {
    /// Every frontend, diffed against everything the maps hold.
    Full(Vec<FrontendSpec>),
    /// Only the frontends of some Services changed, and `gone` are no longer
    /// served: the round's cost follows the change.
    Partial {
        frontends: Vec<FrontendSpec>,
        gone: Vec<Frontend>,
    },
}

/// The first and the longest wait before a round whose writes did not all
/// land is tried again.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// How often flows go from an older agent's maps into the new ones while
/// the uplinks still run the old programs (the Node is not read yet). A TCP
/// handshake whose reply was missed then succeeds on its first retransmission.
const CARRY_PERIOD: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Programs the maps: desired state (within the maps' capacity), diff against
/// what they hold, ordered writes. A write that fails leaves its frontend as
/// it was and the rest is still written; the round then fails, to be retried.
fn sync(
    dataplane: &mut Dataplane,
    round: Round,
    programmed: &mut Programmed,
    status: &Shared,
) -> Result<()> {
    let write = dataplane.writes(Writing::Batched);
    let (report, scope, frontends) = match round {
        Round::Full(frontends) => (programmed.full(&frontends, write), None, frontends),
        Round::Partial { frontends, gone } => {
            let scope: Vec<Frontend> = frontends
                .iter()
                .map(|f| f.frontend)
                .chain(gone.iter().copied())
                .collect();
            let report = programmed.partial(&frontends.iter().collect::<Vec<_>>(), &gone, write);
            (report, Some(scope), frontends)
        }
    };
    name_traffic(&frontends, programmed, status);
    for problem in &report.problems {
        warn!(%problem, "service not programmed");
    }
    let applied = programmed.applied();
    let mut status = status.lock().unwrap();
    status.metrics.syncs.inc();
    status.note_problems(scope.as_deref(), &report.problems);
    status.note_services(
        scope.as_deref(),
        frontends
            .iter()
            .map(|f| (f.frontend, traffic::service_of(&f.name).into())),
    );
    status.metrics.frontends.set(applied.revnat.len() as i64);
    for (map, family, entries) in programmed.fill().rows() {
        let labels = vec![("map", map.to_string()), ("family", family.to_string())];
        status
            .metrics
            .map_entries
            .get_or_create(&labels)
            .set(entries as i64);
    }
    status.metrics.backends.set(applied.backends.len() as i64);
    let failures = &report.outcome.failures;
    if let Some(first) = failures.first() {
        status.metrics.sync_errors.inc();
        status
            .metrics
            .map_write_failures
            .inc_by(failures.len() as u64);
        for (rev, reason) in &report.outcome.failed_frontends {
            let frontend = applied
                .revnat
                .get(rev)
                .map(|r| std::net::SocketAddr::new(r.addr, r.port).to_string());
            warn!(id = rev, ?frontend, reason, "frontend left as it was");
        }
        anyhow::bail!(
            "{} of {} map writes did not land; first {:?}: {}",
            failures.len(),
            report.writes,
            first.op,
            first.reason
        );
    }
    if report.writes > 0 {
        info!(
            writes = report.writes,
            frontends = applied.revnat.len(),
            backends = applied.backends.len(),
            "maps programmed"
        );
    }
    status.health.synced();
    drop(status);
    if scope.is_none() {
        // A full round builds every map's contents beside what the maps hold.
        release_free_memory();
    }
    match dataplane.prune_affinity(applied) {
        Ok(0) => {}
        Ok(n) => debug!(entries = n, "affinity to departed backends dropped"),
        Err(e) => warn!(error = format!("{e:#}"), "pruning affinity"),
    }
    Ok(())
}

/// Gives the heap's free pages back to the kernel. A full round, a resync's
/// read of the maps and the first list of every Service need several times
/// what the agent keeps, for a moment; without this the node would charge
/// part of that moment's memory to the agent for as long as it runs. The
/// agent's allocator is mimalloc (`main.rs`); where it is not (tests), this
/// finds nothing to give back.
fn release_free_memory() {
    // SAFETY: mi_collect only frees pages of mimalloc's own that hold no
    // allocation; it takes no pointer.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use k8s_openapi::api::core::v1::Service;

    use super::*;
    use crate::{k8s::slices::SliceObject, serve::latency};

    /// A slice event as the watch delivers it: slice `name` of Service
    /// `service`, one endpoint at `address`, changed at `trigger`.
    fn slice_event(name: &str, service: &str, address: &str, trigger: &str) -> Change<Slice> {
        let object = serde_json::json!({
            "metadata": {
                "namespace": "default", "name": name,
                "labels": {"kubernetes.io/service-name": service},
                "annotations": {(latency::TRIGGER_TIME_ANNOTATION): trigger},
            },
            "addressType": "IPv4",
            "ports": [{"port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address]}],
        });
        let object: SliceObject = serde_json::from_value(object).unwrap();
        watch::read(
            watcher::Event::Apply(object),
            watch::convert_slice(SliceVersion::V1),
        )
    }

    /// A slice event counts for the programming latency only when what the
    /// agent reads of the slice changed, and marks for the next round both
    /// the Service the slice belongs to now and the one it belonged to.
    #[test]
    fn a_slice_event_counts_its_change_and_touches_the_services_it_moves_between() {
        let node = NodeInfo::default();
        let mut stores = Stores::default();
        stores
            .services
            .apply(watch::read(watcher::Event::Init, watch::keep_service));
        for name in ["web", "db"] {
            let svc: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "default", "name": name},
                "spec": {"clusterIP": if name == "web" {"10.96.0.1"} else {"10.96.0.2"},
                         "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]},
            }))
            .unwrap();
            stores.services.apply(watch::read(
                watcher::Event::InitApply(svc),
                watch::keep_service,
            ));
        }
        stores
            .services
            .apply(watch::read(watcher::Event::InitDone, watch::keep_service));
        stores
            .slices
            .apply(watch::read(watcher::Event::Init, |_: SliceObject| None));
        stores
            .slices
            .apply(watch::read(watcher::Event::InitDone, |_: SliceObject| None));
        let mut cache = FrontendCache::default();
        cache.refresh(&stores, &node, Scheduler::FlowHash);
        let started: jiff::Timestamp = "2026-12-05T10:00:00Z".parse().unwrap();
        let mut triggers = Triggers::new(started);
        let now = started + jiff::SignedDuration::from_secs(60);
        // The Services the next refresh recomputes, by the frontends it hands over.
        let touched = |stores: &Stores, cache: &mut FrontendCache| -> Vec<String> {
            let Changed::Services(frontends, _) = cache.refresh(stores, &node, Scheduler::FlowHash)
            else {
                panic!("a partial refresh");
            };
            let mut names: Vec<String> = frontends.into_iter().map(|f| f.name).collect();
            names.sort();
            names
        };

        let new = slice_event("web-1", "web", "10.244.0.1", "2026-12-05T10:00:10Z");
        let (changed, service) = on_slice(&mut stores.slices, &mut triggers, &mut cache, new);
        assert!(changed);
        assert_eq!(service.as_deref(), Some("default/web"));
        assert_eq!(touched(&stores, &mut cache), ["default/web"]);

        // The same endpoints again, with a later trigger time: nothing the
        // maps hold changed, so no latency is measured for it.
        let same = slice_event("web-1", "web", "10.244.0.1", "2026-12-05T10:00:20Z");
        on_slice(&mut stores.slices, &mut triggers, &mut cache, same);
        touched(&stores, &mut cache);
        // Another address: measured.
        let other = slice_event("web-1", "web", "10.244.0.2", "2026-12-05T10:00:30Z");
        on_slice(&mut stores.slices, &mut triggers, &mut cache, other);
        touched(&stores, &mut cache);
        assert_eq!(triggers.programmed(now), [50.0, 30.0]);

        // The slice moves to another Service: both are recomputed.
        let moved = slice_event("web-1", "db", "10.244.0.2", "2026-12-05T10:00:40Z");
        let (changed, service) = on_slice(&mut stores.slices, &mut triggers, &mut cache, moved);
        assert!(changed);
        assert_eq!(service.as_deref(), Some("default/db"));
        assert_eq!(touched(&stores, &mut cache), ["default/db", "default/web"]);
    }

    /// A watch whose task panics (reading an object, say) ends its stream,
    /// and the loop stops with an error instead of going on without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_whose_task_panics_stops_the_agent() {
        let source = stream::iter([1, 2]).map(|i| {
            assert!(i < 2, "a bug reading an object");
            i
        });
        let mut events = spawned(source);
        assert_eq!(watched(events.next().await, "node").unwrap(), 1);
        let end = watched(events.next().await, "node").unwrap_err();
        assert_eq!(end.to_string(), "the node watch stopped");
    }

    /// A spawned watch pulls from its source before the loop asks (its
    /// first list goes out while the programs load), as far as the channel
    /// holds, and hands every event over in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spawned_watch_reads_ahead_of_the_loop_and_keeps_the_order() {
        static PULLED: AtomicUsize = AtomicUsize::new(0);
        let total = EVENTS_IN_FLIGHT * 2;
        let source = stream::iter(0..total).inspect(|_| {
            PULLED.fetch_add(1, Ordering::SeqCst);
        });
        let mut events = spawned(source);
        let deadline = Instant::now() + Duration::from_secs(10);
        while PULLED.load(Ordering::SeqCst) < EVENTS_IN_FLIGHT && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pulled = PULLED.load(Ordering::SeqCst);
        assert!(
            (EVENTS_IN_FLIGHT..=EVENTS_IN_FLIGHT + 1).contains(&pulled),
            "{pulled} events pulled before the loop took one: the channel's worth"
        );
        let mut taken = Vec::new();
        while let Some(event) = events.next().await {
            taken.push(event);
            if taken.len() == total {
                break;
            }
        }
        assert_eq!(taken, (0..total).collect::<Vec<_>>());
    }
}
