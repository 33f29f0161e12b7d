//! Lab tests of the packets around a Service's flows that kube-proxy gets
//! right through netfilter: ICMP errors about translated flows (path-MTU
//! discovery through a ClusterIP), datagrams in fragments, and SCTP.

mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use proxy_common::{ct_flags, map_names, stats::Stat};
use serde_json::json;
use support::{sctp, *};

/// The bulk server's port in its pod (the lab pods' own server greets and
/// waits; this one counts what it is sent).
const BULK_PORT: u16 = 9000;
const TRANSFER: usize = 10 << 20;
/// The MTU of the link into the backend pod: smaller than the client's.
const SMALL_MTU: u32 = 1280;
/// The big-answer server's UDP port in its pod, and its sizes: a query and
/// an answer (an EDNS answer's size) over the 1500-byte MTU, both cut into
/// fragments by their sender.
const BIG_UDP_PORT: u16 = 9053;
const QUERY: usize = 3000;
const ANSWER: usize = 6000;
/// The SCTP Service's port (Diameter's), and its backend's own.
const SCTP_PORT: u16 = 3868;
const SCTP_TARGET_PORT: u16 = 9868;

/// Answers one datagram on `BIG_UDP_PORT` inside `ns` with `ANSWER` bytes
/// that start with the size of the query. Returns once it listens.
fn big_udp_server(ns: String) -> thread::JoinHandle<usize> {
    let (listening, ready) = mpsc::channel();
    let server = thread::spawn(move || {
        in_netns(&ns, move || {
            let sock = UdpSocket::bind(("0.0.0.0", BIG_UDP_PORT)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            listening.send(()).unwrap();
            let mut buf = vec![0u8; 65536];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            let mut answer = format!("{n}\n").into_bytes();
            answer.resize(ANSWER, 0x5a);
            sock.send_to(&answer, from).unwrap();
            n
        })
    });
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("the UDP server listens");
    server
}

/// Serves one connection on `BULK_PORT` inside `ns`: reads to the end and
/// answers with the count. Returns once it listens.
fn bulk_server(ns: String) -> thread::JoinHandle<usize> {
    let (listening, ready) = mpsc::channel();
    let server = thread::spawn(move || {
        in_netns(&ns, move || {
            let listener = TcpListener::bind(("0.0.0.0", BULK_PORT)).unwrap();
            listening.send(()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut received = 0;
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => received += n,
                    Err(e) => panic!("bulk server, after {received} bytes: {e}"),
                }
            }
            conn.write_all(format!("{received}\n").as_bytes()).unwrap();
            received
        })
    });
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("the bulk server listens");
    server
}

/// The node-side end of the link into the pod at `addr`, in `node_ns`.
fn link_to(node_ns: &str, addr: Ipv4Addr) -> String {
    let out = Command::new("ip")
        .args(["-n", node_ns, "-o", "route", "get", &addr.to_string()])
        .output()
        .unwrap();
    let route = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = route.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "dev")
        .and_then(|_| words.next())
        .unwrap_or_else(|| panic!("no device in {route:?}"))
        .to_string()
}

/// One lab for both (lab tests of one binary would share its name).
#[test]
fn lab_icmp_errors_and_fragments_through_a_cluster_ip() {
    let lab = Lab::up();
    lab.xtask(&["pod", "add", "client", "--node", "node1"]);
    let client = lab.pod_ns("client");
    path_mtu_discovery(&lab, &client);
    udp_datagrams_in_fragments(&lab, &client);
    sctp_echo(&lab, &client);
}

