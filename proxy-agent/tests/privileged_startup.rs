//! The agent's start on a node, in namespaces the tests make: which API server
//! address it dials (the DaemonSet's KUBERNETES_SERVICE_HOST/PORT from the
//! ConfigMap, through kube-rs's in-cluster inference), which interface it
//! takes as the uplink, that `cleanup` takes the uplink's XDP link away, and
//! that a second agent on the same maps refuses to start.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use proxy_agent::{
    kernel::netinfo,
    uplink::{self, Reason, UplinkRequest},
};
use support::netns::{in_netns, run, Lab};

/// The address the ConfigMap gives, and the ClusterIP the kubelet gives.
const CONFIGURED: (&str, u16) = ("10.250.9.1", 6443);
const CLUSTER_IP: (&str, u16) = ("10.96.0.1", 443);

/// An agent process, stopped when dropped (also when the test fails).
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_dials_the_api_server_the_configmap_names() {
    let mut lab = Lab::new("api");
    let node = lab.netns("node");
    for (addr, _) in [CONFIGURED, CLUSTER_IP] {
        run(
            "ip",
            &[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "lo",
            ],
        );
    }
    let listeners = in_netns(&node, || {
        [CONFIGURED, CLUSTER_IP].map(|(addr, port)| {
            let listener = TcpListener::bind((addr, port)).unwrap();
            listener.set_nonblocking(true).unwrap();
            listener
        })
    });

    // A pod's service account files, in a mount namespace of the agent's own
    // (tmpfs over /run, where /var/run points): the machine's stay as they are.
    let dir = lab.dir();
    std::fs::write(dir.join("token"), "not-a-real-token").unwrap();
    std::fs::write(dir.join("namespace"), "kube-system").unwrap();
    std::fs::copy("/etc/ssl/certs/ca-certificates.crt", dir.join("ca.crt")).unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p $SA && cp {dir}/token {dir}/namespace {dir}/ca.crt $SA && exec \"$@\"",
        dir = dir.display()
    );
    let mut child = ferry_netns::enter(&node, "unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_proxy-agent"))
        .args([
            "run",
            "--node-name",
            "node1",
            "--healthz-bind-address",
            "off",
            "--metrics-bind-address",
            "off",
        ])
        .args(["--pod-iface-pattern", "none-here*"])
        .arg("--pin-dir")
        .arg(&lab.pin_dir)
        // Never the machine's cgroup root (the default).
        .env("FERRY_SOCKET_LB", "off")
        .env("SA", "/run/secrets/kubernetes.io/serviceaccount")
        // The ConfigMap's values, as the DaemonSet passes them, beside the
        // variables the kubelet sets for the `kubernetes` Service.
        .env("KUBERNETES_SERVICE_HOST", CONFIGURED.0)
        .env("KUBERNETES_SERVICE_PORT", CONFIGURED.1.to_string())
        .env(
            "KUBERNETES_PORT",
            format!("tcp://{}:{}", CLUSTER_IP.0, CLUSTER_IP.1),
        )
        .env("KUBERNETES_PORT_443_TCP_ADDR", CLUSTER_IP.0)
        .env_remove("KUBECONFIG")
        .env("HOME", &dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start proxy-agent");
    let stderr = child.stderr.take().unwrap();
    let _agent = Agent(child);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("agent: {line}");
            let _ = tx.send(line);
        }
    });

    // The agent's TLS handshake reaches the configured address; nothing
    // reaches the ClusterIP.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let dialled = loop {
        match listeners[0].accept() {
            Ok((_, peer)) => break peer,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not dial {}:{} in 20 s",
            CONFIGURED.0,
            CONFIGURED.1
        );
        thread::sleep(Duration::from_millis(50));
    };
    eprintln!("the agent dialled the configured address from {dialled}");
    assert!(
        listeners[1].accept().is_err(),
        "the agent dialled the kubelet's ClusterIP"
    );
    let line = rx
        .iter()
        .find(|l| l.contains("API server"))
        .expect("the agent's log ended without naming the API server");
    assert!(
        line.contains("api_server=https://10.250.9.1:6443/"),
        "{line}"
    );
    assert!(line.contains("ferry-config"), "the origin is named: {line}");
    assert!(
        line.contains("INFO"),
        "the configured address is no warning: {line}"
    );

    drop(_agent);
    lab.teardown();
    lab.assert_gone();
}

