//! Unit tests of `k8s::frontends` and `k8s::slices`: kube-proxy's rules for
//! turning Services and EndpointSlices into frontends.

use std::net::Ipv4Addr;

use serde_json::json;

use super::*;
use k8s_openapi::api::core::v1::Node;

use crate::k8s::slices::{parse_slice, SliceError, SliceVersion};

fn svc(value: serde_json::Value) -> Service {
    serde_json::from_value(value).unwrap()
}

fn web() -> Service {
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

fn endpoints_of(out: &[FrontendSpec], port: u16) -> Vec<String> {
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
    let Frontends {
        frontends: out,
        skipped,
        ..
    } = of_cluster(&[&web()], &[&slice], &NodeInfo::default());
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
    let out = of_cluster(&[&web()], &[&a, &b], &NodeInfo::default()).frontends;
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
    let out = of_cluster(&[&s], &[&slice], &NodeInfo::default()).frontends;
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
    let out = of_cluster(&[&web()], &[&slice], &NodeInfo::default()).frontends;
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
    let out = of_cluster(&[&web()], &[&a, &b], &NodeInfo::default()).frontends;
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
    let out = of_cluster(&[&web()], &[&slice], &NodeInfo::default()).frontends;
    assert_eq!(endpoints_of(&out, 80), ["10.244.1.3:8080"]);
}

#[test]
fn slices_of_other_services_and_families_are_ignored() {
    let mut other = slice_v1("db-1", json!([{"addresses": ["10.244.9.9"]}]));
    other.service = "default/db".into();
    let mut v6 = slice_v1("web-v6", json!([{"addresses": ["fd00::1"]}]));
    v6.address_type = "IPv6".into();
    let out = of_cluster(&[&web()], &[&other, &v6], &NodeInfo::default()).frontends;
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
    let hints = v1.endpoints[0].hints.as_deref().expect("hints");
    assert_eq!(hints.zones.iter().map(|z| &**z).collect::<Vec<_>>(), ["a"]);
    assert!(hints.nodes.is_empty());
    // Before nodeName existed, v1beta1 carried the node in topology.
    let old = parse_slice(
        SliceVersion::V1beta1,
        object(
            "v1beta1",
            json!({"addresses": ["10.244.1.3"], "topology": {"kubernetes.io/hostname": "node1"}}),
        ),
    )
    .unwrap();
    assert_eq!(old.endpoints[0].node_name.as_deref(), Some("node1"));
}

#[test]
fn a_slice_keeps_each_endpoints_first_address_and_shares_node_names() {
    let slice = slice_v1(
        "web-1",
        json!([{"addresses": ["10.244.1.3", "10.244.1.99"], "nodeName": "node-shared"},
               {"addresses": ["not-an-ip"], "nodeName": "node-shared", "zone": "z1"},
               {"addresses": []}]),
    );
    let [a, b, c] = &slice.endpoints[..] else {
        panic!("three endpoints: {slice:?}")
    };
    assert_eq!(
        a.address.as_ref().and_then(Address::ip),
        Some("10.244.1.3".parse().unwrap())
    );
    assert_eq!(
        b.address.as_ref().map(ToString::to_string).as_deref(),
        Some("not-an-ip")
    );
    assert_eq!(b.address.as_ref().and_then(Address::ip), None);
    assert_eq!(c.address, None);
    assert!(a.hints.is_none(), "no hints, nothing allocated");
    let (Some(na), Some(nb)) = (&a.node_name, &b.node_name) else {
        panic!("node names")
    };
    assert!(na.shares(nb), "one copy of a node name for every endpoint");
    assert_eq!(std::mem::size_of::<crate::k8s::slices::SliceEndpoint>(), 48);
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
    let bogus = svc(json!({"metadata": {"namespace": "d", "name": "bogus"},
            "spec": {"clusterIP": "10.96.0.300", "clusterIPs": ["10.96.0.300"], "ports": [{"port": 80}]}}));
    // A protocol this API version does not have: the port is skipped, the
    // Service's other ports serve. SCTP serves.
    let odd = svc(json!({"metadata": {"namespace": "d", "name": "odd"},
            "spec": {"clusterIP": "10.96.0.31", "ports": [{"port": 80, "protocol": "DCCP"}, {"port": 81}, {"port": 82, "protocol": "SCTP"}]}}));
    let Frontends {
        frontends: out,
        skipped,
        ..
    } = of_cluster(
        &[&external, &headless, &other, &bogus, &odd],
        &[],
        &NodeInfo::default(),
    );
    assert_eq!(
        skipped,
        [
            Skip::ExternalName("d/ext".into()),
            Skip::Headless("d/hl".into()),
            Skip::OtherProxy("d/other".into()),
            Skip::NoClusterIp("d/bogus".into()),
            Skip::Protocol("d/odd".into(), "DCCP".into()),
        ]
    );
    let served: Vec<_> = out
        .iter()
        .map(|f| (f.frontend.port, f.frontend.protocol))
        .collect();
    assert_eq!(
        served,
        [(81, Protocol::Tcp), (82, Protocol::Sctp)],
        "the Service's TCP and SCTP ports serve"
    );
}

fn slice_of(name: &str, address_type: &str, endpoints: serde_json::Value) -> Slice {
    parse_slice(
        SliceVersion::V1,
        json!({
            "metadata": {"namespace": "d", "name": name,
                         "labels": {"kubernetes.io/service-name": "ds"}},
            "addressType": address_type,
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }),
    )
    .unwrap()
}

#[test]
fn a_dual_stack_service_is_served_on_both_cluster_ips_by_the_endpoints_of_each_family() {
    let s = svc(json!({"metadata": {"namespace": "d", "name": "ds"},
            "spec": {"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.40"],
                     "externalIPs": ["192.0.2.7", "2001:db8::7"], "ports": [{"port": 80}]}}));
    let v4 = slice_of(
        "ds-v4",
        "IPv4",
        json!([{"addresses": ["10.244.1.3"], "conditions": {"ready": true}}]),
    );
    let v6 = slice_of(
        "ds-v6",
        "IPv6",
        json!([{"addresses": ["fd00:10:244:1::3"], "conditions": {"ready": true}},
               {"addresses": ["10.244.1.9"], "conditions": {"ready": true}}]),
    );
    let Frontends {
        frontends: out,
        skipped,
        ..
    } = of_cluster(&[&s], &[&v4, &v6], &NodeInfo::default());
    let served: Vec<(String, String, Vec<String>)> = out
        .iter()
        .map(|f| {
            let endpoints = f
                .endpoints
                .iter()
                .map(|e| std::net::SocketAddr::new(e.address, e.port).to_string())
                .collect();
            (f.name.clone(), f.frontend.to_string(), endpoints)
        })
        .collect();
    let row = |name: &str, frontend: &str, endpoint: &str| {
        (
            name.to_string(),
            frontend.to_string(),
            vec![endpoint.to_string()],
        )
    };
    assert_eq!(
        served,
        [
            row("d/ds (10.96.0.40)", "10.96.0.40:80/TCP", "10.244.1.3:8080"),
            row(
                "d/ds (externalIP 192.0.2.7:80)",
                "192.0.2.7:80/TCP",
                "10.244.1.3:8080"
            ),
            row("d/ds", "[fd00::10]:80/TCP", "[fd00:10:244:1::3]:8080"),
            row(
                "d/ds (externalIP [2001:db8::7]:80)",
                "[2001:db8::7]:80/TCP",
                "[fd00:10:244:1::3]:8080"
            ),
        ]
    );
    // An IPv4 address in an IPv6 slice is reported and left out.
    assert_eq!(
        skipped,
        [Skip::Address(
            "d/ds".into(),
            "EndpointSlice endpoint addresses",
            "10.244.1.9".into()
        )]
    );
}

