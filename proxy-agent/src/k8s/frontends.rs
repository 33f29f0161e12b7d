//! From a Service and its EndpointSlices to the frontends this node serves, as
//! kube-proxy reads them: one per port and address (ClusterIP, node ports,
//! externalIPs, LoadBalancer IPs), traffic policies, topology and terminating
//! endpoints. Pure: no API calls here, so every rule has a unit test.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Service;

use super::{
    nodes::NodeInfo,
    services::ServiceInfo,
    slices::{Address, Slice},
    topology::{self, EndpointInfo, Policy},
};
use crate::frontend::{Cidr, Endpoint, Frontend, FrontendSpec, Protocol, Scheduler};

/// sessionAffinity ClientIP's timeout when the Service sets none (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Annotation choosing a Service's scheduler: `flow-hash` (default), `maglev`,
/// `source-hash` or `round-robin`.
pub const SCHEDULER_ANNOTATION: &str = "ferry.dev/scheduler";

/// Services with this label belong to another proxy (kube-proxy skips them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are not proxied at all.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Why a Service (or one of its ports) is not proxied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("{0}: ExternalName service")]
    ExternalName(String),
    #[error("{0}: headless service")]
    Headless(String),
    #[error("{0}: handled by another proxy ({SERVICE_PROXY_NAME_LABEL})")]
    OtherProxy(String),
    #[error("{0}: no valid cluster IP")]
    NoClusterIp(String),
    #[error("{0}: protocol {1} is not supported")]
    Protocol(String, String),
    #[error("{0}: invalid port {1}")]
    Port(String, i32),
    #[error("{0}: invalid nodePort {1} (the port's other frontends are served)")]
    NodePort(String, i32),
    /// The family is the EndpointSlice's, or for externalIPs and
    /// LoadBalancer IPs one the Service has a cluster IP of.
    #[error("{0}: {1} entry {2:?} is not an IP address of its family (left out)")]
    Address(String, &'static str, String),
    #[error("{0}: EndpointSlice port {1} is invalid (its endpoints are left out of that port)")]
    SlicePort(String, i32),
    #[error("{0}: sessionAffinity timeoutSeconds {1} is outside 1-86400 (the default, {DEFAULT_AFFINITY_TIMEOUT} s, is used)")]
    AffinityTimeout(String, i32),
    #[error("{0}: {1} (the agent's default scheduler is used)")]
    Scheduler(String, String),
    #[error("{0}: loadBalancerSourceRanges entry {1:?} is not an IP range (left out; a LoadBalancer IP with no valid range of its family left is reached by no client)")]
    SourceRange(String, String),
}