/// A TCP transfer through a ClusterIP across a link of a smaller MTU.
fn path_mtu_discovery(lab: &Lab, client: &str) {
    let backend = lab.pod_add("bulk-1", "node2", "bulk");
    lab.apply_service(
        "bulk",
        json!({
            "selector": {"app": "bulk"},
            "ports": [{"name": "bulk", "port": 80, "targetPort": BULK_PORT, "protocol": "TCP"}],
        }),
    );
    lab.wait_endpoints("bulk", &[backend]);
    let vip = lab.cluster_ip("bulk");

    eprintln!(
        "== {TRANSFER} bytes from a pod on node1 through {vip}:80 to a pod on node2 behind a link of MTU {SMALL_MTU}"
    );
    // node2 forwards the client's full-size segments into a smaller link:
    // it answers each with "fragmentation needed", about the DNATed
    // segment. Only translated back (about the ClusterIP) does the client
    // learn the path's MTU; untranslated, its kernel finds no socket for
    // the error and the transfer stalls at the first full segment.
    let node2 = lab.node_ns("node2");
    let link = link_to(&node2, backend);
    let status = Command::new("ip")
        .args(["-n", &node2, "link", "set", "dev", &link, "mtu"])
        .arg(SMALL_MTU.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "set {link}'s MTU in {node2}");
    let translated_before = lab.agent_counter("node1", Stat::RevNatIcmp.index());
    let server = bulk_server(lab.pod_ns("bulk-1"));
    let started = Instant::now();
    let answer = in_netns(client, move || {
        let target = SocketAddr::from((vip, 80));
        let mut s = TcpStream::connect_timeout(&target, TIMEOUT)?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let chunk = vec![0x5au8; 1 << 16];
        for _ in 0..TRANSFER / chunk.len() {
            s.write_all(&chunk)?;
        }
        s.shutdown(Shutdown::Write)?;
        read_line(&mut s)
    });
    let elapsed = started.elapsed();
    eprintln!("   answer {answer:?} after {:.1} s", elapsed.as_secs_f64());
    assert_eq!(
        answer.expect("the transfer completes"),
        TRANSFER.to_string(),
        "every byte arrived"
    );
    assert_eq!(server.join().unwrap(), TRANSFER);
    let translated = lab.agent_counter("node1", Stat::RevNatIcmp.index()) - translated_before;
    eprintln!("   node1 translated {translated} ICMP errors back for the client");
    assert!(
        translated >= 1,
        "the client learnt the MTU from a translated error"
    );
}