/// A node with two interfaces: `int0` holds the Node's InternalIP, `def0`
/// carries the default route.
fn two_interface_node(lab: &mut Lab) -> String {
    let node = lab.netns("node");
    for (iface, addr) in [("int0", "10.250.0.11/24"), ("def0", "192.168.77.2/24")] {
        let peer = format!("{iface}p");
        run(
            "ip",
            &[
                "-n", &node, "link", "add", iface, "type", "veth", "peer", "name", &peer,
            ],
        );
        run("ip", &["-n", &node, "addr", "add", addr, "dev", iface]);
        for dev in [iface, peer.as_str()] {
            run("ip", &["-n", &node, "link", "set", dev, "up"]);
        }
    }
    run(
        "ip",
        &[
            "-n",
            &node,
            "route",
            "add",
            "default",
            "via",
            "192.168.77.1",
            "dev",
            "def0",
        ],
    );
    node
}

#[test]
fn the_uplink_is_the_interface_holding_the_nodes_internal_ip() {
    let mut lab = Lab::new("upl");
    let node = two_interface_node(&mut lab);
    let internal: Ipv4Addr = "10.250.0.11".parse().unwrap();
    let (by_address, by_route) = in_netns(&node, move || {
        let interfaces = netinfo::interfaces().unwrap();
        let route = netinfo::default_route().unwrap();
        let choose = |addrs: &[Ipv4Addr]| {
            uplink::choose(&UplinkRequest::Auto, addrs, &interfaces, route.as_deref())
        };
        (choose(&[internal]), choose(&["10.1.1.1".parse().unwrap()]))
    });
    assert_eq!(by_address.interfaces, ["int0"]);
    assert_eq!(by_address.reason, Reason::NodeAddress { address: internal });
    assert_eq!(by_route.interfaces, ["def0"], "{by_route:?}");
    assert!(matches!(by_route.reason, Reason::DefaultRoute { .. }));
    lab.teardown();
    lab.assert_gone();
}

/// GET `path` from the agent's health port inside `ns`.
/// GETs `path` from the agent in `ns`: /healthz and /livez on the healthz
/// port, the rest on the metrics port.
fn get(ns: &str, path: &'static str) -> String {
    let port = match path {
        "/healthz" | "/livez" => 10256,
        _ => 10249,
    };
    in_netns(ns, move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    })
}