fn protocol(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
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
pub struct Frontends {
    pub frontends: Vec<FrontendSpec>,
    pub health_checks: Vec<HealthCheck>,
    pub skipped: Vec<Skip>,
    /// Service ports (of each family) with a Local traffic policy and no
    /// endpoint on this node: internal (ClusterIPs) and external, as
    /// kube-proxy counts them for its metric.
    pub no_local_endpoints: NoLocalEndpoints,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    pub internal: usize,
    pub external: usize,
}

/// Every endpoint of one Service port of one family (`v6`), from its slices of
/// that family (deduplicated by address), with what kube-proxy's
/// categorisation needs to know of it.
fn port_endpoints(
    slices: &[&Slice],
    port_name: &str,
    proto: Protocol,
    node: &NodeInfo,
    v6: bool,
) -> (Vec<Endpoint>, Vec<EndpointInfo>) {
    let mut seen = BTreeSet::new();
    let (mut endpoints, mut infos) = (Vec::new(), Vec::new());
    for slice in slices
        .iter()
        .filter(|s| family_of(&s.address_type) == Some(v6))
    {
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
                .address
                .as_ref()
                .and_then(Address::ip)
                .filter(|a| a.is_ipv6() == v6)
            else {
                continue;
            };
            if !seen.insert((address, target_port)) {
                continue;
            }
            let mut info = EndpointInfo::from_conditions(ep.ready, ep.serving, ep.terminating);
            info.node_name = ep.node_name.clone();
            if let Some(hints) = &ep.hints {
                info.zone_hints = hints.zones.iter().cloned().collect();
                info.node_hints = hints.nodes.iter().cloned().collect();
            }
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
/// named target ports resolve per endpoint). New connections go to the ready
/// endpoints that the traffic policies and topology hints select (kube-proxy's
/// categorisation in `topology`), or to the serving terminating ones when no
/// ready one is left; every endpoint still serving (TCP) stays reachable for the
/// connections it has. Each port gets its ClusterIP frontend; NodePort and
/// LoadBalancer Services also one per node address on the node port;
/// externalIPs and LoadBalancer ingress IPs one each. With
/// internalTrafficPolicy=Local the ClusterIP frontend, and with
/// externalTrafficPolicy=Local the external ones, serve this node's endpoints
/// only; loadBalancerSourceRanges apply to the LoadBalancer IPs.
pub fn of_cluster(k8s: &[&Service], slices: &[&Slice], node: &NodeInfo) -> Frontends {
    let mut by_service: BTreeMap<&str, Vec<&Slice>> = BTreeMap::new();
    for slice in slices {
        if family_of(&slice.address_type).is_some() {
            by_service.entry(&*slice.service).or_default().push(slice);
        }
    }
    let mut out = Frontends::default();
    for svc in k8s {
        let svc = ServiceInfo::from((*svc).clone());
        let service_slices = by_service
            .get(&*svc.key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        of_service(&svc, service_slices, node, &mut out);
    }
    out
}

/// Whether slices of `address_type` hold IPv6 addresses (`Some(true)`),
/// IPv4 ones (`Some(false)`), or neither (FQDN, which kube-proxy ignores).
pub fn family_of(address_type: &str) -> Option<bool> {
    match address_type {
        "IPv4" => Some(false),
        "IPv6" => Some(true),
        _ => None,
    }
}

/// What one Service adds to [`of_cluster`], given its IPv4 and IPv6 slices:
/// the agent recomputes only the Services whose objects changed.
pub fn of_service(
    svc: &ServiceInfo,
    service_slices: &[&Slice],
    node: &NodeInfo,
    out: &mut Frontends,
) {
    let Some(view) = ServiceView::of(svc, node, out) else {
        return;
    };
    report_slices(&view.key, service_slices, out);
    let Some(spec) = &svc.spec else { return };
    let mut local_endpoints = 0;
    for port in &spec.ports {
        let Some(proto) = protocol(port.protocol.as_deref()) else {
            out.skipped.push(Skip::Protocol(
                view.key.clone(),
                port.protocol.as_deref().unwrap_or_default().to_string(),
            ));
            continue;
        };
        let Some(frontend_port) = valid_port(port.port) else {
            out.skipped.push(Skip::Port(view.key.clone(), port.port));
            continue;
        };
        let node_port = match port.node_port {
            None | Some(0) => None,
            Some(p) => valid_port(p).or_else(|| {
                out.skipped.push(Skip::NodePort(view.key.clone(), p));
                None
            }),
        };
        let port = ServicePort {
            name: port.name.as_deref().unwrap_or(""),
            proto,
            port: frontend_port,
            node_port,
        };
        let local = view.port_frontends(&port, service_slices, node, out);
        local_endpoints = local_endpoints.max(local);
    }
    if view.kind == "LoadBalancer" && view.external_local {
        if let Some(port) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        {
            let (namespace, name) = svc.namespace_and_name();
            out.health_checks.push(HealthCheck {
                port,
                namespace: namespace.to_string(),
                name: name.to_string(),
                local_endpoints,
            });
        }
    }
}

/// A port number the API allows (1-65535).
fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// Says what of a Service's slices is left out: addresses that are not of
/// the slice's family (the first of an endpoint, the one kube-proxy uses)
/// and invalid ports.
fn report_slices(key: &str, slices: &[&Slice], out: &mut Frontends) {
    for slice in slices {
        for port in slice.ports.iter().filter_map(|p| p.port) {
            if valid_port(port).is_none() {
                out.skipped.push(Skip::SlicePort(key.to_string(), port));
            }
        }
        let v6 = family_of(&slice.address_type);
        for address in slice.endpoints.iter().filter_map(|e| e.address.as_ref()) {
            if address.ip().map(|a| a.is_ipv6()) != v6 {
                let field = "EndpointSlice endpoint addresses";
                out.skipped
                    .push(Skip::Address(key.to_string(), field, address.to_string()));
            }
        }
    }
}

/// The IP addresses of a list of the families of `vips` (a family the
/// Service has no cluster IP of is not served, as kube-proxy's proxier of
/// that family skips the Service); the others are reported as `field`'s.
fn ip_addresses<'a>(
    list: impl Iterator<Item = &'a str>,
    vips: &[IpAddr],
    key: &str,
    field: &'static str,
    out: &mut Frontends,
) -> Vec<IpAddr> {
    list.filter_map(|a| match a.parse::<IpAddr>() {
        Ok(address) if vips.iter().any(|v| v.is_ipv6() == address.is_ipv6()) => Some(address),
        _ => {
            out.skipped
                .push(Skip::Address(key.to_string(), field, a.to_string()));
            None
        }
    })
    .collect()
}

/// One port of a Service, as its frontends need it.
struct ServicePort<'a> {
    name: &'a str,
    proto: Protocol,
    port: u16,
    node_port: Option<u16>,
}

/// What a Service's ports share: its addresses, policies, affinity and
/// scheduler, read once.
struct ServiceView {
    /// `namespace/name`.
    key: String,
    /// The cluster IPs: one per family the Service has (`spec.clusterIPs`).
    vips: Vec<IpAddr>,
    /// `spec.type`, `ClusterIP` when unset.
    kind: String,
    external_local: bool,
    external_ips: Vec<IpAddr>,
    lb_ips: Vec<IpAddr>,
    source_ranges: Option<SourceRanges>,
    policy: Policy,
    topology_node: topology::Node,
    affinity_timeout: Option<u32>,
    scheduler: Option<Scheduler>,
}

impl ServiceView {
    /// `None` (and the reason in `out.skipped`) for a Service not proxied.
    fn of(svc: &ServiceInfo, node: &NodeInfo, out: &mut Frontends) -> Option<Self> {
        let key = svc.key.to_string();
        let spec = svc.spec.as_ref()?;
        let vips = cluster_ips(svc, &key, out)?;
        let kind = spec.kind.as_deref().unwrap_or("ClusterIP").to_string();
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let external_ips = ip_addresses(
            spec.external_ips.iter().map(AsRef::as_ref),
            &vips,
            &key,
            "externalIPs",
            out,
        );
        let lb_ips: Vec<IpAddr> = if kind == "LoadBalancer" {
            // An ingress with a hostname only (a DNS-named load balancer)
            // has no address to serve. One with `ipMode: Proxy` is a load
            // balancer that proxies (its packets reach the node from the
            // load balancer's own address, not the IP's): traffic to the
            // IP must go to it, and is not short-circuited here, as
            // kube-proxy leaves it.
            let ips = svc
                .ingress
                .iter()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.as_deref());
            ip_addresses(ips, &vips, &key, "status.loadBalancer.ingress ip", out)
        } else {
            Vec::new()
        };
        let source_ranges = source_ranges(spec.load_balancer_source_ranges.as_ref(), &key, out);
        let policy = Policy {
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local,
            has_external_frontends: matches!(kind.as_str(), "NodePort" | "LoadBalancer")
                || !external_ips.is_empty(),
            ignore_node_hints: false,
        };
        let topology_node = topology::Node {
            name: node.name.clone(),
            zone: node.zone.clone(),
        };
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            match spec.affinity_timeout {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(t @ 1..=86_400) => t as u32,
                Some(t) => {
                    out.skipped.push(Skip::AffinityTimeout(key.clone(), t));
                    DEFAULT_AFFINITY_TIMEOUT
                }
            }
        });
        // A scheduler this agent does not know is reported and left to the default.
        let scheduler = match svc.scheduler.as_deref() {
            None => None,
            Some(name) => match name.parse::<Scheduler>() {
                Ok(s) => Some(s),
                Err(e) => {
                    out.skipped.push(Skip::Scheduler(key.clone(), e));
                    None
                }
            },
        };
        Some(Self {
            key,
            vips,
            kind,
            external_local,
            external_ips,
            lb_ips,
            source_ranges,
            policy,
            topology_node,
            affinity_timeout,
            scheduler,
        })
    }

    /// The frontends of one port: its ClusterIPs, node ports, externalIPs
    /// and LoadBalancer IPs, each served by the endpoints of its own family
    /// (as kube-proxy runs one proxier per family). Returns how many
    /// endpoints it has on this node.
    fn port_frontends(
        &self,
        port: &ServicePort<'_>,
        service_slices: &[&Slice],
        node: &NodeInfo,
        out: &mut Frontends,
    ) -> usize {
        let node_ports: Vec<IpAddr> = match (
            matches!(self.kind.as_str(), "NodePort" | "LoadBalancer"),
            port.node_port,
        ) {
            (true, Some(_)) => node.node_port_addresses(),
            _ => Vec::new(),
        };
        let mut local_endpoints = 0;
        for v6 in [false, true] {
            let of_family = |list: &[IpAddr]| -> Vec<IpAddr> {
                list.iter().copied().filter(|a| a.is_ipv6() == v6).collect()
            };
            let addresses = FamilyAddresses {
                vips: of_family(&self.vips),
                node_ports: of_family(&node_ports),
                external_ips: of_family(&self.external_ips),
                lb_ips: of_family(&self.lb_ips),
            };
            if addresses.is_empty() {
                continue;
            }
            let (all, infos) = port_endpoints(service_slices, port.name, port.proto, node, v6);
            let local = self.family_frontends(port, &addresses, &all, &infos, out);
            local_endpoints = local_endpoints.max(local);
        }
        local_endpoints
    }

    /// The frontends of one port at the addresses of one family, served by
    /// `all` (that family's endpoints, `infos` their conditions).
    fn family_frontends(
        &self,
        port: &ServicePort<'_>,
        addresses: &FamilyAddresses,
        all: &[Endpoint],
        infos: &[EndpointInfo],
        out: &mut Frontends,
    ) -> usize {
        let proto = port.proto;
        let selection = topology::categorize(infos, &self.policy, &self.topology_node);
        let pick = |indexes: &[usize]| -> Vec<Endpoint> {
            let mut picked: Vec<Endpoint> = indexes.iter().map(|&i| all[i]).collect();
            picked.sort();
            picked
        };
        let internal = pick(selection.for_internal(&self.policy));
        let external_endpoints = pick(selection.for_external(&self.policy));
        // Counted as kube-proxy's proxier of this family counts them: the
        // Service is of the family when it has a ClusterIP of it.
        if !addresses.vips.is_empty() {
            let no_local = &mut out.no_local_endpoints;
            if self.policy.internal_local && internal.is_empty() {
                no_local.internal += 1;
            }
            let external =
                addresses.node_ports.len() + addresses.external_ips.len() + addresses.lb_ips.len();
            if self.external_local && external_endpoints.is_empty() && external > 0 {
                no_local.external += 1;
            }
        }
        // Under externalTrafficPolicy=Local, clients inside the cluster
        // dialling an external address go to the Cluster endpoints, as if
        // they had gone out to the load balancer and come back in.
        let in_cluster = if self.external_local {
            pick(selection.cluster.as_deref().unwrap_or_default())
        } else {
            Vec::new()
        };
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
        let local_endpoints = selection.local.as_ref().map_or(0, Vec::len);
        let label = if port.name.is_empty() {
            self.key.clone()
        } else {
            format!("{}:{}", self.key, port.name)
        };
        let frontend = |address: IpAddr, port: u16| Frontend {
            address,
            port,
            protocol: proto,
        };
        for vip in &addresses.vips {
            // The second family's ClusterIP is named by its address.
            let name = if Some(vip) == self.vips.first() {
                label.clone()
            } else {
                format!("{label} ({vip})")
            };
            out.frontends.push(FrontendSpec {
                name,
                frontend: frontend(*vip, port.port),
                endpoints: internal.clone(),
                reachable: reachable.clone(),
                local_only: self.policy.internal_local,
                cluster_endpoints: Vec::new(),
                source_ranges: None,
                affinity_timeout: self.affinity_timeout,
                scheduler: self.scheduler,
            });
        }
        let external =
            |address: IpAddr, port: u16, ranges: &Option<Vec<Cidr>>, what: &str| FrontendSpec {
                name: format!(
                    "{label} ({what} {})",
                    std::net::SocketAddr::new(address, port)
                ),
                frontend: frontend(address, port),
                endpoints: external_endpoints.clone(),
                reachable: reachable.clone(),
                local_only: self.external_local,
                cluster_endpoints: in_cluster.clone(),
                source_ranges: ranges.clone(),
                affinity_timeout: self.affinity_timeout,
                scheduler: self.scheduler,
            };
        if let Some(node_port) = port.node_port {
            for address in &addresses.node_ports {
                out.frontends
                    .push(external(*address, node_port, &None, "nodeport"));
            }
        }
        for address in &addresses.external_ips {
            out.frontends
                .push(external(*address, port.port, &None, "externalIP"));
        }
        for address in &addresses.lb_ips {
            let ranges = self
                .source_ranges
                .as_ref()
                .and_then(|r| r.of_family(*address));
            out.frontends
                .push(external(*address, port.port, &ranges, "loadbalancer"));
        }
        local_endpoints
    }
}

