//! The socket hooks with real sockets: the real programs attached to a cgroup
//! of the test's own, this process joined to it, clients and backends on
//! loopback inside the test's network namespaces. Frontends are served as the
//! agent serves them (harness). A cgroup holds whole processes, so the tests
//! of this binary take turns (`turn`), with one load of the programs between
//! them: loading is what takes long in the kernel matrix's emulated VMs.

#[path = "support/mod.rs"]
mod support;

use std::{
    collections::HashMap,
    io::{ErrorKind, Read, Write},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
    },
    sync::{Mutex, MutexGuard},
    thread,
    time::Duration,
};

use proxy_agent::{
    frontend::{Cidr, Endpoint, Frontend, FrontendSpec, Protocol},
    harness::Programs,
    kernel::{
        self,
        sock::{own_netns_cookie, SockPrograms},
        Dataplane, SocketLb,
    },
    settings,
};
use support::{cgroup::Cgroup, netns::Lab};

static PROGRAMS: Mutex<Option<Programs>> = Mutex::new(None);

/// This test's turn, with the programs (loaded by the first test).
fn turn() -> MutexGuard<'static, Option<Programs>> {
    let mut programs = PROGRAMS.lock().unwrap_or_else(|e| e.into_inner());
    programs.get_or_insert_with(|| Programs::load().unwrap());
    programs
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 1);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 2);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 3);
const LOCAL_ONLY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 4);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 5);
/// A LoadBalancer IP under externalTrafficPolicy=Local.
const ETP_LOCAL_LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);

fn spec(address: Ipv4Addr, port: u16, protocol: Protocol, backends: &[u16]) -> FrontendSpec {
    FrontendSpec::new(
        format!("{address}:{port}"),
        Frontend {
            address: address.into(),
            port,
            protocol,
        },
        backends
            .iter()
            .map(|p| Endpoint::new(Ipv4Addr::LOCALHOST, *p))
            .collect(),
    )
}

/// TCP listeners on 127.0.0.1 in `ns` that accept and answer each connection
/// with their index; returns their ports.
fn tcp_backends(ns: &str, count: usize) -> Vec<u16> {
    tcp_backends_on(ns, Ipv4Addr::LOCALHOST.into(), count)
}

/// [`tcp_backends`] on the loopback address `lo` (127.0.0.1 or ::1).
fn tcp_backends_on(ns: &str, lo: IpAddr, count: usize) -> Vec<u16> {
    let ns = ns.to_string();
    support::netns::in_netns(&ns, move || {
        (0..count)
            .map(|i| {
                let listener = TcpListener::bind((lo, 0)).unwrap();
                let port = listener.local_addr().unwrap().port();
                thread::spawn(move || {
                    for mut conn in listener.incoming().map_while(Result::ok) {
                        let _ = conn.write_all(&[i as u8]);
                    }
                });
                port
            })
            .collect()
    })
}

/// A UDP server on 127.0.0.1 in `ns` that answers each datagram with its bytes.
fn udp_echo(ns: &str) -> u16 {
    udp_echo_on(ns, Ipv4Addr::LOCALHOST.into())
}

/// [`udp_echo`] on the loopback address `lo`.
fn udp_echo_on(ns: &str, lo: IpAddr) -> u16 {
    support::netns::in_netns(ns, move || {
        let socket = UdpSocket::bind((lo, 0)).unwrap();
        let port = socket.local_addr().unwrap().port();
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        });
        port
    })
}

/// Dials `addr` from `ns`; returns which backend answered and the peer the
/// socket reports.
fn dial(ns: &str, addr: SocketAddrV4) -> std::io::Result<(u8, SocketAddr)> {
    support::netns::in_netns(ns, move || {
        let mut conn = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
        let peer = conn.peer_addr()?;
        let mut which = [0u8; 1];
        conn.read_exact(&mut which)?;
        Ok((which[0], peer))
    })
}

/// The mode that serves the test's own namespace: host where the kernel can
/// name a namespace (5.14, SO_NETNS_COOKIE); before that "host" means the
/// initial namespace, which tests must not send from, so every namespace.
fn serving_mode() -> SocketLb {
    if own_netns_cookie() != 0 {
        SocketLb::Host
    } else {
        SocketLb::All
    }
}

