//! Unit tests of `k8s::topology`: one per upstream kube-proxy test case.

use super::*;

const THIS_NODE: &str = "this-node";

/// An endpoint of a test table, with upstream's test defaults: every condition
/// false, remote, no hints.
#[derive(Clone)]
struct Ep {
    addr: &'static str,
    info: EndpointInfo,
    local: bool,
}

fn ep(addr: &'static str) -> Ep {
    Ep {
        addr,
        info: EndpointInfo::default(),
        local: false,
    }
}

impl Ep {
    fn ready(mut self) -> Self {
        self.info.ready = true;
        self
    }
    fn serving(mut self) -> Self {
        self.info.serving = true;
        self
    }
    fn terminating(mut self) -> Self {
        self.info.terminating = true;
        self
    }
    fn local(mut self) -> Self {
        self.local = true;
        self
    }
    fn zones(mut self, zones: &[&str]) -> Self {
        self.info.zone_hints = zones.iter().map(|z| (*z).into()).collect();
        self
    }
    fn nodes(mut self, nodes: &[&str]) -> Self {
        self.info.node_hints = nodes.iter().map(|n| (*n).into()).collect();
        self
    }
}

/// One row of the upstream table. `None` for `cluster`/`local` means "this kind
/// of endpoints is not used"; `all` is needed only when both are used.
/// `only_remote` marks rows where the Service has endpoints although none is
/// reachable from this node.
#[derive(Default)]
struct Case {
    node_name: Option<&'static str>,
    zone: Option<&'static str>,
    policy: Policy,
    endpoints: Vec<Ep>,
    cluster: Option<&'static [&'static str]>,
    local: Option<&'static [&'static str]>,
    all: Option<&'static [&'static str]>,
    only_remote: bool,
}

fn set(addrs: &[&'static str]) -> BTreeSet<&'static str> {
    addrs.iter().copied().collect()
}

impl Case {
    fn check(self) {
        let node = Node {
            name: self.node_name.unwrap_or(THIS_NODE).to_string(),
            zone: self.zone.map(str::to_string),
        };
        let infos: Vec<EndpointInfo> = self
            .endpoints
            .iter()
            .map(|e| EndpointInfo {
                node_name: e.local.then(|| node.name.as_str().into()),
                ..e.info.clone()
            })
            .collect();
        let got = categorize(&infos, &self.policy, &node);
        let addrs = |list: &[usize]| -> BTreeSet<&'static str> {
            list.iter().map(|&i| self.endpoints[i].addr).collect()
        };

        assert_eq!(
            got.cluster.as_deref().map(addrs),
            self.cluster.map(set),
            "cluster endpoints: {got:?}"
        );
        assert_eq!(
            got.local.as_deref().map(addrs),
            self.local.map(set),
            "local endpoints: {got:?}"
        );
        let want_all = match (self.cluster, self.local) {
            (Some(cluster), None) => set(cluster),
            (None, Some(local)) => set(local),
            _ => set(self.all.expect("the case names allEndpoints")),
        };
        assert_eq!(
            addrs(&got.all_reachable),
            want_all,
            "all endpoints: {got:?}"
        );
        let mut sorted = got.all_reachable.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, got.all_reachable, "all_reachable sorted and unique");
        assert_eq!(
            got.has_any_endpoints,
            !want_all.is_empty() || self.only_remote,
            "hasAnyEndpoints: {got:?}"
        );
    }
}

const CLUSTER_IP: Policy = Policy {
    internal_local: false,
    external_local: false,
    has_external_frontends: false,
    ignore_node_hints: false,
};
const ITP_LOCAL: Policy = Policy {
    internal_local: true,
    ..CLUSTER_IP
};
const NODE_PORT: Policy = Policy {
    has_external_frontends: true,
    ..CLUSTER_IP
};
const NODE_PORT_ETP_LOCAL: Policy = Policy {
    external_local: true,
    ..NODE_PORT
};
const NODE_PORT_ITP_LOCAL: Policy = Policy {
    internal_local: true,
    ..NODE_PORT
};
const NODE_PORT_BOTH_LOCAL: Policy = Policy {
    internal_local: true,
    external_local: true,
    has_external_frontends: true,
    ignore_node_hints: false,
};