fn node1() -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        addresses: vec!["10.250.0.11".parse().unwrap()],
        addresses6: vec![],
        pod_cidrs: Vec::new(),

        zone: None,
        node_port_loopback: false,
        node_port_only: None,
    }
}

fn lb_service(policy: &str) -> Service {
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

fn frontend_of<'a>(out: &'a Frontends, address: &str, port: u16) -> &'a FrontendSpec {
    out.frontends
        .iter()
        .find(|s| s.frontend.address.to_string() == address && s.frontend.port == port)
        .unwrap_or_else(|| panic!("no frontend {address}:{port} in {:?}", out.frontends))
}

#[test]
fn an_ingress_ip_in_proxy_mode_is_left_to_its_load_balancer() {
    let service = svc(json!({
        "metadata": {"namespace": "default", "name": "web"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                 "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [
            {"ip": "203.0.113.5", "ipMode": "Proxy"},
            {"ip": "203.0.113.6", "ipMode": "VIP"},
            {"ip": "203.0.113.7"},
        ]}}
    }));
    let out = of_cluster(&[&service], &[&two_node_slice()], &node1());
    let served = |address: &str| {
        out.frontends
            .iter()
            .any(|f| f.frontend.address.to_string() == address)
    };
    assert!(!served("203.0.113.5"), "Proxy: the load balancer's");
    assert!(
        served("203.0.113.6") && served("203.0.113.7"),
        "VIP, and unset"
    );
    assert!(served("10.96.0.10") && served("10.250.0.11"));
}