#[test]
fn without_a_node_the_agent_takes_the_default_route_and_cleanup_detaches_it() {
    let mut lab = Lab::new("upr");
    let node = two_interface_node(&mut lab);
    // Another tool's filter on the uplink, which cleanup must leave (and with
    // it the clsact qdisc it hangs from).
    let tc = |args: &[&str]| run("ip", &[&["netns", "exec", &node, "tc"], args].concat());
    tc(&["qdisc", "add", "dev", "def0", "clsact"]);
    tc(&[
        "filter", "add", "dev", "def0", "ingress", "prio", "1", "protocol", "all", "u32", "match",
        "u32", "0", "0", "classid", "1:1",
    ]);
    let dir = lab.dir();
    let services = dir.join("services.json");
    std::fs::write(&services, r#"{"services": []}"#).unwrap();
    // A services file has no Node: the default route decides.
    lab.start_agent(
        &node,
        &[
            "run",
            "--services-file",
            services.to_str().unwrap(),
            "--uplink-mode",
            "generic",
            // int0 plays a pod interface: the pod programs on it.
            "--pod-iface-pattern",
            "int0",
        ],
    );
    let status = get(&node, "/statusz");
    let body = status.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {status}"));
    assert_eq!(
        json["uplinkChoice"]["interfaces"],
        serde_json::json!(["def0"]),
        "{body}"
    );
    assert_eq!(
        json["uplinkChoice"]["reason"]["kind"], "defaultRoute",
        "{body}"
    );
    assert_eq!(json["uplinks"][0]["interface"], "def0", "{body}");
    assert_eq!(json["uplinks"][0]["mode"], "generic", "{body}");
    let xdp =
        |dev: &str| run("ip", &["-n", &node, "link", "show", "dev", dev]).contains("xdpgeneric");
    assert!(xdp("def0"), "XDP on the default route's interface");
    assert!(!xdp("int0"), "no XDP elsewhere");
    let pod_filters = tc(&["filter", "show", "dev", "int0", "ingress"]);
    assert!(pod_filters.contains("from_pod"), "{pod_filters}");
    let uplink_filters = tc(&["filter", "show", "dev", "def0", "ingress"]);
    for program in ["uplink_tc ", "uplink_tc6"] {
        assert!(uplink_filters.contains(program), "{uplink_filters}");
    }

    // The XDP link outlives the agent (pinned), and cleanup removes it.
    lab.teardown_agents_only();
    assert!(xdp("def0"), "XDP stays after the agent stops");
    lab.cleanup_agent_state(&node);
    assert!(!xdp("def0"), "cleanup detached the uplink's XDP link");
    let uplink_filters = tc(&["filter", "show", "dev", "def0", "ingress"]);
    assert!(!uplink_filters.contains("uplink_tc"), "{uplink_filters}");
    assert!(
        uplink_filters.contains("u32"),
        "the other tool's filter stays: {uplink_filters}"
    );
    assert!(
        tc(&["qdisc", "show", "dev", "def0"]).contains("clsact"),
        "def0 keeps its clsact"
    );
    for hook in ["ingress", "egress"] {
        let left = tc(&["filter", "show", "dev", "int0", hook]);
        assert!(left.trim().is_empty(), "int0 {hook} still has: {left}");
    }
    let qdiscs = tc(&["qdisc", "show", "dev", "int0"]);
    assert!(
        !qdiscs.contains("clsact"),
        "the clsact Ferry left empty is gone: {qdiscs}"
    );
    assert!(!lab.pin_dir.exists());
    lab.teardown();
    lab.assert_gone();
}

#[test]
fn a_second_agent_on_the_same_pin_directory_refuses_to_start() {
    let mut lab = Lab::new("two");
    let node = lab.netns("node");
    let dir = lab.dir();
    let services = dir.join("services.json");
    std::fs::write(&services, r#"{"services": []}"#).unwrap();
    let args = [
        "run",
        "--services-file",
        services.to_str().unwrap(),
        "--uplink-iface",
        "none",
        "--healthz-bind-address",
        "off",
        "--metrics-bind-address",
        "off",
    ];
    lab.start_agent(&node, &args);
    let started = std::time::Instant::now();
    let second = ferry_netns::enter(&node, env!("CARGO_BIN_EXE_proxy-agent"))
        .args(args)
        .arg("--pin-dir")
        .arg(&lab.pin_dir)
        .env("FERRY_SOCKET_LB", "off")
        .output()
        .expect("run a second proxy-agent");
    let stderr = String::from_utf8_lossy(&second.stderr);
    eprintln!("second agent: {stderr}");
    assert!(!second.status.success(), "the second agent ran");
    assert!(
        stderr.contains("another agent runs on") && stderr.contains(lab.pin_dir.to_str().unwrap()),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "it gave up after its wait, not never"
    );
    // Once the first is gone, an agent starts on the same maps.
    lab.teardown_agents_only();
    lab.start_agent(&node, &args);
    lab.teardown();
    lab.assert_gone();
}

/// Polls `check` for up to `secs` seconds.
fn within(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    check()
}

#[test]
fn with_the_api_server_down_the_agent_stays_live_attaches_pods_and_repairs_filters() {
    let mut lab = Lab::new("apd");
    let node = lab.netns("node");
    // An API server nobody serves: connections to it are refused.
    let dir = lab.dir();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
         clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: not-a-token}}]\n\
         contexts: [{name: c, context: {cluster: c, user: u}}]\n",
    )
    .unwrap();
    lab.start_agent_until(
        &node,
        &[
            "run",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            "node1",
            "--uplink-iface",
            "none",
            "--pod-iface-pattern",
            "pod*",
            "--resync-seconds",
            "1",
        ],
        "serving /healthz",
    );
    let status = |path| {
        get(&node, path)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    // Live, not in sync: the liveness probe leaves it be, readiness does not.
    assert!(
        within(5, || status("/livez").contains("200")),
        "/livez: {}",
        status("/livez")
    );
    assert!(status("/healthz").contains("503"), "{}", status("/healthz"));

    // A pod created during the outage gets the programs.
    let pod = lab.netns("pod");
    lab.plug_pod(&node, &pod, "pod0", "10.244.1.2", "169.254.1.1");
    let tc = |hook: &str| {
        run(
            "ip",
            &[
                "netns", "exec", &node, "tc", "filter", "show", "dev", "pod0", hook,
            ],
        )
    };
    assert!(
        within(10, || tc("ingress").contains("from_pod")
            && tc("egress").contains("to_pod")),
        "pod0 got no filters: {} / {}",
        tc("ingress"),
        tc("egress")
    );

    // Another tool removes them: the next resync puts them back, and says so.
    run(
        "ip",
        &[
            "netns", "exec", &node, "tc", "filter", "del", "dev", "pod0", "ingress",
        ],
    );
    assert!(!tc("ingress").contains("from_pod"));
    assert!(
        within(10, || tc("ingress").contains("from_pod")),
        "the filter was not put back"
    );
    let metrics = get(&node, "/metrics");
    assert!(
        metrics.contains("ferry_tc_filters_restored_total 1"),
        "{metrics}"
    );
    thread::sleep(Duration::from_secs(2));
    assert!(lab.agents_running(), "the agent exited");
    assert!(status("/livez").contains("200"));
    lab.teardown();
    lab.assert_gone();
}