/// A Service's addresses of one family.
struct FamilyAddresses {
    vips: Vec<IpAddr>,
    node_ports: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    lb_ips: Vec<IpAddr>,
}

impl FamilyAddresses {
    fn is_empty(&self) -> bool {
        self.vips.is_empty()
            && self.node_ports.is_empty()
            && self.external_ips.is_empty()
            && self.lb_ips.is_empty()
    }
}

/// The Service's cluster IPs, the first of each family (a dual-stack
/// Service has one IPv4 and one IPv6); `None` (and why in `out.skipped`) for
/// an ExternalName, headless or other-proxy Service, or one without a valid
/// cluster IP.
fn cluster_ips(svc: &ServiceInfo, key: &str, out: &mut Frontends) -> Option<Vec<IpAddr>> {
    let spec = svc.spec.as_ref()?;
    if spec.kind.as_deref() == Some("ExternalName") {
        out.skipped.push(Skip::ExternalName(key.to_string()));
        return None;
    }
    if svc.other_proxy {
        out.skipped.push(Skip::OtherProxy(key.to_string()));
        return None;
    }
    let cluster_ips: Vec<&str> = spec.cluster_ips.iter().map(AsRef::as_ref).collect();
    if cluster_ips.contains(&"None") || svc.headless_label {
        out.skipped.push(Skip::Headless(key.to_string()));
        return None;
    }
    let mut vips: Vec<IpAddr> = Vec::new();
    for ip in cluster_ips
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
    {
        if !vips.iter().any(|v| v.is_ipv6() == ip.is_ipv6()) {
            vips.push(ip);
        }
    }
    if vips.is_empty() {
        out.skipped.push(Skip::NoClusterIp(key.to_string()));
        return None;
    }
    Some(vips)
}

