//! `/metrics`, in Prometheus' text format, through the Prometheus project's
//! Rust client. kube-proxy's metrics keep kube-proxy's names and meanings
//! (`kubeproxy_*`), so dashboards, alerts and the SIG Scalability SLI
//! queries written for it read Ferry's the same; the rest are Ferry's own
//! (`ferry_*`). Every label takes values from a fixed set, or one per map,
//! uplink or exhausted backend: the README lists them.

use std::{
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::serve::{
    latency,
    traffic::{Book, TrafficCollector},
};

/// A metric's labels: names from the code, values from a bounded set.
pub type Labels = Vec<(&'static str, String)>;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The agent's metrics. Every handle is shared with the registry, which
/// reads them at each scrape.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,

    // kube-proxy's.
    /// Every successful programming round, full or partial.
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    /// When the maps last matched the API server's state (Unix seconds).
    pub last_sync: Gauge<f64, AtomicU64>,
    /// When a change was last queued for programming (Unix seconds).
    pub last_queued: Gauge<f64, AtomicU64>,
    /// From each EndpointSlice change's trigger time to its programming.
    pub network_programming: Histogram,
    /// Services whose endpoints (Services whose own spec) changed since the
    /// last programming round, and every such change.
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes: Counter,
    /// Service ports with a Local traffic policy and no endpoint on this
    /// node, by `traffic_policy` (internal, external).
    pub no_local_endpoints: Family<Labels, Gauge>,
    /// Answers of /healthz and /livez, by HTTP `code`.
    pub healthz: Family<Labels, Counter>,
    pub livez: Family<Labels, Counter>,

    // Ferry's.
    pub syncs: Counter,
    pub sync_errors: Counter,
    pub watch_errors: Counter,
    pub attach_errors: Counter,
    pub services_skipped: Gauge,
    pub service_problems: Gauge,
    /// Frontends refused (or kept as they were) because a map is full.
    pub frontends_refused: Gauge,
    /// Map writes that failed or were skipped behind a failed one.
    pub map_write_failures: Counter,
    /// Pod interfaces whose tc filters were found gone and put back.
    pub filters_restored: Counter,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub pod_interfaces: Gauge,
    /// Endpoints on this node that the kernel reaches through an interface
    /// without the pod programs (see `kernel::ifaces::unattached`).
    pub local_endpoints_unattached: Gauge,
    /// Entries in the conntrack and NAT maps after the last garbage collection.
    pub conntrack_entries: Gauge,
    pub nat_entries: Gauge,
    /// Flows (forward conntrack entries) by `protocol` and `state` (open,
    /// closing), after the last garbage collection.
    pub conntrack_flows: Family<Labels, Gauge>,
    /// NAT ports held over every backend, the most any one backend holds,
    /// and how many one backend can have (the `--nat-ports` range).
    pub nat_ports_in_use: Gauge,
    pub nat_ports_in_use_max: Gauge,
    pub nat_ports_per_backend: Gauge,
    /// New flows dropped because every NAT port towards the backend was
    /// held, by `backend` (`address:port/protocol`).
    pub nat_port_exhaustion: Family<Labels, Counter>,
    /// Pinned maps of an older agent not (or not wholly) carried over at
    /// start, by `map`.
    pub maps_not_carried: Family<Labels, Counter>,
    /// Entries by `map` and `family`, and each map's size by `map` (each
    /// family's map has that size; Maglev's serves both).
    pub map_entries: Family<Labels, Gauge>,
    pub map_capacity: Family<Labels, Gauge>,
    /// The uplinks, by `interface` and attach `mode`.
    pub uplink_attach_mode: Family<Labels, Gauge>,
    /// What the traffic counters' ids stand for (see [`crate::serve::traffic`]).
    pub traffic: Arc<Mutex<Book>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Metrics {
    /// The metrics, with the programs' counters read from the pinned
    /// statistics map in `pin_dir` at each scrape (none without one).
    pub fn new(pin_dir: Option<PathBuf>) -> Self {
        let sync_buckets = latency::sync_buckets;
        let mut m = Self {
            registry: Registry::default(),
            sync_duration: Histogram::new(sync_buckets()),
            sync_full_duration: Histogram::new(sync_buckets()),
            sync_partial_duration: Histogram::new(sync_buckets()),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            network_programming: Histogram::new(latency::programming_buckets()),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            syncs: Counter::default(),
            sync_errors: Counter::default(),
            watch_errors: Counter::default(),
            attach_errors: Counter::default(),
            services_skipped: Gauge::default(),
            service_problems: Gauge::default(),
            frontends_refused: Gauge::default(),
            map_write_failures: Counter::default(),
            filters_restored: Counter::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            pod_interfaces: Gauge::default(),
            local_endpoints_unattached: Gauge::default(),
            conntrack_entries: Gauge::default(),
            nat_entries: Gauge::default(),
            conntrack_flows: Family::default(),
            nat_ports_in_use: Gauge::default(),
            nat_ports_in_use_max: Gauge::default(),
            nat_ports_per_backend: Gauge::default(),
            nat_port_exhaustion: Family::default(),
            maps_not_carried: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            uplink_attach_mode: Family::default(),
            traffic: Arc::default(),
        };
        let r = &mut m.registry;
        // kube-proxy's, with its help texts.
        let kp = r.sub_registry_with_prefix("kubeproxy");
        kp.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        kp.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        kp.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued.clone(),
        );
        kp.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        // A gauge whose name ends in _total, as kube-proxy's does.
        kp.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        kp.register(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        kp.register(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez.clone(),
        );

        let f = r.sub_registry_with_prefix("ferry");
        let counters = [
            (&m.syncs, "syncs", "Map programming rounds"),
            (
                &m.sync_errors,
                "sync_errors",
                "Programming rounds that failed",
            ),
            (
                &m.watch_errors,
                "watch_errors",
                "API watch failures (retried)",
            ),
            (
                &m.attach_errors,
                "attach_errors",
                "Pod interfaces the programs could not attach to",
            ),
            (
                &m.map_write_failures,
                "map_write_failures",
                "Map writes that failed, or were skipped behind a failed write of the same frontend",
            ),
            (
                &m.filters_restored,
                "tc_filters_restored",
                "Pod interfaces whose tc filters were found gone at a resync and put back",
            ),
        ];
        for (counter, name, help) in counters {
            f.register(name, help, counter.clone());
        }
        let gauges = [
            (
                &m.services_skipped,
                "services_skipped",
                "Services or ports not proxied (headless, ExternalName, ...)",
            ),
            (
                &m.service_problems,
                "service_problems",
                "Frontends that could not be programmed",
            ),
            (
                &m.frontends_refused,
                "frontends_refused_map_full",
                "Frontends not programmed, or kept as they were, because a map is full (see /statusz)",
            ),
            (&m.frontends, "frontends", "Frontends in the maps"),
            (&m.backends, "backends", "Backends in the maps"),
            (
                &m.pod_interfaces,
                "pod_interfaces",
                "Pod interfaces with the programs attached",
            ),
            (
                &m.local_endpoints_unattached,
                "local_endpoints_unattached",
                "Endpoints on this node routed through an interface without the pod programs: their pods' connections to Services are not translated (extend --pod-iface-pattern)",
            ),
            (
                &m.conntrack_entries,
                "conntrack_entries",
                "Conntrack entries (both directions of each flow) after the last garbage collection",
            ),
            (
                &m.nat_entries,
                "nat_entries",
                "NAT entries (one per flow SNATed to a remote backend) after the last garbage collection",
            ),
            (
                &m.nat_ports_in_use,
                "nat_ports_in_use",
                "NAT ports held by flows, over every remote backend",
            ),
            (
                &m.nat_ports_in_use_max,
                "nat_ports_in_use_max",
                "NAT ports held towards the backend that holds most (new flows to it are dropped at ferry_nat_ports_per_backend)",
            ),
            (
                &m.nat_ports_per_backend,
                "nat_ports_per_backend",
                "NAT ports one remote backend can be reached from (the --nat-ports range)",
            ),
        ];
        for (gauge, name, help) in gauges {
            f.register(name, help, gauge.clone());
        }
        f.register(
            "conntrack_flows",
            "Flows in conntrack by protocol and state (open, closing) after the last garbage collection",
            m.conntrack_flows.clone(),
        );
        f.register(
            "nat_port_exhaustion_drops",
            "New flows dropped because every NAT port towards the backend was held",
            m.nat_port_exhaustion.clone(),
        );
        f.register(
            "maps_not_carried",
            "Pinned maps of an older agent whose entries were not (or not all) carried over at start",
            m.maps_not_carried.clone(),
        );
        f.register(
            "map_entries",
            "Entries in each map, by family (conntrack, nat and affinity after the last garbage collection)",
            m.map_entries.clone(),
        );
        f.register(
            "map_capacity_entries",
            "The size of each map, in entries (of each family's map)",
            m.map_capacity.clone(),
        );
        f.register(
            "uplink_attach_mode",
            "The uplinks, by interface and attach mode (native, generic, tc)",
            m.uplink_attach_mode.clone(),
        );
        if let Some(pin_dir) = pin_dir {
            f.register_collector(Box::new(Datapath {
                pin_dir: pin_dir.clone(),
            }));
            f.register_collector(Box::new(TrafficCollector {
                pin_dir,
                book: m.traffic.clone(),
            }));
        }
        m
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// A programming round succeeded: `full` or partial, taking `took`.
    pub fn synced(&self, full: bool, took: Duration) {
        let seconds = took.as_secs_f64();
        self.sync_duration.observe(seconds);
        match full {
            true => self.sync_full_duration.observe(seconds),
            false => self.sync_partial_duration.observe(seconds),
        }
        self.last_sync.set(unix_now());
        self.endpoint_changes_pending.set(0);
        self.service_changes_pending.set(0);
    }

    /// A change was queued for programming.
    pub fn queued(&self) {
        self.last_queued.set(unix_now());
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One label.
pub fn label(name: &'static str, value: impl ToString) -> Labels {
    vec![(name, value.to_string())]
}

/// The programs' verdict counters, read from the pinned per-CPU statistics
/// map (summed over the CPUs) at each scrape: packets and bytes by
/// `verdict` (the names `inspect stats` prints; 31 of them).
#[derive(Debug)]
struct Datapath {
    pin_dir: PathBuf,
}

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Unreadable (the maps are being replaced): this scrape goes without.
        let Ok(stats) = proxy_common::pinned::Pinned::new(&self.pin_dir).stats() else {
            return Ok(());
        };
        type Value = fn(&proxy_common::StatCounter) -> u64;
        let rows: [(&str, &str, Value); 2] = [
            (
                "datapath_packets",
                "Packets the programs handled, by verdict (pass_*, fwd_*, rev_*, reject_*, drop_*)",
                |c| c.packets,
            ),
            (
                "datapath_bytes",
                "Bytes of the packets the programs handled, by verdict",
                |c| c.bytes,
            ),
        ];
        for (name, help, value) in rows {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (verdict, counter) in &stats {
                let labels = [("verdict", *verdict)];
                ConstCounter::new(value(counter)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_families_are_served_with_their_names() {
        let metrics = Metrics::default();
        let text = metrics.render();
        assert!(text.contains("# HELP ferry_syncs_total Map programming rounds.\n"));
        assert!(!text.contains("ferry_nat_port_exhaustion_drops_total"));
        metrics
            .nat_port_exhaustion
            .get_or_create(&label("backend", "10.244.2.3:8080/TCP"))
            .inc_by(7);
        metrics.nat_entries.set(3);
        metrics
            .maps_not_carried
            .get_or_create(&label("map", "nat4_v1"))
            .inc();
        let text = metrics.render();
        assert!(text.contains("# TYPE ferry_nat_port_exhaustion_drops_total counter\n"));
        assert!(
            text.contains(
                "ferry_nat_port_exhaustion_drops_total{backend=\"10.244.2.3:8080/TCP\"} 7\n"
            ),
            "{text}"
        );
        assert!(text.contains("\nferry_nat_entries 3\n"), "{text}");
        assert!(
            text.contains("ferry_maps_not_carried_total{map=\"nat4_v1\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn kube_proxys_metrics_keep_kube_proxys_names() {
        let metrics = Metrics::default();
        metrics.synced(true, Duration::from_millis(3));
        metrics.synced(false, Duration::from_millis(1));
        metrics.endpoint_changes.inc();
        metrics
            .no_local_endpoints
            .get_or_create(&label("traffic_policy", "external"))
            .set(2);
        metrics.network_programming.observe(0.003);
        let text = metrics.render();
        for line in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 2\n",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1\n",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 2\n",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.0025\"} 0\n",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.005\"} 1\n",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1\n",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0\n",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 2\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        let last = text
            .lines()
            .find_map(|l| l.strip_prefix("kubeproxy_sync_proxy_rules_last_timestamp_seconds "))
            .unwrap();
        assert!(last.parse::<f64>().unwrap() > 1.7e9, "{last}");
    }
}