/// A services map shrunk below what it holds (`--map-services`): the agent
/// carries what fits into the smaller map, takes out the frontends left with a
/// hole, and its first round fills the room with whole frontends and names
/// the rest as refused. No frontend is left half there.
#[test]
fn a_services_map_shrunk_below_its_entries_keeps_only_whole_frontends() {
    use proxy_agent::desired::{apply::check_whole, MapState};
    let mut lab = Lab::new("shrink");
    let node = lab.netns("node");
    let dir = lab.dir();
    let services = dir.join("services.json");
    // 20 frontends of 3 backends: 80 services-map entries.
    let list: Vec<String> = (1..=20)
        .map(|i| {
            format!(
                r#"{{"name": "s{i}", "address": "10.96.1.{i}", "port": 80, "protocol": "TCP",
                    "endpoints": [{{"address": "10.244.1.{i}", "port": 8080}},
                                  {{"address": "10.244.2.{i}", "port": 8080}},
                                  {{"address": "10.244.3.{i}", "port": 8080}}]}}"#
            )
        })
        .collect();
    std::fs::write(
        &services,
        format!(r#"{{"services": [{}]}}"#, list.join(",")),
    )
    .unwrap();
    let args = [
        "run",
        "--services-file",
        services.to_str().unwrap(),
        "--uplink-iface",
        "none",
        "--healthz-bind-address",
        "127.0.0.1:10256",
    ];
    let pinned = proxy_common::pinned::Pinned::new(&lab.pin_dir);
    lab.start_agent(&node, &args);
    assert_eq!(pinned.services().unwrap().len(), 80);
    lab.teardown_agents_only();

    let mut small = args.to_vec();
    small.extend(["--map-services", "32"]);
    lab.start_agent(&node, &small);
    let state = MapState {
        services: pinned
            .services()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect(),
        backends: pinned
            .backends()
            .unwrap()
            .into_iter()
            .map(|(id, b)| (id, b.into()))
            .collect(),
        revnat: pinned
            .revnat()
            .unwrap()
            .into_iter()
            .map(|(id, r)| (id, r.into()))
            .collect(),
        ..Default::default()
    };
    check_whole(&state).expect("every frontend in the maps is whole");
    let heads = state.services.keys().filter(|k| k.slot == 0).count();
    assert_eq!((state.services.len(), heads), (32, 8), "the room is used");
    let metrics = get(&node, "/metrics");
    assert!(
        metrics.contains("\nferry_frontends_refused_map_full 12\n"),
        "{metrics}"
    );
    lab.teardown();
    lab.assert_gone();
}