/// Four ready endpoints hinted for zones a, b, c, a.
fn four_zoned() -> Vec<Ep> {
    vec![
        ep("10.1.2.3:80").zones(&["zone-a"]).ready(),
        ep("10.1.2.4:80").zones(&["zone-b"]).ready(),
        ep("10.1.2.5:80").zones(&["zone-c"]).ready(),
        ep("10.1.2.6:80").zones(&["zone-a"]).ready(),
    ]
}

/// Four ready endpoints hinted for zones a, b, c, a and nodes 1 to 4.
fn four_node_hinted() -> Vec<Ep> {
    vec![
        ep("10.1.2.3:80")
            .zones(&["zone-a"])
            .nodes(&["node-1"])
            .ready(),
        ep("10.1.2.4:80")
            .zones(&["zone-b"])
            .nodes(&["node-2"])
            .ready(),
        ep("10.1.2.5:80")
            .zones(&["zone-c"])
            .nodes(&["node-3"])
            .ready(),
        ep("10.1.2.6:80")
            .zones(&["zone-a"])
            .nodes(&["node-4"])
            .ready(),
    ]
}

// ---- TestCategorizeEndpoints as upstream has it since hints alone decide, in its order ----

#[test]
fn should_use_topology_since_all_endpoints_have_hints_node_has_a_zone_label_and_and_there_are_endpoints_for_the_nodes_zone(
) {
    Case {
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints: four_zoned(),
        cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn external_traffic_policy_local_topology_ignored_for_local_endpoints() {
    Case {
        zone: Some("zone-a"),
        policy: NODE_PORT_ETP_LOCAL,
        endpoints: vec![
            ep("10.1.2.3:80").zones(&["zone-a"]).ready().local(),
            ep("10.1.2.4:80").zones(&["zone-b"]).ready().local(),
            ep("10.1.2.5:80").zones(&["zone-c"]).ready(),
            ep("10.1.2.6:80").zones(&["zone-a"]).ready(),
        ],
        cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
        local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
        all: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn internal_traffic_policy_local_topology_ignored_for_local_endpoints() {
    Case {
        zone: Some("zone-a"),
        policy: NODE_PORT_ITP_LOCAL,
        endpoints: vec![
            ep("10.1.2.3:80").zones(&["zone-a"]).ready().local(),
            ep("10.1.2.4:80").zones(&["zone-b"]).ready().local(),
            ep("10.1.2.5:80").zones(&["zone-c"]).ready(),
            ep("10.1.2.6:80").zones(&["zone-a"]).ready(),
        ],
        cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
        local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
        all: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn empty_node_labels() {
    Case {
        zone: None,
        policy: CLUSTER_IP,
        endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"]).ready()],
        cluster: Some(&["10.1.2.3:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn empty_zone_label() {
    Case {
        zone: Some(""),
        policy: CLUSTER_IP,
        endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"]).ready()],
        cluster: Some(&["10.1.2.3:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn node_in_different_zone_no_endpoint_filtering() {
    Case {
        zone: Some("zone-b"),
        policy: CLUSTER_IP,
        endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"]).ready()],
        cluster: Some(&["10.1.2.3:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn unready_endpoint() {
    let mut endpoints = four_zoned();
    endpoints[3].info.ready = false;
    Case {
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints,
        cluster: Some(&["10.1.2.3:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn only_unready_endpoints_in_same_zone_should_not_filter() {
    let mut endpoints = four_zoned();
    endpoints[0].info.ready = false;
    endpoints[3].info.ready = false;
    Case {
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints,
        cluster: Some(&["10.1.2.4:80", "10.1.2.5:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn missing_hints_no_filtering_applied() {
    let mut endpoints = four_zoned();
    endpoints[2].info.zone_hints.clear();
    Case {
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints,
        cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn multiple_hints_per_endpoint_filtering_includes_any_endpoint_with_zone_included() {
    Case {
        zone: Some("zone-c"),
        policy: CLUSTER_IP,
        endpoints: vec![
            ep("10.1.2.3:80")
                .zones(&["zone-a", "zone-b", "zone-c"])
                .ready(),
            ep("10.1.2.4:80").zones(&["zone-b", "zone-c"]).ready(),
            ep("10.1.2.5:80").zones(&["zone-b", "zone-d"]).ready(),
            ep("10.1.2.6:80").zones(&["zone-c"]).ready(),
        ],
        cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn conflicting_topology_and_localness_require_merging_all_endpoints() {
    Case {
        zone: Some("zone-a"),
        policy: NODE_PORT_ETP_LOCAL,
        endpoints: vec![
            ep("10.0.0.0:80").zones(&["zone-a"]).ready().local(),
            ep("10.0.0.1:80").zones(&["zone-b"]).ready().local(),
            ep("10.0.0.2:80").zones(&["zone-a"]).ready(),
            ep("10.0.0.3:80").zones(&["zone-b"]).ready(),
        ],
        cluster: Some(&["10.0.0.0:80", "10.0.0.2:80"]),
        local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn internal_traffic_policy_local_with_empty_endpoints() {
    Case {
        policy: ITP_LOCAL,
        endpoints: vec![],
        cluster: None,
        local: Some(&[]),
        ..Case::default()
    }
    .check();
}

#[test]
fn internal_traffic_policy_local_but_all_endpoints_are_remote() {
    Case {
        policy: ITP_LOCAL,
        endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready()],
        cluster: None,
        local: Some(&[]),
        only_remote: true,
        ..Case::default()
    }
    .check();
}

#[test]
fn internal_traffic_policy_local_all_endpoints_are_local() {
    Case {
        policy: ITP_LOCAL,
        endpoints: vec![
            ep("10.0.0.0:80").ready().local(),
            ep("10.0.0.1:80").ready().local(),
        ],
        cluster: None,
        local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn internal_traffic_policy_local_some_endpoints_are_local() {
    Case {
        policy: ITP_LOCAL,
        endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
        cluster: None,
        local: Some(&["10.0.0.0:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn cluster_traffic_policy_endpoints_not_ready() {
    Case {
        policy: CLUSTER_IP,
        endpoints: vec![ep("10.0.0.0:80"), ep("10.0.0.1:80")],
        cluster: Some(&[]),
        local: None,
        ..Case::default()
    }
    .check();
}

#[test]
fn cluster_traffic_policy_some_endpoints_are_ready() {
    Case {
        policy: CLUSTER_IP,
        endpoints: vec![ep("10.0.0.0:80"), ep("10.0.0.1:80").ready()],
        cluster: Some(&["10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn cluster_traffic_policy_all_endpoints_are_terminating() {
    Case {
        policy: CLUSTER_IP,
        endpoints: vec![
            ep("10.0.0.0:80").serving().terminating().local(),
            ep("10.0.0.1:80").serving().terminating(),
        ],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn itp_local_etp_cluster_some_endpoints_local() {
    Case {
        policy: NODE_PORT_ITP_LOCAL,
        endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: Some(&["10.0.0.0:80"]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn itp_cluster_etp_local_some_endpoints_local() {
    Case {
        policy: NODE_PORT_ETP_LOCAL,
        endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: Some(&["10.0.0.0:80"]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn itp_local_etp_local_some_endpoints_local() {
    Case {
        policy: NODE_PORT_BOTH_LOCAL,
        endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: Some(&["10.0.0.0:80"]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn itp_local_etp_local_all_endpoints_remote() {
    Case {
        policy: NODE_PORT_BOTH_LOCAL,
        endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready()],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: Some(&[]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn itp_local_etp_local_all_endpoints_remote_and_terminating() {
    Case {
        policy: NODE_PORT_BOTH_LOCAL,
        endpoints: vec![
            ep("10.0.0.0:80").serving().terminating(),
            ep("10.0.0.1:80").serving().terminating(),
        ],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: Some(&[]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        only_remote: true,
        ..Case::default()
    }
    .check();
}

#[test]
fn itp_cluster_etp_local_with_terminating_endpoints() {
    Case {
        policy: NODE_PORT_ETP_LOCAL,
        endpoints: vec![
            ep("10.0.0.0:80").ready(),
            ep("10.0.0.1:80").local(),
            ep("10.0.0.2:80").serving().terminating().local(),
            ep("10.0.0.3:80").serving().terminating(),
        ],
        cluster: Some(&["10.0.0.0:80"]),
        local: Some(&["10.0.0.2:80"]),
        all: Some(&["10.0.0.0:80", "10.0.0.2:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn external_traffic_policy_ignored_if_not_externally_accessible() {
    Case {
        policy: Policy {
            external_local: true,
            ..CLUSTER_IP
        },
        endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready().local()],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: None,
        ..Case::default()
    }
    .check();
}

#[test]
fn no_cluster_endpoints_for_itp_local_internal_only_service() {
    Case {
        policy: ITP_LOCAL,
        endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready().local()],
        cluster: None,
        local: Some(&["10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

// ---- Rows added with PreferSameNode (KEP-3015, Kubernetes 1.33) ----

#[test]
fn prefer_same_node_falls_back_to_same_zone_when_feature_gate_disabled() {
    Case {
        node_name: Some("node-1"),
        zone: Some("zone-a"),
        policy: Policy {
            ignore_node_hints: true,
            ..CLUSTER_IP
        },
        endpoints: four_node_hinted(),
        cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn prefer_same_node_available() {
    Case {
        node_name: Some("node-1"),
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints: four_node_hinted(),
        cluster: Some(&["10.1.2.3:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn prefer_same_node_ignored_if_some_endpoints_unhinted() {
    let mut endpoints = four_node_hinted();
    endpoints[1].info.zone_hints.clear();
    endpoints[1].info.node_hints.clear();
    Case {
        node_name: Some("node-1"),
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints,
        cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn prefer_same_node_falls_back_to_prefer_same_zone_if_no_endpoint_for_node() {
    Case {
        node_name: Some("node-0"),
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints: four_node_hinted(),
        cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

// ---- Rows of Antrea's copy of the table (third_party/proxy), same semantics ----

#[test]
fn external_traffic_policy_local_externally_accessible_with_empty_endpoints() {
    Case {
        policy: NODE_PORT_ETP_LOCAL,
        endpoints: vec![],
        cluster: Some(&[]),
        local: Some(&[]),
        all: Some(&[]),
        ..Case::default()
    }
    .check();
}

#[test]
fn external_traffic_policy_local_externally_accessible_but_all_endpoints_are_remote() {
    Case {
        policy: NODE_PORT_ETP_LOCAL,
        endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready()],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: Some(&[]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn external_traffic_policy_local_externally_accessible_all_endpoints_are_local() {
    Case {
        policy: NODE_PORT_ETP_LOCAL,
        endpoints: vec![
            ep("10.0.0.0:80").ready().local(),
            ep("10.0.0.1:80").ready().local(),
        ],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn external_traffic_policy_local_externally_accessible_some_endpoints_are_local() {
    Case {
        policy: NODE_PORT_ETP_LOCAL,
        endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: Some(&["10.0.0.0:80"]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

// ---- Rows of older upstream tables (1.24–1.29) whose outcome still holds ----
// Their names mention the topology-mode annotation or the ProxyTerminatingEndpoints
// gate; kube-proxy no longer reads either, and the expected sets are unchanged.

#[test]
fn hints_enabled_hints_annotation_auto() {
    Case {
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints: four_zoned(),
        cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn normal_endpoint_filtering_auto_annotation() {
    Case {
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints: four_zoned(),
        cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn cluster_traffic_policy_pte_enabled_all_endpoints_are_terminating() {
    Case {
        policy: CLUSTER_IP,
        endpoints: vec![
            ep("10.0.0.0:80").serving().terminating().local(),
            ep("10.0.0.1:80").serving().terminating(),
        ],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn itp_local_etp_local_pte_enabled_all_endpoints_remote_and_terminating() {
    Case {
        policy: NODE_PORT_BOTH_LOCAL,
        endpoints: vec![
            ep("10.0.0.0:80").serving().terminating(),
            ep("10.0.0.1:80").serving().terminating(),
        ],
        cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        local: Some(&[]),
        all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
        only_remote: true,
        ..Case::default()
    }
    .check();
}

#[test]
fn itp_cluster_etp_local_pte_enabled_with_terminating_endpoints() {
    Case {
        policy: NODE_PORT_ETP_LOCAL,
        endpoints: vec![
            ep("10.0.0.0:80").ready(),
            ep("10.0.0.1:80").local(),
            ep("10.0.0.2:80").serving().terminating().local(),
            ep("10.0.0.3:80").serving().terminating(),
        ],
        cluster: Some(&["10.0.0.0:80"]),
        local: Some(&["10.0.0.2:80"]),
        all: Some(&["10.0.0.0:80", "10.0.0.2:80"]),
        ..Case::default()
    }
    .check();
}

// ---- Ferry's own cases ----

#[test]
fn unset_conditions_default_like_the_api() {
    let ep = EndpointInfo::from_conditions(None, None, None);
    assert!(ep.ready && ep.serving && !ep.terminating);
    let ep = EndpointInfo::from_conditions(Some(false), Some(true), Some(true));
    assert!(!ep.ready && ep.serving && ep.terminating);
}

#[test]
fn unready_endpoint_without_hints_does_not_disable_topology() {
    let mut endpoints = four_zoned();
    endpoints.push(ep("10.1.2.7:80").serving());
    Case {
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints,
        cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn terminating_fallback_ignores_hints_and_unserving_endpoints() {
    Case {
        zone: Some("zone-a"),
        policy: CLUSTER_IP,
        endpoints: vec![
            ep("10.1.2.3:80").zones(&["zone-a"]).serving().terminating(),
            ep("10.1.2.4:80").zones(&["zone-b"]).serving().terminating(),
            ep("10.1.2.5:80").zones(&["zone-a"]).terminating(),
        ],
        cluster: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn local_ready_endpoints_win_over_local_terminating_ones() {
    Case {
        policy: ITP_LOCAL,
        endpoints: vec![
            ep("10.0.0.0:80").ready().local(),
            ep("10.0.0.1:80").serving().terminating().local(),
            ep("10.0.0.2:80").serving().terminating(),
        ],
        local: Some(&["10.0.0.0:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn local_terminating_fallback_is_independent_of_remote_ready_endpoints() {
    // internalTrafficPolicy: Local falls back to this node's terminating
    // endpoints even while ready ones exist elsewhere.
    Case {
        policy: ITP_LOCAL,
        endpoints: vec![
            ep("10.0.0.0:80").ready(),
            ep("10.0.0.1:80").serving().terminating().local(),
        ],
        local: Some(&["10.0.0.1:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn prefer_same_node_with_local_policy_merges_local_endpoints() {
    // Node hints narrow the Cluster list to this node's hinted endpoint; the
    // Local list still holds every ready endpoint on this node.
    let mut endpoints = four_node_hinted();
    endpoints[1].local = true;
    Case {
        node_name: Some("node-1"),
        zone: Some("zone-a"),
        policy: NODE_PORT_ETP_LOCAL,
        endpoints,
        cluster: Some(&["10.1.2.3:80"]),
        local: Some(&["10.1.2.4:80"]),
        all: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
        ..Case::default()
    }
    .check();
}

#[test]
fn topology_mode_is_reported() {
    let node = Node {
        name: "node-1".into(),
        zone: Some("zone-a".into()),
    };
    let infos = |eps: Vec<Ep>| -> Vec<EndpointInfo> { eps.into_iter().map(|e| e.info).collect() };
    let mode = |eps: Vec<Ep>, policy: Policy| categorize(&infos(eps), &policy, &node).topology;
    assert_eq!(
        mode(four_node_hinted(), CLUSTER_IP),
        TopologyMode::PreferSameNode
    );
    let gate_off = Policy {
        ignore_node_hints: true,
        ..CLUSTER_IP
    };
    assert_eq!(
        mode(four_node_hinted(), gate_off),
        TopologyMode::PreferSameZone
    );
    assert_eq!(mode(four_zoned(), CLUSTER_IP), TopologyMode::PreferSameZone);
    let mut unhinted = four_zoned();
    unhinted[0].info.zone_hints.clear();
    assert_eq!(mode(unhinted, CLUSTER_IP), TopologyMode::Any);
    assert_eq!(mode(vec![], CLUSTER_IP), TopologyMode::Any);
}

#[test]
fn internal_and_external_frontends_pick_their_lists() {
    let node = Node {
        name: THIS_NODE.into(),
        zone: None,
    };
    let eps = [
        EndpointInfo {
            node_name: Some(THIS_NODE.into()),
            ..EndpointInfo::from_conditions(None, None, None)
        },
        EndpointInfo::from_conditions(None, None, None),
    ];
    let sel = categorize(&eps, &NODE_PORT_ETP_LOCAL, &node);
    assert_eq!(sel.for_internal(&NODE_PORT_ETP_LOCAL), &[0, 1]);
    assert_eq!(sel.for_external(&NODE_PORT_ETP_LOCAL), &[0]);
    let sel = categorize(&eps, &ITP_LOCAL, &node);
    assert_eq!(sel.for_internal(&ITP_LOCAL), &[0]);
    assert_eq!(sel.for_external(&ITP_LOCAL), &[] as &[usize]);
}
