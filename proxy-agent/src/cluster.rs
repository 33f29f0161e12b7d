//! From Kubernetes objects to the services the dataplane serves, as kube-proxy
//! reads them. Pure: no API calls here, so every rule has a unit test.
//!
//! EndpointSlices arrive as `discovery.k8s.io/v1` or `v1beta1` (API servers before
//! 1.21 serve only the latter); both become one [`Slice`] model.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::core::v1::{Node, Service as K8sService};
use serde::Deserialize;

use crate::{
    model::{Cidr, Endpoint, Frontend, Protocol, Scheduler, Service},
    topology::{self, EndpointInfo, Policy},
};

/// sessionAffinity ClientIP's timeout when the Service sets none (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Annotation choosing a Service's scheduler: `flow-hash` (default), `maglev`,
/// `source-hash` or `round-robin`.
pub const SCHEDULER_ANNOTATION: &str = "ferry.dev/scheduler";

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy (kube-proxy skips them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are not proxied at all.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// One EndpointSlice, whichever API version it came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    /// `namespace/name` of the Service this slice belongs to.
    pub service: String,
    pub address_type: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub hint_zones: Vec<String>,
    pub hint_nodes: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Conditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize, Default)]
struct ObjectMeta {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The parts of a `discovery.k8s.io/v1` EndpointSlice that proxying needs.
mod v1 {
    use super::*;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointSlice {
        #[serde(default)]
        pub metadata: ObjectMeta,
        pub address_type: String,
        #[serde(default)]
        pub ports: Option<Vec<SlicePort>>,
        #[serde(default)]
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        pub addresses: Vec<String>,
        #[serde(default)]
        pub conditions: Conditions,
        pub node_name: Option<String>,
        pub zone: Option<String>,
        pub hints: Option<Hints>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Hints {
        #[serde(default)]
        pub for_zones: Vec<ForZone>,
        #[serde(default)]
        pub for_nodes: Vec<ForZone>,
    }

    #[derive(Deserialize)]
    pub struct ForZone {
        pub name: String,
    }
}

/// The parts of a `discovery.k8s.io/v1beta1` EndpointSlice that proxying needs:
/// node and zone live in `topology`; `nodeName` exists from 1.20.
mod v1beta1 {
    use super::*;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointSlice {
        #[serde(default)]
        pub metadata: ObjectMeta,
        pub address_type: String,
        #[serde(default)]
        pub ports: Option<Vec<SlicePort>>,
        #[serde(default)]
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        pub addresses: Vec<String>,
        #[serde(default)]
        pub conditions: Conditions,
        #[serde(default)]
        pub topology: BTreeMap<String, String>,
        pub node_name: Option<String>,
        pub hints: Option<super::v1::Hints>,
    }
}

fn hint_names(hints: Option<&Vec<v1::ForZone>>) -> Vec<String> {
    hints
        .into_iter()
        .flatten()
        .map(|h| h.name.clone())
        .collect()
}

/// EndpointSlice API versions the agent can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceVersion {
    V1,
    V1beta1,
}

impl SliceVersion {
    pub const fn api_version(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V1beta1 => "v1beta1",
        }
    }
}

/// Why an EndpointSlice could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    #[error("malformed EndpointSlice: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("EndpointSlice without the {SERVICE_NAME_LABEL} label")]
    NoService,
}

/// Reads an EndpointSlice (the whole object as JSON) of the given version.
pub fn parse_slice(version: SliceVersion, object: serde_json::Value) -> Result<Slice, SliceError> {
    let (meta, address_type, ports, endpoints) = match version {
        SliceVersion::V1 => {
            let s: v1::EndpointSlice = serde_json::from_value(object)?;
            let endpoints = s
                .endpoints
                .into_iter()
                .map(|e| SliceEndpoint {
                    addresses: e.addresses,
                    ready: e.conditions.ready,
                    serving: e.conditions.serving,
                    terminating: e.conditions.terminating,
                    node_name: e.node_name,
                    zone: e.zone,
                    hint_zones: hint_names(e.hints.as_ref().map(|h| &h.for_zones)),
                    hint_nodes: hint_names(e.hints.as_ref().map(|h| &h.for_nodes)),
                })
                .collect();
            (s.metadata, s.address_type, s.ports, endpoints)
        }
        SliceVersion::V1beta1 => {
            let s: v1beta1::EndpointSlice = serde_json::from_value(object)?;
            let endpoints = s
                .endpoints
                .into_iter()
                .map(|mut e| SliceEndpoint {
                    addresses: e.addresses,
                    ready: e.conditions.ready,
                    serving: e.conditions.serving,
                    terminating: e.conditions.terminating,
                    node_name: e
                        .node_name
                        .or_else(|| e.topology.remove("kubernetes.io/hostname")),
                    zone: e.topology.remove("topology.kubernetes.io/zone"),
                    hint_zones: hint_names(e.hints.as_ref().map(|h| &h.for_zones)),
                    hint_nodes: hint_names(e.hints.as_ref().map(|h| &h.for_nodes)),
                })
                .collect();
            (s.metadata, s.address_type, s.ports, endpoints)
        }
    };
    let name = meta
        .labels
        .get(SERVICE_NAME_LABEL)
        .ok_or(SliceError::NoService)?;
    Ok(Slice {
        service: format!("{}/{name}", meta.namespace.unwrap_or_default()),
        address_type,
        ports: ports.unwrap_or_default(),
        endpoints,
    })
}