/// Pods behind interfaces no `--pod-iface-pattern` glob matches (another
/// CNI's names) still get the pod programs, found by routes: a veth with a
/// route to one pod address (a routed CNI's), and the ports of a bridge the
/// route to a local endpoint leads to (a bridge CNI's), client pods
/// included. An endpoint behind an interface that cannot take them (a
/// bridge without ports) is named in the log and counted.
#[test]
fn pod_interfaces_are_found_by_routes_whatever_their_names() {
    let mut lab = Lab::new("una");
    let node = lab.netns("node");
    let by_name = lab.netns("pa");
    let routed = lab.netns("pb");
    lab.plug_pod(&node, &by_name, "pod0", "10.244.1.2", "169.254.1.1");
    lab.plug_pod(&node, &routed, "eni3", "10.244.1.3", "169.254.1.1");
    // A bridge CNI: the bridge holds the gateway and routes the subnet;
    // the pods' veths are its ports.
    let ip = |args: &[&str]| {
        let mut all = vec!["-n", node.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    };
    ip(&["link", "add", "brp", "type", "bridge"]);
    ip(&["addr", "add", "10.244.2.1/24", "dev", "brp"]);
    ip(&["link", "set", "brp", "up"]);
    for (port, pod_end) in [("tapa", "tapa-pod"), ("tapb", "tapb-pod")] {
        ip(&["link", "add", port, "type", "veth", "peer", "name", pod_end]);
        ip(&["link", "set", port, "master", "brp", "up"]);
    }
    // A bridge with a route but no ports: nothing there can take the
    // programs.
    ip(&["link", "add", "brq", "type", "bridge"]);
    ip(&["addr", "add", "10.244.3.1/24", "dev", "brq"]);
    ip(&["link", "set", "brq", "up"]);
    let dir = lab.dir();
    let services = dir.join("services.json");
    std::fs::write(
        &services,
        r#"{"services": [{"name": "web", "address": "10.96.0.10", "port": 80, "protocol": "TCP",
            "endpoints": [{"address": "10.244.1.2", "port": 8080, "local": true},
                          {"address": "10.244.1.3", "port": 8080, "local": true},
                          {"address": "10.244.2.5", "port": 8080, "local": true},
                          {"address": "10.244.3.9", "port": 8080, "local": true}]}]}"#,
    )
    .unwrap();
    lab.start_agent_until(
        &node,
        &[
            "run",
            "--services-file",
            services.to_str().unwrap(),
            "--uplink-iface",
            "none",
            "--pod-iface-pattern",
            "pod*",
            "--resync-seconds",
            "1",
        ],
        r#"endpoint=10.244.3.9 iface="brq""#,
    );
    let filters = |iface: &str| {
        run(
            "ip",
            &[
                "netns", "exec", &node, "tc", "filter", "show", "dev", iface, "ingress",
            ],
        )
    };
    for iface in ["pod0", "eni3", "tapa", "tapb"] {
        assert!(
            within(5, || filters(iface).contains("from_pod")),
            "{iface} has no pod programs: {}",
            filters(iface)
        );
    }
    for iface in ["brp", "brq"] {
        assert!(
            !filters(iface).contains("from_pod"),
            "{iface}: a bridge itself"
        );
    }
    let metrics = get(&node, "/metrics");
    assert!(
        metrics.contains("\nferry_local_endpoints_unattached 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nferry_pod_interfaces 4\n"), "{metrics}");
    lab.teardown();
    lab.assert_gone();
}

