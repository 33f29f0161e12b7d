//! Which endpoints of a Service port this node sends traffic to, decided the way
//! kube-proxy decides it. Pure: the caller turns EndpointSlices, the Service and
//! this Node into plain values, and gets back indices into its own endpoint list.
//!
//! The behaviour follows `CategorizeEndpoints` in kubernetes/kubernetes
//! `pkg/proxy/topology.go` as of Kubernetes 1.33–1.35:
//! - usable endpoints are the ready ones; when there are none, the ones that are
//!   serving and terminating (KEP-1669, ProxyTerminatingEndpoints, GA and always on);
//!   Cluster and Local policies fall back independently of each other;
//! - `internalTrafficPolicy: Local` and `externalTrafficPolicy: Local` (the latter
//!   only when the Service is reachable from outside) use the endpoints on this node;
//! - topology hints narrow the Cluster endpoints: node hints (`hints.forNodes`,
//!   trafficDistribution `PreferSameNode`) when every ready endpoint has one and
//!   some endpoint is hinted for this node, otherwise zone hints (`hints.forZones`,
//!   trafficDistribution `PreferClose`/`PreferSameZone`, or the
//!   `service.kubernetes.io/topology-mode: Auto` annotation) when every ready
//!   endpoint has one and some endpoint is hinted for this node's zone; otherwise
//!   no narrowing at all. As in current kube-proxy, the hints themselves are the
//!   switch (the annotation is no longer read here): the EndpointSlice controller
//!   writes them only for Services that ask.
//!
//! The unit tests re-express that file's `TestCategorizeEndpoints` table, one test
//! per upstream case, named after it.

use std::collections::BTreeSet;

use super::slices::Name;

/// One endpoint of a Service port, as categorizing needs it.
///
/// Build it from an EndpointSlice endpoint with [`EndpointInfo::from_conditions`] so
/// that unset conditions get the API's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint's `nodeName`; it is local when this equals [`Node::name`].
    pub node_name: Option<Name>,
    /// `hints.forZones[].name`; empty means the endpoint has no zone hint.
    pub zone_hints: BTreeSet<Name>,
    /// `hints.forNodes[].name`; empty means the endpoint has no node hint.
    pub node_hints: BTreeSet<Name>,
}

impl EndpointInfo {
    /// An endpoint with the given EndpointSlice conditions, defaulted as the API
    /// documents and kube-proxy reads them: unset `ready` and `serving` mean true,
    /// unset `terminating` means false.
    pub fn from_conditions(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Self {
        Self {
            ready: ready.unwrap_or(true),
            serving: serving.unwrap_or(true),
            terminating: terminating.unwrap_or(false),
            ..Self::default()
        }
    }

    fn is_local(&self, node: &Node) -> bool {
        self.node_name.as_deref() == Some(node.name.as_str())
    }

    fn is_serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// The traffic policies of one Service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`; ignored unless `has_external_frontends`.
    pub external_local: bool,
    /// The port is reachable from outside: a NodePort, a LoadBalancer ingress IP or
    /// an externalIP exists.
    pub has_external_frontends: bool,
    /// Ignore node hints, as kube-proxy does when its PreferSameTrafficDistribution
    /// feature gate is off (alpha in 1.33, on by default from 1.34).
    pub ignore_node_hints: bool,
}

impl Policy {
    /// Whether some traffic uses Cluster policy: internal traffic under
    /// `internalTrafficPolicy: Cluster`, and any externally reachable port (even with
    /// `externalTrafficPolicy: Local`, pods on this node dialling an external address
    /// are short-circuited to the Cluster endpoints).
    pub const fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || self.has_external_frontends
    }

    /// Whether some traffic uses Local policy.
    pub const fn uses_local_endpoints(&self) -> bool {
        self.internal_local || (self.external_local && self.has_external_frontends)
    }
}

/// The node this agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// The `topology.kubernetes.io/zone` label; `None` and `Some("")` both mean the
    /// node has no zone, and then no zone hint ever matches.
    pub zone: Option<String>,
}

/// How the Cluster endpoints were narrowed by topology hints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TopologyMode {
    /// No narrowing: every ready endpoint.
    #[default]
    Any,
    /// Only endpoints hinted for this node's zone.
    PreferSameZone,
    /// Only endpoints hinted for this node.
    PreferSameNode,
}

/// The endpoints to use, as indices into the slice given to [`categorize`], in
/// ascending order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Endpoints for Cluster-policy traffic, topology applied; `None` when no traffic
    /// of this port uses Cluster policy.
    pub cluster: Option<Vec<usize>>,
    /// Endpoints on this node for Local-policy traffic; `None` when no traffic of
    /// this port uses Local policy.
    pub local: Option<Vec<usize>>,
    /// The union of `cluster` and `local`: every endpoint this node may send to.
    pub all_reachable: Vec<usize>,
    /// Whether the Service has a usable endpoint anywhere in the cluster, even when
    /// none is reachable from this node (then traffic is dropped rather than
    /// rejected, as kube-proxy does).
    pub has_any_endpoints: bool,
    /// How `cluster` was narrowed by hints.
    pub topology: TopologyMode,
}

