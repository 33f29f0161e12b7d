//! Lab test of NAT ports: NodePort connections to a backend on another node
//! are SNATed to a node port each; many times more connections than the NAT
//! range holds all succeed, because each flow's NAT entry ends with it.

mod support;

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use proxy_common::{map_names, nat_ports, stats::Stat};
use serde_json::json;
use support::*;

const NODE1: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
const NODE_PORT: u16 = 30077;
/// node1's NAT ports in this test: far fewer than the connections made.
const NAT_MIN: u16 = 62000;
const NAT_MAX: u16 = 63499;
const CONNECTIONS: usize = 20_000;
/// New connections per second. Closed flows hold their ports for the close
/// timeout (1 s here) plus up to one collection interval (1 s), so this rate
/// needs about 400 of the 1500 ports at any time: the margin covers a
/// collection delayed by a busy machine (at 250/s with 1000 ports, one
/// connection in 20,000 was dropped under a load of 11).
const RATE: f64 = 200.0;

/// Ports the NAT-port bitmaps mark held (summary and counter words aside).
fn ports_marked(lab: &Lab) -> u32 {
    lab.pinned_entries("node1", map_names::NAT_PORTS_V4)
        .iter()
        .filter(|e| e["formatted"]["key"]["index"].as_u64().unwrap() < u64::from(nat_ports::WORDS))
        .map(|e| e["formatted"]["value"].as_u64().unwrap().count_ones())
        .sum()
}

#[test]
fn lab_nodeport_to_a_remote_backend_outlasts_its_nat_port_range_many_times() {
    let lab = Lab::up();
    let ext = format!("{}-ext", lab.name);
    let pod = lab.pod_add("natprobe-1", "node2", "natprobe");
    lab.apply_service(
        "natprobe",
        json!({
            "type": "NodePort",
            "selector": {"app": "natprobe"},
            "ports": [
                {"port": 80, "targetPort": 8080, "nodePort": NODE_PORT, "protocol": "TCP"},
            ],
        }),
    );
    lab.wait_endpoints("natprobe", &[pod]);
    lab.xtask(&["agent", "stop", "node1"]);
    lab.xtask(&[
        "agent",
        "start",
        "node1",
        "--",
        "--nat-ports",
        &format!("{NAT_MIN}-{NAT_MAX}"),
        "--conntrack-gc-seconds",
        "1",
        "--conntrack-tcp-close-seconds",
        "1",
    ]);

    eprintln!(
        "== {CONNECTIONS} sequential connections from outside to {NODE1}:{NODE_PORT} (backend on node2), {} NAT ports",
        NAT_MAX - NAT_MIN + 1
    );
    let started = Instant::now();
    let failures = in_netns(&ext, move || {
        let target = SocketAddr::from((NODE1, NODE_PORT));
        let start = Instant::now();
        let mut failures: Vec<(usize, String)> = Vec::new();
        for i in 0..CONNECTIONS {
            let due = start + Duration::from_secs_f64(i as f64 / RATE);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let answer =
                TcpStream::connect_timeout(&target, Duration::from_secs(1)).and_then(|mut s| {
                    s.set_read_timeout(Some(TIMEOUT))?;
                    read_line(&mut s)
                });
            // The backend on node2 answered, and saw node1's address with a
            // port of its NAT range.
            let seen = answer.as_ref().ok().and_then(|a| {
                let peer: SocketAddr = a.split_whitespace().nth(1)?.parse().ok()?;
                Some((pod_of(a).to_string(), peer))
            });
            match seen {
                Some((pod, SocketAddr::V4(peer)))
                    if pod == "natprobe-1"
                        && *peer.ip() == NODE1
                        && (NAT_MIN..=NAT_MAX).contains(&peer.port()) => {}
                _ => failures.push((i, format!("{answer:?}"))),
            }
        }
        failures
    });
    let elapsed = started.elapsed();
    eprintln!(
        "   {} failed, in {:.1} s ({:.0} connections/s)",
        failures.len(),
        elapsed.as_secs_f64(),
        CONNECTIONS as f64 / elapsed.as_secs_f64()
    );
    let dropped = lab.agent_counter("node1", Stat::DropNatPorts.index());
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections failed (drop_nat_ports {dropped}); the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(dropped, 0);

    eprintln!("== afterwards the NAT map and its port bitmaps hold no flow");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let nat = lab.pinned_entries("node1", map_names::NAT_V4).len();
        let marked = ports_marked(&lab);
        if nat == 0 && marked == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{nat} NAT entries and {marked} ports marked held, 15 s after the last connection"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let metrics = http_get(&ext, (NODE1, 10249).into(), "/metrics");
    assert!(metrics.contains("\nferry_nat_entries 0\n"), "{metrics}");
    assert!(
        !metrics.contains("ferry_nat_port_exhaustion_drops_total{"),
        "{metrics}"
    );
}