/// The programs (private maps) serving `frontends` alone, their hooks moved
/// to a new cgroup in `mode` with `ns` as the node's namespace, and this
/// process in that cgroup.
fn attach(
    programs: &mut Option<Programs>,
    ns: &str,
    frontends: &[FrontendSpec],
    mode: SocketLb,
) -> Cgroup {
    let programs = programs.as_mut().unwrap();
    programs.serve_checked(frontends).unwrap();
    programs.dp.detach_sockets().unwrap();
    let mut cgroup = Cgroup::new("sock");
    let cookie = support::netns::in_netns(ns, own_netns_cookie);
    programs
        .dp
        .attach_sockets_as(&cgroup.path, mode, cookie)
        .unwrap();
    cgroup.join();
    cgroup
}

#[test]
fn connect_to_a_cluster_ip_spreads_over_backends_and_the_peer_is_the_cluster_ip() {
    let mut programs = turn();
    let mut lab = Lab::new("sock");
    let ns = lab.netns("host");
    let ports = tcp_backends(&ns, 2);
    let _cgroup = attach(
        &mut programs,
        &ns,
        &[spec(VIP, 80, Protocol::Tcp, &ports)],
        serving_mode(),
    );
    let mut answered: HashMap<u8, usize> = HashMap::new();
    for _ in 0..100 {
        let (which, peer) = dial(&ns, SocketAddrV4::new(VIP, 80)).expect("dial the ClusterIP");
        assert_eq!(peer, SocketAddr::from((VIP, 80)), "getpeername");
        *answered.entry(which).or_default() += 1;
    }
    assert_eq!(answered.len(), 2, "both backends answer: {answered:?}");
    // One reverse entry per socket, naming the frontend.
    let entries = programs.as_ref().unwrap().dp.sock_revnat().unwrap();
    let mine = entries
        .iter()
        .filter(|(_, front)| front.addr == proxy_common::Ip4::new(VIP))
        .count();
    assert!(mine >= 100, "{mine} entries");
}

/// The IPv6 hooks: connect() to an IPv6 ClusterIP reaches a backend on ::1
/// and getpeername() says the ClusterIP, an unconnected UDP reply comes from
/// the ClusterIP, a frontend without endpoints refuses at connect().
#[test]
fn ipv6_sockets_are_translated_like_ipv4_ones() {
    let mut programs = turn();
    let mut lab = Lab::new("sock6");
    let ns = lab.netns("host");
    let vip: Ipv6Addr = "fd00:10:96::71".parse().unwrap();
    let dns_vip: Ipv6Addr = "fd00:10:96::72".parse().unwrap();
    let empty_vip: Ipv6Addr = "fd00:10:96::73".parse().unwrap();
    let ports = tcp_backends_on(&ns, Ipv6Addr::LOCALHOST.into(), 2);
    let dns_port = udp_echo_on(&ns, Ipv6Addr::LOCALHOST.into());
    let spec6 = |address: Ipv6Addr, port: u16, protocol, backends: &[u16]| {
        FrontendSpec::new(
            format!("[{address}]:{port}"),
            Frontend {
                address: address.into(),
                port,
                protocol,
            },
            backends
                .iter()
                .map(|p| Endpoint::new(Ipv6Addr::LOCALHOST, *p))
                .collect(),
        )
    };
    let _cgroup = attach(
        &mut programs,
        &ns,
        &[
            spec6(vip, 80, Protocol::Tcp, &ports),
            spec6(dns_vip, 53, Protocol::Udp, &[dns_port]),
            spec6(empty_vip, 80, Protocol::Tcp, &[]),
        ],
        serving_mode(),
    );
    let target = SocketAddr::from((vip, 80));
    let answered = support::netns::in_netns(&ns, move || {
        let mut answered: HashMap<u8, usize> = HashMap::new();
        for _ in 0..50 {
            let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .expect("dial the IPv6 ClusterIP");
            assert_eq!(conn.peer_addr().unwrap(), target, "getpeername");
            let mut which = [0u8; 1];
            conn.read_exact(&mut which).unwrap();
            *answered.entry(which[0]).or_default() += 1;
        }
        answered
    });
    assert_eq!(answered.len(), 2, "both backends answer: {answered:?}");
    let (reply, from) = support::netns::in_netns(&ns, move || {
        let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket.send_to(b"query", (dns_vip, 53)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).expect("the reply");
        (buf[..n].to_vec(), from)
    });
    assert_eq!(reply, b"query");
    assert_eq!(from, SocketAddr::from((dns_vip, 53)), "recvfrom's source");
    let refused = support::netns::in_netns(&ns, move || {
        TcpStream::connect_timeout(&(empty_vip, 80).into(), Duration::from_secs(5)).unwrap_err()
    });
    let expected = match programs.as_ref().unwrap().dp.sock_programs() {
        Some(SockPrograms::Errno) => ErrorKind::ConnectionRefused,
        _ => ErrorKind::PermissionDenied,
    };
    assert_eq!(refused.kind(), expected, "{refused}");
}