/// Why a Service (or one of its ports) is not proxied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("{0}: ExternalName service")]
    ExternalName(String),
    #[error("{0}: headless service")]
    Headless(String),
    #[error("{0}: handled by another proxy ({SERVICE_PROXY_NAME_LABEL})")]
    OtherProxy(String),
    #[error("{0}: no IPv4 cluster IP")]
    NoIpv4ClusterIp(String),
    #[error("{0}: protocol {1} is not supported")]
    Protocol(String, String),
    #[error("{0}: invalid port {1}")]
    Port(String, i32),
    #[error("{0}: {1} (the agent's default scheduler is used)")]
    Scheduler(String, String),
    #[error("{0}: loadBalancerSourceRanges entry {1:?} is not an IPv4 range (left out; with no valid range left, no client reaches the LoadBalancer IPs)")]
    SourceRange(String, String),
}

fn protocol(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// What this node knows of itself: its name (for endpoint locality) and its
/// addresses (NodePort frontends listen on each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    /// The `topology.kubernetes.io/zone` label, for topology hints.
    pub zone: Option<String>,
}

impl NodeInfo {
    /// From the Node object: its InternalIP and ExternalIP IPv4 addresses.
    pub fn from_node(name: &str, node: Option<&Node>) -> Self {
        let mut addresses = Vec::new();
        for addr in node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
        {
            if matches!(addr.type_.as_str(), "InternalIP" | "ExternalIP") {
                if let Ok(ip) = addr.address.parse::<Ipv4Addr>() {
                    if !addresses.contains(&ip) {
                        addresses.push(ip);
                    }
                }
            }
        }
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .cloned();
        Self {
            name: name.to_string(),
            addresses,
            zone,
        }
    }

    /// The address SNATed traffic leaves with: the first InternalIP.
    pub fn snat_address(&self) -> Option<Ipv4Addr> {
        self.addresses.first().copied()
    }
}

/// A healthCheckNodePort this node serves for an externalTrafficPolicy=Local
/// LoadBalancer Service, with the number of its endpoints on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// Everything the dataplane and the agent serve for the cluster's objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: Vec<Service>,
    pub health_checks: Vec<HealthCheck>,
    pub skipped: Vec<Skip>,
}

/// Every endpoint of one Service port, from its slices (deduplicated by address),
/// with what kube-proxy's categorisation needs to know of it.
fn port_endpoints(
    slices: &[&Slice],
    port_name: &str,
    proto: Protocol,
    node: &NodeInfo,
) -> (Vec<Endpoint>, Vec<EndpointInfo>) {
    let mut seen = BTreeSet::new();
    let (mut endpoints, mut infos) = (Vec::new(), Vec::new());
    for slice in slices {
        let Some(target) = slice.ports.iter().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && protocol(p.protocol.as_deref()) == Some(proto)
        }) else {
            continue;
        };
        let Some(target_port) = target
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            // kube-proxy uses the first address of an endpoint only.
            let Some(address) = ep
                .addresses
                .first()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if !seen.insert((address, target_port)) {
                continue;
            }
            let mut info = EndpointInfo::from_conditions(ep.ready, ep.serving, ep.terminating);
            info.node_name = ep.node_name.clone();
            info.zone_hints = ep.hint_zones.iter().cloned().collect();
            info.node_hints = ep.hint_nodes.iter().cloned().collect();
            let local =
                !node.name.is_empty() && ep.node_name.as_deref() == Some(node.name.as_str());
            endpoints.push(Endpoint {
                address,
                port: target_port,
                local,
                terminating: info.terminating,
            });
            infos.push(info);
        }
    }
    (endpoints, infos)
}