#[test]
fn nodeport_externalip_and_loadbalancer_frontends() {
    let slice = two_node_slice();
    let out = of_cluster(&[&lb_service("Cluster")], &[&slice], &node1());
    assert_eq!(
        out.frontends.len(),
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
fn nodeport_on_loopback_only_when_asked() {
    let slice = two_node_slice();
    let mut node = node1();
    let out = of_cluster(&[&lb_service("Cluster")], &[&slice], &node);
    assert!(!out
        .frontends
        .iter()
        .any(|f| f.frontend.address.is_loopback()));
    node.node_port_loopback = true;
    let out = of_cluster(&[&lb_service("Cluster")], &[&slice], &node);
    let loopback = frontend_of(&out, "127.0.0.1", 30080);
    assert_eq!(
        loopback.endpoints,
        frontend_of(&out, "10.250.0.11", 30080).endpoints,
        "the node address's endpoints"
    );
    assert_eq!(out.frontends.len(), 5);
}

#[test]
fn source_ranges_with_an_invalid_entry_and_no_valid_range_of_the_family_fail_closed() {
    let slice = two_node_slice();
    let mut service = lb_service("Cluster");
    service.spec.as_mut().unwrap().load_balancer_source_ranges =
        Some(vec!["2001:db8::/32".into(), "10.0.0.0/33".into()]);
    let out = of_cluster(&[&service], &[&slice], &node1());
    assert_eq!(
        frontend_of(&out, "203.0.113.5", 80).source_ranges,
        Some(Vec::new()),
        "restricted to no client, not open to all"
    );
    let skipped: Vec<String> = out.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].contains("\"10.0.0.0/33\""), "{skipped:?}");
    // A valid range among invalid ones is kept; an empty list restricts nothing.
    service.spec.as_mut().unwrap().load_balancer_source_ranges =
        Some(vec!["bogus".into(), " 198.51.100.0/24".into()]);
    let out = of_cluster(&[&service], &[&slice], &node1());
    assert_eq!(
        frontend_of(&out, "203.0.113.5", 80).source_ranges,
        Some(vec!["198.51.100.0/24".parse().unwrap()])
    );
    service.spec.as_mut().unwrap().load_balancer_source_ranges = Some(Vec::new());
    let out = of_cluster(&[&service], &[&slice], &node1());
    assert_eq!(frontend_of(&out, "203.0.113.5", 80).source_ranges, None);
}