/// A dual-stack program's IPv6 socket dialling an IPv4 ClusterIP as an
/// IPv4-mapped address (`::ffff:10.96.7.1`): connect() reaches an IPv4
/// backend and getpeername() says the mapped ClusterIP, an unconnected UDP
/// reply comes from the mapped ClusterIP, a frontend without endpoints
/// refuses; the reverse entries are IPv4's.
#[test]
fn an_ipv6_socket_dialling_an_ipv4_mapped_cluster_ip_is_translated() {
    let mut programs = turn();
    let mut lab = Lab::new("sockmap");
    let ns = lab.netns("host");
    let ports = tcp_backends(&ns, 2);
    let dns_port = udp_echo(&ns);
    let _cgroup = attach(
        &mut programs,
        &ns,
        &[
            spec(VIP, 80, Protocol::Tcp, &ports),
            spec(DNS_VIP, 53, Protocol::Udp, &[dns_port]),
            spec(EMPTY_VIP, 80, Protocol::Tcp, &[]),
        ],
        serving_mode(),
    );
    let target = SocketAddr::from((VIP.to_ipv6_mapped(), 80));
    let answered = support::netns::in_netns(&ns, move || {
        let mut answered: HashMap<u8, usize> = HashMap::new();
        for _ in 0..50 {
            let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .expect("dial the mapped ClusterIP");
            assert_eq!(conn.peer_addr().unwrap(), target, "getpeername");
            let mut which = [0u8; 1];
            conn.read_exact(&mut which).unwrap();
            *answered.entry(which[0]).or_default() += 1;
        }
        answered
    });
    assert_eq!(answered.len(), 2, "both backends answer: {answered:?}");
    let dns = SocketAddr::from((DNS_VIP.to_ipv6_mapped(), 53));
    let (reply, from) = support::netns::in_netns(&ns, move || {
        let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket.send_to(b"query", dns).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).expect("the reply");
        (buf[..n].to_vec(), from)
    });
    assert_eq!(reply, b"query");
    assert_eq!(from, dns, "recvfrom's source");
    let empty = SocketAddr::from((EMPTY_VIP.to_ipv6_mapped(), 80));
    let refused = support::netns::in_netns(&ns, move || {
        TcpStream::connect_timeout(&empty, Duration::from_secs(5)).unwrap_err()
    });
    let programs = programs.as_ref().unwrap();
    let expected = match programs.dp.sock_programs() {
        Some(SockPrograms::Errno) => ErrorKind::ConnectionRefused,
        _ => ErrorKind::PermissionDenied,
    };
    assert_eq!(refused.kind(), expected, "{refused}");
    let entries = programs.dp.sock_revnat().unwrap();
    let mine = entries
        .iter()
        .filter(|(_, front)| front.addr == proxy_common::Ip4::new(VIP))
        .count();
    assert!(mine >= 50, "{mine} IPv4 reverse entries");
}

#[test]
fn an_unconnected_udp_reply_comes_from_the_cluster_ip() {
    let mut programs = turn();
    let mut lab = Lab::new("sockudp");
    let ns = lab.netns("host");
    let port = udp_echo(&ns);
    let _cgroup = attach(
        &mut programs,
        &ns,
        &[spec(DNS_VIP, 53, Protocol::Udp, &[port])],
        serving_mode(),
    );
    let (reply, from) = support::netns::in_netns(&ns, || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket.send_to(b"query", (DNS_VIP, 53)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).expect("the reply");
        (buf[..n].to_vec(), from)
    });
    assert_eq!(reply, b"query");
    assert_eq!(from, SocketAddr::from((DNS_VIP, 53)), "recvfrom's source");
}