/// What an agent with the default map sizes pins, in kernel memory (bpftool's
/// `bytes_memlock`, the maps' own memory on 6.x): at most 64 MiB. And
/// `--map-dynamic-size-ratio` sizes the flow maps from the node's memory.
#[test]
fn default_maps_take_at_most_64_mib_and_a_ratio_sizes_the_flow_maps() {
    let mut lab = Lab::new("mem");
    let node = lab.netns("node");
    let dir = lab.dir();
    let services = dir.join("services.json");
    std::fs::write(&services, r#"{"services": []}"#).unwrap();
    let args = [
        "run",
        "--services-file",
        services.to_str().unwrap(),
        "--uplink-iface",
        "none",
        "--healthz-bind-address",
        "127.0.0.1:10256",
    ];
    let memory = |pin_dir: &std::path::Path| -> Vec<(String, u64, u64)> {
        proxy_common::map_names::ALL
            .iter()
            .map(|name| {
                let out = std::process::Command::new("bpftool")
                    .args(["map", "show", "pinned"])
                    .arg(pin_dir.join(name))
                    .arg("-j")
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{name}: {out:?}");
                let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                (
                    name.to_string(),
                    map["bytes_memlock"].as_u64().unwrap(),
                    map["max_entries"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    lab.start_agent(&node, &args);
    let maps = memory(&lab.pin_dir);
    let total: u64 = maps.iter().map(|m| m.1).sum();
    let cpus = std::thread::available_parallelism().unwrap().get();
    let allowed = 64 << 20;
    let table: Vec<String> = maps
        .iter()
        .map(|(name, bytes, entries)| format!("{name}: {entries} entries, {} KiB", bytes >> 10))
        .collect();
    eprintln!(
        "default maps: {:.1} MiB on {cpus} CPUs\n{}",
        total as f64 / (1 << 20) as f64,
        table.join("\n")
    );
    assert!(total <= allowed, "{total} bytes: {table:#?}");
    lab.teardown_agents_only();

    // 1/1000 of the node's memory for the flow maps: conntrack, NAT and
    // affinity are sized to it; a flag keeps its own size.
    let mut ratio = args.to_vec();
    ratio.extend(["--map-dynamic-size-ratio", "0.001", "--map-nat", "4096"]);
    lab.start_agent(&node, &ratio);
    let maps = memory(&lab.pin_dir);
    let entries = |name: &str| maps.iter().find(|m| m.0 == name).unwrap().2;
    let node_memory = proxy_agent::kernel::sizes::node_memory().unwrap();
    let want = proxy_agent::kernel::MapSizes::default()
        .with_flows(
            proxy_agent::kernel::sizes::FlowFlags {
                nat: Some(4096),
                ..Default::default()
            },
            0.001,
            node_memory,
        )
        .unwrap();
    use proxy_common::map_names as names;
    assert_eq!(entries(names::CONNTRACK_V4), u64::from(want.conntrack));
    assert_eq!(entries(names::CONNTRACK_V6), u64::from(want.conntrack / 4));
    assert_eq!(entries(names::AFFINITY_V4), u64::from(want.affinity));
    assert_eq!(entries(names::NAT_V4), 4096, "the flag's size");
    assert_ne!(
        want.conntrack,
        proxy_common::capacity::CONNTRACK,
        "the ratio changed it"
    );
    lab.teardown_agents_only();
    lab.teardown();
    lab.assert_gone();
}