/// The frontends to serve, from every Service and EndpointSlice the agent sees,
/// on `node`. Slices are matched to a Service port by port name and protocol (so
/// named target ports resolve per endpoint); only ready endpoints serve for now.
/// Each port gets its ClusterIP frontend; NodePort and LoadBalancer Services also
/// one per node address on the node port; externalIPs and LoadBalancer ingress
/// IPs one each. With externalTrafficPolicy=Local the external frontends serve
/// this node's endpoints only; loadBalancerSourceRanges apply to the
/// LoadBalancer IPs.
pub fn desired(k8s: &[&K8sService], slices: &[&Slice], node: &NodeInfo) -> Desired {
    let mut by_service: BTreeMap<&str, Vec<&Slice>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type == "IPv4" {
            by_service
                .entry(slice.service.as_str())
                .or_default()
                .push(slice);
        }
    }
    let mut out = Desired::default();
    for svc in k8s {
        let key = service_key(svc);
        let service_slices = by_service
            .get(key.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        desired_service(svc, service_slices, node, &mut out);
    }
    out
}

/// `namespace/name` of a Service: what its slices' service label names.
pub fn service_key(svc: &K8sService) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or(""),
        svc.metadata.name.as_deref().unwrap_or("")
    )
}

/// What one Service adds to [`desired`], given its IPv4 slices: the agent
/// recomputes only the Services whose objects changed.
pub fn desired_service(
    svc: &K8sService,
    service_slices: &[&Slice],
    node: &NodeInfo,
    out: &mut Desired,
) {
    let meta = &svc.metadata;
    let namespace = meta.namespace.as_deref().unwrap_or("");
    let name = meta.name.as_deref().unwrap_or("");
    let key = service_key(svc);
    let Some(spec) = &svc.spec else { return };
    let labels = meta.labels.as_ref();
    if spec.type_.as_deref() == Some("ExternalName") {
        out.skipped.push(Skip::ExternalName(key));
        return;
    }
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        out.skipped.push(Skip::OtherProxy(key));
        return;
    }
    let cluster_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => Vec::new(),
    };
    if cluster_ips.contains(&"None") || labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        out.skipped.push(Skip::Headless(key));
        return;
    }
    let Some(vip) = cluster_ips
        .iter()
        .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        out.skipped.push(Skip::NoIpv4ClusterIp(key));
        return;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let external_ips: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let lb_ips: Vec<Ipv4Addr> = if kind == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        ingress
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect()
    } else {
        Vec::new()
    };
    // Listed ranges restrict the LoadBalancer IPs even when none of them is
    // a valid IPv4 range: then no client gets through (fail closed).
    let source_ranges: Option<Vec<Cidr>> = spec
        .load_balancer_source_ranges
        .as_ref()
        .filter(|ranges| !ranges.is_empty())
        .map(|ranges| {
            ranges
                .iter()
                .filter_map(|r| match r.trim().parse() {
                    Ok(cidr) => Some(cidr),
                    Err(_) => {
                        out.skipped.push(Skip::SourceRange(key.clone(), r.clone()));
                        None
                    }
                })
                .collect()
        });
    let policy = Policy {
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local,
        has_external_frontends: matches!(kind, "NodePort" | "LoadBalancer")
            || !external_ips.is_empty(),
        ignore_node_hints: false,
    };
    let topology_node = topology::Node {
        name: node.name.clone(),
        zone: node.zone.clone(),
    };
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    // A scheduler this agent does not know is reported and left to the default.
    let scheduler = match meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(SCHEDULER_ANNOTATION))
    {
        None => None,
        Some(name) => match name.parse::<Scheduler>() {
            Ok(s) => Some(s),
            Err(e) => {
                out.skipped.push(Skip::Scheduler(key.clone(), e));
                None
            }
        },
    };
    let mut local_endpoints = 0;
    for port in spec.ports.iter().flatten() {
        let Some(proto) = protocol(port.protocol.as_deref()) else {
            out.skipped.push(Skip::Protocol(
                key.clone(),
                port.protocol.clone().unwrap_or_default(),
            ));
            continue;
        };
        let Ok(frontend_port) = u16::try_from(port.port) else {
            out.skipped.push(Skip::Port(key.clone(), port.port));
            continue;
        };
        let port_name = port.name.as_deref().unwrap_or("");
        let (all, infos) = port_endpoints(service_slices, port_name, proto, node);
        let selection = topology::categorize(&infos, &policy, &topology_node);
        let pick = |indexes: &[usize]| -> Vec<Endpoint> {
            let mut picked: Vec<Endpoint> = indexes.iter().map(|&i| all[i]).collect();
            picked.sort();
            picked
        };
        let internal = pick(selection.for_internal(&policy));
        let external_endpoints = pick(selection.for_external(&policy));
        // Every endpoint still serving keeps the connections it has, as
        // conntrack keeps them under kube-proxy: terminating ones, and those
        // the policy or the topology leave out of new connections.
        // UDP has no connection to keep: kube-proxy flushes UDP conntrack
        // entries of endpoints that stop taking new flows, so that clients
        // such as DNS resolvers move on at once. Here their backend entries go.
        let serving: Vec<usize> = (0..infos.len())
            .filter(|&i| proto == Protocol::Tcp && (infos[i].ready || infos[i].serving))
            .collect();
        let reachable = pick(&serving);
        if let Some(local) = &selection.local {
            local_endpoints = local_endpoints.max(local.len());
        }
        let label = if port_name.is_empty() {
            key.clone()
        } else {
            format!("{key}:{port_name}")
        };
        let frontend = |address: Ipv4Addr, port: u16| Frontend {
            address,
            port,
            protocol: proto,
        };
        out.services.push(Service {
            name: label.clone(),
            frontend: frontend(vip, frontend_port),
            endpoints: internal,
            reachable: reachable.clone(),
            local_only: policy.internal_local,
            source_ranges: None,
            affinity_timeout,
            scheduler,
        });
        let external =
            |address: Ipv4Addr, port: u16, ranges: &Option<Vec<Cidr>>, what: &str| Service {
                name: format!("{label} ({what} {address}:{port})"),
                frontend: frontend(address, port),
                endpoints: external_endpoints.clone(),
                reachable: reachable.clone(),
                local_only: external_local,
                source_ranges: ranges.clone(),
                affinity_timeout,
                scheduler,
            };
        let node_port = port
            .node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        if let (true, Some(node_port)) = (matches!(kind, "NodePort" | "LoadBalancer"), node_port) {
            for address in &node.addresses {
                out.services
                    .push(external(*address, node_port, &None, "nodeport"));
            }
        }
        for address in &external_ips {
            out.services
                .push(external(*address, frontend_port, &None, "externalIP"));
        }
        for address in &lb_ips {
            out.services.push(external(
                *address,
                frontend_port,
                &source_ranges,
                "loadbalancer",
            ));
        }
    }
    if kind == "LoadBalancer" && external_local {
        if let Some(port) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        {
            out.health_checks.push(HealthCheck {
                port,
                namespace: namespace.to_string(),
                name: name.to_string(),
                local_endpoints,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(value: serde_json::Value) -> K8sService {
        serde_json::from_value(value).unwrap()
    }

    fn web() -> K8sService {
        svc(json!({
            "metadata": {"namespace": "default", "name": "web"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http-alt", "protocol": "TCP"},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }))
    }

    fn slice_v1(name: &str, endpoints: serde_json::Value) -> Slice {
        parse_slice(
            SliceVersion::V1,
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": "default", "name": name,
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                          {"name": "dns", "port": 5353, "protocol": "UDP"}],
                "endpoints": endpoints,
            }),
        )
        .unwrap()
    }

    fn endpoints_of(out: &[Service], port: u16) -> Vec<String> {
        let s = out
            .iter()
            .find(|s| s.frontend.port == port)
            .expect("frontend");
        s.endpoints
            .iter()
            .map(|e| format!("{}:{}", e.address, e.port))
            .collect()
    }

    #[test]
    fn each_port_becomes_a_frontend_with_the_slices_target_port() {
        let slice = slice_v1(
            "web-1",
            json!([{"addresses": ["10.244.1.3"], "conditions": {"ready": true}}]),
        );
        let Desired {
            services: out,
            skipped,
            ..
        } = desired(&[&web()], &[&slice], &NodeInfo::default());
        assert!(skipped.is_empty());
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name, "default/web:http");
        assert_eq!(
            out[0].frontend,
            Frontend {
                address: "10.96.0.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(endpoints_of(&out, 80), ["10.244.1.3:8080"]);
        assert_eq!(endpoints_of(&out, 53), ["10.244.1.3:5353"]);
    }

    #[test]
    fn named_target_ports_resolve_per_slice() {
        // Two slices of one service whose pods name the same port differently numbered.
        let mut a = slice_v1("web-a", json!([{"addresses": ["10.244.1.3"]}]));
        let mut b = slice_v1("web-b", json!([{"addresses": ["10.244.2.3"]}]));
        a.ports[0].port = Some(8080);
        b.ports[0].port = Some(9090);
        let out = desired(&[&web()], &[&a, &b], &NodeInfo::default()).services;
        assert_eq!(
            endpoints_of(&out, 80),
            ["10.244.1.3:8080", "10.244.2.3:9090"]
        );
    }

    #[test]
    fn unnamed_single_port_matches_unnamed_slice_port() {
        let s = svc(json!({"metadata": {"namespace": "ns", "name": "one"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 443, "targetPort": 8443}]}}));
        let slice = parse_slice(SliceVersion::V1, json!({
            "metadata": {"namespace": "ns", "name": "one-x", "labels": {"kubernetes.io/service-name": "one"}},
            "addressType": "IPv4", "ports": [{"port": 8443, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.7"]}]})).unwrap();
        let out = desired(&[&s], &[&slice], &NodeInfo::default()).services;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "ns/one");
        assert_eq!(endpoints_of(&out, 443), ["10.244.1.7:8443"]);
    }

    #[test]
    fn only_ready_endpoints_serve_and_unknown_readiness_is_ready() {
        let slice = slice_v1(
            "web-1",
            json!([
                {"addresses": ["10.244.1.3"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.5"], "conditions": {}},
            ]),
        );
        let out = desired(&[&web()], &[&slice], &NodeInfo::default()).services;
        assert_eq!(
            endpoints_of(&out, 80),
            ["10.244.1.3:8080", "10.244.1.5:8080"]
        );
    }

    #[test]
    fn duplicate_endpoints_across_slices_count_once() {
        let a = slice_v1("web-a", json!([{"addresses": ["10.244.1.3"]}]));
        let b = slice_v1(
            "web-b",
            json!([{"addresses": ["10.244.1.3"]}, {"addresses": ["10.244.2.3"]}]),
        );
        let out = desired(&[&web()], &[&a, &b], &NodeInfo::default()).services;
        assert_eq!(
            endpoints_of(&out, 80),
            ["10.244.1.3:8080", "10.244.2.3:8080"]
        );
    }

    #[test]
    fn only_the_first_address_of_an_endpoint_is_used() {
        let slice = slice_v1(
            "web-1",
            json!([{"addresses": ["10.244.1.3", "10.244.1.99"]}]),
        );
        let out = desired(&[&web()], &[&slice], &NodeInfo::default()).services;
        assert_eq!(endpoints_of(&out, 80), ["10.244.1.3:8080"]);
    }

    #[test]
    fn slices_of_other_services_and_families_are_ignored() {
        let mut other = slice_v1("db-1", json!([{"addresses": ["10.244.9.9"]}]));
        other.service = "default/db".into();
        let mut v6 = slice_v1("web-v6", json!([{"addresses": ["fd00::1"]}]));
        v6.address_type = "IPv6".into();
        let out = desired(&[&web()], &[&other, &v6], &NodeInfo::default()).services;
        assert!(
            endpoints_of(&out, 80).is_empty(),
            "a frontend without endpoints still exists (it rejects)"
        );
    }

    #[test]
    fn v1_and_v1beta1_slices_give_the_same_model() {
        let endpoint = |zone_field: serde_json::Value| {
            let mut e = json!({"addresses": ["10.244.1.3"], "conditions": {"ready": true, "serving": true, "terminating": false},
                               "nodeName": "node1", "hints": {"forZones": [{"name": "a"}]}});
            e.as_object_mut()
                .unwrap()
                .extend(zone_field.as_object().unwrap().clone());
            e
        };
        let object = |version: &str, ep: serde_json::Value| {
            json!({
            "apiVersion": format!("discovery.k8s.io/{version}"), "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": [ep]})
        };
        let v1 = parse_slice(
            SliceVersion::V1,
            object("v1", endpoint(json!({"zone": "a"}))),
        )
        .unwrap();
        let beta = parse_slice(
            SliceVersion::V1beta1,
            object(
                "v1beta1",
                endpoint(json!({"topology": {"topology.kubernetes.io/zone": "a"}})),
            ),
        )
        .unwrap();
        assert_eq!(v1, beta);
        assert_eq!(v1.endpoints[0].zone.as_deref(), Some("a"));
        assert_eq!(v1.endpoints[0].hint_zones, ["a"]);
        // Before nodeName existed, v1beta1 carried the node in topology.
        let old = parse_slice(
            SliceVersion::V1beta1,
            object("v1beta1", json!({"addresses": ["10.244.1.3"], "topology": {"kubernetes.io/hostname": "node1"}})),
        )
        .unwrap();
        assert_eq!(old.endpoints[0].node_name.as_deref(), Some("node1"));
    }

    #[test]
    fn slice_without_service_label_is_an_error() {
        let err = parse_slice(
            SliceVersion::V1,
            json!({"metadata": {"name": "x"}, "addressType": "IPv4"}),
        )
        .unwrap_err();
        assert!(matches!(err, SliceError::NoService));
        assert!(matches!(
            parse_slice(SliceVersion::V1, json!({"addressType": 5})),
            Err(SliceError::Malformed(_))
        ));
    }

    #[test]
    fn service_kinds_kube_proxy_skips_are_skipped() {
        let external = svc(json!({"metadata": {"namespace": "d", "name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}}));
        let headless = svc(json!({"metadata": {"namespace": "d", "name": "hl"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}));
        let other = svc(json!({"metadata": {"namespace": "d", "name": "other",
            "labels": {"service.kubernetes.io/service-proxy-name": "someone-else"}},
            "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}}));
        let v6only = svc(json!({"metadata": {"namespace": "d", "name": "v6"},
            "spec": {"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"], "ports": [{"port": 80}]}}));
        let sctp = svc(json!({"metadata": {"namespace": "d", "name": "sctp"},
            "spec": {"clusterIP": "10.96.0.31", "ports": [{"port": 80, "protocol": "SCTP"}, {"port": 81}]}}));
        let Desired {
            services: out,
            skipped,
            ..
        } = desired(
            &[&external, &headless, &other, &v6only, &sctp],
            &[],
            &NodeInfo::default(),
        );
        assert_eq!(
            skipped,
            [
                Skip::ExternalName("d/ext".into()),
                Skip::Headless("d/hl".into()),
                Skip::OtherProxy("d/other".into()),
                Skip::NoIpv4ClusterIp("d/v6".into()),
                Skip::Protocol("d/sctp".into(), "SCTP".into()),
            ]
        );
        assert_eq!(
            out.len(),
            1,
            "the TCP port of the SCTP service still serves"
        );
        assert_eq!(out[0].frontend.port, 81);
    }

    #[test]
    fn dual_stack_service_uses_its_ipv4_cluster_ip() {
        let s = svc(json!({"metadata": {"namespace": "d", "name": "ds"},
            "spec": {"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.40"], "ports": [{"port": 80}]}}));
        let out = desired(&[&s], &[], &NodeInfo::default()).services;
        assert_eq!(
            out[0].frontend.address,
            "10.96.0.40".parse::<Ipv4Addr>().unwrap()
        );
    }

    fn node1() -> NodeInfo {
        NodeInfo {
            name: "node1".into(),
            addresses: vec!["10.250.0.11".parse().unwrap()],
            zone: None,
        }
    }

    fn lb_service(policy: &str) -> K8sService {
        svc(json!({
            "metadata": {"namespace": "default", "name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": policy,
                     "externalIPs": ["192.0.2.7"], "healthCheckNodePort": 32100,
                     "loadBalancerSourceRanges": ["198.51.100.0/24"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}}
        }))
    }

    fn two_node_slice() -> Slice {
        slice_v1(
            "web-1",
            json!([
                {"addresses": ["10.244.1.3"], "nodeName": "node1"},
                {"addresses": ["10.244.2.3"], "nodeName": "node2"},
            ]),
        )
    }

    fn frontend_of<'a>(out: &'a Desired, address: &str, port: u16) -> &'a Service {
        out.services
            .iter()
            .find(|s| s.frontend.address.to_string() == address && s.frontend.port == port)
            .unwrap_or_else(|| panic!("no frontend {address}:{port} in {:?}", out.services))
    }

    #[test]
    fn nodeport_externalip_and_loadbalancer_frontends() {
        let slice = two_node_slice();
        let out = desired(&[&lb_service("Cluster")], &[&slice], &node1());
        assert_eq!(
            out.services.len(),
            4,
            "ClusterIP, NodePort on the node address, externalIP, LB IP"
        );
        for (addr, port) in [
            ("10.96.0.10", 80),
            ("10.250.0.11", 30080),
            ("192.0.2.7", 80),
            ("203.0.113.5", 80),
        ] {
            let f = frontend_of(&out, addr, port);
            assert_eq!(
                f.endpoints.len(),
                2,
                "{addr}: every endpoint with policy Cluster"
            );
            assert!(!f.local_only);
        }
        let local: Vec<bool> = frontend_of(&out, "10.96.0.10", 80)
            .endpoints
            .iter()
            .map(|e| e.local)
            .collect();
        assert_eq!(
            local,
            [true, false],
            "locality from the endpoint's nodeName"
        );
        // Source ranges guard the LoadBalancer IP only.
        assert_eq!(
            frontend_of(&out, "203.0.113.5", 80).source_ranges,
            Some(vec!["198.51.100.0/24".parse().unwrap()])
        );
        assert_eq!(frontend_of(&out, "10.250.0.11", 30080).source_ranges, None);
        assert!(
            out.health_checks.is_empty(),
            "health checks only for policy Local"
        );
    }

    #[test]
    fn source_ranges_without_a_valid_ipv4_range_fail_closed() {
        let slice = two_node_slice();
        let mut service = lb_service("Cluster");
        service.spec.as_mut().unwrap().load_balancer_source_ranges =
            Some(vec!["2001:db8::/32".into(), "10.0.0.0/33".into()]);
        let out = desired(&[&service], &[&slice], &node1());
        assert_eq!(
            frontend_of(&out, "203.0.113.5", 80).source_ranges,
            Some(Vec::new()),
            "restricted to no client, not open to all"
        );
        let skipped: Vec<String> = out.skipped.iter().map(ToString::to_string).collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[1].contains("\"10.0.0.0/33\""), "{skipped:?}");
        // A valid range among invalid ones is kept; an empty list restricts nothing.
        service.spec.as_mut().unwrap().load_balancer_source_ranges =
            Some(vec!["bogus".into(), " 198.51.100.0/24".into()]);
        let out = desired(&[&service], &[&slice], &node1());
        assert_eq!(
            frontend_of(&out, "203.0.113.5", 80).source_ranges,
            Some(vec!["198.51.100.0/24".parse().unwrap()])
        );
        service.spec.as_mut().unwrap().load_balancer_source_ranges = Some(Vec::new());
        let out = desired(&[&service], &[&slice], &node1());
        assert_eq!(frontend_of(&out, "203.0.113.5", 80).source_ranges, None);
    }

    #[test]
    fn external_traffic_policy_local_serves_local_endpoints_and_a_health_check() {
        let slice = two_node_slice();
        let out = desired(&[&lb_service("Local")], &[&slice], &node1());
        for (addr, port) in [
            ("10.250.0.11", 30080),
            ("192.0.2.7", 80),
            ("203.0.113.5", 80),
        ] {
            let f = frontend_of(&out, addr, port);
            assert!(f.local_only, "{addr}");
            assert_eq!(f.endpoints.len(), 1, "{addr}: only node1's endpoint");
            assert_eq!(f.endpoints[0].address.to_string(), "10.244.1.3");
        }
        let cluster_ip = frontend_of(&out, "10.96.0.10", 80);
        assert!(
            !cluster_ip.local_only && cluster_ip.endpoints.len() == 2,
            "ClusterIP traffic is not external"
        );
        assert_eq!(
            out.health_checks,
            [HealthCheck {
                port: 32100,
                namespace: "default".into(),
                name: "web".into(),
                local_endpoints: 1
            }]
        );
        let node2 = NodeInfo {
            name: "node2x".into(),
            addresses: vec!["10.250.0.12".parse().unwrap()],
            zone: None,
        };
        let other = desired(&[&lb_service("Local")], &[&slice], &node2);
        assert_eq!(
            other.health_checks[0].local_endpoints, 0,
            "a node without endpoints reports 0 (503)"
        );
        assert!(frontend_of(&other, "10.250.0.12", 30080)
            .endpoints
            .is_empty());
    }

    #[test]
    fn clusterip_services_get_no_external_frontends() {
        let out = desired(&[&web()], &[], &node1());
        assert!(out
            .services
            .iter()
            .all(|s| s.frontend.address.to_string() == "10.96.0.10"));
    }

    #[test]
    fn node_addresses_come_from_the_node_status() {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "node1"}, "status": {"addresses": [
            {"type": "Hostname", "address": "node1"}, {"type": "InternalIP", "address": "10.250.0.11"},
            {"type": "InternalIP", "address": "fd00::11"}, {"type": "ExternalIP", "address": "198.51.100.11"}]}}))
        .unwrap();
        let info = NodeInfo::from_node("node1", Some(&node));
        assert_eq!(
            info.addresses,
            [
                "10.250.0.11".parse::<Ipv4Addr>().unwrap(),
                "198.51.100.11".parse().unwrap()
            ]
        );
        assert_eq!(info.snat_address(), Some("10.250.0.11".parse().unwrap()));
        assert_eq!(NodeInfo::from_node("x", None).snat_address(), None);
    }

    fn node_in_zone(zone: &str) -> NodeInfo {
        NodeInfo {
            name: "node1".into(),
            addresses: vec![],
            zone: Some(zone.into()),
        }
    }

    #[test]
    fn serving_terminating_endpoints_serve_when_none_is_ready() {
        let slice = slice_v1(
            "web-1",
            json!([
                {"addresses": ["10.244.1.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.4"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            ]),
        );
        let out = desired(&[&web()], &[&slice], &node1());
        let f = frontend_of(&out, "10.96.0.10", 80);
        let picked: Vec<(String, bool)> = f
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.terminating))
            .collect();
        assert_eq!(
            picked,
            [("10.244.1.3".to_string(), true)],
            "only the serving one, marked terminating"
        );
    }

    #[test]
    fn terminating_endpoints_keep_their_connections_while_ready_ones_take_new() {
        let slice = slice_v1(
            "web-1",
            json!([
                {"addresses": ["10.244.1.3"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            ]),
        );
        let out = desired(&[&web()], &[&slice], &node1());
        let f = frontend_of(&out, "10.96.0.10", 80);
        assert_eq!(f.endpoints.len(), 1);
        let kept: Vec<String> = f.reachable.iter().map(|e| e.address.to_string()).collect();
        assert!(kept.contains(&"10.244.1.4".to_string()), "{kept:?}");
        // In the maps: a backend entry (for conntrack) but no slot.
        let (state, _) = crate::state::desired(&out.services, &mut crate::state::Ids::default());
        let terminating = state
            .backends
            .values()
            .filter(|b| b.state == proxy_common::backend_state::TERMINATING)
            .count();
        assert!(terminating >= 1);
        let slot0 = state
            .services
            .iter()
            .find(|(k, _)| k.slot == 0 && u16::from_be(k.port_be) == 80)
            .unwrap()
            .1;
        assert_eq!(slot0.count, 1);
    }

    #[test]
    fn internal_traffic_policy_local_without_a_local_endpoint_drops() {
        let svc = svc(json!({"metadata": {"namespace": "default", "name": "web"},
            "spec": {"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80}]}}));
        let slice = two_node_slice();
        let on_node1 = desired(&[&svc], &[&slice], &node1());
        let f = frontend_of(&on_node1, "10.96.0.10", 80);
        assert!(f.local_only);
        assert_eq!(
            f.endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect::<Vec<_>>(),
            ["10.244.1.3"]
        );
        let elsewhere = NodeInfo {
            name: "node9".into(),
            addresses: vec![],
            zone: None,
        };
        let out = desired(&[&svc], &[&slice], &elsewhere);
        let f = frontend_of(&out, "10.96.0.10", 80);
        assert!(
            f.endpoints.is_empty() && f.local_only,
            "drop, not reject: endpoints exist elsewhere"
        );
    }

    #[test]
    fn topology_hints_keep_traffic_in_the_nodes_zone() {
        let slice = slice_v1(
            "web-1",
            json!([
                {"addresses": ["10.244.1.3"], "zone": "a", "hints": {"forZones": [{"name": "a"}]}},
                {"addresses": ["10.244.2.3"], "zone": "b", "hints": {"forZones": [{"name": "b"}]}},
            ]),
        );
        let in_a = desired(&[&web()], &[&slice], &node_in_zone("a"));
        let f = frontend_of(&in_a, "10.96.0.10", 80);
        assert_eq!(
            f.endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect::<Vec<_>>(),
            ["10.244.1.3"]
        );
        let in_c = desired(&[&web()], &[&slice], &node_in_zone("c"));
        assert_eq!(
            frontend_of(&in_c, "10.96.0.10", 80).endpoints.len(),
            2,
            "no hint for zone c: every endpoint"
        );
    }

    #[test]
    fn session_affinity_client_ip_with_its_timeout_or_the_default() {
        let with = |config: serde_json::Value| {
            let mut spec = json!({"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                                  "ports": [{"name": "http", "port": 80}]});
            if !config.is_null() {
                spec["sessionAffinityConfig"] = config;
            }
            svc(json!({"metadata": {"namespace": "d", "name": "s"}, "spec": spec}))
        };
        let out = desired(
            &[&with(json!({"clientIP": {"timeoutSeconds": 60}}))],
            &[],
            &node1(),
        );
        assert_eq!(out.services[0].affinity_timeout, Some(60));
        let out = desired(&[&with(serde_json::Value::Null)], &[], &node1());
        assert_eq!(
            out.services[0].affinity_timeout,
            Some(DEFAULT_AFFINITY_TIMEOUT)
        );
        let out = desired(&[&web()], &[], &node1());
        assert_eq!(out.services[0].affinity_timeout, None);
    }

    #[test]
    fn udp_backends_that_stop_serving_are_not_kept() {
        let slice = slice_v1(
            "web-1",
            json!([
                {"addresses": ["10.244.1.3"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            ]),
        );
        let out = desired(&[&web()], &[&slice], &node1());
        let udp = frontend_of(&out, "10.96.0.10", 53);
        assert_eq!(udp.endpoints.len(), 1);
        assert!(udp.reachable.is_empty(), "UDP flows move on at once");
        assert_eq!(
            frontend_of(&out, "10.96.0.10", 80).reachable.len(),
            2,
            "TCP connections are kept"
        );
    }

    #[test]
    fn scheduler_annotation_is_read_and_a_bad_one_reported() {
        let with = |value: &str| {
            svc(
                json!({"metadata": {"namespace": "d", "name": "s", "annotations": {"ferry.dev/scheduler": value}},
                       "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}),
            )
        };
        let out = desired(&[&with("maglev")], &[], &node1());
        assert_eq!(out.services[0].scheduler, Some(Scheduler::Maglev));
        let out = desired(&[&with("fastest")], &[], &node1());
        assert_eq!(
            out.services[0].scheduler, None,
            "left to the agent's default"
        );
        assert!(matches!(&out.skipped[0], Skip::Scheduler(name, _) if name == "d/s"));
        assert_eq!(
            desired(&[&web()], &[], &node1()).services[0].scheduler,
            None
        );
    }
}