#[test]
fn a_frontend_without_endpoints_refuses_at_connect() {
    let mut programs = turn();
    let mut lab = Lab::new("sockempty");
    let ns = lab.netns("host");
    let mut local_only = spec(LOCAL_ONLY_VIP, 80, Protocol::Tcp, &[]);
    local_only.local_only = true;
    // externalTrafficPolicy=Local without an endpoint on this node: the
    // node's own sockets go to the cluster's endpoints, as with kube-proxy.
    let mut etp_local = spec(ETP_LOCAL_LB, 80, Protocol::Tcp, &[]);
    etp_local.local_only = true;
    etp_local.cluster_endpoints =
        spec(ETP_LOCAL_LB, 80, Protocol::Tcp, &tcp_backends(&ns, 1)).endpoints;
    let _cgroup = attach(
        &mut programs,
        &ns,
        &[
            spec(EMPTY_VIP, 80, Protocol::Tcp, &[]),
            spec(EMPTY_VIP, 80, Protocol::Udp, &[]),
            local_only,
            etp_local,
        ],
        serving_mode(),
    );
    let (which, peer) = dial(&ns, SocketAddrV4::new(ETP_LOCAL_LB, 80)).expect("served");
    assert_eq!((which, peer), (0, SocketAddr::from((ETP_LOCAL_LB, 80))));
    let (refused, eperm) = match programs.as_ref().unwrap().dp.sock_programs().unwrap() {
        SockPrograms::Errno => (libc::ECONNREFUSED, libc::EHOSTUNREACH),
        SockPrograms::Eperm => (libc::EPERM, libc::EPERM),
    };
    let err = dial(&ns, SocketAddrV4::new(EMPTY_VIP, 80)).expect_err("no endpoints");
    assert_eq!(err.raw_os_error(), Some(refused), "{err}");
    // An address of the service CIDRs that no frontend serves: an
    // unallocated ClusterIP, or a port its ClusterIP does not serve.
    let mut with_cidrs = |cidrs: &[&str]| {
        let cidrs: Vec<Cidr> = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        let config = settings::node_config(
            None,
            None,
            settings::DEFAULT_NAT_PORTS,
            settings::service_cidrs(&cidrs).unwrap(),
        );
        programs.as_mut().unwrap().dp.set_config(&config).unwrap();
    };
    with_cidrs(&["10.96.7.0/24"]);
    for unserved in [
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 7, 99), 80),
        SocketAddrV4::new(EMPTY_VIP, 81),
    ] {
        let err = dial(&ns, unserved).expect_err("not a Service");
        assert_eq!(err.raw_os_error(), Some(refused), "{unserved}: {err}");
    }
    with_cidrs(&[]);
    // internalTrafficPolicy=Local without an endpoint on this node.
    let err = dial(&ns, SocketAddrV4::new(LOCAL_ONLY_VIP, 80)).expect_err("no local endpoint");
    assert_eq!(err.raw_os_error(), Some(eperm), "{err}");
    // UDP too, at connect() and at sendto().
    let (connected, sent) = support::netns::in_netns(&ns, || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let sent = socket.send_to(b"x", (EMPTY_VIP, 80)).map(|_| ());
        (socket.connect((EMPTY_VIP, 80)), sent)
    });
    assert_eq!(connected.unwrap_err().raw_os_error(), Some(refused));
    assert_eq!(sent.unwrap_err().raw_os_error(), Some(refused));
}

#[test]
fn session_affinity_holds_for_the_node_s_sockets() {
    let mut programs = turn();
    let mut lab = Lab::new("sockaff");
    let ns = lab.netns("host");
    let ports = tcp_backends(&ns, 4);
    let mut sticky = spec(STICKY_VIP, 80, Protocol::Tcp, &ports);
    sticky.affinity_timeout = Some(10_800);
    let _cgroup = attach(&mut programs, &ns, &[sticky], serving_mode());
    let (first, _) = dial(&ns, SocketAddrV4::new(STICKY_VIP, 80)).unwrap();
    for _ in 0..30 {
        let (which, _) = dial(&ns, SocketAddrV4::new(STICKY_VIP, 80)).unwrap();
        assert_eq!(which, first, "affinity");
    }
}