impl Selection {
    /// The endpoints for traffic to the ClusterIP.
    pub fn for_internal(&self, policy: &Policy) -> &[usize] {
        let chosen = if policy.internal_local {
            &self.local
        } else {
            &self.cluster
        };
        chosen.as_deref().unwrap_or_default()
    }

    /// The endpoints for traffic to a NodePort, LoadBalancer IP or externalIP
    /// arriving from outside the node.
    pub fn for_external(&self, policy: &Policy) -> &[usize] {
        let chosen = if policy.external_local {
            &self.local
        } else {
            &self.cluster
        };
        chosen.as_deref().unwrap_or_default()
    }
}

/// Sorts the endpoints of one Service port into the sets kube-proxy programs.
///
/// One deliberate difference from upstream: with no endpoints at all, upstream
/// returns nil for every list, while this returns `Some(empty)` for each kind of
/// endpoints the policy uses. Callers that look only at the lengths, as the
/// proxiers do, see no difference.
pub fn categorize(endpoints: &[EndpointInfo], policy: &Policy, node: &Node) -> Selection {
    let mut selection = Selection::default();
    let uses_cluster = policy.uses_cluster_endpoints();

    if uses_cluster {
        let mode = topology_mode(endpoints, policy, node);
        let mut cluster = indices(endpoints, |ep| ep.ready && available(ep, mode, node));
        // Hints are ignored when no ready endpoint fits them (see `topology_mode`),
        // so an empty list here means nothing is ready anywhere: fall back to the
        // endpoints that still serve while they terminate, wherever they are.
        if cluster.is_empty() {
            cluster = indices(endpoints, EndpointInfo::is_serving_terminating);
        }
        selection.has_any_endpoints = !cluster.is_empty();
        selection.topology = mode;
        selection.cluster = Some(cluster);
    }

    if !policy.uses_local_endpoints() {
        selection.all_reachable = selection.cluster.clone().unwrap_or_default();
        return selection;
    }

    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for ep in endpoints {
        if ep.ready {
            selection.has_any_endpoints = true;
            local_ready |= ep.is_local(node);
        } else if ep.is_serving_terminating() {
            selection.has_any_endpoints = true;
            local_serving_terminating |= ep.is_local(node);
        }
    }
    // Like the Cluster list, the Local list falls back to terminating endpoints,
    // but only when this node has no ready one.
    let local_uses_terminating = !local_ready && local_serving_terminating;
    let local = if local_ready {
        indices(endpoints, |ep| ep.is_local(node) && ep.ready)
    } else if local_uses_terminating {
        indices(endpoints, |ep| {
            ep.is_local(node) && ep.is_serving_terminating()
        })
    } else {
        Vec::new()
    };

    selection.all_reachable = match &selection.cluster {
        None => local.clone(),
        // Without topology `cluster` holds every ready endpoint, and `local` only
        // ready ones, so `cluster` already covers `local`.
        Some(cluster) if selection.topology == TopologyMode::Any && !local_uses_terminating => {
            cluster.clone()
        }
        // `cluster` may lack local endpoints that topology or readiness left out.
        Some(cluster) => {
            let union: BTreeSet<usize> = cluster.iter().chain(&local).copied().collect();
            union.into_iter().collect()
        }
    };
    selection.local = Some(local);
    selection
}

/// Which hints to apply, judged on the ready endpoints only: node hints when every
/// ready endpoint has one and some name this node; else zone hints when every ready
/// endpoint has one and some name this node's zone; else none.
fn topology_mode(endpoints: &[EndpointInfo], policy: &Policy, node: &Node) -> TopologyMode {
    let zone = node.zone.as_deref().unwrap_or("");
    let mut any_ready = false;
    let (mut all_node_hinted, mut hinted_for_node) = (true, false);
    let (mut all_zone_hinted, mut hinted_for_zone) = (true, false);
    for ep in endpoints.iter().filter(|ep| ep.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hinted = false;
        } else if ep.node_hints.contains(node.name.as_str()) {
            hinted_for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hinted = false;
        } else if ep.zone_hints.contains(zone) {
            hinted_for_zone = true;
        }
    }
    if !any_ready {
        TopologyMode::Any
    } else if !policy.ignore_node_hints && all_node_hinted && hinted_for_node {
        TopologyMode::PreferSameNode
    } else if all_zone_hinted && hinted_for_zone {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::Any
    }
}

/// Whether `ep` may be used under `mode`. No fallback here: that happened when the
/// mode was chosen.
fn available(ep: &EndpointInfo, mode: TopologyMode, node: &Node) -> bool {
    match mode {
        TopologyMode::Any => true,
        TopologyMode::PreferSameNode => ep.node_hints.contains(node.name.as_str()),
        TopologyMode::PreferSameZone => ep.zone_hints.contains(node.zone.as_deref().unwrap_or("")),
    }
}

fn indices(endpoints: &[EndpointInfo], keep: impl Fn(&EndpointInfo) -> bool) -> Vec<usize> {
    endpoints
        .iter()
        .enumerate()
        .filter(|(_, ep)| keep(ep))
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests;