#[test]
fn each_load_balancer_ip_gets_the_source_ranges_of_its_family() {
    let lb = |ranges: &[&str]| {
        svc(json!({"metadata": {"namespace": "d", "name": "ds"},
            "spec": {"type": "LoadBalancer", "clusterIPs": ["10.96.0.40", "fd00::10"],
                     "loadBalancerSourceRanges": ranges,
                     "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}, {"ip": "2001:db8::5"}]}}}))
    };
    let ranges_of = |ranges: &[&str]| {
        let out = of_cluster(&[&lb(ranges)], &[], &NodeInfo::default());
        let of = |address: &str| {
            frontend_of(&out, address, 80)
                .source_ranges
                .as_ref()
                .map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        (of("203.0.113.5"), of("2001:db8::5"))
    };
    let some = |r: &[&str]| Some(r.iter().map(ToString::to_string).collect::<Vec<_>>());
    assert_eq!(
        ranges_of(&["198.51.100.0/24", "2001:db8:1::/48", "fd00::7"]),
        (
            some(&["198.51.100.0/24"]),
            some(&["2001:db8:1::/48", "fd00::7/128"])
        )
    );
    // Ranges of one family leave the other open, as kube-proxy has it...
    assert_eq!(
        ranges_of(&["198.51.100.0/24"]),
        (some(&["198.51.100.0/24"]), None)
    );
    assert_eq!(
        ranges_of(&["2001:db8:1::/48"]),
        (None, some(&["2001:db8:1::/48"]))
    );
    // ...unless an entry was invalid: it might have been meant for either.
    assert_eq!(
        ranges_of(&["198.51.100.0/24", "2001:db8:1::/129"]),
        (some(&["198.51.100.0/24"]), some(&[]))
    );
}

#[test]
fn external_traffic_policy_local_serves_local_endpoints_and_a_health_check() {
    let slice = two_node_slice();
    let out = of_cluster(&[&lb_service("Local")], &[&slice], &node1());
    for (addr, port) in [
        ("10.250.0.11", 30080),
        ("192.0.2.7", 80),
        ("203.0.113.5", 80),
    ] {
        let f = frontend_of(&out, addr, port);
        assert!(f.local_only, "{addr}");
        assert_eq!(f.endpoints.len(), 1, "{addr}: only node1's endpoint");
        assert_eq!(f.endpoints[0].address.to_string(), "10.244.1.3");
        assert_eq!(
            f.cluster_endpoints,
            cluster_ip_endpoints(&out),
            "{addr}: clients inside the cluster go past the policy"
        );
    }
    let cluster_ip = frontend_of(&out, "10.96.0.10", 80);
    assert!(
        !cluster_ip.local_only && cluster_ip.endpoints.len() == 2,
        "ClusterIP traffic is not external"
    );
    assert!(cluster_ip.cluster_endpoints.is_empty());
    // Under the Cluster policy, every client gets the same endpoints.
    let cluster = of_cluster(&[&lb_service("Cluster")], &[&slice], &node1());
    assert!(frontend_of(&cluster, "10.250.0.11", 30080)
        .cluster_endpoints
        .is_empty());
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
        addresses6: vec![],
        pod_cidrs: Vec::new(),

        zone: None,
        node_port_loopback: false,
        node_port_only: None,
    };
    let other = of_cluster(&[&lb_service("Local")], &[&slice], &node2);
    assert_eq!(
        other.health_checks[0].local_endpoints, 0,
        "a node without endpoints reports 0 (503)"
    );
    let no_local = frontend_of(&other, "10.250.0.12", 30080);
    assert!(no_local.endpoints.is_empty());
    assert_eq!(
        no_local.cluster_endpoints.len(),
        2,
        "a pod on a node without an endpoint is still served"
    );
}

/// The endpoints of the ClusterIP 10.96.0.10:80 in `out`.
fn cluster_ip_endpoints(out: &Frontends) -> Vec<Endpoint> {
    frontend_of(out, "10.96.0.10", 80).endpoints.clone()
}

#[test]
fn clusterip_services_get_no_external_frontends() {
    let out = of_cluster(&[&web()], &[], &node1());
    assert!(out
        .frontends
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
    // The IPv6 ones apart: IPv6 NodePorts answer there, IPv6 SNAT leaves
    // with the first.
    assert_eq!(
        info.addresses6,
        ["fd00::11".parse::<std::net::Ipv6Addr>().unwrap()]
    );
    assert_eq!(info.snat_address6(), info.addresses6.first().copied());
    assert_eq!(
        info.node_port_addresses(),
        ["10.250.0.11", "198.51.100.11", "fd00::11"]
            .map(|a| a.parse::<std::net::IpAddr>().unwrap())
    );
    // The uplink is found from the InternalIPs alone.
    assert_eq!(
        crate::k8s::nodes::internal_ips(Some(&node)),
        ["10.250.0.11".parse::<Ipv4Addr>().unwrap()]
    );
}

fn node_in_zone(zone: &str) -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        addresses: vec![],
        addresses6: vec![],
        pod_cidrs: Vec::new(),

        zone: Some(zone.into()),
        node_port_loopback: false,
        node_port_only: None,
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
    let out = of_cluster(&[&web()], &[&slice], &node1());
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
    let out = of_cluster(&[&web()], &[&slice], &node1());
    let f = frontend_of(&out, "10.96.0.10", 80);
    assert_eq!(f.endpoints.len(), 1);
    let kept: Vec<String> = f.reachable.iter().map(|e| e.address.to_string()).collect();
    assert!(kept.contains(&"10.244.1.4".to_string()), "{kept:?}");
    // In the maps: a backend entry (for conntrack) but no slot.
    let (state, _) = crate::desired::map_state(&out.frontends, &mut crate::desired::Ids::default());
    let terminating = state
        .backends
        .values()
        .filter(|b| b.state == proxy_common::backend_state::TERMINATING)
        .count();
    assert!(terminating >= 1);
    let slot0 = state
        .services
        .iter()
        .find(|(k, _)| k.slot == 0 && k.port == 80)
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
    let on_node1 = of_cluster(&[&svc], &[&slice], &node1());
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
        addresses6: vec![],
        pod_cidrs: Vec::new(),

        zone: None,
        node_port_loopback: false,
        node_port_only: None,
    };
    let out = of_cluster(&[&svc], &[&slice], &elsewhere);
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
    let in_a = of_cluster(&[&web()], &[&slice], &node_in_zone("a"));
    let f = frontend_of(&in_a, "10.96.0.10", 80);
    assert_eq!(
        f.endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect::<Vec<_>>(),
        ["10.244.1.3"]
    );
    let in_c = of_cluster(&[&web()], &[&slice], &node_in_zone("c"));
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
    let out = of_cluster(
        &[&with(json!({"clientIP": {"timeoutSeconds": 60}}))],
        &[],
        &node1(),
    );
    assert_eq!(out.frontends[0].affinity_timeout, Some(60));
    let out = of_cluster(&[&with(serde_json::Value::Null)], &[], &node1());
    assert_eq!(
        out.frontends[0].affinity_timeout,
        Some(DEFAULT_AFFINITY_TIMEOUT)
    );
    let out = of_cluster(&[&web()], &[], &node1());
    assert_eq!(out.frontends[0].affinity_timeout, None);
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
    let out = of_cluster(&[&web()], &[&slice], &node1());
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
    let out = of_cluster(&[&with("maglev")], &[], &node1());
    assert_eq!(out.frontends[0].scheduler, Some(Scheduler::Maglev));
    let out = of_cluster(&[&with("fastest")], &[], &node1());
    assert_eq!(
        out.frontends[0].scheduler, None,
        "left to the agent's default"
    );
    assert!(matches!(&out.skipped[0], Skip::Scheduler(name, _) if name == "d/s"));
    assert_eq!(
        of_cluster(&[&web()], &[], &node1()).frontends[0].scheduler,
        None
    );
}

#[test]
fn thousands_of_ports_are_each_a_frontend_and_a_bad_one_among_them_is_named() {
    let mut ports: Vec<serde_json::Value> = (0..5000)
        .map(|i| json!({"name": format!("p{i}"), "port": 10000 + i, "protocol": "TCP"}))
        .collect();
    ports.push(json!({"name": "bad", "port": 70000, "protocol": "TCP"}));
    let service = svc(json!({
        "metadata": {"namespace": "default", "name": "web"},
        "spec": {"clusterIP": "10.96.0.10", "ports": ports}
    }));
    let slice_ports: Vec<serde_json::Value> = (0..5000)
        .map(|i| json!({"name": format!("p{i}"), "port": 20000 + i, "protocol": "TCP"}))
        .collect();
    let slice = parse_slice(
        SliceVersion::V1,
        json!({
            "metadata": {"namespace": "default", "name": "web-1",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": slice_ports,
            "endpoints": [{"addresses": ["10.244.1.5"]}],
        }),
    )
    .unwrap();
    let out = of_cluster(&[&service], &[&slice], &NodeInfo::default());
    assert_eq!(out.frontends.len(), 5000);
    assert_eq!(endpoints_of(&out.frontends, 14999), ["10.244.1.5:24999"]);
    assert_eq!(
        out.skipped
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["default/web: invalid port 70000"]
    );
}

#[test]
fn service_ports_with_a_local_policy_and_no_local_endpoint_are_counted_as_kube_proxy_does() {
    let remote_only = slice_v1(
        "web-1",
        json!([{"addresses": ["10.244.2.3"], "nodeName": "node2"}]),
    );
    // The node has an IPv6 address too: the IPv4 Service is counted once.
    let mut node = node1();
    node.addresses6 = vec!["fd00::11".parse().unwrap()];
    let out = of_cluster(&[&lb_service("Local")], &[&remote_only], &node);
    assert_eq!(
        out.no_local_endpoints,
        NoLocalEndpoints {
            internal: 0,
            external: 1
        }
    );
    let out = of_cluster(&[&lb_service("Local")], &[&two_node_slice()], &node);
    assert_eq!(out.no_local_endpoints, NoLocalEndpoints::default());
    let out = of_cluster(&[&lb_service("Cluster")], &[&remote_only], &node);
    assert_eq!(out.no_local_endpoints, NoLocalEndpoints::default());
    let internal = svc(json!({
        "metadata": {"namespace": "default", "name": "web"},
        "spec": {"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }));
    let out = of_cluster(&[&internal], &[&remote_only], &node);
    assert_eq!(
        out.no_local_endpoints,
        NoLocalEndpoints {
            internal: 1,
            external: 0
        }
    );
}