#[test]
fn host_mode_serves_the_node_s_namespace_only_and_all_serves_every_one() {
    let mut programs = turn();
    let mut lab = Lab::new("sockns");
    let host = lab.netns("host");
    let pod = lab.netns("pod");
    let host_port = udp_echo(&host);
    let pod_port = udp_echo(&pod);
    // The same frontend reaches each namespace's own 127.0.0.1.
    let frontends = [spec(DNS_VIP, 53, Protocol::Udp, &[host_port, pod_port])];
    let connect = |ns: &str| {
        support::netns::in_netns(ns, || {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            socket.connect((DNS_VIP, 53)).map(|()| socket.peer_addr())
        })
    };
    let cgroup = attach(&mut programs, &host, &frontends, SocketLb::Host);
    let unreachable = |r: std::io::Result<std::io::Result<SocketAddr>>| {
        // Untranslated, the ClusterIP has no route in a namespace with loopback only.
        assert_eq!(
            r.err().map(|e| e.kind()),
            Some(ErrorKind::NetworkUnreachable)
        );
    };
    unreachable(connect(&pod));
    if own_netns_cookie() != 0 {
        let peer = connect(&host).expect("translated").unwrap();
        assert_eq!(peer, SocketAddr::from((DNS_VIP, 53)));
    } else {
        // Before 5.14 the node's namespace is the initial one.
        unreachable(connect(&host));
    }
    drop(cgroup);
    let _cgroup = attach(&mut programs, &host, &frontends, SocketLb::All);
    let peer = connect(&pod).expect("translated").unwrap();
    assert_eq!(peer, SocketAddr::from((DNS_VIP, 53)));
}

#[test]
fn pinned_hooks_outlive_the_agent_and_the_next_one_takes_them_over() {
    let _turn = turn();
    let mut lab = Lab::new("sockpin");
    let ns = lab.netns("host");
    let ports = tcp_backends(&ns, 2);
    let frontends = [spec(VIP, 80, Protocol::Tcp, &ports)];
    let mut cgroup = Cgroup::new("sockpin");
    cgroup.join();
    let agent = |pin_dir: std::path::PathBuf| {
        let path = cgroup.path.clone();
        let frontends = frontends.to_vec();
        support::netns::in_netns(&ns, move || {
            // As the agent starts: the maps it finds pinned are what it serves from.
            let mut programs = Programs::with(
                Dataplane::load_pinned(
                    &pin_dir,
                    &Default::default(),
                    true,
                    proxy_agent::kernel::diag::LogLevel::ALL,
                )
                .unwrap(),
            )
            .unwrap();
            programs
                .programmed
                .replace_applied(programs.dp.read_state().unwrap());
            programs.programmed.ids =
                proxy_agent::desired::Ids::from_state(programs.programmed.applied());
            programs.serve(&frontends).unwrap();
            programs.dp.attach_sockets(&path, serving_mode()).unwrap();
        })
    };
    agent(lab.pin_dir.clone());
    // The agent is gone (its maps and programs dropped): the pins hold them.
    let ns2 = ns.clone();
    let held = support::netns::in_netns(&ns, move || {
        TcpStream::connect((VIP, 80)).expect("dial with no agent running")
    });
    assert_eq!(held.peer_addr().unwrap(), SocketAddr::from((VIP, 80)));
    // The next agent swaps its programs into the pinned links.
    agent(lab.pin_dir.clone());
    assert_eq!(held.peer_addr().unwrap(), SocketAddr::from((VIP, 80)));
    let (_, peer) = dial(&ns2, SocketAddrV4::new(VIP, 80)).expect("dial after the takeover");
    assert_eq!(peer, SocketAddr::from((VIP, 80)));
    let links = std::fs::read_dir(&lab.pin_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("cgroup_"))
        .count();
    assert_eq!(
        links, 8,
        "one pinned link per hook (four per family), none added by the restart"
    );
    // Cleanup unpins the links: the hooks go with them. bpffs drops its
    // reference after an RCU grace period, so the detach follows the unlink
    // shortly (on 5.10 under emulation, after the next dial).
    kernel::cleanup(&lab.pin_dir).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match dial(&ns2, SocketAddrV4::new(VIP, 80)) {
            Err(err) => break err,
            Ok(answer) if std::time::Instant::now() > deadline => {
                panic!("a hook still translates 10 s after cleanup: {answer:?}")
            }
            Ok(_) => thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(err.kind(), ErrorKind::NetworkUnreachable, "{err}");
}