/// A UDP query and its answer, both larger than the MTU, through a ClusterIP.
fn udp_datagrams_in_fragments(lab: &Lab, client: &str) {
    let backend = lab.pod_add("big-1", "node2", "big");
    lab.apply_service(
        "big",
        json!({
            "selector": {"app": "big"},
            "ports": [{"name": "big", "port": 53, "targetPort": BIG_UDP_PORT, "protocol": "UDP"}],
        }),
    );
    lab.wait_endpoints("big", &[backend]);
    let vip = lab.cluster_ip("big");

    eprintln!("== a {QUERY}-byte query to {vip}:53 from a pod on node1, a {ANSWER}-byte answer from node2, both in fragments");
    let fragments_before = lab.agent_counter("node1", Stat::PassFragment.index());
    let server = big_udp_server(lab.pod_ns("big-1"));
    let (from, answer) = in_netns(client, move || {
        // A connected socket, as resolvers use: it takes datagrams from
        // the ClusterIP only.
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect((vip, 53)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send(&vec![0xa5u8; QUERY]).unwrap();
        let mut buf = vec![0u8; 65536];
        let (n, from) = sock.recv_from(&mut buf).expect("the answer, whole");
        (from, buf[..n].to_vec())
    });
    assert_eq!(server.join().unwrap(), QUERY, "the query arrived whole");
    assert_eq!(from, SocketAddr::from((vip, 53)), "from the ClusterIP");
    assert_eq!(answer.len(), ANSWER, "the answer arrived whole");
    assert!(answer.starts_with(format!("{QUERY}\n").as_bytes()));
    let untouched = lab.agent_counter("node1", Stat::PassFragment.index()) - fragments_before;
    assert_eq!(untouched, 0, "no fragment went on untranslated");
}

/// Node1's conntrack entries of SCTP flows: (direction, flags) of each.
fn sctp_flows(lab: &Lab) -> Vec<(u64, u64)> {
    lab.pinned_entries("node1", map_names::CONNTRACK_V4)
        .iter()
        .filter(|e| e["formatted"]["key"]["proto"].as_u64() == Some(sctp::IPPROTO_SCTP as u64))
        .map(|e| {
            (
                e["formatted"]["key"]["dir"].as_u64().unwrap(),
                e["formatted"]["value"]["flags"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// An SCTP association through a ClusterIP whose port differs from its
/// backend's: every packet's CRC32c right after the port change, the
/// answers from the ClusterIP, and the flow closed by its shutdown.
fn sctp_echo(lab: &Lab, client: &str) {
    let backend = lab.pod_add("sctp-1", "node2", "sctp");
    lab.apply_service(
        "sctp",
        json!({
            "selector": {"app": "sctp"},
            "ports": [{"name": "diameter", "port": SCTP_PORT, "targetPort": SCTP_TARGET_PORT, "protocol": "SCTP"}],
        }),
    );
    lab.wait_endpoints("sctp", &[backend]);
    let vip = lab.cluster_ip("sctp");
    let client_addr = lab_pod_addr(&lab.xtask(&["status"]), "client");

    eprintln!("== an SCTP association from a pod on node1 to {vip}:{SCTP_PORT}, served on node2 at {backend}:{SCTP_TARGET_PORT}");
    // Both ends are raw sockets (the host kernel may lack SCTP): they check
    // each packet's CRC32c, which a kernel would use to drop it silently.
    let (listening, ready) = mpsc::channel();
    let server = thread::spawn({
        let ns = lab.pod_ns("sctp-1");
        move || {
            in_netns(&ns, move || {
                let ep = sctp::Endpoint::bind(SCTP_TARGET_PORT);
                listening.send(()).unwrap();
                sctp::serve_echo(ep)
            })
        }
    });
    ready.recv_timeout(Duration::from_secs(10)).unwrap();
    // Messages from one byte to one whose echo, bundled after a SACK, fills
    // a 1500-byte packet (IP 20, common header 12, SACK 16, DATA header 16
    // bytes), so the CRC is fixed over lengths of every size class. A
    // larger one would go in IP fragments, which the programs pass
    // untranslated: SCTP stacks cut messages to the path MTU themselves.
    let messages: Vec<Vec<u8>> = [1usize, 3, 64, 333, 1000, 1436]
        .iter()
        .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
        .collect();
    let (established, at_rest) = mpsc::channel();
    let (go_on, resume) = mpsc::channel::<()>();
    let client_thread = thread::spawn({
        let ns = client.to_string();
        let messages = messages.clone();
        move || {
            in_netns(&ns, move || {
                let ep = sctp::Endpoint::bind(38_680);
                sctp::echo(
                    ep,
                    SocketAddrV4::new(vip, SCTP_PORT),
                    &messages,
                    move || {
                        established.send(()).unwrap();
                        resume.recv().unwrap();
                    },
                )
            })
        }
    });
    at_rest
        .recv_timeout(Duration::from_secs(30))
        .expect("the association is established and every message echoed");
    let open = sctp_flows(lab);
    eprintln!("   established: conntrack holds (dir, flags) {open:?}");
    go_on.send(()).unwrap();
    let echoed = client_thread.join().expect("the client's association");
    let served = server.join().expect("the server's association");
    eprintln!(
        "   the client heard {} answers from {}; the server served {} messages to {}",
        echoed.answers.len(),
        echoed.from,
        served.messages,
        served.client
    );
    assert_eq!(
        echoed.from,
        SocketAddrV4::new(vip, SCTP_PORT),
        "answered by the ClusterIP"
    );
    assert_eq!(echoed.answers, messages, "every message echoed whole");
    assert_eq!(
        served.client,
        SocketAddrV4::new(client_addr, 38_680),
        "the client's own address"
    );
    assert_eq!(
        echoed.bad_crcs,
        vec![],
        "packets to the client with a wrong CRC32c"
    );
    assert_eq!(
        served.bad_crcs,
        vec![],
        "packets to the backend with a wrong CRC32c"
    );
    assert_eq!(
        open.iter()
            .filter(|(_, flags)| flags & u64::from(ct_flags::CLOSING) == 0)
            .count(),
        2,
        "an open flow's forward and reply entries: {open:?}"
    );
    let closed = sctp_flows(lab);
    eprintln!("   after SHUTDOWN COMPLETE: {closed:?}");
    assert!(
        closed
            .iter()
            .all(|(_, flags)| flags & u64::from(ct_flags::CLOSING) != 0),
        "the shutdown closed the flow: {closed:?}"
    );
}