/// A Service's loadBalancerSourceRanges, of both families.
struct SourceRanges {
    valid: Vec<Cidr>,
    /// Some entry was not a range: it may have been meant for either family.
    invalid: bool,
}

impl SourceRanges {
    /// The ranges that restrict LoadBalancer IP `address`, as
    /// `FrontendSpec::source_ranges` holds them: those of its family. A
    /// family the Service lists no range of is open to every client, as
    /// kube-proxy has it, unless an entry was invalid: then no client of
    /// that family gets through (fail closed).
    fn of_family(&self, address: IpAddr) -> Option<Vec<Cidr>> {
        let ranges: Vec<Cidr> = self
            .valid
            .iter()
            .filter(|r| r.address.is_ipv4() == address.is_ipv4())
            .copied()
            .collect();
        (!ranges.is_empty() || self.invalid).then_some(ranges)
    }
}

/// loadBalancerSourceRanges; `None` when the Service lists none. Invalid
/// entries are left out (and reported in `out.skipped`).
fn source_ranges(
    ranges: Option<&Vec<String>>,
    key: &str,
    out: &mut Frontends,
) -> Option<SourceRanges> {
    let ranges = ranges.filter(|ranges| !ranges.is_empty())?;
    let mut parsed = SourceRanges {
        valid: Vec::new(),
        invalid: false,
    };
    for range in ranges {
        match range.trim().parse() {
            Ok(cidr) => parsed.valid.push(cidr),
            Err(_) => {
                parsed.invalid = true;
                out.skipped
                    .push(Skip::SourceRange(key.to_string(), range.clone()));
            }
        }
    }
    Some(parsed)
}

#[cfg(test)]
mod tests;
