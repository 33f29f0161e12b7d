//! Lab test of what an operator sees: kube-proxy's metrics on :10249 moved
//! by real traffic and real API changes, and `/healthz` as kube-proxy's
//! rules make it, through an API server outage; `proxy-agent monitor` naming
//! drops and rejects as they happen.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::json;
use support::*;

const NODE1: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
/// node1's agent resyncs every 2 s here: `/healthz` allows a change, or a
/// failing watch, twice that (kube-proxy's rule: twice the sync period).
const RESYNC_SECONDS: u64 = 2;
const CONNECTIONS: usize = 40;
const DATAGRAMS: usize = 50;
const PAYLOAD: usize = 1000;

/// Every sample of a /metrics text, by series (`name{labels}`).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn scrape(ext: &str) -> BTreeMap<String, f64> {
    let answer = http_get(ext, (NODE1, 10249).into(), "/metrics");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    samples(&answer)
}

fn get(metrics: &BTreeMap<String, f64>, series: &str) -> f64 {
    *metrics
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in node1's /metrics"))
}

/// The metric names a dashboard's queries read.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for prefix in ["ferry_", "kubeproxy_"] {
        for (at, _) in text.match_indices(prefix) {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

/// The HTTP status code of node1's `path` on the healthz port.
fn status(ext: &str, path: &'static str) -> u16 {
    let answer = http_get(ext, (NODE1, 10256).into(), path);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{answer}"))
}

/// Waits until node1's /healthz answers `code`; returns how long that took.
fn wait_healthz(ext: &str, code: u16, within: Duration) -> Duration {
    let start = Instant::now();
    while status(ext, "/healthz") != code {
        assert!(
            start.elapsed() < within,
            "node1's /healthz did not say {code} within {within:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// `proxy-agent monitor` as an operator runs it on a node: in the node's
/// network namespace, on its agent's pinned maps, naming Services through
/// the agent's metrics address there. Killed when dropped.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Monitor {
    /// `extra`: more of the monitor's flags (`--type trace`).
    fn start(lab: &Lab, node: &str, extra: &[&str]) -> Self {
        let agent = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/x86_64-unknown-linux-gnu/release/proxy-agent");
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.node_ns(node)))
            .arg(&agent)
            .args(["monitor", "--seconds", "120", "--pin-dir"])
            .arg(format!("/sys/fs/bpf/{}/{node}", lab.name))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("proxy-agent monitor");
        // Reading once it says so on stderr.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut said = String::new();
        while !said.contains("monitor: reading") {
            said.clear();
            let n = stderr.read_line(&mut said).unwrap();
            assert!(n > 0, "monitor exited: {:?}", child.wait());
            eprint!("   {said}");
        }
        thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("   {line}");
            }
        });
        let (tx, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line that names `reason`, and when it came.
    fn line_with(&mut self, reason: &str) -> (Instant, String) {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.contains(reason) => return (at, line),
                Ok(_) => {}
                Err(e) => panic!("no {reason} line from the monitor: {e}"),
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lab_metrics_and_health_as_kube_proxy_serves_them() {
    let lab = Lab::up();
    let ext = format!("{}-ext", lab.name);
    lab.xtask(&["agent", "stop", "node1"]);
    lab.xtask(&[
        "agent",
        "start",
        "node1",
        "--",
        "--resync-seconds",
        &RESYNC_SECONDS.to_string(),
        "--conntrack-gc-seconds",
        "1",
        "--traffic-counters",
        "true",
    ]);
    wait_healthz(&ext, 200, Duration::from_secs(60));
    let before = scrape(&ext);

    eprintln!("== a Service and its pods, made after node1's agent started");
    let client = lab.pod_ns("client");
    lab.xtask(&["pod", "add", "client", "--node", "node1"]);
    let web1 = lab.pod_add("obs-1", "node1", "obs");
    let web2 = lab.pod_add("obs-2", "node2", "obs");
    let vip = lab.service("obs", "obs");
    lab.wait_endpoints("obs", &[web1, web2]);
    // externalTrafficPolicy Local with its one endpoint on node2: node1 has
    // no local endpoint of it.
    let remote = lab.pod_add("obs-remote", "node2", "obs-remote");
    lab.apply_service(
        "obs-remote",
        json!({
            "type": "NodePort",
            "externalTrafficPolicy": "Local",
            "selector": {"app": "obs-remote"},
            "ports": [http()],
        }),
    );
    lab.wait_endpoints("obs-remote", &[remote]);

    eprintln!("== {CONNECTIONS} TCP connections from a pod on node1 to {vip}:80");
    let answers = connect_many(&client, (vip, 80).into(), CONNECTIONS);
    assert_eq!(count(&answers).values().sum::<usize>(), CONNECTIONS);
    // The next programming round and garbage collection have run.
    thread::sleep(Duration::from_secs(RESYNC_SECONDS + 2));
    status(&ext, "/healthz");
    let after = scrape(&ext);
    let moved = |series: &str| get(&after, series) - before.get(series).copied().unwrap_or(0.0);

    let rounds = moved("kubeproxy_sync_proxy_rules_duration_seconds_count");
    let full = moved("kubeproxy_sync_full_proxy_rules_duration_seconds_count");
    let partial = moved("kubeproxy_sync_partial_proxy_rules_duration_seconds_count");
    eprintln!("   programming rounds: {rounds} ({full} full, {partial} partial)");
    assert!(
        partial >= 1.0,
        "the new Services were programmed in partial rounds"
    );
    assert_eq!(rounds, full + partial);
    let last = get(&after, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    let queued = get(
        &after,
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    eprintln!(
        "   last sync {:.1} s ago, last queued {:.1} s ago",
        now - last,
        now - queued
    );
    assert!(now - last < 30.0 && now - last >= 0.0, "{last}");
    assert!(queued <= last + 1.0 && now - queued < 300.0, "{queued}");
    let service_changes = moved("kubeproxy_sync_proxy_rules_service_changes_total");
    let endpoint_changes = moved("kubeproxy_sync_proxy_rules_endpoint_changes_total");
    eprintln!("   changes: {service_changes} of Services, {endpoint_changes} of endpoints");
    assert!(service_changes >= 2.0, "two Services were made");
    assert!(endpoint_changes >= 2.0, "two Services' endpoints were");
    assert_eq!(
        get(&after, "kubeproxy_sync_proxy_rules_service_changes_pending"),
        0.0
    );
    assert_eq!(
        get(
            &after,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending"
        ),
        0.0
    );
    let programmed = moved("kubeproxy_network_programming_duration_seconds_count");
    eprintln!("   network programming latencies observed: {programmed}");
    assert!(programmed >= 1.0);
    assert_eq!(
        get(
            &after,
            r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"}"#
        ),
        1.0,
        "obs-remote has no endpoint on node1"
    );
    assert!(get(&after, r#"kubeproxy_proxy_healthz_total{code="200"}"#) >= 1.0);

    let new = moved(r#"ferry_datapath_packets_total{verdict="fwd_new"}"#);
    let established = moved(r#"ferry_datapath_packets_total{verdict="fwd_established"}"#);
    let reverse = moved(r#"ferry_datapath_packets_total{verdict="rev_nat"}"#);
    eprintln!("   datapath: fwd_new {new}, fwd_established {established}, rev_nat {reverse}");
    // Each connection: a SYN, then at least its ACK and FIN; answers back.
    assert!(new >= CONNECTIONS as f64, "{new}");
    assert!(established >= 2.0 * CONNECTIONS as f64, "{established}");
    assert!(reverse >= 2.0 * CONNECTIONS as f64, "{reverse}");
    assert!(moved(r#"ferry_datapath_bytes_total{verdict="fwd_new"}"#) >= 60.0 * new);
    let frontends = get(&after, "ferry_frontends");
    let services = get(&after, r#"ferry_map_entries{map="services",family="ipv4"}"#);
    let capacity = get(&after, r#"ferry_map_capacity_entries{map="services"}"#);
    eprintln!("   {frontends} frontends; services map {services} of {capacity} entries");
    assert!(frontends >= 4.0 && services > frontends && capacity >= services);
    let flows: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("ferry_conntrack_flows{"))
        .map(|(_, v)| v)
        .sum();
    eprintln!(
        "   conntrack: {} entries, {flows} flows",
        get(&after, "ferry_conntrack_entries")
    );
    assert!(flows >= 1.0 && get(&after, "ferry_conntrack_entries") >= 2.0 * flows);
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("ferry_uplink_attach_mode{")),
        "{after:?}"
    );

    eprintln!(
        "== {DATAGRAMS} UDP datagrams of {PAYLOAD} bytes to a Service of their own: its counters say what was sent"
    );
    let udp_vip = lab.service("obs-udp", "obs");
    lab.wait_endpoints("obs-udp", &[web1, web2]);
    let answered = in_netns(&client, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut answered = 0;
        let mut buf = [0u8; 2048];
        for _ in 0..DATAGRAMS {
            socket
                .send_to(&[b'u'; PAYLOAD], SocketAddr::from((udp_vip, 53)))
                .unwrap();
            if socket.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
        answered
    });
    let metrics = scrape(&ext);
    let service = |direction: &str, unit: &str| {
        get(
            &metrics,
            &format!(
                r#"ferry_service_{unit}_total{{service="default/obs-udp",direction="{direction}"}}"#
            ),
        )
    };
    // Each datagram as it left the pod: Ethernet, IPv4 and UDP headers
    // and the payload. Nothing else goes to this Service: the count is
    // exact (no tolerance needed).
    let frame = (14 + 20 + 8 + PAYLOAD) as f64;
    eprintln!(
        "   to_backend {} packets, {} bytes; to_client {} packets ({answered} answers heard)",
        service("to_backend", "packets"),
        service("to_backend", "bytes"),
        service("to_client", "packets")
    );
    assert_eq!(service("to_backend", "packets"), DATAGRAMS as f64);
    assert_eq!(service("to_backend", "bytes"), DATAGRAMS as f64 * frame);
    assert_eq!(service("to_client", "packets"), answered as f64);
    assert!(
        answered >= DATAGRAMS - 2,
        "{answered} of {DATAGRAMS} answered"
    );
    let web_bytes = |m: &BTreeMap<String, f64>| {
        get(
            m,
            r#"ferry_service_bytes_total{service="default/obs",direction="to_backend"}"#,
        )
    };
    assert!(web_bytes(&metrics) >= 60.0 * 3.0 * CONNECTIONS as f64);

    eprintln!("== a backend goes: its counters leave the map, the Service's totals stay");
    let pairs_before = lab.pinned_entries("node1", "traffic_v1").len();
    lab.xtask(&["pod", "del", "obs-2"]);
    lab.wait_endpoints("obs", &[web1]);
    lab.wait_endpoints("obs-udp", &[web1]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let pairs_after = loop {
        let pairs = lab.pinned_entries("node1", "traffic_v1").len();
        if pairs < pairs_before {
            break pairs;
        }
        assert!(
            Instant::now() < deadline,
            "{pairs} traffic pairs 30 s after a backend left ({pairs_before} before)"
        );
        thread::sleep(Duration::from_millis(200));
    };
    let later = scrape(&ext);
    eprintln!(
        "   {pairs_before} pairs, then {pairs_after}; default/obs to_backend bytes {} then {}",
        web_bytes(&metrics),
        web_bytes(&later)
    );
    assert!(web_bytes(&later) >= web_bytes(&metrics));
    assert_eq!(
        get(
            &later,
            r#"ferry_service_bytes_total{service="default/obs-udp",direction="to_backend"}"#
        ),
        DATAGRAMS as f64 * frame
    );

    eprintln!("== every metric the Grafana dashboard reads is served");
    let dashboard = include_str!("../../deploy/monitoring/grafana-dashboard.json");
    let served: std::collections::BTreeSet<&str> =
        after.keys().map(|k| k.split('{').next().unwrap()).collect();
    // Series that appear once what they count happens.
    let when_it_happens = ["ferry_nat_port_exhaustion_drops_total"];
    let read = metric_names(dashboard);
    for name in &read {
        assert!(
            served.contains(name.as_str()) || when_it_happens.contains(&name.as_str()),
            "the dashboard reads {name}, which node1 does not serve"
        );
    }
    eprintln!("   {} metrics, all served", read.len());

    eprintln!("== proxy-agent monitor on node1 names drops and rejects as they happen");
    let monweb = lab.pod_add("mon-web", "node2", "monweb");
    lab.apply_service(
        "fw",
        json!({
            "type": "LoadBalancer",
            "loadBalancerSourceRanges": ["10.250.0.128/25"],
            "selector": {"app": "monweb"},
            "ports": [http()],
        }),
    );
    lab.wait_endpoints("fw", &[monweb]);
    lab.xtask(&["lb-ip", "fw", "192.0.2.40"]);
    let lb: SocketAddr = (Ipv4Addr::new(192, 0, 2, 40), 80).into();
    let empty = lab.service("empty", "nobody");
    // Programmed once a connection is refused (the reject's ICMP error).
    let refused = |ns: &str| {
        let target: SocketAddr = (empty, 80).into();
        in_netns(ns, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(1))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
    };
    let wait = Instant::now();
    while !refused(&client) {
        assert!(
            wait.elapsed() < Duration::from_secs(20),
            "{empty} never rejected"
        );
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_secs(1));
    let mut monitor = Monitor::start(&lab, "node1", &[]);
    let sent = Instant::now();
    let outside = in_netns(&ext, move || {
        TcpStream::connect_timeout(&lb, Duration::from_millis(300)).is_err()
    });
    assert!(outside, "a client outside the source ranges got through");
    let (after, line) = monitor.line_with("drop_source_range");
    eprintln!(
        "   {:.2} s after the SYN: {line}",
        (after - sent).as_secs_f64()
    );
    assert!(after - sent < Duration::from_secs(1), "{line}");
    assert!(
        line.contains("uplink_xdp") || line.contains("uplink_tc"),
        "{line}"
    );
    assert!(line.contains(&format!("-> {lb}")), "{line}");
    assert!(line.ends_with("service default/fw"), "{line}");
    let sent = Instant::now();
    assert!(refused(&client));
    let (after, line) = monitor.line_with("reject_no_backend");
    eprintln!(
        "   {:.2} s after the SYN: {line}",
        (after - sent).as_secs_f64()
    );
    assert!(after - sent < Duration::from_secs(1), "{line}");
    assert!(line.contains("from_pod"), "{line}");
    assert!(line.contains(&format!("-> {empty}:80")), "{line}");
    assert!(line.ends_with("service default/empty"), "{line}");
    drop(monitor);

    eprintln!("== with --type trace: each packet translated, with its frontend and Service");
    let mut tracer = Monitor::start(&lab, "node1", &["--type", "trace"]);
    let fw: SocketAddr = (lab.cluster_ip("fw"), 80).into();
    let answers = connect_many(&client, fw, 1);
    assert_eq!(count(&answers).get("mon-web"), Some(&1), "{answers:?}");
    let (_, line) = tracer.line_with("fwd_new");
    eprintln!("   {line}");
    assert!(line.contains("from_pod"), "{line}");
    assert!(line.contains(&format!("-> {monweb}:")), "DNATed: {line}");
    assert!(line.contains(&format!("frontend {fw}")), "{line}");
    assert!(line.ends_with("service default/fw"), "{line}");
    let (_, line) = tracer.line_with("rev_nat");
    eprintln!("   {line}");
    assert!(
        line.contains(&format!("TCP {fw} -> ")),
        "from the frontend: {line}"
    );
    assert!(line.ends_with("service default/fw"), "{line}");
    drop(tracer);

    eprintln!(
        "== the API server stops: /healthz says 503 after {} s, /livez stays 200",
        2 * RESYNC_SECONDS
    );
    // From the moment it is told to stop: it closes its watches at once.
    let stopped = Instant::now();
    lab.xtask(&["control-plane", "stop", "kube-apiserver"]);
    wait_healthz(&ext, 503, Duration::from_secs(60));
    let went = stopped.elapsed();
    eprintln!("   503 {:.1} s after the stop", went.as_secs_f64());
    assert!(went >= Duration::from_secs(2 * RESYNC_SECONDS), "{went:?}");
    assert_eq!(status(&ext, "/livez"), 200);
    // Still serving what it had.
    let answers = connect_many(&client, (vip, 80).into(), 5);
    assert_eq!(count(&answers).values().sum::<usize>(), 5);

    eprintln!("== it starts again: 200 after the watches relist and the maps are programmed");
    lab.xtask(&["control-plane", "start", "kube-apiserver"]);
    let back = wait_healthz(&ext, 200, Duration::from_secs(90));
    eprintln!("   200 again {:.1} s after the start", back.as_secs_f64());
    let metrics = scrape(&ext);
    assert!(get(&metrics, "ferry_watch_errors_total") >= 1.0);
    assert!(get(&metrics, r#"kubeproxy_proxy_healthz_total{code="503"}"#) >= 1.0);
}
